//! Node sync: the cluster's Nodes in, this node's datapath out. From its
//! own Node it takes the podCIDR and the InternalIP (whose interface becomes
//! the uplink, looked up again every pass: an address that arrives late
//! makes the node ready); from the others, the remote CIDR map and the
//! masquerade exceptions. Publishes [`NodeState`] for the rest of the agent.
use std::{collections::BTreeMap, sync::Arc, time::Duration};

use anyhow::{Context, Result};
use beeline_common::{NodeConfig, Program, RemoteNode, VXLAN_OVERHEAD, VxlanEncap, vxlan_mac};
use ipnet::Ipv4Net;
use tokio::sync::watch;
use tracing::info;

use super::{Pace, Pass, repaired};
use crate::{
    datapath::Programs,
    maps::{NodeConfigMap, RemoteCidrsMap},
    metrics::Metrics,
    netfilter::{
        forward,
        table::{self, Masquerade},
    },
    remote::{Mode, desired_entries},
    routes,
    sources::nodes::{NodeRoute, Snapshot},
    status::{Conditions, NodeState},
    uplink::{self, Uplink, VXLAN_DEVICE},
};

/// How this node reaches the others; fixed at start.
#[derive(Debug, Clone)]
pub struct NetworkConfig {
    pub mode: Mode,
    pub vni: u32,
    pub vxlan_port: u16,
    pub vxlan_encap: VxlanEncap,
    /// `--pod-mtu`, overriding the uplink-derived value.
    pub pod_mtu: Option<u32>,
    /// Destinations never masqueraded, besides every node's podCIDR.
    pub no_masquerade: Vec<Ipv4Net>,
    pub masquerade: bool,
    /// `--kube-proxy-replacement`: the programs translate Services.
    pub services: bool,
}

impl NetworkConfig {
    /// The pods' MTU on an uplink of `uplink_mtu`.
    pub fn pod_mtu(&self, uplink_mtu: u32) -> u32 {
        self.pod_mtu.unwrap_or(if self.mode.may_encapsulate() {
            uplink_mtu - VXLAN_OVERHEAD
        } else {
            uplink_mtu
        })
    }
}

/// Every node's podCIDR and the configured exceptions, merged: nodes'
/// podCIDRs come out of one cluster CIDR, so thousands of nodes make a
/// handful of rules (and one netlink batch).
pub fn desired_masquerade(
    config: &NetworkConfig,
    pod_cidr: Option<Ipv4Net>,
    nodes: &[NodeRoute],
) -> Option<Masquerade> {
    let pod_cidr = pod_cidr.filter(|_| config.masquerade)?;
    let mut exceptions: Vec<Ipv4Net> = nodes.iter().flat_map(|n| n.pod_cidrs.clone()).collect();
    exceptions.extend(config.no_masquerade.iter().copied());
    Some(Masquerade {
        pod_cidr,
        exceptions: Ipv4Net::aggregate(&exceptions),
    })
}

const OWNER: &str = "nodes";

pub struct NodeSync {
    pub node_name: String,
    pub network: NetworkConfig,
    pub netlink: rtnetlink::Handle,
    pub programs: Programs,
    pub remote_cidrs: RemoteCidrsMap,
    pub node_config: NodeConfigMap,
    pub state: watch::Sender<NodeState>,
    pub metrics: Arc<Metrics>,
    pub conditions: Conditions,
    /// The local datapath last set up, and what was last applied, to tell
    /// drift (repaired, counted) from input changes.
    uplink: Option<Uplink>,
    remote_applied: Option<BTreeMap<Ipv4Net, RemoteNode>>,
    table_applied: Option<Option<Masquerade>>,
    forward_applied: Option<Vec<Ipv4Net>>,
    routes_applied: Option<BTreeMap<Ipv4Net, routes::Via>>,
    /// Drift found in the current pass, by kind.
    found: BTreeMap<String, String>,
}

