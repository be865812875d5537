//! The programs on the node's own devices: `beeline_from_uplink` (tc
//! ingress of the uplink) and `beeline_from_overlay` (tc ingress of the
//! VXLAN device): packets from other nodes for a local pod go straight into
//! its netns, VXLAN for a local pod is decapsulated on the uplink already;
//! `beeline_to_uplink` and `beeline_to_overlay` (their egress): what the
//! host stack sends out, whose NATed connections are recorded, and to which
//! the VXLAN device's program names the remote node.
use aya_ebpf::programs::TcContext;
use beeline_common::{NODE_SERVICES, NodeConfig, Verdict, VxlanEncap, vxlan_mac};

use crate::{
    external_lb,
    forward::{node_config, remote_node},
    local_delivery::to_local_pod,
    packet::{Headers, IPPROTO_UDP, ports},
    stack_nat,
    stats::Outcome,
    vxlan,
};

#[inline(always)]
pub fn try_from_uplink(ctx: &TcContext) -> Outcome {
    let mut h = Headers::parse(ctx)?;
    let config = node_config();
    if h.protocol() == IPPROTO_UDP
        && let Some(config) = config
        && config.vxlan_encap == VxlanEncap::Program as u16
        && h.daddr() == config.node_addr
        && ports(ctx, &h).is_some_and(|p| [p[2], p[3]] == config.vxlan_port.to_be_bytes())
    {
        return vxlan::decapsulate(ctx, config);
    }
    if let Some(outcome) = services_from_outside(ctx, &h, config) {
        return outcome;
    }
    to_local_pod(ctx, &mut h)
}

/// What the VXLAN device decapsulated (the programs declined it): a packet
/// for a pod, or for this node (a NodePort, a reply to a translated client).
#[inline(always)]
pub fn try_from_overlay(ctx: &TcContext) -> Outcome {
    let mut h = Headers::parse(ctx)?;
    if let Some(outcome) = services_from_outside(ctx, &h, node_config()) {
        return outcome;
    }
    to_local_pod(ctx, &mut h)
}

/// Services reached from outside, when this node translates them.
#[inline(always)]
fn services_from_outside(
    ctx: &TcContext,
    h: &Headers,
    config: Option<&NodeConfig>,
) -> Option<Outcome> {
    let config = config?;
    if config.flags & NODE_SERVICES == 0 {
        return None;
    }
    external_lb::from_outside(ctx, h, config)
}

#[inline(always)]
pub fn try_to_uplink(ctx: &TcContext) -> Outcome {
    Err(stack_nat::record(ctx))
}

/// The host stack routes other nodes' podCIDRs to the VXLAN device: the
/// tunnel goes to the node that owns the destination.
#[inline(always)]
pub fn try_to_overlay(ctx: &TcContext) -> Outcome {
    let recorded = stack_nat::record(ctx);
    let mut h = Headers::parse(ctx)?;
    let remote = remote_node(h.daddr()).ok_or(Verdict::DroppedNoRemoteNode)?;
    let config = node_config().ok_or(Verdict::DroppedNoRemoteNode)?;
    // From this node's VXLAN device to the remote node's, as the programs
    // address inner frames.
    h.set_macs(&vxlan_mac(remote.node_addr), &vxlan_mac(config.node_addr));
    vxlan::set_tunnel_key(ctx, config, &remote)?;
    Err(match recorded {
        Verdict::Continued => Verdict::TunnelKeySet,
        recorded => recorded,
    })
}
