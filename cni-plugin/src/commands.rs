//! DEL, GC and STATUS (ADD is in `add`).
use std::collections::{HashMap, HashSet};

use beeline_ipam::IpStore;
use beeline_proto::{Client, ClientError};
use tracing::{info, warn};

use crate::{
    addressing::Addressing,
    config::{Env, NetConf},
    delegate::Delegate,
    error::{CniError, Result, code, from_agent},
    link, netns,
};

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
            match IpStore::open(conf.ipam_dir())
                .and_then(|s| s.allocations().map(|a| (s, a)))
                .map_err(CniError::from)
            {
                Ok((store, allocations)) => {
                    for (ip, record) in allocations {
                        let owner = record.owner;
                        let key = (owner.container_id.clone(), owner.ifname.clone());
                        if !valid.contains(&key) {
                            info!(%ip, container = %owner.container_id, "GC: releasing");
                            note(store.release(&owner).map(|_| ()).map_err(Into::into));
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
