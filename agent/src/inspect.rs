//! `beeline-agent endpoints|stats`: read the pinned maps directly, so they
//! work while the daemon is down.
use std::{net::Ipv4Addr, path::Path};

use anyhow::{Context, Result};
use aya::maps::{HashMap, LpmTrie, Map, MapData, PerCpuArray};
use beeline_common::{Counters, Endpoint, EndpointKey, RemoteNode, StatsSlot, Tunnel, map_names};
use beeline_proto::MacAddr;
use serde::Serialize;

fn pinned(bpffs: &Path, name: &str) -> Result<MapData> {
    let path = bpffs.join(name);
    MapData::from_pin(&path).with_context(|| {
        format!(
            "cannot open the pinned map {} (is the agent installed on this node, \
             and is --bpffs-dir right?)",
            path.display()
        )
    })
}

#[derive(Serialize)]
pub struct EndpointRow {
    pub ip: Ipv4Addr,
    pub host_ifindex: u32,
    pub pod_mac: String,
    pub host_mac: String,
}

pub fn endpoints(bpffs: &Path) -> Result<Vec<EndpointRow>> {
    let map: HashMap<MapData, EndpointKey, Endpoint> =
        HashMap::try_from(Map::HashMap(pinned(bpffs, map_names::ENDPOINTS)?))?;
    let mut rows = map
        .iter()
        .map(|r| {
            r.map(|(k, v)| EndpointRow {
                ip: Ipv4Addr::from(k.addr),
                host_ifindex: v.host_ifindex,
                pod_mac: MacAddr(v.pod_mac).to_string(),
                host_mac: MacAddr(v.host_mac).to_string(),
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    rows.sort_by_key(|r| r.ip);
    Ok(rows)
}

#[derive(Serialize)]
pub struct RemoteRow {
    pub pod_cidr: String,
    pub node_ip: Ipv4Addr,
    pub tunnel: &'static str,
}

/// The remote podCIDR trie: which node (and how) each CIDR goes to.
pub fn remote_cidrs(bpffs: &Path) -> Result<Vec<RemoteRow>> {
    let map: LpmTrie<MapData, [u8; 4], RemoteNode> =
        LpmTrie::try_from(Map::LpmTrie(pinned(bpffs, map_names::REMOTE_CIDRS)?))?;
    let mut rows = map
        .iter()
        .map(|r| {
            r.map(|(k, v)| RemoteRow {
                pod_cidr: format!("{}/{}", Ipv4Addr::from(k.data()), k.prefix_len()),
                node_ip: Ipv4Addr::from(v.node_addr),
                tunnel: if v.tunnel == Tunnel::Vxlan as u32 {
                    "vxlan"
                } else {
                    "direct"
                },
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    rows.sort_by(|a, b| a.pod_cidr.cmp(&b.pod_cidr));
    Ok(rows)
}

pub fn print_remote_cidrs(rows: &[RemoteRow]) {
    println!("{:<20} {:<16} {:<7}", "POD CIDR", "NODE IP", "TUNNEL");
    for r in rows {
        println!("{:<20} {:<16} {:<7}", r.pod_cidr, r.node_ip, r.tunnel);
    }
}

#[derive(Serialize, Default, Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProgramStats {
    pub redirected_local: u64,
    pub forwarded_direct: u64,
    pub forwarded_tunnel: u64,
    pub passed_to_host: u64,
    pub dropped_malformed: u64,
    pub dropped_helper_error: u64,
}

impl ProgramStats {
    fn add(&mut self, c: &Counters) {
        self.redirected_local += c.redirected_local;
        self.forwarded_direct += c.forwarded_direct;
        self.forwarded_tunnel += c.forwarded_tunnel;
        self.passed_to_host += c.passed_to_host;
        self.dropped_malformed += c.dropped_malformed;
        self.dropped_helper_error += c.dropped_helper_error;
    }
}

#[derive(Serialize, Default, Debug)]
pub struct Stats {
    pub from_pod: ProgramStats,
    pub from_uplink: ProgramStats,
    pub from_overlay: ProgramStats,
}

/// Per-program counters summed over CPUs.
pub fn stats(bpffs: &Path) -> Result<Stats> {
    let map: PerCpuArray<MapData, Counters> =
        PerCpuArray::try_from(Map::PerCpuArray(pinned(bpffs, map_names::STATS)?))?;
    let mut stats = Stats::default();
    for (slot, target) in [
        (StatsSlot::FromPod, &mut stats.from_pod),
        (StatsSlot::FromUplink, &mut stats.from_uplink),
        (StatsSlot::FromOverlay, &mut stats.from_overlay),
    ] {
        for per_cpu in map.get(&(slot as u32), 0)?.iter() {
            target.add(per_cpu);
        }
    }
    Ok(stats)
}

pub fn print_endpoints(rows: &[EndpointRow]) {
    println!(
        "{:<16} {:>8}  {:<17}  {:<17}",
        "IP", "IFINDEX", "POD MAC", "HOST MAC"
    );
    for r in rows {
        println!(
            "{:<16} {:>8}  {:<17}  {:<17}",
            r.ip, r.host_ifindex, r.pod_mac, r.host_mac
        );
    }
}

pub fn print_stats(stats: &Stats) {
    println!(
        "{:<14} {:>12} {:>12} {:>12} {:>12} {:>12} {:>12}",
        "PROGRAM", "REDIRECTED", "FWD_DIRECT", "FWD_TUNNEL", "PASSED", "DROP_MALF", "DROP_HELPER"
    );
    for (name, s) in [
        ("from_pod", &stats.from_pod),
        ("from_uplink", &stats.from_uplink),
        ("from_overlay", &stats.from_overlay),
    ] {
        println!(
            "{:<14} {:>12} {:>12} {:>12} {:>12} {:>12} {:>12}",
            name,
            s.redirected_local,
            s.forwarded_direct,
            s.forwarded_tunnel,
            s.passed_to_host,
            s.dropped_malformed,
            s.dropped_helper_error
        );
    }
}
