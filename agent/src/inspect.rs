//! `beeline-agent endpoints|nodes|stats|services`: read the pinned maps directly
//! (and, for names, the agent's state file), so they work while the daemon
//! is down.
use std::{collections::BTreeMap, net::Ipv4Addr, path::Path};

use anyhow::Result;
use beeline_common::{Program, SERVICE_SNAT, Tunnel, Verdict, scope};
use beeline_proto::MacAddr;
use serde::Serialize;

use crate::{
    maps::{EndpointsMap, RemoteCidrsMap, ServicesMaps, StatsMap},
    owners::services::read_names,
    state,
};

#[derive(Serialize)]
pub struct EndpointRow {
    pub ip: Ipv4Addr,
    pub host_ifindex: u32,
    pub pod_mac: String,
    pub host_mac: String,
    /// From the agent's records; absent for a map entry nobody recorded.
    pub namespace: Option<String>,
    pub pod: Option<String>,
    pub container_id: Option<String>,
    pub ifname: Option<String>,
    pub host_ifname: Option<String>,
}

/// The endpoint map, joined with the agent's records by IP.
pub fn endpoints(bpffs: &Path, state_dir: &Path) -> Result<Vec<EndpointRow>> {
    let records: BTreeMap<Ipv4Addr, beeline_proto::Endpoint> = state::read(state_dir)
        .unwrap_or_default()
        .into_iter()
        .map(|e| (e.ip, e))
        .collect();
    let mut rows: Vec<EndpointRow> = EndpointsMap::open(bpffs)?
        .entries()?
        .into_iter()
        .map(|(ip, v)| {
            let record = records.get(&ip);
            let pod = record.and_then(|r| r.pod.as_ref());
            EndpointRow {
                ip,
                host_ifindex: v.host_ifindex,
                pod_mac: MacAddr(v.pod_mac).to_string(),
                host_mac: MacAddr(v.host_mac).to_string(),
                namespace: pod.map(|p| p.namespace.clone()),
                pod: pod.map(|p| p.name.clone()),
                container_id: record.map(|r| r.container_id.clone()),
                ifname: record.map(|r| r.ifname.clone()),
                host_ifname: record.map(|r| r.host_ifname.clone()),
            }
        })
        .collect();
    rows.sort_by_key(|r| r.ip);
    Ok(rows)
}

pub fn print_endpoints(rows: &[EndpointRow]) {
    println!(
        "{:<16} {:<30} {:<16} {:>8}  {:<17}  {:<17}",
        "IP", "POD", "HOST VETH", "IFINDEX", "POD MAC", "HOST MAC"
    );
    for r in rows {
        let pod = match (&r.namespace, &r.pod) {
            (Some(ns), Some(name)) => format!("{ns}/{name}"),
            _ => "-".into(),
        };
        println!(
            "{:<16} {:<30} {:<16} {:>8}  {:<17}  {:<17}",
            r.ip,
            pod,
            r.host_ifname.as_deref().unwrap_or("-"),
            r.host_ifindex,
            r.pod_mac,
            r.host_mac
        );
    }
}

#[derive(Serialize)]
pub struct RemoteRow {
    pub pod_cidr: String,
    pub node_ip: Ipv4Addr,
    pub tunnel: &'static str,
}

/// The remote podCIDR trie: which node (and how) each CIDR goes to.
pub fn remote_cidrs(bpffs: &Path) -> Result<Vec<RemoteRow>> {
    Ok(RemoteCidrsMap::open(bpffs)?
        .entries()?
        .into_iter()
        .map(|(net, v)| RemoteRow {
            pod_cidr: net.to_string(),
            node_ip: Ipv4Addr::from(v.node_addr),
            tunnel: if v.tunnel == Tunnel::Vxlan as u16 {
                "vxlan"
            } else {
                "direct"
            },
        })
        .collect())
}

