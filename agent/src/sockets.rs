//! Connected UDP sockets the socket programs pointed at a backend that is
//! gone: found with sock_diag and destroyed (`SOCK_DESTROY`, what `ss -K`
//! does), so the application sees an error and opens a new socket, which
//! gets a live backend. TCP needs none of this: its connection fails on
//! its own. Cilium does the same with a socket iterator.
use std::{
    collections::HashSet,
    io,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use netlink_sys::{Socket, protocols::NETLINK_SOCK_DIAG};

const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;
const NLM_F_REQUEST: u16 = 0x01;
const NLM_F_ACK: u16 = 0x04;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const AF_INET: u8 = 2;
const IPPROTO_UDP: u8 = 17;
const TCP_ESTABLISHED: u32 = 1;
/// `struct inet_diag_sockid`.
const SOCKID_LEN: usize = 48;
/// `struct inet_diag_req_v2`.
const REQ_LEN: usize = 8 + SOCKID_LEN;
/// `struct inet_diag_msg`.
const MSG_LEN: usize = 4 + SOCKID_LEN + 20;

/// A connected UDP socket as sock_diag reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UdpSocket {
    pub cookie: u64,
    pub dst: Ipv4Addr,
    pub dport: u16,
    /// The raw `inet_diag_sockid`, to name it in `SOCK_DESTROY`.
    sockid: [u8; SOCKID_LEN],
}

fn request(kind: u16, flags: u16, sockid: &[u8; SOCKID_LEN], states: u32) -> Vec<u8> {
    let len = 16 + REQ_LEN;
    let mut m = Vec::with_capacity(len);
    m.extend_from_slice(&(len as u32).to_ne_bytes());
    m.extend_from_slice(&kind.to_ne_bytes());
    m.extend_from_slice(&flags.to_ne_bytes());
    m.extend_from_slice(&1u32.to_ne_bytes()); // sequence
    m.extend_from_slice(&0u32.to_ne_bytes()); // port id
    m.extend_from_slice(&[AF_INET, IPPROTO_UDP, 0, 0]);
    m.extend_from_slice(&states.to_ne_bytes());
    m.extend_from_slice(sockid);
    m
}

/// Every connected UDP socket of the current network namespace.
fn connected_udp(socket: &mut Socket) -> io::Result<Vec<UdpSocket>> {
    let dump = request(
        SOCK_DIAG_BY_FAMILY,
        NLM_F_REQUEST | NLM_F_DUMP,
        &[0; SOCKID_LEN],
        1 << TCP_ESTABLISHED,
    );
    socket.send(&dump, 0)?;
    let mut found = Vec::new();
    loop {
        let (data, _) = socket.recv_from_full()?;
        let mut at = 0;
        while at + 16 <= data.len() {
            let len = u32::from_ne_bytes(data[at..at + 4].try_into().unwrap()) as usize;
            let kind = u16::from_ne_bytes(data[at + 4..at + 6].try_into().unwrap());
            if len < 16 || at + len > data.len() {
                return Err(io::Error::other("a truncated sock_diag message"));
            }
            match kind {
                NLMSG_DONE => return Ok(found),
                NLMSG_ERROR => {
                    let errno = i32::from_ne_bytes(data[at + 16..at + 20].try_into().unwrap());
                    return Err(io::Error::from_raw_os_error(-errno));
                }
                SOCK_DIAG_BY_FAMILY if len >= 16 + MSG_LEN => {
                    let msg = &data[at + 16..at + 16 + MSG_LEN];
                    let id: [u8; SOCKID_LEN] = msg[4..4 + SOCKID_LEN].try_into().unwrap();
                    found.push(UdpSocket {
                        dport: u16::from_be_bytes([id[2], id[3]]),
                        dst: Ipv4Addr::new(id[20], id[21], id[22], id[23]),
                        cookie: u32::from_ne_bytes(id[40..44].try_into().unwrap()) as u64
                            | (u32::from_ne_bytes(id[44..48].try_into().unwrap()) as u64) << 32,
                        sockid: id,
                    });
                }
                _ => {}
            }
            at += (len + 3) & !3;
        }
    }
}

fn destroy(socket: &mut Socket, target: &UdpSocket) -> io::Result<()> {
    socket.send(
        &request(SOCK_DESTROY, NLM_F_REQUEST | NLM_F_ACK, &target.sockid, 0),
        0,
    )?;
    let (data, _) = socket.recv_from_full()?;
    if data.len() >= 20 && u16::from_ne_bytes([data[4], data[5]]) == NLMSG_ERROR {
        let errno = i32::from_ne_bytes(data[16..20].try_into().unwrap());
        // Gone meanwhile is fine.
        if errno != 0 && -errno != libc::ENOENT {
            return Err(io::Error::from_raw_os_error(-errno));
        }
    }
    Ok(())
}

/// In `netns` (`None`: the agent's own), destroys the connected UDP
/// sockets that `doomed` picks; returns how many.
pub fn destroy_udp_in(
    netns: Option<&Path>,
    doomed: &(dyn Fn(&UdpSocket) -> bool + Sync),
) -> io::Result<usize> {
    std::thread::scope(|s| {
        s.spawn(|| {
            if let Some(path) = netns {
                let file = std::fs::File::open(path)?;
                nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(io::Error::from)?;
            }
            let mut socket = Socket::new(NETLINK_SOCK_DIAG)?;
            socket.bind_auto()?;
            let mut n = 0;
            for target in connected_udp(&mut socket)?.iter().filter(|s| doomed(s)) {
                destroy(&mut socket, target)?;
                n += 1;
            }
            Ok(n)
        })
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("the sock_diag thread panicked")))
    })
}

/// The agent's own netns and every pod's: where translated sockets live.
pub fn netns_to_search(state_dir: &Path) -> Vec<Option<PathBuf>> {
    let pods: HashSet<PathBuf> = crate::state::read(state_dir)
        .unwrap_or_default()
        .into_iter()
        .map(|e| PathBuf::from(e.netns))
        .filter(|p| p.exists())
        .collect();
    std::iter::once(None)
        .chain(pods.into_iter().map(Some))
        .collect()
}
