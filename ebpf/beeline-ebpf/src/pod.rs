//! `beeline_from_pod`, on the tc ingress of every pod's host-side veth:
//! packets leaving the pod.
use aya_ebpf::programs::TcContext;
use aya_log_ebpf::debug;
use beeline_common::Verdict;

use crate::{
    forward::{remote_node, to_remote_node},
    local_delivery::{deliver, endpoint},
    packet::Headers,
    stats::Outcome,
};

/// A local destination is delivered straight into its pod; one inside a
/// remote node's podCIDR is forwarded to that node; anything else goes up
/// the host stack.
#[inline(always)]
pub fn try_from_pod(ctx: &TcContext) -> Outcome {
    let mut h = Headers::parse(ctx).inspect_err(|v| {
        if *v == Verdict::DroppedMalformed {
            debug!(
                ctx,
                "dropping a malformed frame of {} bytes from a pod",
                ctx.len()
            );
        }
    })?;
    let daddr = h.daddr();
    if let Some(ep) = endpoint(daddr) {
        return deliver(ctx, &mut h, &ep);
    }
    if let Some(remote) = remote_node(daddr) {
        return to_remote_node(ctx, &mut h, &remote);
    }
    Err(Verdict::PassedToHost)
}
