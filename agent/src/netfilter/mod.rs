//! Netfilter, written over netlink with nftnl (no `iptables`/`nft`
//! processes): the egress masquerade table Beeline owns, and the accept
//! rules for pod traffic in iptables' FORWARD chain.
use std::{
    collections::HashSet,
    ffi::{CStr, CString},
    io,
    os::fd::AsRawFd,
};

use nftnl::{FinalizedBatch, nftnl_sys as sys};

pub mod forward;
pub mod table;

/// The names of the tables in this netns, of every family.
pub fn tables() -> io::Result<HashSet<CString>> {
    let socket = mnl::Socket::new(mnl::Bus::Netfilter)?;
    let seq = 1;
    let request = nftnl::table::get_tables_nlmsg(seq);
    let mut tables = HashSet::new();
    dump(
        &socket,
        &request,
        seq,
        nftnl::table::get_tables_cb,
        &mut tables,
    )?;
    Ok(tables)
}

/// A rule as far as Beeline tells its own apart: its handle and comment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleInfo {
    pub handle: u64,
    pub comment: Option<String>,
}

/// Whether the IPv4 table `table` has a chain `chain`.
pub fn chain_exists(table: &CStr, chain: &CStr) -> io::Result<bool> {
    let socket = mnl::Socket::new(mnl::Bus::Netfilter)?;
    let seq = 1;
    let mut request = vec![0u8; nftnl::nft_nlmsg_maxsize() as usize];
    // SAFETY: as in `rules`, for a chain object.
    unsafe {
        let header = sys::nftnl_nlmsg_build_hdr(
            request.as_mut_ptr().cast(),
            libc::NFT_MSG_GETCHAIN as u16,
            nftnl::ProtoFamily::Ipv4 as u16,
            libc::NLM_F_ACK as u16,
            seq,
        );
        let object = sys::nftnl_chain_alloc();
        if object.is_null() {
            return Err(io::Error::other("out of memory"));
        }
        sys::nftnl_chain_set_str(object, sys::NFTNL_CHAIN_TABLE as u16, table.as_ptr());
        sys::nftnl_chain_set_str(object, sys::NFTNL_CHAIN_NAME as u16, chain.as_ptr());
        sys::nftnl_chain_nlmsg_build_payload(header, object);
        sys::nftnl_chain_free(object);
    }
    let mut seen = 0u32;
    match dump(
        &socket,
        &request,
        seq,
        |_, seen: &mut u32| {
            *seen += 1;
            1
        },
        &mut seen,
    ) {
        Ok(()) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
        Err(e) => Err(e),
    }
}

