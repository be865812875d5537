//! The endpoint registry, behind the CNI socket: the one owner of pod
//! endpoints, their persisted records, their map entries and the program on
//! each pod's host veth. Its task serves requests one at a time; its resync
//! repairs what was changed behind its back and drops endpoints whose pod
//! is gone.
use std::{collections::BTreeMap, net::Ipv4Addr, sync::Arc, time::Duration};

use anyhow::{Context, Result};
use beeline_proto::{ApiError, Endpoint, Request};
use serde_json::Value;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{info, warn};

use super::{Pace, Pass, listed, repaired};
use crate::{
    datapath::Programs,
    maps::EndpointsMap,
    metrics::Metrics,
    retire::Retirer,
    state::{AttachmentKey, EndpointStore, key_of},
    status::{Conditions, NodeState},
    uplink,
};

const OWNER: &str = "endpoints";

/// A request and where its answer goes.
pub type Call = (Request, oneshot::Sender<Value>);

/// What the socket server holds to reach the registry.
#[derive(Clone)]
pub struct RegistryHandle(mpsc::Sender<Call>);

impl RegistryHandle {
    /// The registry's answer; `None` if it is gone.
    pub async fn call(&self, request: Request) -> Option<Value> {
        let (tx, rx) = oneshot::channel();
        self.0.send((request, tx)).await.ok()?;
        rx.await.ok()
    }
}

/// What a restore or resync changed, for logs and tests.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ReconcileReport {
    pub restored: usize,
    pub removed_stale: Vec<String>,
    pub removed_orphan_entries: Vec<Ipv4Addr>,
}

pub struct Registry {
    pub store: EndpointStore,
    pub map: EndpointsMap,
    pub programs: Programs,
    pub netlink: rtnetlink::Handle,
    pub retirer: Retirer,
    pub node: watch::Receiver<NodeState>,
    pub metrics: Arc<Metrics>,
    pub conditions: Conditions,
}

/// Whether an endpoint's pod is still there, as far as the node can tell.
#[derive(Debug, PartialEq, Eq)]
enum Liveness {
    /// Its host veth is the one it registered.
    Present,
    /// Its veth is gone and so is its netns (or the node rebooted): the
    /// pod is gone, and what it held is released.
    Gone,
    /// Its veth is gone but its netns is still there (deleted by hand, say):
    /// the pod keeps its address until its DEL.
    VethMissing,
}

impl Registry {
    /// The registry's task, and the handle to reach it.
    pub fn start(self, period: Duration) -> (RegistryHandle, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(64);
        (RegistryHandle(tx), tokio::spawn(self.run(rx, period)))
    }

    async fn run(mut self, mut calls: mpsc::Receiver<Call>, period: Duration) {
        let mut pace = Pace::new(OWNER, period);
        loop {
            tokio::select! {
                call = calls.recv() => {
                    let Some((request, reply)) = call else { return };
                    let _ = reply.send(self.handle(request).await);
                }
                _ = pace.due() => {
                    let result = self.resync().await;
                    pace.after(&result, &self.metrics);
                }
            }
        }
    }

    /// At start, maps first: every persisted endpoint whose veth is alive
    /// gets its map entry; endpoints whose veth vanished (a DEL while the
    /// agent was down) and map entries nobody owns are dropped. Returns the
    /// live endpoints, whose programs [`Registry::restore_programs`] swaps
    /// once every map is filled, so new programs never see an empty map.
    pub async fn restore_maps(&mut self) -> Result<(Vec<Endpoint>, ReconcileReport)> {
        let mut report = ReconcileReport::default();
        let mut live = Vec::new();
        for ep in self.store.list().cloned().collect::<Vec<_>>() {
            match self.liveness(&ep).await? {
                Liveness::Present => {
                    self.map.upsert(ep.ip, map_entry(&ep))?;
                    live.push(ep);
                }
                Liveness::Gone => self.remove_stale(&ep, &mut report)?,
                Liveness::VethMissing => {}
            }
        }
        self.remove_orphans(&mut report)?;
        self.metrics.endpoints.set(self.store.len() as i64);
        self.metrics
            .set_map_fill("endpoints", self.store.len(), beeline_common::MAX_ENDPOINTS);
        Ok((live, report))
    }

    /// Then programs: this agent's program onto every live endpoint's veth
    /// (swapped in place), and off the other hook if `--pod-attach` changed.
    pub async fn restore_programs(
        &self,
        live: &[Endpoint],
        report: &mut ReconcileReport,
    ) -> Result<()> {
        for ep in live {
            let attached = self
                .attach(ep)
                .and_then(|()| self.programs.drop_other_pod_attach(&ep.host_ifname));
            match attached {
                Ok(()) => report.restored += 1,
                // Its netns went away meanwhile: the resync drops it.
                Err(_) if !self.veth_present(ep).await? => {}
                Err(e) => return Err(e).with_context(|| format!("restoring endpoint {}", ep.ip)),
            }
        }
        Ok(())
    }

