//! Beeline's kernel-side datapath: three tc ingress programs, named for where
//! they run (Cilium's `bpf_lxc` / `bpf_host` / `bpf_overlay` split).
//!
//! - `beeline_from_pod` (host-side veth of every pod): a local destination is
//!   delivered straight into the receiver's netns with `bpf_redirect_peer`; a
//!   destination inside a remote node's podCIDR is forwarded to that node
//!   (`bpf_redirect_neigh` on the underlay, or VXLAN); anything else goes up
//!   the host stack.
//! - `beeline_from_uplink` / `beeline_from_overlay`: packets from other nodes
//!   for a local pod go straight into its netns. VXLAN packets for a local pod
//!   are decapsulated on the uplink already; what that declines takes the
//!   kernel's VXLAN device and `beeline_from_overlay`.
#![no_std]
#![no_main]

use aya_ebpf::{
    EbpfContext,
    bindings::{
        BPF_F_ADJ_ROOM_ENCAP_L2_ETH, BPF_F_ADJ_ROOM_ENCAP_L3_IPV4, BPF_F_ADJ_ROOM_ENCAP_L4_UDP,
        BPF_F_ADJ_ROOM_FIXED_GSO, TC_ACT_SHOT, TC_ACT_UNSPEC, bpf_adj_room_mode::BPF_ADJ_ROOM_MAC,
        bpf_redir_neigh, bpf_tunnel_key,
    },
    btf_maps::{Array, HashMap, LpmTrie, PerCpuArray, lpm_trie::Key},
    helpers::generated::{
        bpf_get_hash_recalc, bpf_redirect, bpf_redirect_neigh, bpf_redirect_peer,
        bpf_skb_set_tunnel_key,
    },
    macros::{btf_map, classifier},
    programs::TcContext,
};
use aya_log_ebpf::debug;
use beeline_common::{
    Counters, Endpoint, EndpointKey, MAX_ENDPOINTS, MAX_REMOTE_CIDRS, NodeConfig, RemoteNode,
    STATS_SLOTS, StatsSlot, Tunnel, VxlanEncap,
};

#[btf_map]
static BEELINE_ENDPOINTS: HashMap<EndpointKey, Endpoint, { MAX_ENDPOINTS as usize }> =
    HashMap::new();

#[btf_map]
static BEELINE_REMOTE_CIDRS: LpmTrie<[u8; 4], RemoteNode, { MAX_REMOTE_CIDRS as usize }> =
    LpmTrie::new();

#[btf_map]
static BEELINE_NODE_CONFIG: Array<NodeConfig, 1> = Array::new();

#[btf_map]
static BEELINE_STATS: PerCpuArray<Counters, { STATS_SLOTS as usize }> = PerCpuArray::new();

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const IPV4_TOS_OFF: usize = ETH_HLEN + 1;
const IPV4_FRAG_OFF: usize = ETH_HLEN + 6;
const IPV4_TTL_OFF: usize = ETH_HLEN + 8;
const IPV4_PROTO_OFF: usize = ETH_HLEN + 9;
const IPV4_CSUM_OFF: usize = ETH_HLEN + 10;
const IPV4_DADDR_OFF: usize = ETH_HLEN + 16;
const IPV4_MIN_HLEN: usize = 20;
const AF_INET: u32 = 2;
const IPPROTO_UDP: u8 = 17;

#[derive(Clone, Copy)]
enum Verdict {
    RedirectedLocal,
    ForwardedDirect,
    ForwardedTunnel,
    PassedToHost,
    DroppedMalformed,
    DroppedHelperError,
}

#[classifier]
pub fn beeline_from_pod(ctx: TcContext) -> i32 {
    finish(StatsSlot::FromPod, from_pod(&ctx))
}

#[classifier]
pub fn beeline_from_uplink(ctx: TcContext) -> i32 {
    finish(StatsSlot::FromUplink, from_uplink(&ctx))
}

#[classifier]
pub fn beeline_from_overlay(ctx: TcContext) -> i32 {
    finish(StatsSlot::FromOverlay, from_overlay(&ctx))
}

