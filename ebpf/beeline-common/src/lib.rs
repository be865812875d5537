//! Types shared by the kernel-side datapath (`beeline-ebpf`) and user space
//! (`beeline-agent`). Every map key and value is `#[repr(C)]` with explicit
//! padding so both sides agree on the layout and `bpftool` prints field names.
#![no_std]

mod stats;

pub use stats::{
    Counter, Hook, MAX_PROGRAMS, MAX_VERDICTS, Program, STATS_SLOTS, Verdict, VerdictKind,
    stats_slot,
};

/// Map names as they appear in the object file and as pin names in bpffs.
pub mod map_names {
    pub const ENDPOINTS: &str = "BEELINE_ENDPOINTS";
    pub const REMOTE_CIDRS: &str = "BEELINE_REMOTE_CIDRS";
    pub const NODE_CONFIG: &str = "BEELINE_NODE_CONFIG";
    pub const STATS: &str = "BEELINE_STATS";
    pub const STACK_NAT: &str = "BEELINE_STACK_NAT";
    pub const STACK_NAT_ON: &str = "BEELINE_STACK_NAT_ON";
    pub const SERVICES: &str = "BEELINE_SERVICES";
    pub const BACKENDS: &str = "BEELINE_BACKENDS";
    pub const SOCK_REV_NAT: &str = "BEELINE_SOCK_REV_NAT";
    pub const AFFINITY: &str = "BEELINE_AFFINITY";
    pub const LB_NAT: &str = "BEELINE_LB_NAT";
    pub const ALL: [&str; 11] = [
        ENDPOINTS,
        REMOTE_CIDRS,
        NODE_CONFIG,
        STATS,
        STACK_NAT,
        STACK_NAT_ON,
        SERVICES,
        BACKENDS,
        SOCK_REV_NAT,
        AFFINITY,
        LB_NAT,
    ];
}

pub const MAX_ENDPOINTS: u32 = 65536;
pub const MAX_REMOTE_CIDRS: u32 = 16384;

/// Entries of `BEELINE_STACK_NAT` when the agent cannot read the node's
/// conntrack size; it sizes the map as `nf_conntrack_max` otherwise (no
/// more NATed connections can exist than conntrack holds).
pub const DEFAULT_STACK_NAT_ENTRIES: u32 = 262144;

/// The packet mark bit Beeline's nftables rule sets on packets of
/// connections the host stack destination-NATed, for the egress programs to
/// record (kube-proxy uses 0x4000 and 0x8000, Calico 0xffff0000).
pub const STACK_NAT_MARK: u32 = 0x0010_0000;

/// Bytes VXLAN adds in front of a frame: outer Ethernet 14 + IPv4 20 +
/// UDP 8 + VXLAN 8 (RFC 7348).
pub const VXLAN_OVERHEAD: u32 = 50;

/// Key of `BEELINE_ENDPOINTS`: a pod's IPv4 address in network byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct EndpointKey {
    pub addr: [u8; 4],
}

/// Value of `BEELINE_ENDPOINTS`: where to deliver packets for a local pod.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// ifindex of the pod's host-side veth (the argument of `bpf_redirect_peer`).
    pub host_ifindex: u32,
    /// MAC of the pod's interface (destination MAC after the rewrite).
    pub pod_mac: [u8; 6],
    /// MAC of the host-side veth (source MAC after the rewrite; the pod's gateway MAC).
    pub host_mac: [u8; 6],
    /// `ENDPOINT_*` bits.
    pub flags: u32,
}

/// `Endpoint::flags`: deliver through the host stack, not straight into the
/// pod (the bandwidth plugin shapes it on its host veth).
pub const ENDPOINT_THROUGH_STACK: u32 = 1;

/// How packets reach a remote node.
#[repr(u16)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tunnel {
    /// `bpf_redirect_neigh` to the node's underlay address out of the uplink.
    Direct = 0,
    /// VXLAN encapsulation (see [`VxlanEncap`] for who builds the headers).
    Vxlan = 1,
}

