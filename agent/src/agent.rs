//! The agent's state machine: endpoints in, BPF maps and tc links out.
use std::net::Ipv4Addr;

use anyhow::{Context, Result};
use beeline_common::{
    NodeConfig,
    program_names::{FROM_OVERLAY, FROM_UPLINK},
};
use beeline_proto::{ApiError, Endpoint, NodeInfo, Request};
use ipnet::Ipv4Net;
use serde_json::Value;
use tracing::{info, warn};

use crate::{
    datapath::Datapath,
    health::Metrics,
    install, masquerade,
    nodes::NodeRoute,
    remote::{Mode, desired_entries},
    state::{AttachmentKey, EndpointStore, key_of},
    uplink::{self, Uplink, VXLAN_DEVICE},
};

/// VXLAN adds 50 bytes (outer Ethernet 14 + IPv4 20 + UDP 8 + VXLAN 8).
pub const VXLAN_OVERHEAD: u32 = 50;

/// How this node reaches the others; fixed at start.
#[derive(Debug, Clone)]
pub struct NetworkConfig {
    pub mode: Mode,
    pub vni: u32,
    pub vxlan_port: u16,
    pub vxlan_encap: beeline_common::VxlanEncap,
    /// `--pod-mtu`, overriding the uplink-derived value.
    pub pod_mtu: Option<u32>,
    /// Destinations never masqueraded, besides every node's podCIDR.
    pub no_masquerade: Vec<Ipv4Net>,
    pub masquerade: bool,
}

/// Where to install the CNI binary and config once the node is ready.
#[derive(Debug, Clone, Default)]
pub struct CniInstall {
    pub bin_dir: Option<std::path::PathBuf>,
    pub binary: Option<std::path::PathBuf>,
    pub conf_dir: Option<std::path::PathBuf>,
    pub socket: std::path::PathBuf,
}

/// The pods' default gateway: link-local, never on the wire (the pod has a
/// permanent neighbour entry for it pointing at its host veth).
pub const POD_GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);

pub struct Agent {
    pub node_name: String,
    pub network: NetworkConfig,
    pub datapath: Datapath,
    pub store: EndpointStore,
    pub netlink: rtnetlink::Handle,
    pub retirer: crate::retire::Retirer,
    /// From this node's Node object; `None` until it has one.
    pub pod_cidr: Option<Ipv4Net>,
    /// Set once the uplink (the interface with the node's InternalIP) is found.
    pub uplink: Option<Uplink>,
    pub vxlan_ifindex: u32,
    pub nodes: Vec<NodeRoute>,
    pub metrics: Metrics,
    pub cni_install: CniInstall,
    /// The conflist has been written (the node is advertised as ready).
    pub cni_installed: bool,
}

/// What a reconcile pass changed, for logs and tests.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ReconcileReport {
    pub restored: usize,
    pub removed_stale: Vec<String>,
    pub removed_orphan_entries: Vec<Ipv4Addr>,
}

impl Agent {
    pub async fn handle(&mut self, request: Request) -> Value {
        let verb = match &request {
            Request::NodeInfo => "node_info",
            Request::Register { .. } => "register",
            Request::Unregister { .. } => "unregister",
            Request::GetEndpoint { .. } => "get_endpoint",
            Request::CheckEndpoint { .. } => "check_endpoint",
            Request::ListEndpoints => "list_endpoints",
            Request::RetireLink { .. } => "retire_link",
        };
        let response = self.dispatch(request).await;
        self.metrics
            .count_request(verb, response.get("Ok").is_some());
        response
    }

