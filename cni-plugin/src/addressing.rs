//! Where a pod's address comes from: the built-in allocator, or the `ipam`
//! plugin of the config (host-local, static, dhcp).
use std::net::Ipv4Addr;

use beeline_ipam::{IpStore, Owner, Pod, Record};
use ipnet::Ipv4Net;
use tracing::info;

use crate::{
    config::{Env, NetConf},
    delegate::{Delegate, first_ipv4},
    error::{CniError, Result, code},
    link,
};

pub enum Addressing<'a> {
    Builtin { store: IpStore, owner: Owner },
    Delegated(Delegate<'a>),
}

impl<'a> Addressing<'a> {
    pub fn new(env: &'a Env, conf: &'a NetConf, stdin: &'a [u8]) -> Result<Addressing<'a>> {
        Ok(match conf.ipam_type() {
            Some(plugin) => Addressing::Delegated(Delegate { plugin, env, stdin }),
            None => Addressing::Builtin {
                store: IpStore::open(conf.ipam_dir())?,
                owner: owner(env),
            },
        })
    }

    /// The built-in allocator's store, if this network uses it.
    pub fn store(&self) -> Option<&IpStore> {
        match self {
            Addressing::Builtin { store, .. } => Some(store),
            Addressing::Delegated(_) => None,
        }
    }

    /// An address for the pod `pod` names.
    pub fn acquire(&self, pod_cidr: Ipv4Net, pod: &Pod) -> Result<Ipv4Addr> {
        match self {
            Addressing::Builtin { store, owner } => {
                let record = Record {
                    owner: owner.clone(),
                    pod: Some(pod.clone()),
                };
                Ok(store.allocate(pod_cidr, &record, pod_is_gone)?)
            }
            Addressing::Delegated(d) => {
                let result = d.exec("ADD")?.ok_or_else(|| {
                    CniError::new(code::IPAM_DELEGATE, "the IPAM plugin printed no result")
                })?;
                first_ipv4(&result)
            }
        }
    }

    pub fn release(&self) -> Result<()> {
        match self {
            Addressing::Builtin { store, owner } => {
                let released = store.release(owner)?;
                info!(?released, "released addresses");
                Ok(())
            }
            Addressing::Delegated(d) => d.exec("DEL").map(|_| ()),
        }
    }
}

pub fn owner(env: &Env) -> Owner {
    Owner {
        container_id: env.container_id.clone(),
        ifname: env.ifname.clone(),
    }
}

/// Whether the pod a record names is gone: its netns is (path missing or
/// another netns there now) and so is its host veth. Either alone is not
/// enough: a netns path can be unmounted while a process holds the netns,
/// and a veth can be deleted by hand while the pod lives.
pub fn pod_is_gone(record: &Record) -> bool {
    let Some(pod) = &record.pod else {
        return false;
    };
    let veth = link::host_ifname(&record.owner.container_id, &record.owner.ifname);
    pod.netns_gone()
        && matches!(
            nix::net::if_::if_nametoindex(veth.as_str()),
            Err(nix::errno::Errno::ENODEV)
        )
}
