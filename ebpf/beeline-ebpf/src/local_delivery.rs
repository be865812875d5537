//! The one place a packet enters a local pod: every program that delivers
//! (from a pod, from the uplink, from the overlay) ends here.
use aya_ebpf::{helpers::generated::bpf_redirect_peer, programs::TcContext};
use aya_log_ebpf::debug;
use beeline_common::{ENDPOINT_THROUGH_STACK, Endpoint, EndpointKey, Verdict};

use crate::{
    maps::BEELINE_ENDPOINTS,
    packet::Headers,
    stack_nat,
    stats::{Outcome, redirected},
};

/// The local pod that owns `addr`, if any.
#[inline(always)]
pub fn endpoint(addr: [u8; 4]) -> Option<Endpoint> {
    // SAFETY: the value is copied out before any map update can reuse the slot.
    unsafe { BEELINE_ENDPOINTS.get(EndpointKey { addr }) }.copied()
}

/// Rewrites the Ethernet header and hands the packet straight to the pod's
/// netns (`bpf_redirect_peer` from ingress: no second pass through the
/// host's backlog).
#[inline(always)]
pub fn deliver(ctx: &TcContext, h: &mut Headers, ep: &Endpoint) -> Outcome {
    if ep.flags & ENDPOINT_THROUGH_STACK != 0 {
        return Err(Verdict::PassedThroughStack);
    }
    if !h.decrement_ttl() {
        return Err(Verdict::PassedToHost);
    }
    h.set_macs(&ep.pod_mac, &ep.host_mac);
    // SAFETY: plain helper call; the kernel validates the ifindex.
    let rc = unsafe { bpf_redirect_peer(ep.host_ifindex, 0) };
    let outcome = redirected(rc, Verdict::RedirectedLocal);
    if outcome.is_err() {
        // Off the hot path: only failures log, and only at debug level.
        debug!(
            ctx,
            "bpf_redirect_peer to ifindex {} failed", ep.host_ifindex
        );
    }
    outcome
}

/// Delivers a packet from another node to its destination pod if that pod
/// is on this node, and the packet is not a reply the stack must translate.
#[inline(always)]
pub fn to_local_pod(ctx: &TcContext, h: &mut Headers) -> Outcome {
    let ep = endpoint(h.daddr()).ok_or(Verdict::PassedToHost)?;
    stack_nat::leave_replies_to_stack(ctx, h)?;
    deliver(ctx, h, &ep)
}