/// The rules of `chain` in the IPv4 table `table`; `None` when there is no
/// such chain.
pub fn rules(table: &CStr, chain: &CStr) -> io::Result<Option<Vec<RuleInfo>>> {
    if !chain_exists(table, chain)? {
        return Ok(None);
    }
    let socket = mnl::Socket::new(mnl::Bus::Netfilter)?;
    let seq = 1;
    let mut request = vec![0u8; nftnl::nft_nlmsg_maxsize() as usize];
    // SAFETY: the buffer holds a whole netlink page; the rule is allocated,
    // filled with NUL-terminated strings that outlive the call, and freed.
    unsafe {
        let header = sys::nftnl_nlmsg_build_hdr(
            request.as_mut_ptr().cast(),
            libc::NFT_MSG_GETRULE as u16,
            nftnl::ProtoFamily::Ipv4 as u16,
            (libc::NLM_F_DUMP | libc::NLM_F_ACK) as u16,
            seq,
        );
        let rule = sys::nftnl_rule_alloc();
        if rule.is_null() {
            return Err(io::Error::other("out of memory"));
        }
        sys::nftnl_rule_set_str(rule, sys::NFTNL_RULE_TABLE as u16, table.as_ptr());
        sys::nftnl_rule_set_str(rule, sys::NFTNL_RULE_CHAIN as u16, chain.as_ptr());
        sys::nftnl_rule_nlmsg_build_payload(header, rule);
        sys::nftnl_rule_free(rule);
    }
    let mut found = Vec::new();
    match dump(&socket, &request, seq, rule_info_cb, &mut found) {
        Ok(()) => Ok(Some(found)),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

fn rule_info_cb(header: &libc::nlmsghdr, found: &mut Vec<RuleInfo>) -> libc::c_int {
    // SAFETY: `header` is a complete message from the kernel (mnl checked
    // its length); the rule is allocated, parsed into and freed here, and
    // the userdata it returns is copied before that.
    unsafe {
        let rule = sys::nftnl_rule_alloc();
        if rule.is_null() {
            return -1;
        }
        if sys::nftnl_rule_nlmsg_parse((header as *const libc::nlmsghdr).cast(), rule) < 0 {
            sys::nftnl_rule_free(rule);
            return -1;
        }
        let handle = sys::nftnl_rule_get_u64(rule, sys::NFTNL_RULE_HANDLE as u16);
        let mut len = 0u32;
        let data = sys::nftnl_rule_get_data(rule, sys::NFTNL_RULE_USERDATA as u16, &mut len);
        let userdata = if data.is_null() {
            Vec::new()
        } else {
            std::slice::from_raw_parts(data.cast::<u8>(), len as usize).to_vec()
        };
        sys::nftnl_rule_free(rule);
        found.push(RuleInfo {
            handle,
            comment: comment_of(&userdata),
        });
    }
    1 // MNL_CB_OK
}

/// The comment in a rule's userdata: type-length-value records, the
/// comment is type 0 (NFTNL_UDATA_RULE_COMMENT), NUL-terminated.
fn comment_of(userdata: &[u8]) -> Option<String> {
    let mut rest = userdata;
    while let [kind, len, tail @ ..] = rest {
        let len = *len as usize;
        if tail.len() < len {
            return None;
        }
        let (value, next) = tail.split_at(len);
        if *kind == sys::NFTNL_UDATA_RULE_COMMENT as u8 {
            let text = value.split(|b| *b == 0).next().unwrap_or_default();
            return Some(String::from_utf8_lossy(text).into_owned());
        }
        rest = next;
    }
    None
}

/// Sends a request built in a whole-page buffer and runs `callback` on
/// every message of the answer.
fn dump<T>(
    socket: &mnl::Socket,
    request: &[u8],
    seq: u32,
    callback: mnl::Callback<T>,
    data: &mut T,
) -> io::Result<()> {
    let portid = socket.portid();
    // The builders fill a whole page: send only the message.
    let len = u32::from_ne_bytes(request[..4].try_into().expect("4 bytes")) as usize;
    socket.send(&request[..len])?;
    let mut buffer = vec![0; nftnl::nft_nlmsg_maxsize() as usize];
    loop {
        let n = socket.recv_raw(&mut buffer)?;
        match mnl::cb_run2(&buffer[..n], seq, portid, callback, data)? {
            mnl::CbResult::Stop => return Ok(()),
            mnl::CbResult::Ok => {}
        }
    }
}

/// Receive buffer per acknowledgement: a capped ack (`NETLINK_CAP_ACK`) is a
/// 36-byte message in an skb whose truesize is well under this.
const RCVBUF_PER_ACK: usize = 1024;
/// Never size a buffer below this: it is about the socket's default.
const MIN_BUF: usize = 128 * 1024;

/// Sends a batch as one netfilter transaction.
pub fn send(batch: &FinalizedBatch) -> io::Result<()> {
    let socket = mnl::Socket::new(mnl::Bus::Netfilter)?;
    let portid = socket.portid();
    let fd = socket.as_raw_fd();
    // One sendmsg is one transaction. nftnl splits a big batch into pages
    // and `send_all` would send them one by one: past ~500 rules the kernel
    // sees a batch without its end and a second one without its begin.
    let message: Vec<u8> = batch.iter().flatten().copied().collect();
    // netlink refuses a message larger than the send buffer (EMSGSIZE).
    let sndbuf = (message.len() + 4096).max(MIN_BUF);
    setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, sndbuf)?;
    // The kernel runs the whole batch inside that sendmsg and queues one ack
    // per message before we read any: the default receive buffer (~208 KiB)
    // overflows (ENOBUFS) at about 250 rules. Acks without a copy of the
    // request, and room for all of them.
    setsockopt_int(fd, libc::SOL_NETLINK, libc::NETLINK_CAP_ACK, 1)?;
    let rcvbuf = (batch.sequence_numbers().len() * RCVBUF_PER_ACK).max(MIN_BUF);
    setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, rcvbuf)?;
    if socket.send(&message)? < message.len() {
        return Err(io::Error::other("the netfilter batch was sent in part"));
    }
    let mut buffer = vec![0; nftnl::nft_nlmsg_maxsize() as usize];
    let mut expected = batch.sequence_numbers();
    while !expected.is_empty() {
        for message in socket.recv(&mut buffer[..])? {
            let message = message?;
            let seq = expected
                .next()
                .ok_or_else(|| io::Error::other("unexpected netfilter acknowledgement"))?;
            mnl::cb_run(message, seq, portid)?;
        }
    }
    Ok(())
}

fn setsockopt_int(fd: i32, level: i32, name: i32, value: usize) -> io::Result<()> {
    let value = i32::try_from(value).map_err(|_| io::Error::other("netfilter batch too large"))?;
    // SAFETY: `fd` is the live netlink socket; the option value is a c_int
    // on our stack, passed with its size.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&value as *const i32).cast(),
            std::mem::size_of::<i32>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