impl NodeSync {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        node_name: String,
        network: NetworkConfig,
        netlink: rtnetlink::Handle,
        programs: Programs,
        remote_cidrs: RemoteCidrsMap,
        node_config: NodeConfigMap,
        metrics: Arc<Metrics>,
        conditions: Conditions,
    ) -> (NodeSync, watch::Receiver<NodeState>) {
        let (state, rx) = watch::channel(NodeState {
            not_ready: Some(format!("node {node_name}: the node list is not read yet")),
            ..Default::default()
        });
        let sync = NodeSync {
            node_name,
            network,
            netlink,
            programs,
            remote_cidrs,
            node_config,
            state,
            metrics,
            conditions,
            uplink: None,
            remote_applied: None,
            table_applied: None,
            forward_applied: None,
            routes_applied: None,
            found: BTreeMap::new(),
        };
        (sync, rx)
    }

    /// Reconciles on every node list change, at the resync period and, while
    /// failing or waiting, sooner.
    pub async fn run(mut self, mut nodes: watch::Receiver<Snapshot>, period: Duration) {
        let mut pace = Pace::new(OWNER, period);
        loop {
            let snapshot = nodes.borrow_and_update().clone();
            let result = self.reconcile(&snapshot).await;
            drop(snapshot);
            release_freed_memory();
            pace.after(&result, &self.metrics);
            tokio::select! {
                changed = nodes.changed() => if changed.is_err() { return },
                _ = pace.due() => {}
            }
        }
    }

    /// One pass: local datapath, remote CIDRs, masquerade, then the
    /// published state.
    pub async fn reconcile(&mut self, nodes: &[NodeRoute]) -> Result<Pass> {
        self.found.clear();
        let pass = self.apply(nodes).await;
        self.conditions.publish(OWNER, &self.found);
        match pass? {
            Pass::Done if !self.found.is_empty() => Ok(Pass::Repaired),
            pass => Ok(pass),
        }
    }

    async fn apply(&mut self, nodes: &[NodeRoute]) -> Result<Pass> {
        let me = nodes.iter().find(|n| n.name == self.node_name);
        let pod_cidr = me.and_then(|n| n.pod_cidrs.first().copied());
        let uplink = match me.and_then(|n| n.internal_ip) {
            Some(ip) => uplink::find(&self.netlink, ip).await?,
            None => None,
        };
        // Maps first: programs attached below never see them empty.
        self.sync_remote(nodes, uplink.as_ref().map(|u| u.net))?;
        // What the host stack needs (routes, nftables, FORWARD rules) does
        // not hold pods back: a failure there is retried and shows as
        // degraded, and the node state is published all the same.
        let mut degraded: Vec<(&str, anyhow::Error)> = Vec::new();
        if let Some(up) = &uplink {
            let vxlan_ifindex = self.local_datapath(up).await?;
            if let Err(e) = self.sync_routes(up, vxlan_ifindex).await {
                degraded.push(("pod_cidr_routes", e));
            }
        }
        if uplink != self.uplink {
            info!(from = ?self.uplink, to = ?uplink, "uplink");
            self.uplink = uplink.clone();
        }
        if let Err(e) = self.sync_table(desired_masquerade(&self.network, pod_cidr, nodes)) {
            degraded.push(("nftables_table", e));
        }
        let pod_cidrs =
            Ipv4Net::aggregate(&nodes.iter().flat_map(|n| n.pod_cidrs.clone()).collect());
        if let Err(e) = self.sync_forward(pod_cidrs) {
            degraded.push(("forward_rules", e));
        }
        for (kind, e) in &degraded {
            super::listed(&mut self.found, kind, &format!("{e:#}"));
        }

        let not_ready = not_ready_reason(&self.node_name, me, pod_cidr, uplink.as_ref());
        let state = NodeState {
            pod_cidr,
            pod_mtu: self
                .network
                .pod_mtu(uplink.as_ref().map_or(1500, |u| u.mtu)),
            uplink,
            not_ready,
            nodes: nodes.len(),
        };
        self.metrics.nodes.set(nodes.len() as i64);
        let waiting = state.not_ready.is_some();
        self.state.send_if_modified(|current| {
            if *current == state {
                return false;
            }
            info!(pod_cidr = ?state.pod_cidr, mtu = state.pod_mtu, not_ready = ?state.not_ready, "node state");
            *current = state;
            true
        });
        if let Some((_, e)) = degraded.into_iter().next() {
            return Err(e);
        }
        Ok(if waiting { Pass::Waiting } else { Pass::Done })
    }

    /// The VXLAN device, the node config map and the programs on the uplink
    /// and the VXLAN device; each checked every pass and repaired if changed
    /// behind the agent's back. Maps are filled before programs are attached.
    async fn local_datapath(&mut self, up: &Uplink) -> Result<u32> {
        let first = self.uplink.as_ref() != Some(up);
        let vxlan_ifindex = if self.network.mode.may_encapsulate() {
            uplink::ensure_vxlan(
                &self.netlink,
                self.network.vxlan_port,
                up.mtu - VXLAN_OVERHEAD,
                vxlan_mac(up.net.addr().octets()),
            )
            .await?
        } else {
            0
        };
        let config = NodeConfig {
            uplink_ifindex: up.ifindex,
            vxlan_ifindex,
            vni: self.network.vni,
            node_addr: up.net.addr().octets(),
            vxlan_port: self.network.vxlan_port,
            vxlan_encap: self.network.vxlan_encap as u16,
            flags: if self.network.services {
                beeline_common::NODE_SERVICES
            } else {
                0
            },
        };
        // A device recreated behind our back has a new index: its programs
        // are attached again below.
        let changed = self.node_config.get()? != config;
        if changed {
            self.node_config.set(config)?;
            self.repaired_unless(first, "node_config", &up.ifname);
        }
        let mut links = vec![
            (up.ifname.as_str(), Program::FromUplink),
            (up.ifname.as_str(), Program::ToUplink),
        ];
        if vxlan_ifindex != 0 {
            links.push((VXLAN_DEVICE, Program::FromOverlay));
            links.push((VXLAN_DEVICE, Program::ToOverlay));
        }
        for (ifname, program) in links {
            // At the first setup of this process, always: a restarted agent
            // swaps its own program into the pinned links.
            let missing = !self.programs.has_link(ifname, program);
            if first || changed || missing {
                self.programs.attach_link(ifname, program)?;
            }
            if missing {
                self.repaired_unless(first, "node_program", ifname);
            }
        }
        if first {
            // Pod traffic leaving the cluster goes through the host stack.
            std::fs::write("/proc/sys/net/ipv4/ip_forward", "1")
                .context("enabling IPv4 forwarding")?;
            info!(uplink = %up.ifname, mtu = up.mtu, net = %up.net, vxlan_ifindex, mode = ?self.network.mode, "node datapath ready");
        }
        Ok(vxlan_ifindex)
    }

    /// Kernel routes to the other nodes' podCIDRs, for what the host stack
    /// sends there; put back if deleted.
    async fn sync_routes(&mut self, up: &Uplink, vxlan_ifindex: u32) -> Result<()> {
        let Some(remote) = &self.remote_applied else {
            return Ok(());
        };
        let desired = routes::desired(remote, up, vxlan_ifindex);
        let changed = self.routes_applied.as_ref() != Some(&desired);
        let (added, removed) = routes::sync(&self.netlink, &desired, up.net.addr()).await?;
        if added + removed > 0 {
            info!(
                added,
                removed,
                routes = desired.len(),
                "routes to other nodes' pods"
            );
            self.repaired_unless(
                changed,
                "pod_cidr_route",
                &format!("{added} added, {removed} removed"),
            );
        }
        self.routes_applied = Some(desired);
        Ok(())
    }

    fn sync_remote(&mut self, nodes: &[NodeRoute], uplink_net: Option<Ipv4Net>) -> Result<()> {
        let desired = desired_entries(nodes, &self.node_name, self.network.mode, uplink_net);
        let (upserted, removed) = self.remote_cidrs.sync(&desired)?;
        if upserted + removed > 0 {
            info!(
                upserted,
                removed,
                remote_cidrs = desired.len(),
                "remote node routes updated"
            );
            let drift = self.remote_applied.as_ref() == Some(&desired);
            self.repaired_unless(
                !drift,
                "remote_cidr_entry",
                &format!("{upserted} written, {removed} removed"),
            );
        }
        self.metrics.set_map_fill(
            "remote_cidrs",
            desired.len(),
            beeline_common::MAX_REMOTE_CIDRS,
        );
        self.remote_applied = Some(desired);
        Ok(())
    }

    /// Beeline's nftables table: the stack-NAT mark, and the masquerade
    /// rules once the node has a podCIDR (unless `--no-masquerade`).
    fn sync_table(&mut self, masquerade: Option<Masquerade>) -> Result<()> {
        let changed = self.table_applied.as_ref() != Some(&masquerade);
        let missing = !changed && !table::installed().context("listing the nftables tables")?;
        if changed || missing {
            table::apply(masquerade.as_ref()).context("installing the nftables table")?;
            self.repaired_unless(!missing, "nftables_table", "table ip beeline was missing");
        }
        self.table_applied = Some(masquerade);
        Ok(())
    }

    /// Accept rules for pod traffic in iptables' FORWARD chain, when there is
    /// one (Docker sets its policy to DROP); put back if flushed.
    fn sync_forward(&mut self, pod_cidrs: Vec<Ipv4Net>) -> Result<()> {
        let installed = forward::installed().context("listing the FORWARD chain")?;
        let Some(installed) = installed else {
            self.forward_applied = None;
            return Ok(());
        };
        let changed = self.forward_applied.as_ref() != Some(&pod_cidrs);
        if changed || !installed {
            forward::apply(&pod_cidrs).context("installing the FORWARD accept rules")?;
            self.repaired_unless(
                changed,
                "forward_rules",
                "the jump to BEELINE-FORWARD was missing",
            );
        }
        self.forward_applied = Some(pod_cidrs);
        Ok(())
    }

    /// Counts a repair of `kind`, unless the change was the inputs' doing.
    fn repaired_unless(&mut self, expected: bool, kind: &str, what: &str) {
        if !expected {
            repaired(&self.metrics, &mut self.found, kind, what);
        }
    }
}

