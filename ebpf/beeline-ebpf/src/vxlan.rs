//! VXLAN (RFC 7348) built and stripped by the programs in place, with the
//! node's collect_md VXLAN device as the fallback for whatever they decline.
use aya_ebpf::{
    EbpfContext,
    bindings::{
        BPF_F_ADJ_ROOM_ENCAP_L2_ETH, BPF_F_ADJ_ROOM_ENCAP_L3_IPV4, BPF_F_ADJ_ROOM_ENCAP_L4_UDP,
        BPF_F_ADJ_ROOM_FIXED_GSO, bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, bpf_tunnel_key,
    },
    helpers::generated::{bpf_get_hash_recalc, bpf_redirect, bpf_skb_set_tunnel_key},
    programs::TcContext,
};
use aya_log_ebpf::debug;
use beeline_common::{NodeConfig, RemoteNode, VXLAN_OVERHEAD, Verdict};

use crate::{
    forward::redirect_to_node,
    local_delivery::{deliver, endpoint},
    packet::{
        ETH_HLEN, ETH_P_IP, Headers, IPPROTO_UDP, IPV4_FRAG_OFF, IPV4_MIN_HLEN, IPV4_TOS_OFF,
        ipv4_header_checksum, linear, pulled,
    },
    stack_nat,
    stats::{Outcome, redirected},
};

/// Outer IPv4 + UDP + VXLAN + inner Ethernet.
const ENCAP_LEN: usize = VXLAN_OVERHEAD as usize;
const _: () = assert!(ENCAP_LEN == IPV4_MIN_HLEN + 8 + 8 + ETH_HLEN);
/// The outer headers as they sit in the frame, after the outer Ethernet.
const OUTER_LEN: usize = ETH_HLEN + ENCAP_LEN;
const OUTER_UDP_OFF: usize = ETH_HLEN + IPV4_MIN_HLEN;
const VXLAN_OFF: usize = OUTER_UDP_OFF + 8;
const INNER_ETH_OFF: usize = VXLAN_OFF + 8;
/// VXLAN flags with only the I bit: the VNI is valid.
const FLAGS_VNI: u8 = 0x08;
const IPV4_DF: u8 = 0x40;
const ECN_MASK: u8 = 0x03;
const ECN_CE: u8 = 0x03;

/// Encapsulates in place and sends the frame out of the uplink, like the
/// direct path plus 50 bytes of headers: no VXLAN device, no second route
/// lookup. GSO packets stay whole (the headers are marked as a UDP tunnel,
/// so a NIC or the kernel segments them correctly). Whatever
/// `bpf_skb_adjust_room` refuses (a packet already encapsulated, say) takes
/// the VXLAN device instead.
#[inline(always)]
pub fn encapsulate(
    ctx: &TcContext,
    h: &Headers,
    config: &NodeConfig,
    remote: &RemoteNode,
) -> Outcome {
    let inner_eth = h.ethernet();
    // RFC 6040 normal mode: the outer header copies DSCP and ECN.
    let tos = h.tos();
    if ctx.len() as usize + ENCAP_LEN - ETH_HLEN > u16::MAX as usize {
        // A BIG TCP packet: the outer length would not fit.
        return through_device(ctx, config, remote);
    }
    let flags = (BPF_F_ADJ_ROOM_FIXED_GSO
        | BPF_F_ADJ_ROOM_ENCAP_L3_IPV4
        | BPF_F_ADJ_ROOM_ENCAP_L4_UDP
        | BPF_F_ADJ_ROOM_ENCAP_L2_ETH) as u64
        | (ETH_HLEN as u64) << 56; // BPF_F_ADJ_ROOM_ENCAP_L2(ETH_HLEN)
    // FIXED_GSO: the pod MTU already leaves room for the 50 bytes.
    if ctx
        .adjust_room(ENCAP_LEN as i32, BPF_ADJ_ROOM_MAC, flags)
        .is_err()
    {
        return through_device(ctx, config, remote);
    }
    let o = linear::<[u8; OUTER_LEN]>(ctx).ok_or(Verdict::DroppedHelperError)?;
    // SAFETY: `linear` bounds-checked the bytes; nothing else holds them.
    let o = unsafe { &mut *o };
    // The outer Ethernet header is written by bpf_redirect_neigh.
    let ip_len = (ctx.len() as usize - ETH_HLEN) as u16;
    let udp_len = ip_len - IPV4_MIN_HLEN as u16;
    let ip = &mut o[ETH_HLEN..OUTER_UDP_OFF];
    ip[0] = 0x45;
    ip[1] = tos;
    ip[2..4].copy_from_slice(&ip_len.to_be_bytes());
    ip[4..6].copy_from_slice(&[0, 0]);
    ip[6..8].copy_from_slice(&[IPV4_DF, 0]);
    ip[8] = 64;
    ip[9] = IPPROTO_UDP;
    ip[10..12].copy_from_slice(&[0, 0]);
    ip[12..16].copy_from_slice(&config.node_addr);
    ip[16..20].copy_from_slice(&remote.node_addr);
    let csum = ipv4_header_checksum(ip);
    ip[10..12].copy_from_slice(&csum.to_be_bytes());
    // Source port from the inner flow's hash: ECMP and RSS spread flows.
    // SAFETY: plain helper call on our own context.
    let hash = unsafe { bpf_get_hash_recalc(ctx.as_ptr().cast()) };
    let source_port = 0xc000 | (hash >> 18) as u16;
    let udp = &mut o[OUTER_UDP_OFF..VXLAN_OFF];
    udp[0..2].copy_from_slice(&source_port.to_be_bytes());
    udp[2..4].copy_from_slice(&config.vxlan_port.to_be_bytes());
    udp[4..6].copy_from_slice(&udp_len.to_be_bytes());
    udp[6..8].copy_from_slice(&[0, 0]); // optional for UDP over IPv4
    let vni = config.vni.to_be_bytes();
    o[VXLAN_OFF..INNER_ETH_OFF].copy_from_slice(&[FLAGS_VNI, 0, 0, 0, vni[1], vni[2], vni[3], 0]);
    o[INNER_ETH_OFF..OUTER_LEN].copy_from_slice(&inner_eth);
    redirect_to_node(ctx, config, remote, Verdict::ForwardedTunnel)
}

