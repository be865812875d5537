//! The programs on the node's own devices: `beeline_from_uplink` (tc
//! ingress of the uplink) and `beeline_from_overlay` (tc ingress of the
//! VXLAN device). Packets from other nodes for a local pod go straight into
//! its netns; VXLAN for a local pod is decapsulated on the uplink already.
use aya_ebpf::programs::TcContext;
use beeline_common::VxlanEncap;

use crate::{
    forward::node_config,
    local_delivery::to_local_pod,
    packet::{Headers, IPPROTO_UDP},
    stats::Outcome,
    vxlan,
};

#[inline(always)]
pub fn try_from_uplink(ctx: &TcContext) -> Outcome {
    let mut h = Headers::parse(ctx)?;
    if h.protocol() == IPPROTO_UDP
        && let Some(config) = node_config()
        && config.vxlan_encap == VxlanEncap::Program as u16
        && h.daddr() == config.node_addr
    {
        return vxlan::decapsulate(ctx, config);
    }
    to_local_pod(ctx, &mut h)
}

/// What the VXLAN device decapsulated (the programs declined it).
#[inline(always)]
pub fn try_from_overlay(ctx: &TcContext) -> Outcome {
    let mut h = Headers::parse(ctx)?;
    to_local_pod(ctx, &mut h)
}