/// Counts the verdict and turns it into a tc action.
#[inline(always)]
fn finish(slot: StatsSlot, (verdict, action): (Verdict, i32)) -> i32 {
    if let Some(counters) = BEELINE_STATS.get_ptr_mut(slot as u32) {
        // SAFETY: per-CPU slot, valid for the program's lifetime; no other
        // program on this CPU runs concurrently with us.
        let c = unsafe { &mut *counters };
        match verdict {
            Verdict::RedirectedLocal => c.redirected_local += 1,
            Verdict::ForwardedDirect => c.forwarded_direct += 1,
            Verdict::ForwardedTunnel => c.forwarded_tunnel += 1,
            Verdict::PassedToHost => c.passed_to_host += 1,
            Verdict::DroppedMalformed => c.dropped_malformed += 1,
            Verdict::DroppedHelperError => c.dropped_helper_error += 1,
        }
    }
    action
}

/// Not ours: TCX_NEXT (TC_ACT_UNSPEC) hands the packet to the next tc program
/// or classic filter (e.g. the bandwidth plugin's ifb redirect) and then to
/// the host stack, instead of ending tc processing like TC_ACT_OK would.
const PASS: (Verdict, i32) = (Verdict::PassedToHost, TC_ACT_UNSPEC);
const MALFORMED: (Verdict, i32) = (Verdict::DroppedMalformed, TC_ACT_SHOT);
const HELPER_ERROR: (Verdict, i32) = (Verdict::DroppedHelperError, TC_ACT_SHOT);

/// Ethernet + the fixed IPv4 header: what the programs read and write.
const HEADERS_LEN: usize = ETH_HLEN + IPV4_MIN_HLEN;

/// The Ethernet and IPv4 headers, read and written in place (direct packet
/// access: no helper call per field). The headers of a pod's or peer's
/// packet are normally in the linear area; if not, they are pulled in once.
/// `None` when the frame is not IPv4.
#[inline(always)]
fn headers(ctx: &TcContext) -> Result<Option<*mut [u8; HEADERS_LEN]>, ()> {
    let len = ctx.len() as usize;
    if len < ETH_HLEN {
        return Err(());
    }
    if len >= HEADERS_LEN && linear::<[u8; HEADERS_LEN]>(ctx).is_none() {
        // Rare: headers outside the linear area. A failed pull shows below.
        let _ = ctx.pull_data(HEADERS_LEN as u32);
    }
    let eth = linear::<[u8; ETH_HLEN]>(ctx).ok_or(())?;
    // SAFETY: `linear` checked that the bytes lie inside the packet.
    let ethertype = unsafe { u16::from_be_bytes([(*eth)[12], (*eth)[13]]) };
    if ethertype != ETH_P_IP {
        return Ok(None);
    }
    linear::<[u8; HEADERS_LEN]>(ctx).map(Some).ok_or(())
}

/// A pointer to the first `size_of::<T>()` bytes of the packet, if they are
/// in the linear area (the check the verifier needs).
#[inline(always)]
fn linear<T>(ctx: &TcContext) -> Option<*mut T> {
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + core::mem::size_of::<T>() > end {
        return None;
    }
    Some(start as *mut T)
}

#[inline(always)]
fn ipv4_destination(h: &[u8; HEADERS_LEN]) -> [u8; 4] {
    [
        h[IPV4_DADDR_OFF],
        h[IPV4_DADDR_OFF + 1],
        h[IPV4_DADDR_OFF + 2],
        h[IPV4_DADDR_OFF + 3],
    ]
}

/// Decrements the IPv4 TTL like a router does, fixing the header checksum
/// incrementally (RFC 1624). Returns false when the packet must not be
/// forwarded (TTL would expire): the host stack then sends the ICMP
/// time-exceeded.
#[inline(always)]
fn decrement_ttl(h: &mut [u8; HEADERS_LEN]) -> bool {
    let ttl = h[IPV4_TTL_OFF];
    if ttl <= 1 {
        return false;
    }
    h[IPV4_TTL_OFF] = ttl - 1;
    // TTL is the high byte of its 16-bit word: the word drops by 0x0100.
    let csum = u16::from_be_bytes([h[IPV4_CSUM_OFF], h[IPV4_CSUM_OFF + 1]]);
    let sum = (!csum as u32) + 0xfeff; // + ~0x0100
    let sum = (sum & 0xffff) + (sum >> 16);
    let csum = !(sum as u16);
    h[IPV4_CSUM_OFF..IPV4_CSUM_OFF + 2].copy_from_slice(&csum.to_be_bytes());
    true
}

