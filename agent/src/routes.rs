//! Kernel routes to other nodes' podCIDRs, so what the host stack sends (a
//! node process, a Service kube-proxy DNATed, a NodePort, a hostPort)
//! reaches pods on other nodes: for a direct peer via its address on the
//! uplink, for a VXLAN peer through the VXLAN device, whose egress program
//! names the node. Pod-to-pod traffic never uses them (the programs forward
//! it). Beeline's routes carry their own protocol number, so they are told
//! apart from everyone else's and kept in line each pass.
use std::{collections::BTreeMap, net::Ipv4Addr};

use anyhow::{Context, Result};
use beeline_common::{REMOTE_IS_NODE, RemoteNode, Tunnel};
use futures::TryStreamExt;
use ipnet::Ipv4Net;
use rtnetlink::{
    Handle, RouteMessageBuilder,
    packet_route::route::{RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteScope},
};

use crate::uplink::Uplink;

/// The `proto` of Beeline's routes (`ip route` shows it as a number).
pub const PROTOCOL: u8 = 199;

/// Where a route to a remote podCIDR points.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Via {
    pub oif: u32,
    /// The peer's address for a direct route; none through the VXLAN device.
    pub gateway: Option<Ipv4Addr>,
}

/// The routes this node should have, from the remote CIDR map's entries.
pub fn desired(
    remote: &BTreeMap<Ipv4Net, RemoteNode>,
    uplink: &Uplink,
    vxlan_ifindex: u32,
) -> BTreeMap<Ipv4Net, Via> {
    remote
        .iter()
        .filter(|(_, r)| r.flags & REMOTE_IS_NODE == 0)
        .filter_map(|(net, r)| {
            let via = if r.tunnel == Tunnel::Vxlan as u16 {
                (vxlan_ifindex != 0).then_some(Via {
                    oif: vxlan_ifindex,
                    gateway: None,
                })?
            } else {
                Via {
                    oif: uplink.ifindex,
                    gateway: Some(Ipv4Addr::from(r.node_addr)),
                }
            };
            Some((*net, via))
        })
        .collect()
}

/// Makes Beeline's routes equal to `desired`; returns (added, removed).
/// Routes through the VXLAN device take the node's address as their source.
pub async fn sync(
    handle: &Handle,
    desired: &BTreeMap<Ipv4Net, Via>,
    source: Ipv4Addr,
) -> Result<(usize, usize)> {
    let current = ours(handle).await?;
    let mut added = 0;
    for (net, via) in desired {
        if current.get(net).map(|(v, _)| v) == Some(via) {
            continue;
        }
        let mut route = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(net.network(), net.prefix_len())
            .output_interface(via.oif)
            .protocol(RouteProtocol::Other(PROTOCOL));
        route = match via.gateway {
            Some(gateway) => route.gateway(gateway),
            None => route.scope(RouteScope::Link).pref_source(source),
        };
        handle
            .route()
            .add(route.build())
            .replace()
            .execute()
            .await
            .with_context(|| format!("adding the route to {net}"))?;
        added += 1;
    }
    let mut removed = 0;
    for (net, (_, message)) in current.iter().filter(|(n, _)| !desired.contains_key(n)) {
        handle
            .route()
            .del(message.clone())
            .execute()
            .await
            .with_context(|| format!("removing the route to {net}"))?;
        removed += 1;
    }
    Ok((added, removed))
}

/// Removes every route of Beeline's; returns how many.
pub async fn remove_all(handle: &Handle) -> Result<usize> {
    sync(handle, &BTreeMap::new(), Ipv4Addr::UNSPECIFIED)
        .await
        .map(|(_, removed)| removed)
}

/// Beeline's routes in the main table, by destination.
async fn ours(handle: &Handle) -> Result<BTreeMap<Ipv4Net, (Via, RouteMessage)>> {
    let mut routes = handle
        .route()
        .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
        .execute();
    let mut out = BTreeMap::new();
    while let Some(message) = routes.try_next().await.context("listing routes")? {
        if message.header.protocol != RouteProtocol::Other(PROTOCOL) {
            continue;
        }
        let (mut dst, mut oif, mut gateway) = (Ipv4Addr::UNSPECIFIED, 0, None);
        for attribute in &message.attributes {
            match attribute {
                RouteAttribute::Destination(RouteAddress::Inet(d)) => dst = *d,
                RouteAttribute::Oif(i) => oif = *i,
                RouteAttribute::Gateway(RouteAddress::Inet(g)) => gateway = Some(*g),
                _ => {}
            }
        }
        let net = Ipv4Net::new(dst, message.header.destination_prefix_length)?;
        out.insert(net, (Via { oif, gateway }, message));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_cidrs_route_by_tunnel_and_node_addresses_are_left_out() {
        let uplink = Uplink {
            ifindex: 2,
            ifname: "eth0".into(),
            mtu: 1500,
            net: "192.168.1.5/24".parse().unwrap(),
        };
        let entry = |ip: [u8; 4], tunnel: Tunnel, flags| RemoteNode {
            node_addr: ip,
            tunnel: tunnel as u16,
            flags,
        };
        let remote = BTreeMap::from([
            (
                "10.244.1.0/24".parse().unwrap(),
                entry([192, 168, 1, 6], Tunnel::Direct, 0),
            ),
            (
                "10.244.2.0/24".parse().unwrap(),
                entry([172, 16, 0, 9], Tunnel::Vxlan, 0),
            ),
            (
                "192.168.1.6/32".parse().unwrap(),
                entry([192, 168, 1, 6], Tunnel::Direct, REMOTE_IS_NODE),
            ),
        ]);
        let routes = desired(&remote, &uplink, 7);
        assert_eq!(routes.len(), 2);
        assert_eq!(
            routes[&"10.244.1.0/24".parse().unwrap()],
            Via {
                oif: 2,
                gateway: Some(Ipv4Addr::new(192, 168, 1, 6))
            }
        );
        assert_eq!(
            routes[&"10.244.2.0/24".parse().unwrap()],
            Via {
                oif: 7,
                gateway: None
            }
        );
        // Without a VXLAN device there is no route to a VXLAN peer's pods.
        assert_eq!(desired(&remote, &uplink, 0).len(), 1);
    }
}