/// Who encapsulates and decapsulates VXLAN (`NodeConfig::vxlan_encap`).
#[repr(u16)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VxlanEncap {
    /// The node's collect_md VXLAN device (`bpf_skb_set_tunnel_key`).
    Device = 0,
    /// The programs themselves (`bpf_skb_adjust_room`), straight to and from
    /// the uplink; the device stays as the fallback for what they decline.
    Program = 1,
}

/// Value of `BEELINE_REMOTE_CIDRS` (an LPM trie keyed by a remote podCIDR,
/// or by a remote node's own address as a /32).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RemoteNode {
    /// Underlay (InternalIP) address of the node owning the CIDR, network byte order.
    pub node_addr: [u8; 4],
    /// A [`Tunnel`] value.
    pub tunnel: u16,
    /// `REMOTE_*` bits.
    pub flags: u16,
}

/// `RemoteNode::flags`: the key is the node's own address, not a podCIDR
/// (over VXLAN, the inner frame goes to that node's VXLAN device).
pub const REMOTE_IS_NODE: u16 = 1;

/// The MAC of a node's VXLAN device, derived from its address so every
/// node knows every other's: `02:be:` and the four address bytes.
pub const fn vxlan_mac(node_addr: [u8; 4]) -> [u8; 6] {
    [
        0x02,
        0xbe,
        node_addr[0],
        node_addr[1],
        node_addr[2],
        node_addr[3],
    ]
}

/// Key of `BEELINE_STACK_NAT`: a packet's addresses and ports as they are
/// on the wire (network byte order), for TCP and UDP.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowKey {
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
    pub sport: [u8; 2],
    pub dport: [u8; 2],
    pub protocol: u8,
    pub pad: [u8; 3],
}

pub const MAX_SERVICE_ENTRIES: u32 = 262144;
pub const MAX_BACKENDS: u32 = 131072;
pub const MAX_SOCK_REV_NAT: u32 = 262144;
pub const MAX_AFFINITY: u32 = 65536;
pub const MAX_LB_NAT: u32 = 262144;

/// `ServiceKey::scope`: who the entry translates for.
pub mod scope {
    /// Sockets of pods and of the node (`connect`/`sendmsg` hooks): a
    /// ClusterIP, and externalIPs, load-balancer IPs and this node's
    /// NodePorts reached from inside the cluster.
    pub const SOCKET: u8 = 0;
    /// Packets arriving from outside the cluster on the uplink: NodePorts,
    /// externalIPs and load-balancer IPs.
    pub const EXTERNAL: u8 = 1;
}

/// Key of `BEELINE_SERVICES`, Cilium's `lb4_key` shape: slot 0 is the
/// Service's frontend (address, port, protocol, scope), slots 1..=count its
/// backends.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    pub addr: [u8; 4],
    /// Network byte order.
    pub port: [u8; 2],
    pub protocol: u8,
    /// A [`scope`] value.
    pub scope: u8,
    pub slot: u16,
    pub pad: [u8; 2],
}

/// Value of `BEELINE_SERVICES`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceEntry {
    /// Slot 0: the frontend's id (affinity and counters are keyed by it).
    /// Other slots: the backend's id in `BEELINE_BACKENDS`.
    pub id: u32,
    /// Slot 0: how many backend slots follow (0: the Service has no
    /// endpoints, connections are refused).
    pub count: u16,
    /// Slot 0: `SERVICE_*` bits.
    pub flags: u16,
    /// Slot 0: `sessionAffinity: ClientIP` timeout in seconds (0: none).
    pub affinity_timeout: u32,
}

/// `ServiceEntry::flags`: translate the client's address to this node's
/// (`externalTrafficPolicy: Cluster`; `Local` keeps the client's).
pub const SERVICE_SNAT: u16 = 1;

/// Value of `BEELINE_BACKENDS` (keyed by backend id).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backend {
    pub addr: [u8; 4],
    /// Network byte order.
    pub port: [u8; 2],
    pub protocol: u8,
    pub pad: u8,
}

/// Key of `BEELINE_SOCK_REV_NAT`: a translated socket and the backend it
/// was sent to, for `recvmsg` and `getpeername` to show the Service.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockRevKey {
    pub cookie: u64,
    pub addr: [u8; 4],
    pub port: [u8; 2],
    pub pad: [u8; 2],
}

