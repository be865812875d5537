//! Header access: Ethernet and IPv4 read and written in place (direct
//! packet access, no helper call per field), the IPv4 header length
//! honoured, L4 ports on request.
use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::TcContext,
};
use beeline_common::{FlowKey, LbNat, Verdict};

pub const ETH_HLEN: usize = 14;
pub const ETH_P_IP: u16 = 0x0800;
pub const IPV4_MIN_HLEN: usize = 20;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
/// Ethernet + the fixed part of the IPv4 header.
pub const HEADERS_LEN: usize = ETH_HLEN + IPV4_MIN_HLEN;

// Offsets in the frame (Ethernet header first).
const ETHERTYPE_OFF: usize = 12;
const IPV4_VIHL_OFF: usize = ETH_HLEN;
pub const IPV4_TOS_OFF: usize = ETH_HLEN + 1;
pub const IPV4_FRAG_OFF: usize = ETH_HLEN + 6;
const IPV4_TTL_OFF: usize = ETH_HLEN + 8;
const IPV4_PROTO_OFF: usize = ETH_HLEN + 9;
const IPV4_CSUM_OFF: usize = ETH_HLEN + 10;
const IPV4_SADDR_OFF: usize = ETH_HLEN + 12;
const IPV4_DADDR_OFF: usize = ETH_HLEN + 16;

/// A pointer to the first `size_of::<T>()` bytes of the packet, if they are
/// in the linear area (the check the verifier needs).
#[inline(always)]
pub fn linear<T>(ctx: &TcContext) -> Option<*mut T> {
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + core::mem::size_of::<T>() > end {
        return None;
    }
    Some(start as *mut T)
}

/// Like [`linear`], pulling the bytes into the linear area first if they
/// are not there (rare for pod and peer packets).
#[inline(always)]
pub fn pulled<T>(ctx: &TcContext) -> Option<*mut T> {
    if let Some(p) = linear::<T>(ctx) {
        return Some(p);
    }
    let _ = ctx.pull_data(core::mem::size_of::<T>() as u32);
    linear::<T>(ctx)
}

/// The Ethernet and IPv4 headers of a packet (or of the frame inside a
/// tunnel, `base` bytes in), in place.
pub struct Headers<'a>(&'a mut [u8; HEADERS_LEN], usize);

