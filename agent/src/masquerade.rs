//! Egress masquerade for pod traffic leaving the cluster, as an nftables
//! table owned by Beeline (`table ip beeline`), written over netfilter
//! netlink with nftnl (no `iptables`/`nft` processes).
//!
//! ```text
//! table ip beeline {
//!   chain postrouting {
//!     type nat hook postrouting priority srcnat; policy accept;
//!     ip daddr <each cluster / non-masquerade CIDR> return
//!     ip saddr <this node's podCIDR> masquerade
//!   }
//! }
//! ```
//! Every apply replaces the whole table in one netfilter transaction.
use std::{ffi::CStr, io, os::fd::AsRawFd};

use ipnet::Ipv4Net;
use nftnl::{
    Batch, Chain, ChainType, FinalizedBatch, Hook, MsgType, Policy, ProtoFamily, Rule, Table,
    nft_expr,
};

const TABLE: &CStr = c"beeline";
const CHAIN: &CStr = c"postrouting";
/// NF_IP_PRI_NAT_SRC: where `masquerade` normally runs.
const SRCNAT_PRIORITY: i32 = 100;

/// Installs (or atomically replaces) the masquerade table.
pub fn apply(pod_cidr: Ipv4Net, no_masquerade: &[Ipv4Net]) -> io::Result<()> {
    let table = Table::new(TABLE, ProtoFamily::Ipv4);
    let mut batch = Batch::new();
    // add + delete + add: replaces an existing table, creates a missing one,
    // all inside one transaction.
    batch.add(&table, MsgType::Add);
    batch.add(&table, MsgType::Del);
    batch.add(&table, MsgType::Add);
    let mut chain = Chain::new(CHAIN, &table);
    chain.set_type(ChainType::Nat);
    chain.set_hook(Hook::PostRouting, SRCNAT_PRIORITY);
    chain.set_policy(Policy::Accept);
    batch.add(&chain, MsgType::Add);
    for net in no_masquerade {
        let mut rule = Rule::new(&chain);
        rule.add_expr(&nft_expr!(payload ipv4 daddr));
        rule.add_expr(&nft_expr!(bitwise mask net.netmask(), xor 0u32));
        rule.add_expr(&nft_expr!(cmp == net.network()));
        rule.add_expr(&nft_expr!(verdict return));
        batch.add(&rule, MsgType::Add);
    }
    let mut rule = Rule::new(&chain);
    rule.add_expr(&nft_expr!(payload ipv4 saddr));
    rule.add_expr(&nft_expr!(bitwise mask pod_cidr.netmask(), xor 0u32));
    rule.add_expr(&nft_expr!(cmp == pod_cidr.network()));
    rule.add_expr(&nft_expr!(counter));
    rule.add_expr(&nft_expr!(masquerade));
    batch.add(&rule, MsgType::Add);
    send(&batch.finalize())
}

/// Removes the table; succeeds if it is already gone.
pub fn remove() -> io::Result<()> {
    let table = Table::new(TABLE, ProtoFamily::Ipv4);
    let mut batch = Batch::new();
    batch.add(&table, MsgType::Add);
    batch.add(&table, MsgType::Del);
    send(&batch.finalize())
}

/// Whether the table is installed (a `nft flush ruleset` or a firewall
/// reload removes it).
pub fn installed() -> io::Result<bool> {
    let socket = mnl::Socket::new(mnl::Bus::Netfilter)?;
    let portid = socket.portid();
    let seq = 1;
    let request = nftnl::table::get_tables_nlmsg(seq);
    // The builder returns a whole page: send only the message.
    let len = u32::from_ne_bytes(request[..4].try_into().expect("4 bytes")) as usize;
    socket.send(&request[..len])?;
    let mut tables = std::collections::HashSet::new();
    let mut buffer = vec![0; nftnl::nft_nlmsg_maxsize() as usize];
    loop {
        let n = socket.recv_raw(&mut buffer)?;
        match mnl::cb_run2(
            &buffer[..n],
            seq,
            portid,
            nftnl::table::get_tables_cb,
            &mut tables,
        )? {
            mnl::CbResult::Stop => break,
            mnl::CbResult::Ok => {}
        }
    }
    Ok(tables.contains(TABLE))
}

/// Receive buffer per acknowledgement: a capped ack (`NETLINK_CAP_ACK`) is a
/// 36-byte message in an skb whose truesize is well under this.
const RCVBUF_PER_ACK: usize = 1024;
/// Never size a buffer below this: it is about the socket's default.
const MIN_BUF: usize = 128 * 1024;

fn send(batch: &FinalizedBatch) -> io::Result<()> {
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