    async fn dispatch(&mut self, request: Request) -> Value {
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
        }
    }

    /// Why pods cannot be networked yet, if they cannot.
    pub fn not_ready_reason(&self) -> Option<String> {
        if self.pod_cidr.is_none() {
            return Some(format!(
                "node {} has no podCIDR yet; waiting for it",
                self.node_name
            ));
        }
        if self.uplink.is_none() {
            return Some(format!(
                "node {}: no interface holds its InternalIP yet; waiting for it",
                self.node_name
            ));
        }
        None
    }

    pub fn pod_mtu(&self) -> u32 {
        let uplink_mtu = self.uplink.as_ref().map_or(1500, |u| u.mtu);
        self.network
            .pod_mtu
            .unwrap_or(if self.network.mode.may_encapsulate() {
                uplink_mtu - VXLAN_OVERHEAD
            } else {
                uplink_mtu
            })
    }

    fn node_info(&self) -> Result<NodeInfo, ApiError> {
        if let Some(reason) = self.not_ready_reason() {
            return Err(ApiError::not_ready(reason));
        }
        Ok(NodeInfo {
            node_name: self.node_name.clone(),
            pod_cidr: self.pod_cidr.expect("ready").to_string(),
            mtu: self.pod_mtu(),
            gateway: POD_GATEWAY,
        })
    }

    /// Applies a new snapshot of the cluster's Nodes: local podCIDR, local
    /// datapath setup (once the uplink is known), remote CIDR map and
    /// masquerade exceptions.
    pub async fn sync_nodes(&mut self, nodes: Vec<NodeRoute>) -> Result<()> {
        let me = nodes.iter().find(|n| n.name == self.node_name).cloned();
        let pod_cidr = match &me {
            None => {
                warn!(
                    "node {} is not in the node list; waiting for it",
                    self.node_name
                );
                None
            }
            Some(n) if n.pod_cidrs.is_empty() => {
                warn!(
                    "node {} has no IPv4 podCIDR yet; waiting for it",
                    self.node_name
                );
                None
            }
            Some(n) => Some(n.pod_cidrs[0]),
        };
        if pod_cidr != self.pod_cidr {
            info!(from = ?self.pod_cidr, to = ?pod_cidr, "local podCIDR");
            self.pod_cidr = pod_cidr;
        }
        if let Some(ip) = me.as_ref().and_then(|n| n.internal_ip)
            && self.uplink.as_ref().is_none_or(|u| u.net.addr() != ip)
        {
            self.setup_local(ip).await?;
        }
        let uplink_net = self.uplink.as_ref().map(|u| u.net);
        let desired = desired_entries(&nodes, &self.node_name, self.network.mode, uplink_net);
        let (upserted, removed) = self.datapath.sync_remote(&desired)?;
        if upserted + removed > 0 {
            info!(
                upserted,
                removed,
                remote_cidrs = desired.len(),
                "remote node routes updated"
            );
        }
        if self.network.masquerade
            && let Some(pod_cidr) = self.pod_cidr
        {
            let mut exceptions: Vec<Ipv4Net> =
                nodes.iter().flat_map(|n| n.pod_cidrs.clone()).collect();
            exceptions.extend(self.network.no_masquerade.iter().copied());
            // Nodes' podCIDRs come out of one cluster CIDR: merged, thousands
            // of nodes make a handful of rules (and one netlink batch).
            let exceptions = Ipv4Net::aggregate(&exceptions);
            masquerade::apply(pod_cidr, &exceptions).context("installing the masquerade rules")?;
        }
        self.nodes = nodes;
        self.install_cni_when_ready()
    }

    /// Installs the CNI binary and then (last, atomically) the conflist,
    /// once pods can really be networked.
    fn install_cni_when_ready(&mut self) -> Result<()> {
        if self.cni_installed || self.not_ready_reason().is_some() {
            return Ok(());
        }
        let cfg = self.cni_install.clone();
        if let Some(bin_dir) = &cfg.bin_dir {
            let source = match &cfg.binary {
                Some(path) => path.clone(),
                None => install::default_cni_binary()?,
            };
            let dest = install::install_binary(&source, bin_dir)?;
            info!(path = %dest.display(), "installed the CNI binary");
        }
        if let Some(conf_dir) = &cfg.conf_dir {
            let dest = install::write_conflist(conf_dir, &cfg.socket)?;
            info!(path = %dest.display(), "wrote the CNI network config: this node can network pods");
        }
        self.cni_installed = true;
        Ok(())
    }

    /// Finds the uplink, creates the VXLAN device, fills the node config map
    /// and attaches the from-uplink / from-overlay programs.
    async fn setup_local(&mut self, node_ip: Ipv4Addr) -> Result<()> {
        let Some(up) = uplink::find(&self.netlink, node_ip).await? else {
            warn!(%node_ip, "no interface holds this node's InternalIP yet");
            return Ok(());
        };
        let vxlan_ifindex = if self.network.mode.may_encapsulate() {
            let index = uplink::ensure_vxlan(
                &self.netlink,
                self.network.vxlan_port,
                up.mtu - VXLAN_OVERHEAD,
            )
            .await?;
            self.datapath.attach(VXLAN_DEVICE, FROM_OVERLAY)?;
            index
        } else {
            0
        };
        self.datapath.set_node_config(NodeConfig {
            uplink_ifindex: up.ifindex,
            vxlan_ifindex,
            vni: self.network.vni,
            node_addr: node_ip.octets(),
            vxlan_port: self.network.vxlan_port,
            vxlan_encap: self.network.vxlan_encap as u16,
        })?;
        self.datapath.attach(&up.ifname, FROM_UPLINK)?;
        // Pod traffic leaving the cluster goes through the host stack.
        std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").context("enabling IPv4 forwarding")?;
        info!(uplink = %up.ifname, mtu = up.mtu, net = %up.net, vxlan_ifindex, mode = ?self.network.mode, "node datapath ready");
        self.uplink = Some(up);
        self.vxlan_ifindex = vxlan_ifindex;
        Ok(())
    }

    fn register(&mut self, ep: Endpoint) -> Result<(), ApiError> {
        let pod_cidr = self.node_info()?.pod_cidr;
        let pod_cidr: Ipv4Net = pod_cidr.parse().expect("stored podCIDR is valid");
        if !pod_cidr.contains(&ep.ip) {
            // A delegated IPAM plugin may hand out other ranges: such a pod
            // is reachable on this node only.
            warn!(ip = %ep.ip, %pod_cidr, "endpoint outside the node's podCIDR: other nodes cannot reach it");
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

    /// The differences between an endpoint's record and the kernel.
    async fn check_endpoint(&self, key: &AttachmentKey) -> Option<Vec<String>> {
        let ep = self.store.get(key)?;
        let mut problems = Vec::new();
        match nix::net::if_::if_nametoindex(ep.host_ifname.as_str()) {
            Ok(index) if index == ep.host_ifindex => {}
            Ok(index) => problems.push(format!(
                "{} has index {index}, the agent recorded {}",
                ep.host_ifname, ep.host_ifindex
            )),
            Err(_) => problems.push(format!("{} does not exist", ep.host_ifname)),
        }
        match self.datapath.endpoint(ep.ip) {
            Ok(Some(entry))
                if entry.host_ifindex == ep.host_ifindex
                    && entry.pod_mac == ep.pod_mac.0
                    && entry.host_mac == ep.host_mac.0 => {}
            Ok(Some(_)) => problems.push(format!("the endpoint map entry for {} differs", ep.ip)),
            Ok(None) => problems.push(format!("the endpoint map has no entry for {}", ep.ip)),
            Err(e) => problems.push(format!("reading the endpoint map: {e:#}")),
        }
        match self
            .datapath
            .pod_attached(&self.netlink, &ep.host_ifname, ep.host_ifindex)
            .await
        {
            Ok(true) => {}
            Ok(false) => problems.push(format!("no program is attached to {}", ep.host_ifname)),
            Err(e) => problems.push(format!("listing the filters of {}: {e:#}", ep.host_ifname)),
        }
        Some(problems)
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

    fn install(&mut self, ep: &Endpoint) -> Result<()> {
        self.datapath.attach_pod(&ep.host_ifname)?;
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
        if let Err(e) = self.datapath.detach_pod(&ep.host_ifname) {
            warn!("detaching from {}: {e:#}", ep.host_ifname);
        }
    }

    /// Brings the kernel in line with the persisted endpoints: re-installs
    /// live ones (with this agent's program), drops those whose host veth is
    /// gone (deleted while the agent was down), and removes map entries
    /// nobody owns. (A pod's filter goes with its veth.)
    ///
    /// `restore` (at start) re-installs every live endpoint so this process's
    /// program replaces the previous one; the periodic pass only cleans up.
    pub fn reconcile(&mut self, restore: bool) -> Result<ReconcileReport> {
        let mut report = ReconcileReport::default();
        let endpoints: Vec<Endpoint> = self.store.list().cloned().collect();
        for ep in endpoints {
            let alive = nix::net::if_::if_nametoindex(ep.host_ifname.as_str())
                .is_ok_and(|i| i == ep.host_ifindex);
            if alive && !restore {
                continue;
            }
            if alive {
                self.install(&ep)
                    .and_then(|()| self.datapath.drop_other_pod_attach(&ep.host_ifname))
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
        self.metrics
            .count_action("removed_stale_endpoint", report.removed_stale.len());
        self.metrics.count_action(
            "removed_orphan_map_entry",
            report.removed_orphan_entries.len(),
        );
        Ok(report)
    }
}