/// Rewrites the Ethernet header and hands the packet to the pod's netns.
#[inline(always)]
fn deliver_local(h: &mut [u8; HEADERS_LEN], ctx: &TcContext, ep: &Endpoint) -> (Verdict, i32) {
    if !decrement_ttl(h) {
        return PASS;
    }
    h[..6].copy_from_slice(&ep.pod_mac);
    h[6..12].copy_from_slice(&ep.host_mac);
    // SAFETY: plain helper call; the kernel validates the ifindex.
    let action = unsafe { bpf_redirect_peer(ep.host_ifindex, 0) } as i32;
    if action == TC_ACT_SHOT {
        // Off the hot path: only failures log, and only at debug level.
        debug!(
            ctx,
            "bpf_redirect_peer to ifindex {} failed", ep.host_ifindex
        );
        return HELPER_ERROR;
    }
    (Verdict::RedirectedLocal, action)
}

#[inline(always)]
fn forward_remote(
    h: &mut [u8; HEADERS_LEN],
    ctx: &TcContext,
    remote: &RemoteNode,
) -> (Verdict, i32) {
    let Some(config) = BEELINE_NODE_CONFIG.get(0) else {
        return PASS;
    };
    if !decrement_ttl(h) {
        return PASS;
    }
    if remote.tunnel == Tunnel::Vxlan as u32 {
        if config.vxlan_encap == VxlanEncap::Program as u16 && config.uplink_ifindex != 0 {
            return encapsulate(h, ctx, config, remote);
        }
        through_vxlan_device(ctx, config, remote)
    } else {
        if config.uplink_ifindex == 0 {
            return PASS;
        }
        redirect_to_node(ctx, config, remote, Verdict::ForwardedDirect)
    }
}

/// Out of the uplink to the remote node's underlay address; the kernel
/// resolves its MAC (`bpf_redirect_neigh`).
#[inline(always)]
fn redirect_to_node(
    ctx: &TcContext,
    config: &NodeConfig,
    remote: &RemoteNode,
    verdict: Verdict,
) -> (Verdict, i32) {
    // SAFETY: all-zero is a valid bpf_redir_neigh.
    let mut nh: bpf_redir_neigh = unsafe { core::mem::zeroed() };
    nh.nh_family = AF_INET;
    // ipv4_nh is network byte order: copy the bytes as they are.
    nh.__bindgen_anon_1.ipv4_nh = u32::from_ne_bytes(remote.node_addr);
    // SAFETY: `nh` lives on the stack for the duration of the call.
    let action = unsafe {
        bpf_redirect_neigh(
            config.uplink_ifindex,
            &mut nh,
            core::mem::size_of::<bpf_redir_neigh>() as i32,
            0,
        )
    } as i32;
    if action == TC_ACT_SHOT {
        debug!(
            ctx,
            "bpf_redirect_neigh to ifindex {} failed", config.uplink_ifindex
        );
        return HELPER_ERROR;
    }
    (verdict, action)
}

/// Through the node's collect_md VXLAN device: the kernel builds the
/// headers. The fallback for packets `encapsulate` cannot take.
#[inline(always)]
fn through_vxlan_device(
    ctx: &TcContext,
    config: &NodeConfig,
    remote: &RemoteNode,
) -> (Verdict, i32) {
    if config.vxlan_ifindex == 0 {
        return PASS;
    }
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
        return HELPER_ERROR;
    }
    // SAFETY: plain helper call.
    let action = unsafe { bpf_redirect(config.vxlan_ifindex, 0) } as i32;
    if action == TC_ACT_SHOT {
        return HELPER_ERROR;
    }
    (Verdict::ForwardedTunnel, action)
}

/// Outer IPv4 + UDP + VXLAN + inner Ethernet (RFC 7348).
const VXLAN_ENCAP_LEN: usize = IPV4_MIN_HLEN + 8 + 8 + ETH_HLEN;
/// The outer headers as they sit in the frame, after the outer Ethernet.
const OUTER_LEN: usize = ETH_HLEN + VXLAN_ENCAP_LEN;
const OUTER_UDP_OFF: usize = ETH_HLEN + IPV4_MIN_HLEN;
const VXLAN_OFF: usize = OUTER_UDP_OFF + 8;
const INNER_ETH_OFF: usize = VXLAN_OFF + 8;
/// VXLAN flags with only the I bit: the VNI is valid.
const VXLAN_FLAGS_VNI: u8 = 0x08;
const IPV4_DF: u8 = 0x40;
const ECN_MASK: u8 = 0x03;
const ECN_CE: u8 = 0x03;

