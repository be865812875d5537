//! The node's conntrack over netlink (ctnetlink): the reply tuples of every
//! connection the host stack destination-NATed, and the events of their
//! end. The stack-NAT owner keeps `BEELINE_STACK_NAT` equal to them.
use std::{collections::HashSet, io, net::IpAddr};

use beeline_common::FlowKey;
use netlink_packet_core::{
    NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_netfilter::{
    NetfilterHeader, NetfilterMessage, NetfilterMessageInner, NetfilterProtoFamily,
    conntrack::{
        ConntrackAttribute, ConntrackMessage, IPTuple, ProtoTuple, Protocol, Status, Tuple,
    },
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_NETFILTER};
use tokio::sync::mpsc;
use tracing::warn;

/// `NFNLGRP_CONNTRACK_DESTROY`: events of connections that ended.
const GROUP_DESTROY: u32 = 3;
/// Room for bursts of events (a flood of connections expiring at once).
const EVENT_BUFFER: usize = 8 << 20;

/// What the event listener reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A NATed connection ended: its replies' key.
    Ended(FlowKey),
    /// Events were lost (the socket overflowed): time for a full resync.
    Lost,
}

/// The reply key of every destination-NATed connection conntrack holds.
pub fn dnat_replies() -> io::Result<HashSet<FlowKey>> {
    let socket = get(vec![], NLM_F_REQUEST | NLM_F_DUMP)?;
    let mut keys = HashSet::new();
    loop {
        let (data, _) = socket.recv_from_full()?;
        let mut offset = 0;
        while offset < data.len() {
            let message = NetlinkMessage::<NetfilterMessage>::deserialize(&data[offset..])
                .map_err(|e| io::Error::other(format!("a conntrack message: {e}")))?;
            offset += message.header.length as usize;
            match message.payload {
                NetlinkPayload::Done(_) => return Ok(keys),
                NetlinkPayload::Error(e) => return Err(e.to_io()),
                NetlinkPayload::InnerMessage(m) => keys.extend(dnat_reply(&m)),
                _ => {}
            }
            if message.header.length == 0 {
                break;
            }
        }
    }
}

/// Sends a conntrack GET (`flags`: one entry, or a dump); the answers come
/// on the returned socket.
fn get(attributes: Vec<ConntrackAttribute>, flags: u16) -> io::Result<Socket> {
    let mut socket = Socket::new(NETLINK_NETFILTER)?;
    socket.bind_auto()?;
    let mut request = NetlinkMessage::new(
        NetlinkHeader::default(),
        NetlinkPayload::from(NetfilterMessage::new(
            NetfilterHeader::new(NetfilterProtoFamily::IPv4, 0, 0),
            ConntrackMessage::Get(attributes),
        )),
    );
    request.header.flags = flags;
    request.header.sequence_number = 1;
    request.finalize();
    let mut buf = vec![0; request.buffer_len()];
    request.serialize(&mut buf);
    socket.send(&buf, 0)?;
    Ok(socket)
}

/// Whether conntrack holds a destination-NATed connection whose replies
/// have `key`: a client that reopens a connection on the same port makes a
/// new one as the old one ends, and both have the same key.
pub fn dnat_reply_exists(key: &FlowKey) -> io::Result<bool> {
    let protocol = match i32::from(key.protocol) {
        libc::IPPROTO_TCP => Protocol::Tcp,
        libc::IPPROTO_UDP => Protocol::Udp,
        _ => return Ok(false),
    };
    let tuple = vec![
        Tuple::Ip(vec![
            IPTuple::SourceAddress(IpAddr::V4(key.saddr.into())),
            IPTuple::DestinationAddress(IpAddr::V4(key.daddr.into())),
        ]),
        Tuple::Proto(vec![
            ProtoTuple::Protocol(protocol),
            ProtoTuple::SourcePort(u16::from_be_bytes(key.sport)),
            ProtoTuple::DestinationPort(u16::from_be_bytes(key.dport)),
        ]),
    ];
    let socket = get(
        vec![ConntrackAttribute::CtaTupleReply(tuple)],
        NLM_F_REQUEST,
    )?;
    let (data, _) = socket.recv_from_full()?;
    let message = NetlinkMessage::<NetfilterMessage>::deserialize(&data)
        .map_err(|e| io::Error::other(format!("a conntrack message: {e}")))?;
    match message.payload {
        NetlinkPayload::InnerMessage(m) => Ok(dnat_reply(&m) == Some(*key)),
        NetlinkPayload::Error(e) if e.to_io().raw_os_error() == Some(libc::ENOENT) => Ok(false),
        NetlinkPayload::Error(e) => Err(e.to_io()),
        _ => Ok(false),
    }
}

