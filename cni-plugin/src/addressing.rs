//! Where a pod's address comes from: the built-in allocator, or the `ipam`
//! plugin of the config (host-local, static, dhcp).
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use tracing::info;

use crate::{
    config::{Env, NetConf},
    delegate::{Delegate, first_ipv4},
    error::{CniError, Result, code},
    ipam::{IpStore, Owner},
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
                owner: Owner {
                    container_id: env.container_id.clone(),
                    ifname: env.ifname.clone(),
                },
            },
        })
    }

    pub fn acquire(&self, pod_cidr: Ipv4Net) -> Result<Ipv4Addr> {
        match self {
            Addressing::Builtin { store, owner } => store.allocate(pod_cidr, owner),
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
            Addressing::Builtin { store, owner } => store.release(owner).map(|released| {
                info!(?released, "released addresses");
            }),
            Addressing::Delegated(d) => d.exec("DEL").map(|_| ()),
        }
    }
}
