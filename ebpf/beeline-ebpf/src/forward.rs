//! Forwarding to other nodes: the remote podCIDR's owner is reached by
//! direct routing (`bpf_redirect_neigh` out of the uplink) or VXLAN.
use aya_ebpf::{
    bindings::bpf_redir_neigh, helpers::generated::bpf_redirect_neigh, programs::TcContext,
};
use aya_log_ebpf::debug;
use beeline_common::{NodeConfig, RemoteNode, Tunnel, Verdict, VxlanEncap, vxlan_mac};

use crate::{
    maps::{BEELINE_NODE_CONFIG, BEELINE_REMOTE_CIDRS},
    packet::Headers,
    stats::{Outcome, redirected},
    vxlan,
};
use aya_ebpf::btf_maps::lpm_trie::Key;

const AF_INET: u32 = 2;

/// The node whose podCIDR holds `addr`, if it is another node's.
#[inline(always)]
pub fn remote_node(addr: [u8; 4]) -> Option<RemoteNode> {
    BEELINE_REMOTE_CIDRS.get(&Key::new(32, addr)).copied()
}

#[inline(always)]
pub fn node_config() -> Option<&'static NodeConfig> {
    BEELINE_NODE_CONFIG.get(0)
}

/// Sends a pod's packet to the node that owns its destination.
#[inline(always)]
pub fn to_remote_node(ctx: &TcContext, h: &mut Headers, remote: &RemoteNode) -> Outcome {
    let config = node_config().ok_or(Verdict::PassedToHost)?;
    if !h.decrement_ttl() {
        return Err(Verdict::PassedToHost);
    }
    if remote.tunnel == Tunnel::Vxlan as u16 {
        // The inner frame goes from this node's VXLAN device to the remote
        // node's (their MACs are derived from the nodes' addresses): what the
        // remote programs leave to its device (a reply the stack must
        // translate, a packet for the node itself) is addressed to it.
        h.set_macs(&vxlan_mac(remote.node_addr), &vxlan_mac(config.node_addr));
        if config.vxlan_encap == VxlanEncap::Program as u16 && config.uplink_ifindex != 0 {
            return vxlan::encapsulate(ctx, h, config, remote);
        }
        return vxlan::through_device(ctx, config, remote);
    }
    if config.uplink_ifindex == 0 {
        return Err(Verdict::PassedToHost);
    }
    redirect_to_node(ctx, config, remote, Verdict::ForwardedDirect)
}

/// Out of the uplink to the remote node's underlay address; the kernel
/// resolves its MAC (`bpf_redirect_neigh`).
#[inline(always)]
pub fn redirect_to_node(
    ctx: &TcContext,
    config: &NodeConfig,
    remote: &RemoteNode,
    verdict: Verdict,
) -> Outcome {
    // SAFETY: all-zero is a valid bpf_redir_neigh.
    let mut nh: bpf_redir_neigh = unsafe { core::mem::zeroed() };
    nh.nh_family = AF_INET;
    // ipv4_nh is network byte order: copy the bytes as they are.
    nh.__bindgen_anon_1.ipv4_nh = u32::from_ne_bytes(remote.node_addr);
    // SAFETY: `nh` lives on the stack for the duration of the call.
    let rc = unsafe {
        bpf_redirect_neigh(
            config.uplink_ifindex,
            &mut nh,
            core::mem::size_of::<bpf_redir_neigh>() as i32,
            0,
        )
    };
    let outcome = redirected(rc, verdict);
    if outcome.is_err() {
        debug!(
            ctx,
            "bpf_redirect_neigh to ifindex {} failed", config.uplink_ifindex
        );
    }
    outcome
}
