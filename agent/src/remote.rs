//! Which remote podCIDRs go to which node, and how (direct or VXLAN).
use std::{collections::BTreeMap, net::Ipv4Addr};

use beeline_common::{REMOTE_IS_NODE, RemoteNode, Tunnel};
use ipnet::Ipv4Net;

use crate::sources::nodes::NodeRoute;

/// `--mode`: how to reach other nodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Direct for peers on the uplink's L2 subnet, VXLAN for the others.
    Auto,
    /// Always `bpf_redirect_neigh` to the peer's underlay IP (like flannel host-gw).
    Direct,
    /// Always VXLAN (like flannel vxlan).
    Vxlan,
}

impl Mode {
    /// Whether pods must leave room for VXLAN headers.
    pub fn may_encapsulate(self) -> bool {
        self != Mode::Direct
    }
}

pub fn tunnel_for(mode: Mode, uplink_net: Option<Ipv4Net>, peer: Ipv4Addr) -> Tunnel {
    match mode {
        Mode::Direct => Tunnel::Direct,
        Mode::Vxlan => Tunnel::Vxlan,
        Mode::Auto if uplink_net.is_some_and(|n| n.contains(&peer)) => Tunnel::Direct,
        Mode::Auto => Tunnel::Vxlan,
    }
}

/// The LPM entries this node should have: every other node's podCIDRs,
/// and each other node's own address as a /32, so a pod's replies to a
/// process on another node (an API server calling a webhook) go back the
/// way the request came, past this node's stack, which never saw it. Nodes
/// without an InternalIP cannot be reached and are left out.
pub fn desired_entries(
    nodes: &[NodeRoute],
    me: &str,
    mode: Mode,
    uplink_net: Option<Ipv4Net>,
) -> BTreeMap<Ipv4Net, RemoteNode> {
    let mut out = BTreeMap::new();
    for node in nodes.iter().filter(|n| n.name != me) {
        let Some(ip) = node.internal_ip else { continue };
        let remote = |flags| RemoteNode {
            node_addr: ip.octets(),
            tunnel: tunnel_for(mode, uplink_net, ip) as u16,
            flags,
        };
        for cidr in &node.pod_cidrs {
            out.insert(*cidr, remote(0));
        }
        out.insert(
            Ipv4Net::new(ip, 32).expect("/32 is valid"),
            remote(REMOTE_IS_NODE),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, cidr: &str, ip: &str) -> NodeRoute {
        NodeRoute {
            name: name.into(),
            pod_cidrs: vec![cidr.parse().unwrap()],
            internal_ip: Some(ip.parse().unwrap()),
        }
    }

    #[test]
    fn auto_picks_direct_on_the_same_subnet_and_vxlan_elsewhere() {
        let uplink: Ipv4Net = "192.168.10.5/24".parse().unwrap();
        let nodes = [
            node("me", "10.244.0.0/24", "192.168.10.5"),
            node("near", "10.244.1.0/24", "192.168.10.6"),
            node("far", "10.244.2.0/24", "172.20.0.9"),
            NodeRoute {
                name: "no-ip".into(),
                pod_cidrs: vec!["10.244.3.0/24".parse().unwrap()],
                internal_ip: None,
            },
        ];
        let entries = desired_entries(&nodes, "me", Mode::Auto, Some(uplink));
        assert_eq!(
            entries.len(),
            4,
            "two podCIDRs and two node addresses; own CIDR and unreachable nodes are left out"
        );
        let near_node = entries[&"192.168.10.6/32".parse().unwrap()];
        assert_eq!(near_node.flags, REMOTE_IS_NODE);
        assert_eq!(near_node.node_addr, [192, 168, 10, 6]);
        let near = entries[&"10.244.1.0/24".parse().unwrap()];
        assert_eq!(near.tunnel, Tunnel::Direct as u16);
        assert_eq!(near.node_addr, [192, 168, 10, 6]);
        let far = entries[&"10.244.2.0/24".parse().unwrap()];
        assert_eq!(far.tunnel, Tunnel::Vxlan as u16);

        let forced = desired_entries(&nodes, "me", Mode::Vxlan, Some(uplink));
        assert!(forced.values().all(|e| e.tunnel == Tunnel::Vxlan as u16));
        let forced = desired_entries(&nodes, "me", Mode::Direct, Some(uplink));
        assert!(forced.values().all(|e| e.tunnel == Tunnel::Direct as u16));
    }
}
