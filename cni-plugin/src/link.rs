//! The pod's veth pair, addresses, routes and neighbours, all through rtnetlink.
use std::{fs::File, net::Ipv4Addr, os::fd::AsRawFd};

use beeline_proto::MacAddr;
use futures::TryStreamExt;
use rtnetlink::{
    Handle, LinkMessageBuilder, LinkUnspec, LinkVeth, RouteMessageBuilder,
    packet_route::{
        link::{InfoData, InfoVeth, LinkAttribute, LinkMessage},
        neighbour::NeighbourState,
        route::RouteScope,
    },
};

use crate::error::{CniError, Result, code};

const ENOENT: i32 = libc::ENOENT;
const ENODEV: i32 = libc::ENODEV;
const EEXIST: i32 = libc::EEXIST;

/// The errno inside a netlink error, if it is one.
pub fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => Some(m.raw_code().abs()),
        _ => None,
    }
}

fn netlink_error(what: impl Into<String>, e: rtnetlink::Error) -> CniError {
    CniError::new(code::NETLINK_FAILURE, what).with_details(e)
}

/// The host-side veth name for an attachment: stable, so DEL finds it with no
/// state, and at most 15 bytes.
pub fn host_ifname(container_id: &str, ifname: &str) -> String {
    use std::hash::Hasher;
    let mut h = fnv::FnvHasher::default();
    h.write(container_id.as_bytes());
    h.write(&[0]);
    h.write(ifname.as_bytes());
    format!("bl{:013x}", h.finish() & ((1 << 52) - 1))
}

pub async fn link_by_name(handle: &Handle, name: &str) -> Result<Option<LinkMessage>> {
    let mut links = handle.link().get().match_name(name.to_string()).execute();
    match links.try_next().await {
        Ok(link) => Ok(link),
        Err(e) if matches!(errno(&e), Some(ENODEV | ENOENT)) => Ok(None),
        Err(e) => Err(netlink_error(format!("cannot look up interface {name}"), e)),
    }
}

pub fn mac_of(link: &LinkMessage) -> Option<MacAddr> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::Address(bytes) => MacAddr::try_from(bytes.as_slice()).ok(),
        _ => None,
    })
}

#[derive(Debug, Clone)]
pub struct PodLink {
    pub host_ifname: String,
    pub host_ifindex: u32,
    pub host_mac: MacAddr,
    pub pod_ifindex: u32,
    pub pod_mac: MacAddr,
}

/// Creates the veth pair with the pod end born inside `netns` as `ifname`
/// (so it never clashes with a host interface of the same name).
pub async fn create_veth(
    host: &Handle,
    pod: &Handle,
    netns: &File,
    host_ifname: &str,
    ifname: &str,
    mtu: u32,
) -> Result<PodLink> {
    if link_by_name(pod, ifname).await?.is_some() {
        return Err(CniError::new(
            code::INTERFACE_EXISTS,
            format!("interface {ifname} already exists in the container's netns"),
        ));
    }
    let peer = LinkMessageBuilder::<LinkUnspec>::new()
        .name(ifname.to_string())
        .mtu(mtu)
        .setns_by_fd(netns.as_raw_fd())
        .build();
    let veth = LinkVeth::new(host_ifname, ifname)
        .mtu(mtu)
        .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
        .build();
    if let Err(e) = host.link().add(veth).execute().await {
        if errno(&e) == Some(EEXIST) {
            return Err(CniError::new(
                code::INTERFACE_EXISTS,
                format!(
                    "host interface {host_ifname} for this container and interface already exists \
                     (a previous ADD was not deleted)"
                ),
            ));
        }
        return Err(netlink_error("cannot create the veth pair", e));
    }
    let missing = |side: &str| {
        CniError::new(
            code::NETLINK_FAILURE,
            format!("the {side} end of the new veth pair disappeared"),
        )
    };
    let host_link = link_by_name(host, host_ifname)
        .await?
        .ok_or_else(|| missing("host"))?;
    let pod_link = link_by_name(pod, ifname)
        .await?
        .ok_or_else(|| missing("pod"))?;
    Ok(PodLink {
        host_ifname: host_ifname.to_string(),
        host_ifindex: host_link.header.index,
        host_mac: mac_of(&host_link).ok_or_else(|| missing("host"))?,
        pod_ifindex: pod_link.header.index,
        pod_mac: mac_of(&pod_link).ok_or_else(|| missing("pod"))?,
    })
}

