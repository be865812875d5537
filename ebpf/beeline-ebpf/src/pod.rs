//! The programs on a pod's host veth: `beeline_from_pod` (tc ingress:
//! packets leaving the pod) and `beeline_to_pod` (tc egress: what the host
//! stack sends the pod).
use aya_ebpf::programs::TcContext;
use aya_log_ebpf::debug;
use beeline_common::{NODE_SERVICES, Verdict};

use crate::{
    external_lb,
    forward::{node_config, remote_node, to_remote_node},
    local_delivery::{deliver, endpoint},
    packet::Headers,
    stack_nat,
    stats::Outcome,
};

/// A local destination is delivered straight into its pod; one inside a
/// remote node's podCIDR (or a remote node itself) is forwarded to that
/// node; anything else, and every reply of a connection the host stack
/// NATed, goes up the host stack.
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
    // A backend's reply to a client outside the cluster.
    if let Some(config) = node_config()
        && config.flags & NODE_SERVICES != 0
        && let Some(outcome) = external_lb::tracked(ctx, &h, config)
    {
        return outcome;
    }
    let daddr = h.daddr();
    if let Some(ep) = endpoint(daddr) {
        stack_nat::leave_replies_to_stack(ctx, &h)?;
        return deliver(ctx, &mut h, &ep);
    }
    if let Some(remote) = remote_node(daddr) {
        stack_nat::leave_replies_to_stack(ctx, &h)?;
        return to_remote_node(ctx, &mut h, &remote);
    }
    Err(Verdict::PassedToHost)
}

/// Records the replies of connections the stack NATed towards this pod (a
/// Service's backend, a hostPort's target).
#[inline(always)]
pub fn try_to_pod(ctx: &TcContext) -> Outcome {
    Err(stack_nat::record(ctx))
}
