//! Beeline's kernel-side datapath: tc programs, named for where they run
//! (Cilium's `bpf_lxc` / `bpf_host` / `bpf_overlay` split), each a thin
//! entry point over a `try_` function whose error is the packet's verdict.
//!
//! - `pod`: a pod's host veth (ingress: packets leaving the pod; egress:
//!   what the host stack sends it);
//! - `node`: the uplink and the VXLAN device (ingress: packets from other
//!   nodes; egress: what the host stack sends out);
//! - `local_delivery`: the one place a packet enters a pod;
//! - `forward` and `vxlan`: to other nodes, directly or encapsulated;
//! - `stack_nat`: replies of connections the host stack NATed go back to it;
//! - `packet`: header access; `maps`: every map; `stats`: verdict counters.
#![no_std]
#![no_main]

mod forward;
mod local_delivery;
mod maps;
mod node;
mod packet;
mod pod;
mod stack_nat;
mod stats;
mod vxlan;

use aya_ebpf::{macros::classifier, programs::TcContext};
use beeline_common::Program;

#[classifier]
pub fn beeline_from_pod(ctx: TcContext) -> i32 {
    stats::finish(&ctx, Program::FromPod, pod::try_from_pod(&ctx))
}

#[classifier]
pub fn beeline_from_uplink(ctx: TcContext) -> i32 {
    stats::finish(&ctx, Program::FromUplink, node::try_from_uplink(&ctx))
}

#[classifier]
pub fn beeline_from_overlay(ctx: TcContext) -> i32 {
    stats::finish(&ctx, Program::FromOverlay, node::try_from_overlay(&ctx))
}

#[classifier]
pub fn beeline_to_pod(ctx: TcContext) -> i32 {
    stats::finish(&ctx, Program::ToPod, pod::try_to_pod(&ctx))
}

#[classifier]
pub fn beeline_to_uplink(ctx: TcContext) -> i32 {
    stats::finish(&ctx, Program::ToUplink, node::try_to_uplink(&ctx))
}

#[classifier]
pub fn beeline_to_overlay(ctx: TcContext) -> i32 {
    stats::finish(&ctx, Program::ToOverlay, node::try_to_overlay(&ctx))
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