/// Listens for connections that end, on a thread of its own (the socket is
/// read as fast as the kernel writes); stops when `tx` closes.
pub fn listen(tx: mpsc::UnboundedSender<Event>) -> io::Result<std::thread::JoinHandle<()>> {
    let mut socket = Socket::new(NETLINK_NETFILTER)?;
    socket.bind(&SocketAddr::new(0, 0))?;
    socket.add_membership(GROUP_DESTROY)?;
    if let Err(e) = socket.set_rx_buf_sz(EVENT_BUFFER) {
        warn!("conntrack events: cannot enlarge the socket buffer: {e}");
    }
    std::thread::Builder::new()
        .name("conntrack-events".into())
        .spawn(move || {
            loop {
                let data = match socket.recv_from_full() {
                    Ok((data, _)) => data,
                    Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                        if tx.send(Event::Lost).is_err() {
                            return;
                        }
                        continue;
                    }
                    Err(e) => {
                        warn!("conntrack events: {e}; resyncing");
                        if tx.send(Event::Lost).is_err() {
                            return;
                        }
                        std::thread::sleep(std::time::Duration::from_secs(1));
                        continue;
                    }
                };
                let mut offset = 0;
                while offset < data.len() {
                    let Ok(message) =
                        NetlinkMessage::<NetfilterMessage>::deserialize(&data[offset..])
                    else {
                        break;
                    };
                    offset += (message.header.length as usize).max(1);
                    if let NetlinkPayload::InnerMessage(m) = message.payload
                        && let Some(key) = dnat_reply(&m)
                        && tx.send(Event::Ended(key)).is_err()
                    {
                        return;
                    }
                }
            }
        })
}

/// The reply key of a conntrack message about a destination-NATed TCP or
/// UDP connection.
fn dnat_reply(message: &NetfilterMessage) -> Option<FlowKey> {
    let NetfilterMessageInner::Conntrack(ct) = &message.inner else {
        return None;
    };
    let attributes = match ct {
        ConntrackMessage::New(a) | ConntrackMessage::Delete(a) => a,
        _ => return None,
    };
    let mut nat = false;
    let mut reply = None;
    for attribute in attributes {
        match attribute {
            ConntrackAttribute::CtaStatus(status) => nat = status.contains(Status::DstNat),
            ConntrackAttribute::CtaTupleReply(tuple) => reply = Some(tuple),
            _ => {}
        }
    }
    if !nat {
        return None;
    }
    key_of(reply?)
}

fn key_of(tuple: &[Tuple]) -> Option<FlowKey> {
    let mut key = FlowKey::default();
    let (mut src, mut dst, mut proto) = (false, false, false);
    for part in tuple {
        match part {
            Tuple::Ip(ips) => {
                for ip in ips {
                    match ip {
                        IPTuple::SourceAddress(IpAddr::V4(a)) => {
                            key.saddr = a.octets();
                            src = true;
                        }
                        IPTuple::DestinationAddress(IpAddr::V4(a)) => {
                            key.daddr = a.octets();
                            dst = true;
                        }
                        _ => {}
                    }
                }
            }
            Tuple::Proto(parts) => {
                for p in parts {
                    match p {
                        ProtoTuple::Protocol(Protocol::Tcp) => {
                            key.protocol = libc::IPPROTO_TCP as u8;
                            proto = true;
                        }
                        ProtoTuple::Protocol(Protocol::Udp) => {
                            key.protocol = libc::IPPROTO_UDP as u8;
                            proto = true;
                        }
                        ProtoTuple::SourcePort(p) => key.sport = p.to_be_bytes(),
                        ProtoTuple::DestinationPort(p) => key.dport = p.to_be_bytes(),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    (src && dst && proto).then_some(key)
}
