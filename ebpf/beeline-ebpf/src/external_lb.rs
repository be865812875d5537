//! Services reached from outside the cluster (NodePorts, externalIPs,
//! load-balancer IPs), translated per packet with Beeline's own connection
//! tracking (Cilium's `nodeport.h`): the first packet picks a backend and
//! records both directions in `BEELINE_LB_NAT`; every later packet of the
//! connection, either way, is rewritten from its entry and routed on.
//! `externalTrafficPolicy: Cluster` also translates the client to this
//! node's address (replies must come back here), `Local` keeps it (only
//! local backends serve).
use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::{bpf_get_prandom_u32, bpf_ktime_get_ns, generated::bpf_redirect_neigh},
    programs::TcContext,
};
use beeline_common::{
    FlowKey, LB_NAT_REPLY, LbNat, NodeConfig, Program, SERVICE_SNAT, Verdict, scope,
};

use crate::{
    forward::{remote_node, to_remote_node},
    local_delivery::{deliver, endpoint},
    maps::BEELINE_LB_NAT,
    packet::{Headers, rewrite_flow},
    service::{frontend, select_backend},
    stats::{Outcome, count, redirected},
};

/// Source ports for translated clients: above the kernel's default
/// ephemeral range (32768-60999), so they never collide with the node's own
/// connections.
const SNAT_PORT_FIRST: u32 = 61000;
const SNAT_PORTS: u32 = 65536 - SNAT_PORT_FIRST;
const SNAT_TRIES: u32 = 8;

/// A packet of a translated connection, either direction: rewritten and
/// routed. `None`: not one.
#[inline(always)]
pub fn tracked(ctx: &TcContext, h: &Headers, config: &NodeConfig) -> Option<Outcome> {
    let flow = h.flow(ctx)?;
    let nat = BEELINE_LB_NAT.get_ptr_mut(&flow)?;
    // SAFETY: a valid entry; a racing update of the timestamp is harmless.
    let nat = unsafe {
        (*nat).last_seen_ns = bpf_ktime_get_ns();
        *nat
    };
    count(Program::ServiceLb, Verdict::Tracked, ctx.len());
    Some(translate(ctx, h.ipv4_header_len(), &flow, &nat, config))
}

/// A packet from outside: a tracked connection's, or the first of a new
/// connection to a Service frontend. `None`: neither, the caller goes on.
#[inline(always)]
pub fn from_outside(ctx: &TcContext, h: &Headers, config: &NodeConfig) -> Option<Outcome> {
    if let Some(outcome) = tracked(ctx, h, config) {
        return Some(outcome);
    }
    let flow = h.flow(ctx)?;
    let frontend = frontend(flow.daddr, flow.dport, flow.protocol, scope::EXTERNAL)?;
    let outcome = new_connection(ctx, h, config, &flow, &frontend);
    if let Err(verdict) = outcome
        && verdict != Verdict::PassedToHost
    {
        count(Program::ServiceLb, verdict, ctx.len());
    }
    Some(outcome)
}

#[inline(always)]
fn new_connection(
    ctx: &TcContext,
    h: &Headers,
    config: &NodeConfig,
    flow: &FlowKey,
    frontend: &crate::service::Frontend,
) -> Outcome {
    let (backend_id, backend) =
        match select_backend(frontend, u32::from_ne_bytes(flow.saddr) as u64) {
            Ok(found) => found,
            // No endpoints: the node's own stack answers a NodePort (a TCP
            // reset, an ICMP port unreachable), as kube-proxy's REJECT does.
            Err(v) if flow.daddr == config.node_addr => {
                count(Program::ServiceLb, v, ctx.len());
                return Err(Verdict::PassedToHost);
            }
            Err(v) => return Err(v),
        };
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    let mut forward = LbNat {
        saddr: flow.saddr,
        daddr: backend.addr,
        sport: flow.sport,
        dport: backend.port,
        flags: 0,
        last_seen_ns: now,
        frontend: frontend.entry.id,
        backend: backend_id,
    };
    let reply = LbNat {
        saddr: flow.daddr,
        daddr: flow.saddr,
        sport: flow.dport,
        dport: flow.sport,
        flags: LB_NAT_REPLY,
        ..forward
    };
    let snat = frontend.entry.flags & SERVICE_SNAT != 0;
    if snat {
        forward.saddr = config.node_addr;
    }
    // The reply's tuple must be unique: with SNAT, find a free port.
    let mut reply_key = FlowKey {
        saddr: backend.addr,
        daddr: forward.saddr,
        sport: backend.port,
        dport: flow.sport,
        protocol: flow.protocol,
        pad: [0; 3],
    };
    let mut recorded = false;
    let mut i = 0;
    while i < SNAT_TRIES {
        if snat {
            // SAFETY: plain helper call.
            let port = (SNAT_PORT_FIRST + unsafe { bpf_get_prandom_u32() } % SNAT_PORTS) as u16;
            forward.sport = port.to_be_bytes();
            reply_key.dport = forward.sport;
        }
        if BEELINE_LB_NAT
            .insert(&reply_key, &reply, BPF_NOEXIST as u64)
            .is_ok()
        {
            recorded = true;
            break;
        }
        if !snat {
            // Without SNAT the tuple is the client's own: an entry left
            // from an earlier connection of it. Replace it.
            recorded = BEELINE_LB_NAT.insert(&reply_key, &reply, 0).is_ok();
            break;
        }
        i += 1;
    }
    if !recorded {
        return Err(if snat {
            Verdict::DroppedNoSnatPort
        } else {
            Verdict::DroppedLbNatFull
        });
    }
    if BEELINE_LB_NAT.insert(flow, &forward, 0).is_err() {
        let _ = BEELINE_LB_NAT.remove(&reply_key);
        return Err(Verdict::DroppedLbNatFull);
    }
    count(Program::ServiceLb, Verdict::Translated, ctx.len());
    translate(ctx, h.ipv4_header_len(), flow, &forward, config)
}

/// Rewrites the packet as `nat` says and routes it: into a local pod, to
/// the node that owns the destination, or out of the uplink to a client
/// outside the cluster.
#[inline(always)]
fn translate(
    ctx: &TcContext,
    ipv4_header_len: usize,
    flow: &FlowKey,
    nat: &LbNat,
    config: &NodeConfig,
) -> Outcome {
    rewrite_flow(ctx, ipv4_header_len, flow, nat)?;
    let mut h = Headers::at_start(ctx)?;
    let daddr = h.daddr();
    if let Some(ep) = endpoint(daddr) {
        return deliver(ctx, &mut h, &ep);
    }
    if let Some(remote) = remote_node(daddr) {
        return to_remote_node(ctx, &mut h, &remote);
    }
    if !h.decrement_ttl() || config.uplink_ifindex == 0 {
        return Err(Verdict::PassedToHost);
    }
    // The kernel looks up the route and the next hop's MAC.
    // SAFETY: no parameters: a plain helper call.
    let rc = unsafe { bpf_redirect_neigh(config.uplink_ifindex, core::ptr::null_mut(), 0, 0) };
    redirected(rc, Verdict::ForwardedDirect)
}
