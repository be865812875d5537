//! The node's uplink: the interface that carries its InternalIP.
use std::net::{IpAddr, Ipv4Addr};

use anyhow::{Context, Result};
use futures::TryStreamExt;
use rtnetlink::packet_route::{address::AddressAttribute, link::LinkAttribute};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uplink {
    pub ifindex: u32,
    pub ifname: String,
    pub mtu: u32,
}

/// Finds the interface holding `ip` in the agent's netns.
pub async fn find(ip: Ipv4Addr) -> Result<Option<Uplink>> {
    let (connection, handle, _) = rtnetlink::new_connection().context("opening netlink")?;
    let conn = tokio::spawn(connection);
    let result = async {
        let mut addrs = handle.address().get().execute();
        let mut index = None;
        while let Some(msg) = addrs.try_next().await? {
            let holds = msg
                .attributes
                .iter()
                .any(|a| matches!(a, AddressAttribute::Local(IpAddr::V4(a)) | AddressAttribute::Address(IpAddr::V4(a)) if *a == ip));
            if holds {
                index = Some(msg.header.index);
                break;
            }
        }
        let Some(index) = index else { return Ok(None) };
        let mut links = handle.link().get().match_index(index).execute();
        let Some(link) = links.try_next().await? else { return Ok(None) };
        let mut up = Uplink {
            ifindex: index,
            ifname: String::new(),
            mtu: 0,
        };
        for attr in link.attributes {
            match attr {
                LinkAttribute::IfName(n) => up.ifname = n,
                LinkAttribute::Mtu(m) => up.mtu = m,
                _ => {}
            }
        }
        Ok::<_, rtnetlink::Error>(Some(up))
    }
    .await;
    conn.abort();
    result.context("querying addresses and links")
}

pub async fn mtu_of_address(ip: Ipv4Addr) -> Result<Option<u32>> {
    Ok(find(ip).await?.map(|u| u.mtu))
}
