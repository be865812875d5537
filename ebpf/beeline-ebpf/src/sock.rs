//! Services for pods and the node at the socket (Cilium's `bpf_sock.c`):
//! `connect` and `sendmsg` to a Service address get a backend's address
//! instead, so the packets are plain pod-to-pod traffic on the one-hop path
//! and nothing is NATed; `recvmsg` and `getpeername` show the Service again.
use aya_ebpf::{
    EbpfContext,
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_set_retval},
    programs::SockAddrContext,
};
use beeline_common::{SockRevKey, SockRevNat, Verdict, scope};

use crate::{
    maps::BEELINE_SOCK_REV_NAT,
    packet::{IPPROTO_TCP, IPPROTO_UDP},
    service::{frontend, select_backend},
};

const AF_INET: u32 = 2;
const ECONNREFUSED: i32 = 111;

/// `Ok`: go on (translated or not ours); `Err(RefusedNoEndpoints)`: the
/// call fails with ECONNREFUSED.
pub type SockOutcome = Result<Verdict, Verdict>;

/// The address the socket asks for, if it is IPv4 TCP or UDP.
#[inline(always)]
fn destination(ctx: &SockAddrContext) -> Option<([u8; 4], [u8; 2], u8)> {
    // SAFETY: the kernel hands the program a valid bpf_sock_addr.
    let sa = unsafe { &*ctx.sock_addr };
    if sa.user_family != AF_INET {
        return None;
    }
    let protocol = sa.protocol as u8;
    if protocol != IPPROTO_TCP && protocol != IPPROTO_UDP {
        return None;
    }
    // Both are in network byte order (the port in the low 16 bits).
    Some((
        sa.user_ip4.to_ne_bytes(),
        (sa.user_port as u16).to_ne_bytes(),
        protocol,
    ))
}

/// `connect4` and `sendmsg4`: a Service address becomes a backend's.
#[inline(always)]
pub fn try_translate(ctx: &SockAddrContext) -> SockOutcome {
    let Some((addr, port, protocol)) = destination(ctx) else {
        return Ok(Verdict::Continued);
    };
    let Some(frontend) = frontend(addr, port, protocol, scope::SOCKET) else {
        return Ok(Verdict::Continued);
    };
    // The client, for affinity: its network namespace (a pod, or the node).
    // SAFETY: plain helper call on the program's own context.
    let client = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let (_, backend) = select_backend(&frontend, client)?;
    // SAFETY: the kernel hands the program a valid bpf_sock_addr, writable
    // in these hooks.
    let sa = unsafe { &mut *ctx.sock_addr };
    sa.user_ip4 = u32::from_ne_bytes(backend.addr);
    sa.user_port = u16::from_ne_bytes(backend.port) as u32;
    let key = SockRevKey {
        // SAFETY: plain helper call on the program's own context.
        cookie: unsafe { bpf_get_socket_cookie(ctx.as_ptr()) },
        addr: backend.addr,
        port: backend.port,
        pad: [0; 2],
    };
    let service = SockRevNat {
        addr,
        port,
        pad: [0; 2],
    };
    // LRU: never full. Only `recvmsg`/`getpeername` would miss it.
    let _ = BEELINE_SOCK_REV_NAT.insert(&key, &service, 0);
    Ok(Verdict::Translated)
}

/// `recvmsg4` and `getpeername4`: a backend's address shown as the
/// Service's, for a socket this module translated.
#[inline(always)]
pub fn try_reverse(ctx: &SockAddrContext) -> SockOutcome {
    let Some((addr, port, _)) = destination(ctx) else {
        return Ok(Verdict::Continued);
    };
    let key = SockRevKey {
        // SAFETY: plain helper call on the program's own context.
        cookie: unsafe { bpf_get_socket_cookie(ctx.as_ptr()) },
        addr,
        port,
        pad: [0; 2],
    };
    // SAFETY: copied out at once.
    let Some(service) = unsafe { BEELINE_SOCK_REV_NAT.get(key) }.copied() else {
        return Ok(Verdict::Continued);
    };
    // SAFETY: as above.
    let sa = unsafe { &mut *ctx.sock_addr };
    sa.user_ip4 = u32::from_ne_bytes(service.addr);
    sa.user_port = u16::from_ne_bytes(service.port) as u32;
    Ok(Verdict::ReverseTranslated)
}

/// The hook's return value: 1 lets the call go on; 0 fails it, with
/// ECONNREFUSED (as kube-proxy's REJECT makes a connection fail at once).
#[inline(always)]
pub fn allow(outcome: &SockOutcome, may_refuse: bool) -> i32 {
    match outcome {
        Err(Verdict::RefusedNoEndpoints) if may_refuse => {
            // SAFETY: plain helper call.
            unsafe { bpf_set_retval(-ECONNREFUSED) };
            0
        }
        _ => 1,
    }
}
