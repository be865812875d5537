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
//! - `sock` (cgroup hooks), `external_lb` (per packet) and `service`:
//!   Beeline's own Service load balancing;
//! - `packet`: header access; `maps`: every map; `stats`: verdict counters.
#![no_std]
#![no_main]

mod external_lb;
mod forward;
mod local_delivery;
mod maps;
mod node;
mod packet;
mod pod;
mod service;
mod sock;
mod stack_nat;
mod stats;
mod vxlan;

use aya_ebpf::{
    macros::{cgroup_sock_addr, classifier},
    programs::{SockAddrContext, TcContext},
};
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

#[cgroup_sock_addr(connect4)]
pub fn beeline_sock_connect4(ctx: SockAddrContext) -> i32 {
    let outcome = sock::try_translate(&ctx);
    sock_finish(Program::SockConnect, &outcome);
    sock::allow(&outcome, true)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn beeline_sock_sendmsg4(ctx: SockAddrContext) -> i32 {
    let outcome = sock::try_translate(&ctx);
    sock_finish(Program::SockSendmsg, &outcome);
    sock::allow(&outcome, true)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn beeline_sock_recvmsg4(ctx: SockAddrContext) -> i32 {
    let outcome = sock::try_reverse(&ctx);
    sock_finish(Program::SockRecvmsg, &outcome);
    sock::allow(&outcome, false)
}

#[cgroup_sock_addr(getpeername4)]
pub fn beeline_sock_getpeername4(ctx: SockAddrContext) -> i32 {
    let outcome = sock::try_reverse(&ctx);
    sock_finish(Program::SockGetpeername, &outcome);
    sock::allow(&outcome, false)
}

/// Socket calls are counted when something happened (not every call of
/// every socket on the node).
#[inline(always)]
fn sock_finish(program: Program, outcome: &sock::SockOutcome) {
    if let Ok(v) | Err(v) = *outcome
        && v != beeline_common::Verdict::Continued
    {
        stats::count(program, v, 0);
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
