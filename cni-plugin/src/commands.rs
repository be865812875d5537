//! ADD, DEL, GC and STATUS.
use std::{
    collections::{HashMap, HashSet},
    net::Ipv4Addr,
};

use beeline_proto::{Client, ClientError, Endpoint};
use ipnet::Ipv4Net;
use serde_json::Value;
use tracing::{info, warn};

use crate::{
    config::{Env, NetConf},
    delegate::{Delegate, first_ipv4},
    error::{CniError, Result, code, from_agent},
    ipam::{IpStore, Owner},
    link, netns,
    result::{AddResult, Interface},
};

/// Where the pod's address comes from: the built-in allocator, or the
/// `ipam` plugin of the config.
enum Addressing<'a> {
    Builtin { store: IpStore, owner: Owner },
    Delegated(Delegate<'a>),
}

impl<'a> Addressing<'a> {
    fn new(env: &'a Env, conf: &'a NetConf, stdin: &'a [u8]) -> Result<Addressing<'a>> {
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

    fn acquire(&self, pod_cidr: Ipv4Net) -> Result<Ipv4Addr> {
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

    fn release(&self) -> Result<()> {
        match self {
            Addressing::Builtin { store, owner } => store.release(owner).map(|released| {
                info!(?released, "released addresses");
            }),
            Addressing::Delegated(d) => d.exec("DEL").map(|_| ()),
        }
    }
}

pub async fn add(env: &Env, conf: &NetConf, stdin: &[u8]) -> Result<Value> {
    let netns_path = env.netns.as_ref().expect("ADD requires CNI_NETNS");
    let netns = netns::open(netns_path)?;
    let agent = Client::new(conf.agent_socket());
    // Ask the agent while the netlink sockets are opened.
    let node = tokio::task::spawn_blocking({
        let agent = agent.clone();
        move || agent.node_info()
    });
    let host = netns::netlink_here()?;
    let pod = netns::netlink_in(&netns)?;
    let node = node
        .await
        .expect("the node_info task does not panic")
        .map_err(from_agent)?;
    let pod_cidr: Ipv4Net = node.pod_cidr.parse().map_err(|e| {
        CniError::new(
            code::AGENT_REFUSED,
            format!("the agent reported an invalid podCIDR {:?}", node.pod_cidr),
        )
        .with_details(e)
    })?;
    let mtu = conf.mtu.unwrap_or(node.mtu);
    let host_ifname = link::host_ifname(&env.container_id, &env.ifname);
    if link::link_by_name(&host, &host_ifname).await?.is_some() {
        return Err(CniError::new(
            code::INTERFACE_EXISTS,
            format!(
                "interface {} of container {} is already set up (host side {host_ifname}); \
                 DEL it first",
                env.ifname, env.container_id
            ),
        ));
    }

    let addressing = Addressing::new(env, conf, stdin)?;
    // A node-local DHCP server answers the pod on its host veth, so that
    // end carries the pod's gateway address.
    let needs_link = conf.ipam_talks_on_link();
    let host_address = needs_link.then_some(node.gateway);
    let mut acquired = false;
    let setup = async {
        // Allocating first leaves a record that names the attachment, so
        // GC finds an ADD killed at any later point. dhcp talks over the
        // pod's interface: it runs once that exists and is up.
        let early = if needs_link {
            None
        } else {
            acquired = true;
            Some(addressing.acquire(pod_cidr)?)
        };
        let alias = link::attachment_alias(&conf.name, &env.container_id, &env.ifname);
        let veth = link::create_veth(&host, &pod, &netns, &host_ifname, &env.ifname, mtu).await?;
        let (ip, configured_early) = match early {
            Some(ip) => (ip, false),
            None => {
                link::bring_up(&host, &pod, &veth, &alias, host_address).await?;
                acquired = true;
                (addressing.acquire(pod_cidr)?, true)
            }
        };
        if !pod_cidr.contains(&ip) {
            return Err(CniError::new(
                code::IPAM_DELEGATE,
                format!(
                    "the IPAM plugin returned {ip}, outside this node's podCIDR {pod_cidr}: \
                     other nodes would not route it here"
                ),
            ));
        }
        let endpoint = Endpoint {
            container_id: env.container_id.clone(),
            ifname: env.ifname.clone(),
            netns: netns_path.display().to_string(),
            ip,
            host_ifname: veth.host_ifname.clone(),
            host_ifindex: veth.host_ifindex,
            host_mac: veth.host_mac,
            pod_mac: veth.pod_mac,
        };
        // The agent attaches its program while the links are set up.
        let registered = tokio::task::spawn_blocking({
            let agent = agent.clone();
            move || agent.register(&endpoint)
        });
        let configured = async {
            if !configured_early {
                link::bring_up(&host, &pod, &veth, &alias, host_address).await?;
            }
            link::configure_pod(&pod, &veth, ip, node.gateway).await?;
            link::configure_host(&host, &veth, ip).await
        }
        .await;
        // Both finish before any undo, so an unregister cannot overtake them.
        let registered = registered.await.expect("the register task does not panic");
        configured?;
        registered.map_err(from_agent)?;
        Ok::<_, CniError>((veth, ip))
    };
    match setup.await {
        Ok((veth, ip)) => {
            info!(container = %env.container_id, %ip, host_ifname, "pod attached");
            Ok(AddResult {
                interfaces: vec![
                    Interface {
                        name: veth.host_ifname,
                        mac: veth.host_mac.to_string(),
                        sandbox: None,
                    },
                    Interface {
                        name: env.ifname.clone(),
                        mac: veth.pod_mac.to_string(),
                        sandbox: Some(netns_path.display().to_string()),
                    },
                ],
                ip,
                ip_interface: 1,
                gateway: node.gateway,
            }
            .to_json_after(&conf.cni_version, conf.prev_result.as_ref()))
        }
        Err(e) => {
            warn!(container = %env.container_id, "ADD failed, undoing: {e}");
            if let Err(e) = agent.unregister(&env.container_id, &env.ifname)
                && !matches!(e, ClientError::Unreachable { .. })
            {
                warn!("undo: unregister failed: {e}");
            }
            // Release while the interface still exists: dhcp sends its
            // DHCPRELEASE through it.
            if acquired && let Err(e) = addressing.release() {
                warn!("undo: releasing the address failed: {e}");
            }
            if let Err(e) = link::delete_by_name(&host, &host_ifname).await {
                warn!("undo: deleting {host_ifname} failed: {e}");
            }
            Err(e)
        }
    }
}

/// DEL succeeds when things are already gone: each step is idempotent.
pub async fn del(env: &Env, conf: &NetConf, stdin: &[u8]) -> Result<()> {
    let agent = Client::new(conf.agent_socket());
    match agent.unregister(&env.container_id, &env.ifname) {
        Ok(_) => {}
        // The agent drops entries whose host veth is gone when it (re)starts.
        Err(e @ ClientError::Unreachable { .. }) => {
            warn!("agent unreachable during DEL, it will reconcile on start: {e}")
        }
        Err(e) => return Err(from_agent(e)),
    }
    // Release before the veth goes: dhcp sends its DHCPRELEASE through it.
    Addressing::new(env, conf, stdin)?.release()?;
    let host = netns::netlink_here()?;
    // The pod end is renamed too when its netns is still there.
    let pod_netns = env.netns.as_deref().and_then(|p| netns::open(p).ok());
    let host_ifname = link::host_ifname(&env.container_id, &env.ifname);
    if let Some(retired) =
        link::retire(&host, pod_netns.as_ref(), &host_ifname, &env.ifname).await?
    {
        // The agent deletes it in the background; without an agent, now.
        if let Err(e) = agent.retire_link(&retired) {
            info!("deleting {retired} here ({e})");
            link::delete_by_name(&host, &retired).await?;
        }
    }
    info!(container = %env.container_id, "pod detached");
    Ok(())
}

/// GC: releases every address, endpoint and veth of this network whose
/// attachment is not in `cni.dev/valid-attachments`. Stale attachments are
/// found in the agent's endpoints, the built-in allocator's records and the
/// host veths' aliases (an ADD killed before it allocated or registered).
/// Keeps going on errors and reports the first one.
pub async fn gc(env: &Env, conf: &NetConf, stdin: &[u8]) -> Result<()> {
    let valid: HashSet<(String, String)> = conf
        .valid_attachments
        .iter()
        .flatten()
        .map(|a| (a.container_id.clone(), a.ifname.clone()))
        .collect();
    let mut first_error: Option<CniError> = None;
    let mut note = |r: Result<()>| {
        if let Err(e) = r {
            warn!("GC: {e}");
            first_error.get_or_insert(e);
        }
    };
    // (container id, ifname) -> the netns, when known.
    let mut stale: HashMap<(String, String), Option<String>> = HashMap::new();

    // An agent that is down is not an error: it reconciles its map against
    // the veths when it starts.
    let agent = Client::new(conf.agent_socket());
    match agent.list_endpoints() {
        Ok(endpoints) => {
            for ep in endpoints {
                let key = (ep.container_id.clone(), ep.ifname.clone());
                if !valid.contains(&key) {
                    note(
                        agent
                            .unregister(&ep.container_id, &ep.ifname)
                            .map(|_| ())
                            .map_err(from_agent),
                    );
                    stale.insert(key, Some(ep.netns));
                }
            }
        }
        Err(e) => warn!("GC: agent unreachable, skipping its endpoints: {e}"),
    }
    let host = netns::netlink_here();
    match &host {
        Ok(host) => match link::attachments_of(host, &conf.name).await {
            Ok(found) => {
                for key in found.into_iter().filter(|k| !valid.contains(k)) {
                    stale.entry(key).or_default();
                }
            }
            Err(e) => note(Err(e)),
        },
        Err(e) => note(Err(e.clone())),
    }
    match conf.ipam_type() {
        None => {
            match IpStore::open(conf.ipam_dir()).and_then(|s| s.allocations().map(|a| (s, a))) {
                Ok((store, allocations)) => {
                    for (ip, owner) in allocations {
                        let key = (owner.container_id.clone(), owner.ifname.clone());
                        if !valid.contains(&key) {
                            info!(%ip, container = %owner.container_id, "GC: releasing");
                            note(store.release(&owner).map(|_| ()));
                            stale.entry(key).or_default();
                        }
                    }
                }
                Err(e) => note(Err(e)),
            }
        }
        Some(plugin) => {
            // Plugins that predate GC (Debian's are 1.0.0) only release on
            // DEL: each stale attachment gets one, before its veth goes.
            let delegate = Delegate { plugin, env, stdin };
            if !stale.is_empty() {
                match delegate.config_at_common_version() {
                    Ok(del_config) => {
                        for ((container_id, ifname), netns) in &stale {
                            let env = Env {
                                container_id: container_id.clone(),
                                ifname: ifname.clone(),
                                netns: netns.as_ref().map(Into::into),
                                ..env.clone()
                            };
                            info!(container = %container_id, "GC: releasing through {plugin}");
                            note(
                                Delegate {
                                    plugin,
                                    env: &env,
                                    stdin: &del_config,
                                }
                                .exec("DEL")
                                .map(|_| ()),
                            );
                        }
                    }
                    Err(e) => note(Err(e)),
                }
            }
            if let Err(e) = delegate.exec("GC") {
                warn!("GC: IPAM plugin {plugin}: {e}");
            }
        }
    }
    if let Ok(host) = &host {
        for (container_id, ifname) in stale.keys() {
            note(
                link::delete_by_name(host, &link::host_ifname(container_id, ifname))
                    .await
                    .map(|_| ()),
            );
        }
    }
    info!(removed = stale.len(), "GC done");
    first_error.map_or(Ok(()), Err)
}

/// STATUS: code 50 while ADD cannot be served (agent down, no podCIDR yet).
pub fn status(conf: &NetConf) -> Result<()> {
    Client::new(conf.agent_socket())
        .node_info()
        .map(|_| ())
        .map_err(|e| {
            let err = from_agent(e);
            CniError::new(code::NOT_AVAILABLE, err.msg).with_details(err.details)
        })
}