impl<'a> Headers<'a> {
    /// The headers of an IPv4 frame. `Err` is the verdict for anything
    /// else: not IPv4 passes to the host, a truncated or inconsistent
    /// header is dropped.
    #[inline(always)]
    pub fn parse(ctx: &TcContext) -> Result<Headers<'a>, Verdict> {
        let len = ctx.len() as usize;
        if len < ETH_HLEN {
            return Err(Verdict::DroppedMalformed);
        }
        if len >= HEADERS_LEN
            && let Some(h) = pulled::<[u8; HEADERS_LEN]>(ctx)
        {
            // SAFETY: `pulled` bounds-checked the bytes; nothing else holds them.
            return Headers::checked(unsafe { &mut *h }, 0);
        }
        let eth = linear::<[u8; ETH_HLEN]>(ctx).ok_or(Verdict::DroppedMalformed)?;
        // SAFETY: `linear` checked that the bytes lie inside the packet.
        let eth = unsafe { &*eth };
        if ethertype(eth) != ETH_P_IP {
            return Err(Verdict::PassedToHost);
        }
        Err(Verdict::DroppedMalformed)
    }

    /// Headers already known to be in the linear area (after a decapsulation).
    #[inline(always)]
    pub fn at_start(ctx: &TcContext) -> Result<Headers<'a>, Verdict> {
        Headers::at(ctx, 0)
    }

    /// The headers of the frame `base` bytes into the packet (inside a
    /// tunnel), already in the linear area.
    #[inline(always)]
    pub fn at(ctx: &TcContext, base: usize) -> Result<Headers<'a>, Verdict> {
        let (start, end) = (ctx.data(), ctx.data_end());
        if start + base + HEADERS_LEN > end {
            return Err(Verdict::DroppedHelperError);
        }
        // SAFETY: bounds-checked just above; nothing else holds the bytes.
        let h = unsafe { &mut *((start + base) as *mut [u8; HEADERS_LEN]) };
        Headers::checked(h, base)
    }

    #[inline(always)]
    fn checked(h: &'a mut [u8; HEADERS_LEN], base: usize) -> Result<Headers<'a>, Verdict> {
        if ethertype(h) != ETH_P_IP {
            return Err(Verdict::PassedToHost);
        }
        if h[IPV4_VIHL_OFF] >> 4 != 4 || ((h[IPV4_VIHL_OFF] & 0x0f) as usize) < IPV4_MIN_HLEN / 4 {
            return Err(Verdict::DroppedMalformed);
        }
        Ok(Headers(h, base))
    }

    #[inline(always)]
    pub fn saddr(&self) -> [u8; 4] {
        self.four(IPV4_SADDR_OFF)
    }

    #[inline(always)]
    pub fn daddr(&self) -> [u8; 4] {
        self.four(IPV4_DADDR_OFF)
    }

    #[inline(always)]
    fn four(&self, off: usize) -> [u8; 4] {
        [
            self.0[off],
            self.0[off + 1],
            self.0[off + 2],
            self.0[off + 3],
        ]
    }

    #[inline(always)]
    pub fn protocol(&self) -> u8 {
        self.0[IPV4_PROTO_OFF]
    }

    #[inline(always)]
    pub fn tos(&self) -> u8 {
        self.0[IPV4_TOS_OFF]
    }

    /// The IPv4 header's length in bytes, options included.
    #[inline(always)]
    pub fn ipv4_header_len(&self) -> usize {
        ((self.0[IPV4_VIHL_OFF] & 0x0f) as usize) * 4
    }

    /// The Ethernet header, copied out.
    #[inline(always)]
    pub fn ethernet(&self) -> [u8; ETH_HLEN] {
        let mut eth = [0u8; ETH_HLEN];
        eth.copy_from_slice(&self.0[..ETH_HLEN]);
        eth
    }

    /// Rewrites the Ethernet addresses.
    #[inline(always)]
    pub fn set_macs(&mut self, dst: &[u8; 6], src: &[u8; 6]) {
        self.0[..6].copy_from_slice(dst);
        self.0[6..12].copy_from_slice(src);
    }

    /// Decrements the TTL like a router does, fixing the header checksum
    /// incrementally (RFC 1624). False when the packet must not be forwarded
    /// (the TTL would expire): the host stack then sends the ICMP
    /// time-exceeded.
    #[inline(always)]
    pub fn decrement_ttl(&mut self) -> bool {
        let h = &mut *self.0;
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
}

/// L4 source and destination ports of a TCP or UDP packet, as they are on
/// the wire; `None` for other protocols and for fragments after the first.
#[inline(always)]
pub fn ports(ctx: &TcContext, h: &Headers) -> Option<[u8; 4]> {
    let protocol = h.protocol();
    if protocol != IPPROTO_TCP && protocol != IPPROTO_UDP {
        return None;
    }
    // A fragment offset means the ports are in an earlier fragment.
    if (u16::from_be_bytes([h.0[IPV4_FRAG_OFF], h.0[IPV4_FRAG_OFF + 1]]) & 0x1fff) != 0 {
        return None;
    }
    let offset = h.1 + ETH_HLEN + h.ipv4_header_len();
    // In place when linear (nearly always): no helper call per packet.
    let (start, end) = (ctx.data(), ctx.data_end());
    if offset <= 256 && start + offset + 4 <= end {
        // SAFETY: bounds-checked just above.
        return Some(unsafe { *((start + offset) as *const [u8; 4]) });
    }
    ctx.load::<[u8; 4]>(offset).ok()
}

#[inline(always)]
fn ethertype(frame: &[u8]) -> u16 {
    u16::from_be_bytes([frame[ETHERTYPE_OFF], frame[ETHERTYPE_OFF + 1]])
}

/// The checksum of an IPv4 header without options.
#[inline(always)]
pub fn ipv4_header_checksum(ip: &[u8]) -> u16 {
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

impl Headers<'_> {
    /// The packet's TCP/UDP tuple as it is on the wire; `None` for other
    /// protocols and later fragments.
    #[inline(always)]
    pub fn flow(&self, ctx: &TcContext) -> Option<FlowKey> {
        let ports = ports(ctx, self)?;
        Some(FlowKey {
            saddr: self.saddr(),
            daddr: self.daddr(),
            sport: [ports[0], ports[1]],
            dport: [ports[2], ports[3]],
            protocol: self.protocol(),
            pad: [0; 3],
        })
    }
}

/// Writes `to`'s addresses and ports into a TCP or UDP packet whose tuple
/// is `from` (no tunnel header in front), fixing the IPv4 and L4 checksums
/// incrementally. Invalidates every pointer into the packet: parse again.
#[inline(always)]
pub fn rewrite_flow(
    ctx: &TcContext,
    ipv4_header_len: usize,
    from: &FlowKey,
    to: &LbNat,
) -> Result<(), Verdict> {
    let l4 = ETH_HLEN + ipv4_header_len;
    // A UDP checksum of 0 means none: it stays 0 (MANGLED_0).
    let (csum_off, csum_flags) = if from.protocol == IPPROTO_TCP {
        (l4 + 16, 0)
    } else {
        (l4 + 6, BPF_F_MARK_MANGLED_0 as u64)
    };
    let failed = |_| Verdict::DroppedHelperError;
    if from.saddr != to.saddr {
        replace_addr(
            ctx,
            IPV4_SADDR_OFF,
            csum_off,
            csum_flags,
            from.saddr,
            to.saddr,
        )?;
    }
    if from.daddr != to.daddr {
        replace_addr(
            ctx,
            IPV4_DADDR_OFF,
            csum_off,
            csum_flags,
            from.daddr,
            to.daddr,
        )?;
    }
    if from.sport != to.sport {
        let (old, new) = (u16::from_ne_bytes(from.sport), u16::from_ne_bytes(to.sport));
        ctx.l4_csum_replace(csum_off, old as u64, new as u64, csum_flags | 2)
            .map_err(failed)?;
        ctx.store(l4, &to.sport, 0).map_err(failed)?;
    }
    if from.dport != to.dport {
        let (old, new) = (u16::from_ne_bytes(from.dport), u16::from_ne_bytes(to.dport));
        ctx.l4_csum_replace(csum_off, old as u64, new as u64, csum_flags | 2)
            .map_err(failed)?;
        ctx.store(l4 + 2, &to.dport, 0).map_err(failed)?;
    }
    Ok(())
}

/// One IPv4 address: the L4 checksum (pseudo header), the IPv4 header
/// checksum, then the address itself.
#[inline(always)]
fn replace_addr(
    ctx: &TcContext,
    addr_off: usize,
    csum_off: usize,
    csum_flags: u64,
    old: [u8; 4],
    new: [u8; 4],
) -> Result<(), Verdict> {
    let failed = |_| Verdict::DroppedHelperError;
    let (old32, new32) = (
        u32::from_ne_bytes(old) as u64,
        u32::from_ne_bytes(new) as u64,
    );
    ctx.l4_csum_replace(
        csum_off,
        old32,
        new32,
        csum_flags | BPF_F_PSEUDO_HDR as u64 | 4,
    )
    .map_err(failed)?;
    ctx.l3_csum_replace(IPV4_CSUM_OFF, old32, new32, 4)
        .map_err(failed)?;
    ctx.store(addr_off, &new, 0).map_err(failed)
}