/// Value of `BEELINE_SOCK_REV_NAT`: the Service address the socket asked for.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockRevNat {
    pub addr: [u8; 4],
    pub port: [u8; 2],
    pub pad: [u8; 2],
}

/// Key of `BEELINE_AFFINITY`: a client (a netns cookie for sockets, an
/// IPv4 address for packets from outside) and a frontend id.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AffinityKey {
    pub client: u64,
    pub frontend: u32,
    pub scope: u32,
}

/// Value of `BEELINE_AFFINITY`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Affinity {
    pub backend: u32,
    /// The backend's slot in the frontend when chosen (checked again: the
    /// backend must still be there).
    pub slot: u32,
    /// `bpf_ktime_get_ns` of the last connection that used it.
    pub last_used_ns: u64,
}

/// Value of `BEELINE_LB_NAT` (keyed by a packet's [`FlowKey`] as it
/// arrives): the addresses and ports to write into it, both directions of
/// each translated connection (Beeline's own connection tracking for
/// Services reached from outside).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LbNat {
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
    pub sport: [u8; 2],
    pub dport: [u8; 2],
    /// `LB_NAT_*` bits.
    pub flags: u32,
    /// `bpf_ktime_get_ns` of the last packet (the agent expires idle ones).
    pub last_seen_ns: u64,
    /// The frontend's id (counters, and removal with the Service).
    pub frontend: u32,
    /// The backend's id (removal with the backend).
    pub backend: u32,
}

/// `LbNat::flags`: the reply direction (backend to client).
pub const LB_NAT_REPLY: u32 = 1;

/// `NodeConfig::flags`: this node translates Services itself
/// (`--kube-proxy-replacement`).
pub const NODE_SERVICES: u32 = 1;

/// The single value of `BEELINE_NODE_CONFIG`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NodeConfig {
    pub uplink_ifindex: u32,
    pub vxlan_ifindex: u32,
    /// VXLAN network identifier used for the tunnel key.
    pub vni: u32,
    /// This node's underlay address, network byte order.
    pub node_addr: [u8; 4],
    /// VXLAN UDP destination port, host byte order.
    pub vxlan_port: u16,
    /// A [`VxlanEncap`] value.
    pub vxlan_encap: u16,
    /// `NODE_*` bits.
    pub flags: u32,
}

#[cfg(feature = "user")]
mod user {
    use super::*;
    // SAFETY: plain-old-data, `#[repr(C)]`, no padding holes with undefined content
    // (fields are laid out to avoid implicit padding).
    unsafe impl aya::Pod for EndpointKey {}
    unsafe impl aya::Pod for Endpoint {}
    unsafe impl aya::Pod for RemoteNode {}
    unsafe impl aya::Pod for NodeConfig {}
    unsafe impl aya::Pod for Counter {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for ServiceKey {}
    unsafe impl aya::Pod for ServiceEntry {}
    unsafe impl aya::Pod for Backend {}
    unsafe impl aya::Pod for SockRevKey {}
    unsafe impl aya::Pod for SockRevNat {}
    unsafe impl aya::Pod for AffinityKey {}
    unsafe impl aya::Pod for Affinity {}
    unsafe impl aya::Pod for LbNat {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    // The kernel program and user space must agree on sizes: a silent layout
    // change would corrupt every map entry.
    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<EndpointKey>(), 4);
        assert_eq!(size_of::<Endpoint>(), 20);
        assert_eq!(size_of::<RemoteNode>(), 8);
        assert_eq!(size_of::<NodeConfig>(), 24);
        assert_eq!(size_of::<ServiceKey>(), 12);
        assert_eq!(size_of::<ServiceEntry>(), 12);
        assert_eq!(size_of::<Backend>(), 8);
        assert_eq!(size_of::<SockRevKey>(), 16);
        assert_eq!(size_of::<SockRevNat>(), 8);
        assert_eq!(size_of::<AffinityKey>(), 16);
        assert_eq!(size_of::<Affinity>(), 16);
        assert_eq!(size_of::<LbNat>(), 32);
        assert_eq!(size_of::<Counter>(), 16);
        assert_eq!(size_of::<FlowKey>(), 16);
    }
}
