//! The agent's state machine: endpoints in, BPF maps and tc links out.
use std::net::Ipv4Addr;

use anyhow::{Context, Result};
use beeline_common::program_names::FROM_POD;
use beeline_proto::{ApiError, Endpoint, NodeInfo, Request};
use ipnet::Ipv4Net;
use serde_json::Value;
use tracing::{info, warn};

use crate::{
    datapath::Datapath,
    state::{AttachmentKey, EndpointStore, key_of},
};

/// The pods' default gateway: link-local, never on the wire (the pod has a
/// permanent neighbour entry for it pointing at its host veth).
pub const POD_GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);

pub struct Agent {
    pub node_name: String,
    pub pod_cidr: Option<Ipv4Net>,
    pub pod_mtu: u32,
    pub datapath: Datapath,
    pub store: EndpointStore,
}

/// What a reconcile pass changed, for logs and tests.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ReconcileReport {
    pub restored: usize,
    pub removed_stale: Vec<String>,
    pub removed_orphan_entries: Vec<Ipv4Addr>,
    pub removed_orphan_links: Vec<String>,
}

impl Agent {
    pub fn handle(&mut self, request: Request) -> Value {
        fn reply<T: serde::Serialize>(r: Result<T, ApiError>) -> Value {
            serde_json::to_value(r).expect("responses serialize")
        }
        match request {
            Request::NodeInfo => reply(self.node_info()),
            Request::Register { endpoint } => reply(self.register(endpoint)),
            Request::Unregister {
                container_id,
                ifname,
            } => reply(self.unregister(&(container_id, ifname))),
            Request::GetEndpoint {
                container_id,
                ifname,
            } => reply(Ok::<_, ApiError>(
                self.store.get(&(container_id, ifname)).cloned(),
            )),
            Request::ListEndpoints => reply(Ok::<_, ApiError>(
                self.store.list().cloned().collect::<Vec<_>>(),
            )),
        }
    }

    fn node_info(&self) -> Result<NodeInfo, ApiError> {
        let pod_cidr = self.pod_cidr.ok_or_else(|| {
            ApiError::not_ready(format!(
                "node {} has no podCIDR yet; waiting for it",
                self.node_name
            ))
        })?;
        Ok(NodeInfo {
            node_name: self.node_name.clone(),
            pod_cidr: pod_cidr.to_string(),
            mtu: self.pod_mtu,
            gateway: POD_GATEWAY,
        })
    }

    fn register(&mut self, ep: Endpoint) -> Result<(), ApiError> {
        let pod_cidr = self.node_info()?.pod_cidr;
        let pod_cidr: Ipv4Net = pod_cidr.parse().expect("stored podCIDR is valid");
        if !pod_cidr.contains(&ep.ip) {
            return Err(ApiError::new(format!(
                "{} is outside this node's podCIDR {pod_cidr}",
                ep.ip
            )));
        }
        if let Some(other) = self.store.by_ip(ep.ip)
            && key_of(other) != key_of(&ep)
        {
            return Err(ApiError::new(format!(
                "{} is already used by container {} ({})",
                ep.ip, other.container_id, other.ifname
            )));
        }
        match nix::net::if_::if_nametoindex(ep.host_ifname.as_str()) {
            Ok(index) if index == ep.host_ifindex => {}
            _ => {
                return Err(ApiError::new(format!(
                    "host interface {} with index {} does not exist in the agent's netns",
                    ep.host_ifname, ep.host_ifindex
                )));
            }
        }
        self.install(&ep).map_err(|e| {
            self.uninstall(&ep);
            ApiError::new(format!("cannot install endpoint {}: {e:#}", ep.ip))
        })?;
        let replaced = self.store.insert(ep.clone()).map_err(|e| {
            self.uninstall(&ep);
            ApiError::new(format!("cannot persist endpoint {}: {e:#}", ep.ip))
        })?;
        if let Some(old) = replaced
            && old.ip != ep.ip
        {
            let _ = self.datapath.remove_endpoint(old.ip);
        }
        info!(container = %ep.container_id, ip = %ep.ip, host_ifname = %ep.host_ifname, "endpoint registered");
        Ok(())
    }

    fn unregister(&mut self, key: &AttachmentKey) -> Result<Option<Endpoint>, ApiError> {
        let Some(ep) = self.store.get(key).cloned() else {
            return Ok(None);
        };
        self.uninstall(&ep);
        self.store
            .remove(key)
            .map_err(|e| ApiError::new(format!("cannot persist the removal: {e:#}")))?;
        info!(container = %ep.container_id, ip = %ep.ip, "endpoint unregistered");
        Ok(Some(ep))
    }

    fn install(&mut self, ep: &Endpoint) -> Result<()> {
        self.datapath.attach(&ep.host_ifname, FROM_POD)?;
        self.datapath.upsert_endpoint(
            ep.ip,
            beeline_common::Endpoint {
                host_ifindex: ep.host_ifindex,
                pod_mac: ep.pod_mac.0,
                host_mac: ep.host_mac.0,
            },
        )
    }

    /// Best effort: used on failure paths and for endpoints whose veth is gone.
    fn uninstall(&mut self, ep: &Endpoint) {
        if let Err(e) = self.datapath.remove_endpoint(ep.ip) {
            warn!("removing map entry {}: {e:#}", ep.ip);
        }
        if let Err(e) = self.datapath.detach(&ep.host_ifname, FROM_POD) {
            warn!("detaching from {}: {e:#}", ep.host_ifname);
        }
    }

    /// Brings the kernel in line with the persisted endpoints: re-installs
    /// live ones (with this agent's program), drops those whose host veth is
    /// gone (deleted while the agent was down), and removes map entries and
    /// links nobody owns.
    pub fn reconcile(&mut self) -> Result<ReconcileReport> {
        let mut report = ReconcileReport::default();
        let endpoints: Vec<Endpoint> = self.store.list().cloned().collect();
        for ep in endpoints {
            let alive = nix::net::if_::if_nametoindex(ep.host_ifname.as_str())
                .is_ok_and(|i| i == ep.host_ifindex);
            if alive {
                self.install(&ep)
                    .with_context(|| format!("restoring endpoint {}", ep.ip))?;
                report.restored += 1;
            } else {
                self.uninstall(&ep);
                self.store.remove(&key_of(&ep))?;
                report.removed_stale.push(ep.container_id.clone());
            }
        }
        for (ip, _) in self.datapath.endpoint_entries()? {
            if self.store.by_ip(ip).is_none() {
                self.datapath.remove_endpoint(ip)?;
                report.removed_orphan_entries.push(ip);
            }
        }
        for ifname in self.datapath.attached(FROM_POD)? {
            if !self.store.list().any(|e| e.host_ifname == ifname) {
                self.datapath.detach(&ifname, FROM_POD)?;
                report.removed_orphan_links.push(ifname);
            }
        }
        Ok(report)
    }
}
