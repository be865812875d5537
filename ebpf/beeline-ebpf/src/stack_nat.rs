//! Connections the host stack NATed (kube-proxy's Service DNAT, portmap's
//! hostPort DNAT) must have every reply go back through the stack, which
//! reverses the translation; the programs would otherwise deliver a reply
//! straight to its pod or node, untranslated. Exact, not probable: netfilter
//! marks the packets of such connections (Beeline's nftables rule: original
//! direction, `ct status dnat`), the egress programs record the reply's
//! tuple before any reply can exist, and the agent removes the entry when
//! conntrack destroys the connection. An entry lives as long as its
//! connection: no cache, no eviction.
use aya_ebpf::programs::TcContext;
use beeline_common::{FlowKey, STACK_NAT_MARK, Verdict};

use crate::{
    maps::{BEELINE_STACK_NAT, BEELINE_STACK_NAT_ON},
    packet::{Headers, ports},
};

/// Egress: records the replies of a packet the stack NATed (and clears the
/// mark, which is Beeline's alone).
#[inline(always)]
pub fn record(ctx: &TcContext) -> Verdict {
    // SAFETY: reading a field of the context's own sk_buff.
    let mark = unsafe { (*ctx.skb.skb).mark };
    if mark & STACK_NAT_MARK == 0 {
        return Verdict::Continued;
    }
    ctx.set_mark(mark & !STACK_NAT_MARK);
    let Ok(h) = Headers::parse(ctx) else {
        return Verdict::Continued;
    };
    let Some(key) = reply_of(ctx, &h) else {
        return Verdict::Continued;
    };
    // Before the entry: no reply can be missed.
    if let Some(on) = BEELINE_STACK_NAT_ON.get_ptr_mut(0) {
        // SAFETY: the map's one value, valid while the program runs; written
        // only when it changes, so CPUs do not fight over its cache line.
        unsafe {
            if *on == 0 {
                *on = 1;
            }
        }
    }
    match BEELINE_STACK_NAT.insert(&key, &0, 0) {
        Ok(()) => Verdict::RecordedStackNat,
        Err(_) => Verdict::StackNatMapFull,
    }
}

/// Ingress: `Err(PassedStackNat)` when the packet replies to a connection
/// the stack NATed, for `?` before a redirect.
#[inline(always)]
pub fn leave_replies_to_stack(ctx: &TcContext, h: &Headers) -> Result<(), Verdict> {
    if BEELINE_STACK_NAT_ON.get(0).is_none_or(|on| *on == 0) {
        return Ok(());
    }
    let Some(ports) = ports(ctx, h) else {
        return Ok(());
    };
    let key = FlowKey {
        saddr: h.saddr(),
        daddr: h.daddr(),
        sport: [ports[0], ports[1]],
        dport: [ports[2], ports[3]],
        protocol: h.protocol(),
        pad: [0; 3],
    };
    match BEELINE_STACK_NAT.get_ptr(&key) {
        Some(_) => Err(Verdict::PassedStackNat),
        None => Ok(()),
    }
}

/// The tuple replies to this packet carry.
#[inline(always)]
fn reply_of(ctx: &TcContext, h: &Headers) -> Option<FlowKey> {
    let ports = ports(ctx, h)?;
    Some(FlowKey {
        saddr: h.daddr(),
        daddr: h.saddr(),
        sport: [ports[2], ports[3]],
        dport: [ports[0], ports[1]],
        protocol: h.protocol(),
        pad: [0; 3],
    })
}
