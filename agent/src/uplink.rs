//! The node's uplink (the interface carrying its InternalIP) and the VXLAN
//! device, through rtnetlink.
use std::net::{IpAddr, Ipv4Addr};

use anyhow::{Context, Result};
use futures::TryStreamExt;
use ipnet::Ipv4Net;
use rtnetlink::{
    Handle, LinkUnspec, LinkVxlan,
    packet_route::{
        address::AddressAttribute,
        link::{InfoKind, LinkAttribute, LinkFlags, LinkInfo, LinkMessage},
    },
};

pub const VXLAN_DEVICE: &str = "beeline-vxlan";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uplink {
    pub ifindex: u32,
    pub ifname: String,
    pub mtu: u32,
    /// The node address with the uplink's prefix: peers inside it are on-link.
    pub net: Ipv4Net,
}

pub fn netlink() -> Result<Handle> {
    let (connection, handle, _) = rtnetlink::new_connection().context("opening netlink")?;
    tokio::spawn(connection);
    Ok(handle)
}

fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => Some(m.raw_code().abs()),
        _ => None,
    }
}

/// Finds the interface holding `ip` in the agent's netns.
pub async fn find(handle: &Handle, ip: Ipv4Addr) -> Result<Option<Uplink>> {
    let mut addrs = handle.address().get().execute();
    let mut found = None;
    while let Some(msg) = addrs.try_next().await? {
        let holds = msg.attributes.iter().any(|a| {
            matches!(a, AddressAttribute::Local(IpAddr::V4(a)) | AddressAttribute::Address(IpAddr::V4(a)) if *a == ip)
        });
        if holds {
            found = Some((msg.header.index, msg.header.prefix_len));
        }
    }
    let Some((index, prefix_len)) = found else {
        return Ok(None);
    };
    let Some(link) = link_by_index(handle, index).await? else {
        return Ok(None);
    };
    Ok(Some(Uplink {
        ifindex: index,
        ifname: name_of(&link),
        mtu: mtu_of(&link),
        net: Ipv4Net::new(ip, prefix_len)?,
    }))
}

/// What the agent checks of a would-be pod's host veth.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostLink {
    pub ifindex: u32,
    pub is_veth: bool,
    /// Set when the link's peer lives in another netns.
    pub peer_netns_id: Option<i32>,
}

/// The link named `name`; `None` only when the kernel says there is no
/// such device.
pub async fn host_link(handle: &Handle, name: &str) -> Result<Option<HostLink>> {
    let Some(link) = link_by_name(handle, name).await? else {
        return Ok(None);
    };
    let is_veth = link.attributes.iter().any(|a| {
        matches!(a, LinkAttribute::LinkInfo(infos) if infos.iter().any(|i| matches!(i, LinkInfo::Kind(InfoKind::Veth))))
    });
    let peer_netns_id = link.attributes.iter().find_map(|a| match a {
        LinkAttribute::LinkNetNsId(id) => Some(*id),
        _ => None,
    });
    Ok(Some(HostLink {
        ifindex: link.header.index,
        is_veth,
        peer_netns_id,
    }))
}

/// The index of the link named `name`; `None` only when the kernel says
/// there is no such device.
pub async fn link_index(handle: &Handle, name: &str) -> Result<Option<u32>> {
    Ok(link_by_name(handle, name).await?.map(|l| l.header.index))
}

async fn link_by_index(handle: &Handle, index: u32) -> Result<Option<LinkMessage>> {
    first_link(handle.link().get().match_index(index)).await
}

async fn link_by_name(handle: &Handle, name: &str) -> Result<Option<LinkMessage>> {
    first_link(handle.link().get().match_name(name.to_string())).await
}

/// The link a filtered get returns; `None` when the kernel says ENODEV.
async fn first_link(request: rtnetlink::LinkGetRequest) -> Result<Option<LinkMessage>> {
    match request.execute().try_next().await {
        Ok(link) => Ok(link),
        Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

fn name_of(link: &LinkMessage) -> String {
    link.attributes
        .iter()
        .find_map(|a| match a {
            LinkAttribute::IfName(n) => Some(n.clone()),
            _ => None,
        })
        .unwrap_or_default()
}

fn mtu_of(link: &LinkMessage) -> u32 {
    link.attributes
        .iter()
        .find_map(|a| match a {
            LinkAttribute::Mtu(m) => Some(*m),
            _ => None,
        })
        .unwrap_or(0)
}

fn is_vxlan(link: &LinkMessage) -> bool {
    link.attributes.iter().any(|a| {
        matches!(a, LinkAttribute::LinkInfo(infos) if infos.iter().any(|i| matches!(i, LinkInfo::Kind(InfoKind::Vxlan))))
    })
}

/// Creates (or reuses, updating what differs) the node's VXLAN device in
/// external (collect_md) mode: the programs set the remote and VNI per
/// packet. It has no ARP (the host stack routes other nodes' podCIDRs to it
/// with no neighbour to resolve) and a MAC derived from the node's address
/// (`beeline_common::vxlan_mac`), which other nodes address frames for this
/// node itself to.
pub async fn ensure_vxlan(handle: &Handle, port: u16, mtu: u32, mac: [u8; 6]) -> Result<u32> {
    if let Some(link) = link_by_name(handle, VXLAN_DEVICE).await? {
        if !is_vxlan(&link) {
            anyhow::bail!("{VXLAN_DEVICE} exists but is not a VXLAN device; remove it");
        }
        let index = link.header.index;
        let flags = link.header.flags;
        let current_mac = link.attributes.iter().find_map(|a| match a {
            LinkAttribute::Address(m) => Some(m.clone()),
            _ => None,
        });
        let in_line = mtu_of(&link) == mtu
            && current_mac.as_deref() == Some(&mac[..])
            && flags.contains(LinkFlags::Noarp)
            && flags.contains(LinkFlags::Up);
        if !in_line {
            handle
                .link()
                .set(
                    LinkUnspec::new_with_index(index)
                        .mtu(mtu)
                        .address(mac.to_vec())
                        .arp(false)
                        .up()
                        .build(),
                )
                .execute()
                .await
                .context("updating the VXLAN device")?;
        }
        return Ok(index);
    }
    // In collect_md mode the device id stays 0: the per-packet tunnel key
    // carries the VNI, and a non-zero id makes the kernel miss the device
    // when it demultiplexes received packets.
    let msg = LinkVxlan::new(VXLAN_DEVICE, 0)
        .port(port)
        .learning(false)
        .collect_metadata(true)
        .mtu(mtu)
        .address(mac.to_vec())
        .arp(false)
        .up()
        .build();
    handle
        .link()
        .add(msg)
        .execute()
        .await
        .context("creating the VXLAN device")?;
    let link = link_by_name(handle, VXLAN_DEVICE)
        .await?
        .context("the new VXLAN device vanished")?;
    Ok(link.header.index)
}

pub async fn delete_vxlan(handle: &Handle) -> Result<bool> {
    let Some(link) = link_by_name(handle, VXLAN_DEVICE).await? else {
        return Ok(false);
    };
    handle.link().del(link.header.index).execute().await?;
    Ok(true)
}