pub fn print_remote_cidrs(rows: &[RemoteRow]) {
    println!("{:<20} {:<16} {:<7}", "POD CIDR", "NODE IP", "TUNNEL");
    for r in rows {
        println!("{:<20} {:<16} {:<7}", r.pod_cidr, r.node_ip, r.tunnel);
    }
}

/// Packets by program and verdict, summed over CPUs: `{program: {verdict: n}}`.
pub type Stats = BTreeMap<&'static str, BTreeMap<&'static str, u64>>;

pub fn stats(bpffs: &Path) -> Result<Stats> {
    let counters = StatsMap::open(bpffs)?.read()?;
    Ok(Program::ALL
        .iter()
        .map(|&p| {
            let verdicts = Verdict::ALL
                .iter()
                .map(|&v| (v.name(), counters.get(p, v)))
                .collect();
            (p.name(), verdicts)
        })
        .collect())
}

/// One line per program and verdict that counted anything.
pub fn print_stats(stats: &Stats) {
    println!("{:<16} {:<22} {:>14}", "PROGRAM", "VERDICT", "PACKETS");
    for (program, verdicts) in stats {
        for (verdict, packets) in verdicts.iter().filter(|(_, n)| **n > 0) {
            println!("{program:<16} {verdict:<22} {packets:>14}");
        }
    }
}

#[derive(Serialize)]
pub struct ServiceRow {
    /// `namespace/name:port`, from the agent's state dir.
    pub service: Option<String>,
    pub frontend: String,
    pub protocol: &'static str,
    /// `socket` (pods and the node) or `external` (packets from outside).
    pub scope: &'static str,
    /// Translates the client to this node's address.
    pub snat: bool,
    pub affinity_timeout: u32,
    /// `ip:port` of each backend, in slot order.
    pub backends: Vec<String>,
    /// `ok`, `no endpoints` (refused at once), or `missing backend` (a slot
    /// naming a backend the map lacks: the next resync repairs it).
    pub state: &'static str,
}

/// The Service frontends and their backends, from the pinned maps.
pub fn services(bpffs: &Path, state_dir: &Path) -> Result<Vec<ServiceRow>> {
    let tables = ServicesMaps::open(bpffs)?.read()?;
    let names = read_names(state_dir);
    let mut rows: Vec<ServiceRow> = tables
        .frontends()
        .map(|(k, e)| {
            let ids = tables.slots(k, e.count);
            let backends: Vec<String> = ids
                .iter()
                .filter_map(|id| tables.backends.get(id))
                .map(|b| format!("{}:{}", Ipv4Addr::from(b.addr), u16::from_be_bytes(b.port)))
                .collect();
            let state = if e.count == 0 {
                "no endpoints"
            } else if backends.len() != e.count as usize {
                "missing backend"
            } else {
                "ok"
            };
            ServiceRow {
                service: names.frontends.get(&e.id).cloned(),
                frontend: format!("{}:{}", Ipv4Addr::from(k.addr), u16::from_be_bytes(k.port)),
                protocol: if k.protocol == 17 { "UDP" } else { "TCP" },
                scope: if k.scope == scope::EXTERNAL {
                    "external"
                } else {
                    "socket"
                },
                snat: e.flags & SERVICE_SNAT != 0,
                affinity_timeout: e.affinity_timeout,
                backends,
                state,
            }
        })
        .collect();
    rows.sort_by(|a, b| {
        (&a.service, &a.frontend, a.scope).cmp(&(&b.service, &b.frontend, b.scope))
    });
    Ok(rows)
}

pub fn print_services(rows: &[ServiceRow]) {
    println!(
        "{:<32} {:<22} {:<5} {:<9} {:<13} BACKENDS",
        "SERVICE", "FRONTEND", "PROTO", "SCOPE", "STATE"
    );
    for r in rows {
        println!(
            "{:<32} {:<22} {:<5} {:<9} {:<13} {}",
            r.service.as_deref().unwrap_or("-"),
            r.frontend,
            r.protocol,
            r.scope,
            r.state,
            r.backends.join(" ")
        );
    }
}