    async fn handle(&mut self, request: Request) -> Value {
        fn reply<T: serde::Serialize>(r: Result<T, ApiError>) -> Value {
            serde_json::to_value(r).expect("responses serialize")
        }
        let verb = request.verb();
        let response = match request {
            Request::NodeInfo => reply(Err::<(), _>(ApiError::new(
                "node_info is answered by the socket server",
            ))),
            Request::Register { endpoint } => reply(self.register(endpoint).await),
            Request::Unregister {
                container_id,
                ifname,
            } => reply(self.unregister(&(container_id, ifname))),
            Request::CheckEndpoint {
                container_id,
                ifname,
            } => reply(Ok::<_, ApiError>(
                self.check_endpoint(&(container_id, ifname)).await,
            )),
            Request::ListEndpoints => reply(Ok::<_, ApiError>(
                self.store.list().cloned().collect::<Vec<_>>(),
            )),
            Request::RetireLink { ifname } => reply(self.retire_link(ifname)),
        };
        self.metrics
            .count_request(verb, response.get("Ok").is_some());
        self.metrics.endpoints.set(self.store.len() as i64);
        self.metrics
            .set_map_fill("endpoints", self.store.len(), beeline_common::MAX_ENDPOINTS);
        response
    }

    async fn register(&mut self, ep: Endpoint) -> Result<(), ApiError> {
        self.validate(&ep).await?;
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
            let _ = self.map.remove(old.ip);
        }
        info!(container = %ep.container_id, ip = %ep.ip, host_ifname = %ep.host_ifname, pod = ?ep.pod, "endpoint registered");
        Ok(())
    }

    /// A registration must name what this node really has: an address of
    /// its podCIDR that no one else holds and that is not a node's, and a
    /// host veth that exists, is a veth whose peer is in another netns, and
    /// is no other endpoint's (nor the uplink, nor the VXLAN device).
    async fn validate(&self, ep: &Endpoint) -> Result<(), ApiError> {
        let refuse = |why: String| Err(ApiError::new(why));
        let node = self.node.borrow().clone();
        if let Some(reason) = node.not_ready {
            return Err(ApiError::not_ready(reason));
        }
        let pod_cidr = node.pod_cidr.expect("a ready node has a podCIDR");
        if !pod_cidr.contains(&ep.ip) {
            return refuse(format!(
                "{} is outside this node's podCIDR {pod_cidr}: other nodes would not route it here",
                ep.ip
            ));
        }
        if pod_cidr.prefix_len() < 31
            && (ep.ip == pod_cidr.network() || ep.ip == pod_cidr.broadcast())
        {
            return refuse(format!("{} is not a host address of {pod_cidr}", ep.ip));
        }
        if node.node_addresses().contains(&ep.ip) {
            return refuse(format!("{} is this node's own address", ep.ip));
        }
        if let Some(other) = self.store.by_ip(ep.ip)
            && key_of(other) != key_of(ep)
        {
            return refuse(format!(
                "{} is already used by container {} ({})",
                ep.ip, other.container_id, other.ifname
            ));
        }
        if let Some(other) = self.store.list().find(|o| {
            key_of(o) != key_of(ep)
                && (o.host_ifname == ep.host_ifname || o.host_ifindex == ep.host_ifindex)
        }) {
            return refuse(format!(
                "{} (index {}) is the host veth of container {} ({})",
                ep.host_ifname, ep.host_ifindex, other.container_id, other.ifname
            ));
        }
        let uplink = node.uplink.as_ref();
        if uplink.is_some_and(|u| u.ifname == ep.host_ifname || u.ifindex == ep.host_ifindex)
            || ep.host_ifname == uplink::VXLAN_DEVICE
        {
            return refuse(format!(
                "{} is one of the node's own devices",
                ep.host_ifname
            ));
        }
        let link = uplink::host_link(&self.netlink, &ep.host_ifname)
            .await
            .map_err(|e| ApiError::not_ready(format!("looking up {}: {e:#}", ep.host_ifname)))?;
        match link {
            None => refuse(format!(
                "host interface {} with index {} does not exist in the agent's netns",
                ep.host_ifname, ep.host_ifindex
            )),
            Some(l) if l.ifindex != ep.host_ifindex => refuse(format!(
                "{} has index {}, not {}",
                ep.host_ifname, l.ifindex, ep.host_ifindex
            )),
            Some(l) if !l.is_veth => refuse(format!("{} is not a veth", ep.host_ifname)),
            Some(l) if l.peer_netns_id.is_none() => refuse(format!(
                "{}'s peer is in the node's netns, not a pod's",
                ep.host_ifname
            )),
            Some(_) => Ok(()),
        }
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

    /// The differences between an endpoint's record and the kernel.
    async fn check_endpoint(&self, key: &AttachmentKey) -> Option<Vec<String>> {
        let ep = self.store.get(key)?;
        let mut problems = Vec::new();
        match self.veth_present(ep).await {
            Ok(true) => {}
            Ok(false) => problems.push(format!(
                "{} with index {} does not exist",
                ep.host_ifname, ep.host_ifindex
            )),
            Err(e) => problems.push(format!("looking up {}: {e:#}", ep.host_ifname)),
        }
        match self.map.get(ep.ip) {
            Ok(Some(entry)) if entry == map_entry(ep) => {}
            Ok(Some(_)) => problems.push(format!("the endpoint map entry for {} differs", ep.ip)),
            Ok(None) => problems.push(format!("the endpoint map has no entry for {}", ep.ip)),
            Err(e) => problems.push(format!("reading the endpoint map: {e:#}")),
        }
        match self
            .programs
            .pod_attached(&self.netlink, &ep.host_ifname, ep.host_ifindex)
            .await
        {
            Ok(attached) if attached != ep.shaped => {}
            Ok(true) => problems.push(format!(
                "{} is shaped, yet a program is attached to it",
                ep.host_ifname
            )),
            Ok(false) => problems.push(format!("no program is attached to {}", ep.host_ifname)),
            Err(e) => problems.push(format!("listing the filters of {}: {e:#}", ep.host_ifname)),
        }
        Some(problems)
    }

    fn retire_link(&mut self, ifname: String) -> Result<(), ApiError> {
        if !ifname.starts_with(beeline_proto::RETIRED_PREFIX) {
            return Err(ApiError::new(format!(
                "{ifname} is not a retired pod veth (those are named {}...)",
                beeline_proto::RETIRED_PREFIX
            )));
        }
        self.retirer.retire(ifname);
        self.metrics.count_action("retired_veth", 1);
        Ok(())
    }

    /// Brings the kernel in line with the endpoints: drops those whose veth
    /// is gone, puts back missing or changed map entries and detached
    /// programs, removes map entries nobody owns. What it repaired stays
    /// listed in the conditions until a pass finds nothing.
    async fn resync(&mut self) -> Result<Pass> {
        let mut report = ReconcileReport::default();
        let mut found: BTreeMap<String, String> = BTreeMap::new();
        let mut repairs = 0;
        let mut first_error = None;
        for ep in self.store.list().cloned().collect::<Vec<_>>() {
            match self.liveness(&ep).await {
                Ok(Liveness::Present) => {}
                Ok(Liveness::Gone) => {
                    self.remove_stale(&ep, &mut report)?;
                    continue;
                }
                Ok(Liveness::VethMissing) => {
                    listed(&mut found, "pod_veth_missing", &ep.host_ifname);
                    continue;
                }
                // Never "gone" on a failed lookup (out of file descriptors,
                // say): the next pass looks again.
                Err(e) => {
                    first_error.get_or_insert(e);
                    continue;
                }
            }
            if self.map.get(ep.ip)? != Some(map_entry(&ep)) {
                self.map.upsert(ep.ip, map_entry(&ep))?;
                repaired(
                    &self.metrics,
                    &mut found,
                    "endpoint_map_entry",
                    &ep.ip.to_string(),
                );
                repairs += 1;
            }
            match self
                .programs
                .pod_attached(&self.netlink, &ep.host_ifname, ep.host_ifindex)
                .await
            {
                Ok(true) => {}
                Ok(false) if ep.shaped => {}
                Ok(false) => {
                    self.programs.attach_pod(&ep.host_ifname)?;
                    repaired(&self.metrics, &mut found, "pod_program", &ep.host_ifname);
                    repairs += 1;
                }
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        self.remove_orphans(&mut report)?;
        if !report.removed_stale.is_empty() || !report.removed_orphan_entries.is_empty() {
            info!(?report, "resync removed stale state");
        }
        self.conditions.publish(OWNER, &found);
        self.metrics.endpoints.set(self.store.len() as i64);
        match first_error {
            Some(e) => Err(e),
            None if repairs == 0 => Ok(Pass::Done),
            None => Ok(Pass::Repaired),
        }
    }

    /// Drops the endpoint of a pod that is gone, and releases the address
    /// it held in the built-in allocator's store.
    fn remove_stale(&mut self, ep: &Endpoint, report: &mut ReconcileReport) -> Result<()> {
        info!(container = %ep.container_id, ip = %ep.ip, host_ifname = %ep.host_ifname, "dropping the endpoint of a pod that is gone");
        self.uninstall(ep);
        if let Some(dir) = &ep.ipam_dir {
            let owner = beeline_ipam::Owner {
                container_id: ep.container_id.clone(),
                ifname: ep.ifname.clone(),
            };
            let released = beeline_ipam::IpStore::open(dir)
                .and_then(|store| store.release(&owner))
                .with_context(|| format!("releasing {} in {}", ep.ip, dir.display()))?;
            self.metrics
                .count_action("released_address", released.len());
        }
        self.store.remove(&key_of(ep))?;
        report.removed_stale.push(ep.container_id.clone());
        self.metrics.count_action("removed_stale_endpoint", 1);
        Ok(())
    }

    fn remove_orphans(&mut self, report: &mut ReconcileReport) -> Result<()> {
        for (ip, _) in self.map.entries()? {
            if self.store.by_ip(ip).is_none() {
                self.map.remove(ip)?;
                report.removed_orphan_entries.push(ip);
                self.metrics.count_action("removed_orphan_map_entry", 1);
            }
        }
        Ok(())
    }

    /// Whether the endpoint's host veth is the one it registered. Only the
    /// kernel's "no such device" counts as absent; any other failure (out
    /// of file descriptors, say) is an error, never "gone".
    async fn veth_present(&self, ep: &Endpoint) -> Result<bool> {
        Ok(uplink::link_index(&self.netlink, &ep.host_ifname).await? == Some(ep.host_ifindex))
    }

    async fn liveness(&self, ep: &Endpoint) -> Result<Liveness> {
        if self.veth_present(ep).await? {
            return Ok(Liveness::Present);
        }
        // Endpoints of the previous release name no netns inode: their veth
        // is all there is to go by.
        let pod = beeline_ipam::Pod {
            boot_id: ep.boot_id.clone(),
            netns: ep.netns.clone(),
            netns_inode: ep.netns_inode,
        };
        let rebooted = !ep.boot_id.is_empty() && ep.boot_id != beeline_ipam::boot_id();
        if rebooted || ep.netns_inode == 0 || pod.netns_gone() || released(ep) {
            Ok(Liveness::Gone)
        } else {
            Ok(Liveness::VethMissing)
        }
    }

    fn install(&mut self, ep: &Endpoint) -> Result<()> {
        self.attach(ep)?;
        self.map.upsert(ep.ip, map_entry(ep))
    }

    /// The from-pod program onto the endpoint's veth; a shaped pod's veth
    /// gets none (its packets go up the host stack, through the bandwidth
    /// plugin's ifb, and its ingress qdisc slot stays free for it).
    fn attach(&self, ep: &Endpoint) -> Result<()> {
        if ep.shaped {
            return self.programs.detach_pod(&ep.host_ifname);
        }
        self.programs.attach_pod(&ep.host_ifname)
    }

    /// Best effort: used on failure paths and for endpoints whose veth is gone.
    fn uninstall(&mut self, ep: &Endpoint) {
        if let Err(e) = self.map.remove(ep.ip) {
            warn!("removing map entry {}: {e:#}", ep.ip);
        }
        if let Err(e) = self.programs.detach_pod(&ep.host_ifname) {
            warn!("detaching from {}: {e:#}", ep.host_ifname);
        }
    }
}

/// Whether the built-in allocator no longer holds the endpoint's address
/// for it: its DEL ran (while the agent was down, say).
fn released(ep: &Endpoint) -> bool {
    let Some(dir) = &ep.ipam_dir else {
        return false;
    };
    let owner = beeline_ipam::Owner {
        container_id: ep.container_id.clone(),
        ifname: ep.ifname.clone(),
    };
    beeline_ipam::IpStore::open(dir)
        .and_then(|store| store.find(&owner))
        .is_ok_and(|held| held != Some(ep.ip))
}

/// The map entry an endpoint's record calls for.
fn map_entry(ep: &Endpoint) -> beeline_common::Endpoint {
    beeline_common::Endpoint {
        host_ifindex: ep.host_ifindex,
        pod_mac: ep.pod_mac.0,
        host_mac: ep.host_mac.0,
        flags: if ep.shaped {
            beeline_common::ENDPOINT_THROUGH_STACK
        } else {
            0
        },
    }
}