/// VXLAN-encapsulates in place and sends the frame out of the uplink, like
/// the direct path plus 50 bytes of headers: no VXLAN device, no second
/// route lookup. GSO packets stay whole (the headers are marked as a UDP
/// tunnel, so a NIC or the kernel segments them correctly). Whatever
/// `bpf_skb_adjust_room` refuses (a packet already encapsulated, say) takes
/// the VXLAN device instead.
#[inline(always)]
fn encapsulate(
    h: &mut [u8; HEADERS_LEN],
    ctx: &TcContext,
    config: &NodeConfig,
    remote: &RemoteNode,
) -> (Verdict, i32) {
    let mut inner_eth = [0u8; ETH_HLEN];
    inner_eth.copy_from_slice(&h[..ETH_HLEN]);
    // RFC 6040 normal mode: the outer header copies DSCP and ECN.
    let tos = h[IPV4_TOS_OFF];
    if ctx.len() as usize + VXLAN_ENCAP_LEN - ETH_HLEN > u16::MAX as usize {
        // A BIG TCP packet: the outer length would not fit.
        return through_vxlan_device(ctx, config, remote);
    }
    let flags = (BPF_F_ADJ_ROOM_FIXED_GSO
        | BPF_F_ADJ_ROOM_ENCAP_L3_IPV4
        | BPF_F_ADJ_ROOM_ENCAP_L4_UDP
        | BPF_F_ADJ_ROOM_ENCAP_L2_ETH) as u64
        | (ETH_HLEN as u64) << 56; // BPF_F_ADJ_ROOM_ENCAP_L2(ETH_HLEN)
    // FIXED_GSO: the pod MTU already leaves room for the 50 bytes.
    if ctx
        .adjust_room(VXLAN_ENCAP_LEN as i32, BPF_ADJ_ROOM_MAC, flags)
        .is_err()
    {
        return through_vxlan_device(ctx, config, remote);
    }
    let Some(o) = linear::<[u8; OUTER_LEN]>(ctx) else {
        return HELPER_ERROR;
    };
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
    o[VXLAN_OFF..INNER_ETH_OFF].copy_from_slice(&[
        VXLAN_FLAGS_VNI,
        0,
        0,
        0,
        vni[1],
        vni[2],
        vni[3],
        0,
    ]);
    o[INNER_ETH_OFF..OUTER_LEN].copy_from_slice(&inner_eth);
    redirect_to_node(ctx, config, remote, Verdict::ForwardedTunnel)
}

