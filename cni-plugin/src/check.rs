//! CHECK: compares the attachment with what ADD reported (prevResult) and
//! with what the datapath holds, and names every difference.
use std::net::{IpAddr, Ipv4Addr};

use beeline_ipam::{IpStore, Owner};
use beeline_proto::{Client, POD_GATEWAY as GATEWAY};
use futures::TryStreamExt;
use rtnetlink::{
    Handle, RouteMessageBuilder,
    packet_route::{
        address::AddressAttribute,
        route::{RouteAddress, RouteAttribute},
    },
};
use serde_json::Value;

use crate::{
    config::{Env, NetConf},
    delegate::Delegate,
    error::{CniError, Result, code, from_agent},
    link, netns,
};

/// What prevResult says about our interface: its MAC and IPv4 address.
pub(crate) fn expected(prev: &Value, env: &Env) -> Result<(String, Ipv4Addr)> {
    let bad = |what: &str| CniError::new(code::INVALID_CONFIG, format!("prevResult {what}"));
    let interfaces = prev["interfaces"]
        .as_array()
        .ok_or_else(|| bad("has no interfaces"))?;
    let index = interfaces
        .iter()
        .position(|i| i["name"] == env.ifname.as_str() && i["sandbox"].is_string())
        .ok_or_else(|| bad(&format!("has no interface {} in a sandbox", env.ifname)))?;
    let mac = interfaces[index]["mac"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let ip = prev["ips"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|ip| ip["interface"].as_u64() == Some(index as u64))
        .filter_map(|ip| ip["address"].as_str()?.split('/').next()?.parse().ok())
        .next()
        .ok_or_else(|| bad(&format!("has no IPv4 address on {}", env.ifname)))?;
    Ok((mac, ip))
}

pub async fn check(env: &Env, conf: &NetConf, stdin: &[u8]) -> Result<()> {
    let prev = conf.prev_result.as_ref().ok_or_else(|| {
        CniError::new(
            code::INVALID_CONFIG,
            "CHECK needs the ADD result in prevResult",
        )
    })?;
    let (mac, ip) = expected(prev, env)?;
    let netns_path = env.netns.as_ref().expect("CHECK requires CNI_NETNS");
    let netns = netns::open(netns_path)?;
    let pod = netns::netlink_in(&netns)?;
    let host = netns::netlink_here()?;
    let mut problems: Vec<String> = Vec::new();

    match link::link_by_name(&pod, &env.ifname).await? {
        None => problems.push(format!(
            "interface {} is missing in the container",
            env.ifname
        )),
        Some(l) => {
            let actual = link::mac_of(&l).map(|m| m.to_string()).unwrap_or_default();
            if !mac.is_empty() && !actual.eq_ignore_ascii_case(&mac) {
                problems.push(format!(
                    "{} has MAC {actual}, ADD reported {mac}",
                    env.ifname
                ));
            }
            if !has_address(&pod, l.header.index, ip).await? {
                problems.push(format!("{} lacks its address {ip}/32", env.ifname));
            }
            let default_route = prev["routes"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|r| r["dst"] == "0.0.0.0/0" && r["gw"] == GATEWAY.to_string().as_str());
            if default_route
                && !has_route(&pod, Ipv4Addr::UNSPECIFIED, 0, Some(GATEWAY), None).await?
            {
                problems.push(format!("the default route via {GATEWAY} is missing"));
            }
        }
    }
    let host_ifname = link::host_ifname(&env.container_id, &env.ifname);
    match link::link_by_name(&host, &host_ifname).await? {
        None => problems.push(format!("host veth {host_ifname} is missing")),
        Some(l) => {
            if !has_route(&host, ip, 32, None, Some(l.header.index)).await? {
                problems.push(format!(
                    "the host route to {ip} via {host_ifname} is missing"
                ));
            }
        }
    }
    let agent = Client::new(conf.agent_socket());
    match agent
        .check_endpoint(&env.container_id, &env.ifname)
        .map_err(from_agent)?
    {
        None => problems.push("the agent has no endpoint for this attachment".into()),
        Some(agent_problems) => problems.extend(agent_problems),
    }
    match conf.ipam_type() {
        None => {
            let owner = Owner {
                container_id: env.container_id.clone(),
                ifname: env.ifname.clone(),
            };
            match IpStore::open(conf.ipam_dir())?.find(&owner)? {
                Some(held) if held == ip => {}
                Some(held) => problems.push(format!("the allocator holds {held}, not {ip}")),
                None => problems.push(format!("the allocator holds no address for {}", env.ifname)),
            }
        }
        Some(plugin) => {
            if let Err(e) = (Delegate { plugin, env, stdin }).exec("CHECK") {
                problems.push(e.to_string());
            }
        }
    }
    if problems.is_empty() {
        return Ok(());
    }
    Err(CniError::new(
        code::CHECK_FAILED,
        format!(
            "CHECK found {} problem(s): {}",
            problems.len(),
            problems.join("; ")
        ),
    ))
}

async fn has_address(handle: &Handle, index: u32, ip: Ipv4Addr) -> Result<bool> {
    let mut addrs = handle
        .address()
        .get()
        .set_link_index_filter(index)
        .execute();
    while let Some(msg) = addrs.try_next().await.map_err(netlink)? {
        let matches = msg
            .attributes
            .iter()
            .any(|a| matches!(a, AddressAttribute::Address(IpAddr::V4(a)) if *a == ip));
        if matches && msg.header.prefix_len == 32 {
            return Ok(true);
        }
    }
    Ok(false)
}

async fn has_route(
    handle: &Handle,
    dst: Ipv4Addr,
    prefix: u8,
    gateway: Option<Ipv4Addr>,
    oif: Option<u32>,
) -> Result<bool> {
    let mut routes = handle
        .route()
        .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
        .execute();
    while let Some(msg) = routes.try_next().await.map_err(netlink)? {
        if msg.header.destination_prefix_length != prefix {
            continue;
        }
        let attr_dst = msg.attributes.iter().find_map(|a| match a {
            RouteAttribute::Destination(RouteAddress::Inet(d)) => Some(*d),
            _ => None,
        });
        if attr_dst.unwrap_or(Ipv4Addr::UNSPECIFIED) != dst {
            continue;
        }
        let gw_ok = gateway.is_none_or(|g| {
            msg.attributes
                .iter()
                .any(|a| matches!(a, RouteAttribute::Gateway(RouteAddress::Inet(x)) if *x == g))
        });
        let oif_ok = oif.is_none_or(|o| {
            msg.attributes
                .iter()
                .any(|a| matches!(a, RouteAttribute::Oif(x) if *x == o))
        });
        if gw_ok && oif_ok {
            return Ok(true);
        }
    }
    Ok(false)
}

fn netlink(e: rtnetlink::Error) -> CniError {
    CniError::new(code::NETLINK_FAILURE, "netlink query failed during CHECK").with_details(e)
}
