//! Types shared by the kernel-side datapath (`beeline-ebpf`) and user space
//! (`beeline-agent`). Every map key and value is `#[repr(C)]` with explicit
//! padding so both sides agree on the layout and `bpftool` prints field names.
#![no_std]

mod stats;

pub use stats::{
    Counter, MAX_PROGRAMS, MAX_VERDICTS, Program, STATS_SLOTS, Verdict, VerdictKind, stats_slot,
};

/// Map names as they appear in the object file and as pin names in bpffs.
pub mod map_names {
    pub const ENDPOINTS: &str = "BEELINE_ENDPOINTS";
    pub const REMOTE_CIDRS: &str = "BEELINE_REMOTE_CIDRS";
    pub const NODE_CONFIG: &str = "BEELINE_NODE_CONFIG";
    pub const STATS: &str = "BEELINE_STATS";
    pub const ALL: [&str; 4] = [ENDPOINTS, REMOTE_CIDRS, NODE_CONFIG, STATS];
}

pub const MAX_ENDPOINTS: u32 = 65536;
pub const MAX_REMOTE_CIDRS: u32 = 16384;

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
}

/// How packets reach a remote node.
#[repr(u32)]
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

/// Value of `BEELINE_REMOTE_CIDRS` (an LPM trie keyed by a remote podCIDR).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RemoteNode {
    /// Underlay (InternalIP) address of the node owning the CIDR, network byte order.
    pub node_addr: [u8; 4],
    /// A [`Tunnel`] value.
    pub tunnel: u32,
}

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
        assert_eq!(size_of::<Endpoint>(), 16);
        assert_eq!(size_of::<RemoteNode>(), 8);
        assert_eq!(size_of::<NodeConfig>(), 20);
        assert_eq!(size_of::<Counter>(), 16);
    }
}