#[inline(always)]
fn ipv4_header_checksum(ip: &[u8]) -> u16 {
    let mut sum = 0u32;
    let mut i = 0;
    while i < IPV4_MIN_HLEN {
        sum += u16::from_be_bytes([ip[i], ip[i + 1]]) as u32;
        i += 2;
    }
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

#[inline(always)]
fn from_pod(ctx: &TcContext) -> (Verdict, i32) {
    let h = match headers(ctx) {
        // SAFETY: `headers` bounds-checked the bytes; nothing else holds them.
        Ok(Some(h)) => unsafe { &mut *h },
        Ok(None) => return PASS,
        Err(()) => {
            debug!(
                ctx,
                "dropping a malformed frame of {} bytes from a pod",
                ctx.len()
            );
            return MALFORMED;
        }
    };
    let daddr = ipv4_destination(h);
    // SAFETY: the value is copied out before any map update can reuse the slot.
    if let Some(ep) = unsafe { BEELINE_ENDPOINTS.get(EndpointKey { addr: daddr }) }.copied() {
        return deliver_local(h, ctx, &ep);
    }
    let key = Key::new(32, daddr);
    if let Some(remote) = BEELINE_REMOTE_CIDRS.get(&key).copied() {
        return forward_remote(h, ctx, &remote);
    }
    PASS
}

#[inline(always)]
fn from_uplink(ctx: &TcContext) -> (Verdict, i32) {
    let h = match node_packet_headers(ctx) {
        Ok(h) => h,
        Err(verdict) => return verdict,
    };
    if h[IPV4_PROTO_OFF] == IPPROTO_UDP
        && let Some(config) = BEELINE_NODE_CONFIG.get(0)
        && config.vxlan_encap == VxlanEncap::Program as u16
        && ipv4_destination(h) == config.node_addr
    {
        return decapsulate(ctx, config);
    }
    to_local_pod(h, ctx)
}

/// A VXLAN packet from another node for a local pod: strips the outer
/// headers and delivers the inner packet straight into the pod. Anything
/// unusual (IP options, fragments, a foreign VNI, congestion marks to merge
/// into the inner header, no local pod) is left to the kernel's VXLAN
/// device, untouched.
#[inline(always)]
fn decapsulate(ctx: &TcContext, config: &NodeConfig) -> (Verdict, i32) {
    const FRAME_LEN: usize = OUTER_LEN + IPV4_MIN_HLEN;
    if (ctx.len() as usize) < FRAME_LEN {
        return PASS;
    }
    if linear::<[u8; FRAME_LEN]>(ctx).is_none() {
        let _ = ctx.pull_data(FRAME_LEN as u32);
    }
    let Some(f) = linear::<[u8; FRAME_LEN]>(ctx) else {
        return PASS;
    };
    // SAFETY: `linear` bounds-checked the bytes; nothing else holds them.
    let f = unsafe { &*f };
    let vni = config.vni.to_be_bytes();
    let inner_ip = &f[OUTER_LEN..];
    let ours = f[ETH_HLEN] == 0x45
        && f[IPV4_FRAG_OFF] & 0x3f == 0 // neither MF nor a fragment offset
        && f[IPV4_FRAG_OFF + 1] == 0
        && f[IPV4_TOS_OFF] & ECN_MASK != ECN_CE
        && f[OUTER_UDP_OFF + 2..OUTER_UDP_OFF + 4] == config.vxlan_port.to_be_bytes()
        && f[VXLAN_OFF] == VXLAN_FLAGS_VNI
        && f[VXLAN_OFF + 4..VXLAN_OFF + 7] == vni[1..4]
        && u16::from_be_bytes([f[INNER_ETH_OFF + 12], f[INNER_ETH_OFF + 13]]) == ETH_P_IP
        && inner_ip[0] == 0x45
        && inner_ip[8] > 1; // TTL: expiring packets get their ICMP from the host
    if !ours {
        return PASS;
    }
    let inner_daddr = [inner_ip[16], inner_ip[17], inner_ip[18], inner_ip[19]];
    // SAFETY: the value is copied out before any map update can reuse the slot.
    let Some(ep) = (unsafe { BEELINE_ENDPOINTS.get(EndpointKey { addr: inner_daddr }) }).copied()
    else {
        return PASS;
    };
    // FIXED_GSO: the inner segments keep their size.
    if ctx
        .adjust_room(
            -(VXLAN_ENCAP_LEN as i32),
            BPF_ADJ_ROOM_MAC,
            BPF_F_ADJ_ROOM_FIXED_GSO as u64,
        )
        .is_err()
    {
        return PASS;
    }
    let Some(h) = linear::<[u8; HEADERS_LEN]>(ctx) else {
        return HELPER_ERROR;
    };
    // SAFETY: `linear` bounds-checked the bytes; nothing else holds them.
    deliver_local(unsafe { &mut *h }, ctx, &ep)
}

#[inline(always)]
fn from_overlay(ctx: &TcContext) -> (Verdict, i32) {
    match node_packet_headers(ctx) {
        Ok(h) => to_local_pod(h, ctx),
        Err(verdict) => verdict,
    }
}

/// The headers of a packet from another node; `Err` is the verdict for a
/// frame that has none to route by.
#[inline(always)]
fn node_packet_headers(ctx: &TcContext) -> Result<&mut [u8; HEADERS_LEN], (Verdict, i32)> {
    match headers(ctx) {
        // SAFETY: `headers` bounds-checked the bytes; nothing else holds them.
        Ok(Some(h)) => Ok(unsafe { &mut *h }),
        Ok(None) => Err(PASS),
        Err(()) => Err(MALFORMED),
    }
}

/// Delivers a packet from another node to its pod, if the pod is here.
#[inline(always)]
fn to_local_pod(h: &mut [u8; HEADERS_LEN], ctx: &TcContext) -> (Verdict, i32) {
    let daddr = ipv4_destination(h);
    // SAFETY: the value is copied out before any map update can reuse the slot.
    match unsafe { BEELINE_ENDPOINTS.get(EndpointKey { addr: daddr }) }.copied() {
        Some(ep) => deliver_local(h, ctx, &ep),
        None => PASS,
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