/// Parsing a large node list leaves megabytes of freed heap in glibc's
/// arenas; give them back so the agent's RSS reflects what it holds.
fn release_freed_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Why this node cannot network pods yet, if it cannot.
fn not_ready_reason(
    node_name: &str,
    me: Option<&NodeRoute>,
    pod_cidr: Option<Ipv4Net>,
    uplink: Option<&Uplink>,
) -> Option<String> {
    match (me, pod_cidr, uplink) {
        (None, _, _) => Some(format!(
            "node {node_name} is not in the node list; waiting for it"
        )),
        (Some(_), None, _) => Some(format!(
            "node {node_name} has no podCIDR yet; waiting for it"
        )),
        (Some(n), Some(_), None) => Some(match n.internal_ip {
            None => format!("node {node_name} has no InternalIP yet; waiting for it"),
            Some(ip) => format!(
                "node {node_name}: no interface holds its InternalIP {ip} yet; waiting for it"
            ),
        }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn node(name: &str, cidr: &str, ip: Option<Ipv4Addr>) -> NodeRoute {
        NodeRoute {
            name: name.into(),
            pod_cidrs: vec![cidr.parse().unwrap()],
            internal_ip: ip,
        }
    }

    #[test]
    fn masquerade_exceptions_merge_every_podcidr_and_the_configured_ones() {
        let config = NetworkConfig {
            mode: Mode::Auto,
            vni: 1,
            vxlan_port: 4789,
            vxlan_encap: VxlanEncap::Program,
            pod_mtu: None,
            no_masquerade: vec!["192.168.0.0/16".parse().unwrap()],
            masquerade: true,
            services: false,
        };
        let nodes = [
            node("a", "10.244.0.0/24", None),
            node("b", "10.244.1.0/24", None),
        ];
        let spec =
            desired_masquerade(&config, Some("10.244.0.0/24".parse().unwrap()), &nodes).unwrap();
        let want: Vec<Ipv4Net> = vec![
            "10.244.0.0/23".parse().unwrap(),
            "192.168.0.0/16".parse().unwrap(),
        ];
        assert_eq!(spec.exceptions, want);
        assert_eq!(desired_masquerade(&config, None, &nodes), None);
        let off = NetworkConfig {
            masquerade: false,
            ..config
        };
        assert_eq!(desired_masquerade(&off, spec.pod_cidr.into(), &nodes), None);
    }

    #[test]
    fn not_ready_says_what_is_missing() {
        let me = node("me", "10.244.0.0/24", Some(Ipv4Addr::new(192, 168, 1, 5)));
        let reason = |m, c, u| not_ready_reason("me", m, c, u).unwrap_or_default();
        assert!(reason(None, None, None).contains("not in the node list"));
        assert!(reason(Some(&me), None, None).contains("no podCIDR"));
        assert!(reason(Some(&me), me.pod_cidrs.first().copied(), None).contains("192.168.1.5"));
    }
}
