//! The pod's veth pair, addresses, routes and neighbours, all through rtnetlink.
use std::{fs::File, hash::Hasher, net::Ipv4Addr, os::fd::AsRawFd};

use beeline_proto::MacAddr;
use futures::TryStreamExt;
use rtnetlink::{
    Handle, LinkMessageBuilder, LinkUnspec, LinkVeth, RouteMessageBuilder,
    packet_route::{
        address::AddressScope,
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
    let mut h = fnv::FnvHasher::default();
    h.write(container_id.as_bytes());
    h.write(&[0]);
    h.write(ifname.as_bytes());
    hashed_name("bl", h)
}

/// `prefix` and 13 hex digits of the hash: at most 15 bytes, a valid ifname.
fn hashed_name(prefix: &str, h: fnv::FnvHasher) -> String {
    format!("{prefix}{:013x}", h.finish() & ((1 << 52) - 1))
}

const ALIAS_PREFIX: &str = "beeline";
/// IFALIASZ - 1
const MAX_ALIAS: usize = 255;

/// The host veth's alias names its attachment, for operators (`ip link`)
/// and for GC, which must find veths of ADDs killed before they recorded
/// anything else.
pub fn attachment_alias(network: &str, container_id: &str, ifname: &str) -> String {
    let mut alias = format!("{ALIAS_PREFIX} {network} {ifname} {container_id}");
    // All ASCII (validated), so any cut is a char boundary.
    alias.truncate(MAX_ALIAS);
    alias
}

/// The attachments of `network` that have a host veth, from the aliases.
/// A container id cut short by the alias limit is recovered only if the
/// veth's name confirms it; others are found by DEL, not GC.
pub async fn attachments_of(handle: &Handle, network: &str) -> Result<Vec<(String, String)>> {
    let prefix = format!("{ALIAS_PREFIX} {network} ");
    let mut links = handle.link().get().execute();
    let mut found = Vec::new();
    loop {
        let link = match links.try_next().await {
            Ok(Some(link)) => link,
            Ok(None) => break,
            Err(e) => return Err(netlink_error("cannot list interfaces", e)),
        };
        let (mut name, mut alias) = (None, None);
        for attr in &link.attributes {
            match attr {
                LinkAttribute::IfName(n) => name = Some(n),
                LinkAttribute::IfAlias(a) => alias = Some(a),
                _ => {}
            }
        }
        let Some(rest) = alias.and_then(|a| a.strip_prefix(&prefix)) else {
            continue;
        };
        let Some((ifname, container_id)) = rest.split_once(' ') else {
            continue;
        };
        if name.is_some_and(|n| *n == host_ifname(container_id, ifname)) {
            found.push((container_id.to_string(), ifname.to_string()));
        }
    }
    Ok(found)
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

/// Brings both ends up and names the attachment in the host end's alias
/// (the kernel ignores an alias given at creation). `host_address` (a /32
/// of host scope, so it is never picked as the source of host-to-pod
/// traffic) goes on the host end.
pub async fn bring_up(
    host: &Handle,
    pod: &Handle,
    link: &PodLink,
    alias: &str,
    host_address: Option<Ipv4Addr>,
) -> Result<()> {
    set_up(pod, link.pod_ifindex).await?;
    host.link()
        .set(
            LinkUnspec::new_with_index(link.host_ifindex)
                .up()
                .alias(alias)
                .build(),
        )
        .execute()
        .await
        .map_err(|e| netlink_error(format!("cannot bring up {}", link.host_ifname), e))?;
    if let Some(address) = host_address {
        let mut add = host.address().add(link.host_ifindex, address.into(), 32);
        add.message_mut().header.scope = AddressScope::Host;
        add.execute().await.map_err(|e| {
            netlink_error(format!("cannot add {address}/32 to the host interface"), e)
        })?;
    }
    Ok(())
}

/// Inside the pod: `ip/32`, a permanent neighbour for the
/// link-local gateway (so the pod never ARPs) and `default via gw onlink`
/// unless another interface has it. True when the default route is ours.
pub async fn configure_pod(
    pod: &Handle,
    link: &PodLink,
    ip: Ipv4Addr,
    gateway: Ipv4Addr,
) -> Result<bool> {
    let index = link.pod_ifindex;
    pod.address()
        .add(index, ip.into(), 32)
        .execute()
        .await
        .map_err(|e| netlink_error(format!("cannot add {ip}/32 to the pod interface"), e))?;
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
    // A second interface of the pod on this network (Multus' `net1`): the
    // first one's default route stays, this one gets its address and
    // gateway neighbour only.
    match pod.route().add(default).execute().await {
        Ok(()) => Ok(true),
        Err(e) if errno(&e) == Some(EEXIST) => Ok(false),
        Err(e) => Err(netlink_error("cannot add the pod's default route", e)),
    }
}

/// On the host: `ip/32 dev host_veth` (host-to-pod traffic such as
/// kubelet probes) and a permanent neighbour for the pod.
pub async fn configure_host(host: &Handle, link: &PodLink, ip: Ipv4Addr) -> Result<()> {
    let index = link.host_ifindex;
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
        // A DHCP server may have put a dynamic entry there already.
        .replace()
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

/// A fresh name for a retired veth: the prefix and 13 hex digits.
pub fn retired_name() -> String {
    let mut h = fnv::FnvHasher::default();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    h.write_u128(now.as_nanos());
    h.write_u32(std::process::id());
    hashed_name(beeline_proto::RETIRED_PREFIX, h)
}

/// Takes a pod's veth out of service at once, leaving its deletion (tens of
/// milliseconds in the kernel) for later: the host end goes down (its route
/// and neighbour entries go with it) and is renamed, and so is the pod end
/// if its netns is given, so the attachment's names are free again. Returns the
/// host end's new name; `None` if there was no such veth.
pub async fn retire(
    host: &Handle,
    pod_netns: Option<&File>,
    host_ifname: &str,
    ifname: &str,
) -> Result<Option<String>> {
    let Some(link) = link_by_name(host, host_ifname).await? else {
        return Ok(None);
    };
    // Only now a socket in the pod's netns (a DEL of nothing needs none).
    let pod = pod_netns.map(crate::netns::netlink_in).transpose()?;
    let retired = retired_name();
    // A running interface cannot be renamed: down first, then rename.
    let rename = |handle: &Handle, index: u32, alias: Option<&str>| {
        let handle = handle.clone();
        let retired = retired.clone();
        let alias = alias.map(str::to_string);
        async move {
            handle
                .link()
                .set(LinkUnspec::new_with_index(index).down().build())
                .execute()
                .await?;
            let mut renamed = LinkUnspec::new_with_index(index).name(retired);
            if let Some(alias) = alias {
                renamed = renamed.alias(alias);
            }
            handle.link().set(renamed.build()).execute().await
        }
    };
    // The kernel may be deleting the pair meanwhile (its netns is going
    // away): a vanished device is retired already.
    let gone = |e: &rtnetlink::Error| matches!(errno(e), Some(ENODEV | ENOENT));
    if let Some(pod) = &pod
        && let Some(pod_link) = link_by_name(pod, ifname).await?
    {
        match rename(pod, pod_link.header.index, None).await {
            Ok(()) => {}
            Err(e) if gone(&e) => return Ok(None),
            Err(e) => {
                return Err(netlink_error(
                    format!("cannot retire {ifname} in the pod"),
                    e,
                ));
            }
        }
    }
    match rename(host, link.header.index, Some(beeline_proto::RETIRED_ALIAS)).await {
        Ok(()) => Ok(Some(retired)),
        Err(e) if gone(&e) => Ok(None),
        Err(e) => Err(netlink_error(format!("cannot retire {host_ifname}"), e)),
    }
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
