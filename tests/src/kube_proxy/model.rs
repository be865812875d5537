//! The Services, endpoints and node settings the rules are rendered from.
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

/// kube-proxy's two Linux modes modelled here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProxyMode {
    /// `iptables` mode (iptables-nft here, as on current distributions).
    Iptables,
    /// `nftables` mode: table `ip kube-proxy`.
    Nftables,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    /// `strings.ToLower(string(v1.Protocol))`, as kube-proxy hashes and prints it.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePort {
    /// The port's name ("" for a Service's single unnamed port).
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
    /// The endpoints' port (numeric targetPort).
    pub target_port: u16,
    /// Set for Services of type NodePort.
    pub node_port: Option<u16>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceEndpoint {
    pub ip: Ipv4Addr,
    /// The endpoint's nodeName is this node.
    pub local: bool,
    /// `conditions.ready`; endpoints that are not ready are left out.
    pub ready: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Service {
    pub namespace: String,
    pub name: String,
    pub cluster_ip: Ipv4Addr,
    pub ports: Vec<ServicePort>,
    /// Every endpoint serves every port (at the port's `target_port`).
    pub endpoints: Vec<ServiceEndpoint>,
    /// `externalTrafficPolicy: Local` (only matters for NodePort ports).
    pub external_traffic_policy_local: bool,
    /// `sessionAffinity: ClientIP` with this timeout (kube-proxy's default is 10800).
    pub session_affinity_seconds: Option<u32>,
}

/// What kube-proxy knows about the node it runs on, and its flags.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeSettings {
    /// The node's IPs (the first is kube-proxy's `nodeIP`).
    pub node_ips: Vec<Ipv4Addr>,
    /// `--cluster-cidr` (detect-local-mode ClusterCIDR); `None` leaves out
    /// the `! -s <cidr> -j KUBE-MARK-MASQ` and "pod traffic" rules, as
    /// kube-proxy does without it.
    pub cluster_cidr: Option<Ipv4Net>,
    /// The ServiceCIDRs (nftables: "Drop traffic to unallocated ClusterIPs").
    pub service_cidrs: Vec<Ipv4Net>,
    /// `--nodeport-addresses`. `None` is kube-proxy's default for the mode:
    /// every local address in iptables mode, `primary` (the node IPs) in
    /// nftables mode. The addresses used are the `node_ips` inside the CIDRs.
    pub nodeport_addresses: Option<Vec<Ipv4Net>>,
    /// `--masquerade-all`.
    pub masquerade_all: bool,
    /// `--iptables-masquerade-bit` (kube-proxy's default 14: mark 0x4000).
    pub masquerade_bit: u8,
    /// `--iptables-localhost-nodeports` (default true).
    pub localhost_nodeports: bool,
    /// The node has `net.netfilter.nf_conntrack_tcp_be_liberal` set.
    pub conntrack_tcp_be_liberal: bool,
}

impl Default for NodeSettings {
    fn default() -> Self {
        NodeSettings {
            node_ips: Vec::new(),
            cluster_cidr: None,
            service_cidrs: Vec::new(),
            nodeport_addresses: None,
            masquerade_all: false,
            masquerade_bit: 14,
            localhost_nodeports: true,
            conntrack_tcp_be_liberal: false,
        }
    }
}