/// Inside the pod: `ip/32`, link up, a permanent neighbour for the
/// link-local gateway (so the pod never ARPs) and `default via gw onlink`.
pub async fn configure_pod(
    pod: &Handle,
    link: &PodLink,
    ip: Ipv4Addr,
    gateway: Ipv4Addr,
) -> Result<()> {
    let index = link.pod_ifindex;
    pod.address()
        .add(index, ip.into(), 32)
        .execute()
        .await
        .map_err(|e| netlink_error(format!("cannot add {ip}/32 to the pod interface"), e))?;
    set_up(pod, index).await?;
    pod.neighbours()
        .add(index, gateway.into())
        .link_layer_address(&link.host_mac.0)
        .state(NeighbourState::Permanent)
        .execute()
        .await
        .map_err(|e| netlink_error("cannot add the gateway neighbour in the pod", e))?;
    let default = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(Ipv4Addr::UNSPECIFIED, 0)
        .gateway(gateway)
        .output_interface(index)
        .onlink()
        .build();
    pod.route()
        .add(default)
        .execute()
        .await
        .map_err(|e| netlink_error("cannot add the pod's default route", e))
}

/// On the host: link up, `ip/32 dev host_veth` (host-to-pod traffic such as
/// kubelet probes) and a permanent neighbour for the pod.
pub async fn configure_host(host: &Handle, link: &PodLink, ip: Ipv4Addr) -> Result<()> {
    let index = link.host_ifindex;
    set_up(host, index).await?;
    let route = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(ip, 32)
        .output_interface(index)
        .scope(RouteScope::Link)
        .build();
    host.route()
        .add(route)
        .execute()
        .await
        .map_err(|e| netlink_error(format!("cannot add the host route to {ip}"), e))?;
    host.neighbours()
        .add(index, ip.into())
        .link_layer_address(&link.pod_mac.0)
        .state(NeighbourState::Permanent)
        .execute()
        .await
        .map_err(|e| netlink_error("cannot add the pod neighbour on the host", e))
}

async fn set_up(handle: &Handle, index: u32) -> Result<()> {
    handle
        .link()
        .set(LinkUnspec::new_with_index(index).up().build())
        .execute()
        .await
        .map_err(|e| netlink_error(format!("cannot bring up interface {index}"), e))
}

/// Deletes a link by name; `Ok(false)` if it did not exist.
pub async fn delete_by_name(handle: &Handle, name: &str) -> Result<bool> {
    let Some(link) = link_by_name(handle, name).await? else {
        return Ok(false);
    };
    match handle.link().del(link.header.index).execute().await {
        Ok(()) => Ok(true),
        Err(e) if matches!(errno(&e), Some(ENODEV | ENOENT)) => Ok(false),
        Err(e) => Err(netlink_error(format!("cannot delete interface {name}"), e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_ifname_is_stable_short_and_distinct() {
        let a = host_ifname("container-a", "eth0");
        assert_eq!(a, host_ifname("container-a", "eth0"));
        assert!(a.len() <= 15 && a.starts_with("bl"), "{a}");
        assert_ne!(a, host_ifname("container-a", "eth1"));
        assert_ne!(a, host_ifname("container-b", "eth0"));
        // The separator keeps ("ab","c") and ("a","bc") apart.
        assert_ne!(host_ifname("ab", "c"), host_ifname("a", "bc"));
    }
}