/// Through the node's collect_md VXLAN device: the kernel builds the
/// headers. The fallback for packets `encapsulate` cannot take.
#[inline(always)]
pub fn through_device(ctx: &TcContext, config: &NodeConfig, remote: &RemoteNode) -> Outcome {
    if config.vxlan_ifindex == 0 {
        return Err(Verdict::PassedToHost);
    }
    set_tunnel_key(ctx, config, remote)?;
    // SAFETY: plain helper call.
    let rc = unsafe { bpf_redirect(config.vxlan_ifindex, 0) };
    redirected(rc, Verdict::ForwardedTunnel)
}

/// Names the remote node (and the VNI) the VXLAN device sends this packet
/// to; `Err` is the verdict when the kernel refuses.
#[inline(always)]
pub fn set_tunnel_key(
    ctx: &TcContext,
    config: &NodeConfig,
    remote: &RemoteNode,
) -> Result<(), Verdict> {
    // SAFETY: all-zero is a valid bpf_tunnel_key.
    let mut key: bpf_tunnel_key = unsafe { core::mem::zeroed() };
    key.tunnel_id = config.vni;
    // The helper wants the remote address in host byte order.
    key.__bindgen_anon_1.remote_ipv4 = u32::from_be_bytes(remote.node_addr);
    key.tunnel_ttl = 64;
    // SAFETY: `key` lives on the stack for the duration of the call.
    let rc = unsafe {
        bpf_skb_set_tunnel_key(
            ctx.as_ptr().cast(),
            &mut key,
            core::mem::size_of::<bpf_tunnel_key>() as u32,
            0,
        )
    };
    if rc != 0 {
        debug!(ctx, "bpf_skb_set_tunnel_key failed: {}", rc);
        return Err(Verdict::DroppedHelperError);
    }
    Ok(())
}

/// A VXLAN packet from another node for a local pod: strips the outer
/// headers and delivers the inner packet straight into the pod. Anything
/// unusual (IP options, fragments, a foreign VNI, congestion marks to merge
/// into the inner header, no local pod) is left to the kernel's VXLAN
/// device, untouched.
#[inline(always)]
pub fn decapsulate(ctx: &TcContext, config: &NodeConfig) -> Outcome {
    const FRAME_LEN: usize = OUTER_LEN + IPV4_MIN_HLEN;
    if (ctx.len() as usize) < FRAME_LEN {
        return Err(Verdict::PassedToHost);
    }
    let f = pulled::<[u8; FRAME_LEN]>(ctx).ok_or(Verdict::PassedToHost)?;
    // SAFETY: `pulled` bounds-checked the bytes; nothing else holds them.
    let f = unsafe { &*f };
    let vni = config.vni.to_be_bytes();
    let inner_ip = &f[OUTER_LEN..];
    let ours = f[ETH_HLEN] == 0x45
        && f[IPV4_FRAG_OFF] & 0x3f == 0 // neither MF nor a fragment offset
        && f[IPV4_FRAG_OFF + 1] == 0
        && f[IPV4_TOS_OFF] & ECN_MASK != ECN_CE
        && f[OUTER_UDP_OFF + 2..OUTER_UDP_OFF + 4] == config.vxlan_port.to_be_bytes()
        && f[VXLAN_OFF] == FLAGS_VNI
        && f[VXLAN_OFF + 4..VXLAN_OFF + 7] == vni[1..4]
        && u16::from_be_bytes([f[INNER_ETH_OFF + 12], f[INNER_ETH_OFF + 13]]) == ETH_P_IP
        && inner_ip[0] == 0x45
        && inner_ip[8] > 1; // TTL: expiring packets get their ICMP from the host
    if !ours {
        return Err(Verdict::PassedToHost);
    }
    let inner_daddr = [inner_ip[16], inner_ip[17], inner_ip[18], inner_ip[19]];
    let ep = endpoint(inner_daddr).ok_or(Verdict::PassedToHost)?;
    // A reply the stack must translate: left whole to the VXLAN device, so
    // it reaches the stack on the device its route (and rp_filter) expects.
    let inner = Headers::at(ctx, OUTER_LEN - ETH_HLEN)?;
    stack_nat::leave_replies_to_stack(ctx, &inner)?;
    // FIXED_GSO: the inner segments keep their size.
    ctx.adjust_room(
        -(ENCAP_LEN as i32),
        BPF_ADJ_ROOM_MAC,
        BPF_F_ADJ_ROOM_FIXED_GSO as u64,
    )
    .map_err(|_| Verdict::PassedToHost)?;
    let mut h = Headers::at_start(ctx)?;
    deliver(ctx, &mut h, &ep)
}
