//! Phase 5: agent scale, a large NodeList into the maps (in-process and
//! through a running agent), the endpoint map, masquerade and agent RSS.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    path::Path,
    time::{Duration, Instant},
};

use beeline_agent::{
    cli::PodAttach, datapath::Datapath, netfilter::table, remote, sources::nodes::parse_node_list,
};
use beeline_common::{Endpoint, RemoteNode, map_names};
use beeline_tests::{BpffsDir, NetNs, Node, eventually_every};
use ipnet::Ipv4Net;
use serde_json::{Value, json};

use crate::{
    Cfg, NODE_IP, POD_CIDR, R, TARGET_RSS_MB, TARGET_SYNC_S,
    cni::beeline_node,
    machine::{
        busy_since, check_interrupted, cpu_times, foreign_cpus, foreign_ticks, loadavg, step,
        wait_quiet,
    },
    report::{Output, plural, table, yes_no},
    stats::{median, sorted},
};

/// The k-th (k >= 1) synthetic remote node.
fn synthetic_node(k: usize) -> (String, String, Ipv4Addr) {
    (
        format!("bench-node-{k}"),
        format!("10.{}.{}.0/24", 128 + k / 256, k % 256),
        Ipv4Addr::new(
            172,
            16 + (k / 62500) as u8,
            ((k / 250) % 250) as u8,
            (k % 250 + 1) as u8,
        ),
    )
}

fn write_node_list(node: &Node, remote: usize) {
    let synth: Vec<(String, String, Ipv4Addr)> = (1..=remote).map(synthetic_node).collect();
    let mut entries: Vec<(&str, Option<&str>, Ipv4Addr)> =
        vec![(node.name.as_str(), Some(POD_CIDR), NODE_IP)];
    entries.extend(
        synth
            .iter()
            .map(|(n, c, ip)| (n.as_str(), Some(c.as_str()), *ip)),
    );
    node.write_nodes_file(&entries);
}

/// The same NodeList as `write_node_list`, as text, for in-process parsing.
fn node_list_text(me: &str, remote: usize) -> String {
    let item = |name: &str, cidr: &str, ip: Ipv4Addr| {
        json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": { "name": name },
            "spec": { "podCIDR": cidr, "podCIDRs": [cidr] },
            "status": { "addresses": [{ "type": "InternalIP", "address": ip.to_string() }] },
        })
    };
    let mut items = vec![item(me, POD_CIDR, NODE_IP)];
    items.extend((1..=remote).map(|k| {
        let (n, c, ip) = synthetic_node(k);
        item(&n, &c, ip)
    }));
    serde_json::to_string_pretty(&json!({ "apiVersion": "v1", "kind": "List", "items": items }))
        .unwrap()
}

/// Entries in the pinned remote CIDR trie (keys only: cheap to poll).
fn remote_count(bpffs: &Path) -> usize {
    use aya::maps::{Map, MapData, lpm_trie::LpmTrie};
    let Ok(data) = MapData::from_pin(bpffs.join(map_names::REMOTE_CIDRS)) else {
        return usize::MAX;
    };
    let Ok(map) = Map::from_map_data(data) else {
        return usize::MAX;
    };
    let Ok(trie) = LpmTrie::<_, [u8; 4], RemoteNode>::try_from(map) else {
        return usize::MAX;
    };
    trie.keys().count()
}

/// Seconds of the day of a tracing JSON log timestamp (…THH:MM:SS.ffffffZ).
pub(crate) fn log_seconds(ts: &str) -> Option<f64> {
    let t = ts.split('T').nth(1)?.trim_end_matches('Z');
    let mut it = t.split(':');
    let h: f64 = it.next()?.parse().ok()?;
    let m: f64 = it.next()?.parse().ok()?;
    let s: f64 = it.next()?.split('+').next()?.parse().ok()?;
    Some(h * 3600.0 + m * 60.0 + s)
}

/// Agent-side time from "input file changed" (after reading and
/// parsing) to "remote node routes updated" (maps written), for the last
/// such pair whose file had `nodes` nodes.
fn agent_sync_seconds(log: &str, nodes: usize) -> Option<f64> {
    let mut changed: Option<f64> = None;
    let mut last = None;
    for line in log.lines() {
        let Ok(v) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        let msg = v["fields"]["message"].as_str().unwrap_or("");
        let ts = v["timestamp"].as_str().and_then(log_seconds);
        if msg == "input file changed" {
            changed = (v["fields"]["objects"].as_u64() == Some(nodes as u64))
                .then_some(ts)
                .flatten();
        } else if msg == "remote node routes updated"
            && let (Some(c), Some(t)) = (changed.take(), ts)
        {
            let mut d = t - c;
            if d < 0.0 {
                d += 86400.0;
            }
            last = Some(d);
        }
    }
    last
}

pub(crate) fn vm_kib(pid: u32, key: &str) -> Option<f64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find(|l| l.starts_with(key))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

pub(crate) fn phase_scale(cfg: &Cfg) -> R<Output> {
    step(&format!(
        "phase 5: agent scale ({} nodes, {} endpoints)",
        cfg.nodes, cfg.endpoints
    ));
    let remote = cfg.nodes - 1;
    let env = wait_quiet(cfg);
    let cpu0 = cpu_times();
    let others0 = foreign_ticks();
    let t_phase = Instant::now();
    let mut md = format!(
        "## 5. Agent scale\n\n\
         A NodeList of {} Nodes (this node + {remote} with a /24 podCIDR each) written into a \
         running agent's `--nodes-file`; the agent re-reads the file when its mtime changes \
         (polled every 500 ms). The endpoint map is filled through `Datapath::upsert_endpoint` \
         directly: registering {} real veths is not feasible on this machine.\n\n",
        cfg.nodes, cfg.endpoints
    );
    // --- in-process: parse, LPM sync, masquerade table, endpoint map.
    let me = "bench-me";
    let text = node_list_text(me, remote);
    let mut parse_s = Vec::new();
    let mut routes = Vec::new();
    for _ in 0..cfg.reps {
        let t = Instant::now();
        routes = parse_node_list(&text).map_err(|e| format!("{e:#}"))?;
        parse_s.push(t.elapsed().as_secs_f64());
    }
    let uplink: Ipv4Net = format!("{NODE_IP}/24").parse().unwrap();
    let desired = remote::desired_entries(&routes, me, remote::Mode::Auto, Some(uplink));
    let exceptions: Vec<Ipv4Net> = routes.iter().flat_map(|n| n.pod_cidrs.clone()).collect();
    let (mut sync_add, mut sync_noop, mut sync_del) = (Vec::new(), Vec::new(), Vec::new());
    let (mut ep_insert, mut ep_dump, mut ep_remove) = (Vec::new(), Vec::new(), Vec::new());
    let mut load_s = Vec::new();
    let mut masq_s = Vec::new();
    let mut masq_error: Option<String> = None;
    let mut masq_max_ok: Option<usize> = None;
    let mut ep_count = 0;
    {
        let bpffs = BpffsDir::new();
        let t = Instant::now();
        let mut dp =
            Datapath::load(&bpffs.path, false, PodAttach::Tc).map_err(|e| format!("{e:#}"))?;
        load_s.push(t.elapsed().as_secs_f64());
        let empty = BTreeMap::new();
        for _ in 0..cfg.reps {
            check_interrupted()?;
            let t = Instant::now();
            dp.remote_cidrs
                .sync(&desired)
                .map_err(|e| format!("{e:#}"))?;
            sync_add.push(t.elapsed().as_secs_f64());
            let t = Instant::now();
            dp.remote_cidrs
                .sync(&desired)
                .map_err(|e| format!("{e:#}"))?;
            sync_noop.push(t.elapsed().as_secs_f64());
            let t = Instant::now();
            dp.remote_cidrs.sync(&empty).map_err(|e| format!("{e:#}"))?;
            sync_del.push(t.elapsed().as_secs_f64());
        }
        for _ in 0..cfg.reps {
            check_interrupted()?;
            let ips: Vec<Ipv4Addr> = (0..cfg.endpoints as u32)
                .map(|i| Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 200, 0, 0)) + i))
                .collect();
            let t = Instant::now();
            for (i, ip) in ips.iter().enumerate() {
                dp.endpoints
                    .upsert(
                        *ip,
                        Endpoint {
                            host_ifindex: 1000 + i as u32,
                            pod_mac: [0x02, 0, 0, 0, (i >> 8) as u8, i as u8],
                            host_mac: [0x02, 1, 0, 0, (i >> 8) as u8, i as u8],
                            flags: 0,
                        },
                    )
                    .map_err(|e| format!("endpoint {i} of {}: {e:#}", cfg.endpoints))?;
            }
            ep_insert.push(t.elapsed().as_secs_f64());
            let t = Instant::now();
            ep_count = dp.endpoints.entries().map_err(|e| format!("{e:#}"))?.len();
            ep_dump.push(t.elapsed().as_secs_f64());
            let t = Instant::now();
            for ip in &ips {
                dp.endpoints.remove(*ip).map_err(|e| format!("{e:#}"))?;
            }
            ep_remove.push(t.elapsed().as_secs_f64());
        }
        let scratch_ns = NetNs::new("blm");
        let pod_cidr: Ipv4Net = POD_CIDR.parse().unwrap();
        let apply = |n: usize| {
            let masquerade = table::Masquerade {
                pod_cidr,
                exceptions: exceptions[..n].to_vec(),
            };
            scratch_ns.enter(|| table::apply(Some(&masquerade)))
        };
        for _ in 0..cfg.reps {
            let t = Instant::now();
            match apply(exceptions.len()) {
                Ok(()) => masq_s.push(t.elapsed().as_secs_f64()),
                Err(e) => {
                    masq_error = Some(e.to_string());
                    break;
                }
            }
        }
        if masq_error.is_some() {
            // The largest exception list that still applies (bisection).
            let (mut ok, mut bad) = (0usize, exceptions.len());
            while bad - ok > 1 {
                let mid = (ok + bad) / 2;
                if apply(mid).is_ok() {
                    ok = mid;
                } else {
                    bad = mid;
                }
            }
            masq_max_ok = Some(ok);
        }
        drop(dp);
    }
    // --- the real agent: file -> maps, and its memory.
    check_interrupted()?;
    let mut node = beeline_node(&["--log-format", "json"]);
    let pid = node.agent.as_ref().unwrap().pid();
    let rss_before = vm_kib(pid, "VmRSS:");
    let (mut e2e_add, mut e2e_del, mut agent_add, mut agent_del) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut rss_after = Vec::new();
    let mut hwm = None;
    for _ in 0..cfg.reps {
        check_interrupted()?;
        for (count, e2e, agent) in [
            (remote, &mut e2e_add, &mut agent_add),
            (0, &mut e2e_del, &mut agent_del),
        ] {
            write_node_list(&node, count);
            let t = Instant::now();
            // Each remote node: its podCIDR and its own /32.
            let entries = 2 * count;
            let ok = eventually_every(Duration::from_secs(30), Duration::from_millis(5), || {
                remote_count(&node.bpffs.path) == entries
            });
            if !ok {
                return Err(format!(
                    "the agent did not reach {entries} remote CIDR entries in 30 s (has {})",
                    remote_count(&node.bpffs.path)
                ));
            }
            e2e.push(t.elapsed().as_secs_f64());
            // Masquerade exceptions are applied right after the map sync.
            std::thread::sleep(Duration::from_millis(800));
            let log = node.agent.as_ref().unwrap().log_text();
            agent.push(agent_sync_seconds(&log, count + 1).unwrap_or(f64::NAN));
            if count == remote {
                rss_after.push(vm_kib(pid, "VmRSS:").unwrap_or(f64::NAN));
            }
        }
        hwm = vm_kib(pid, "VmHWM:");
    }
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    let agent_warnings: Vec<String> = node
        .agent
        .as_ref()
        .unwrap()
        .log_text()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| matches!(v["level"].as_str(), Some("WARN" | "ERROR")))
        .map(|v| v["fields"]["message"].as_str().unwrap_or("").to_string())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    node.kill_agent();
    drop(node);
    let mut env = env;
    env["busy_during"] = json!(busy_since(cpu0));
    env["other_processes_cpus"] = json!(foreign_cpus(&others0, t_phase.elapsed()));
    env["load1_after"] = json!(loadavg());
    env["seconds"] = json!(t_phase.elapsed().as_secs_f64());
    let agent_total: Vec<f64> = agent_add.iter().map(|a| a + median(&parse_s)).collect();
    let sync_val = median(&agent_total);
    // The highest RSS after a sync (it grows after the first one: the
    // allocator keeps the parse's peak).
    let rss_mb = sorted(&rss_after).last().copied().unwrap_or(f64::NAN) / 1024.0;
    let ms = |v: &[f64]| format!("{:.1} ms", median(v) * 1e3);
    let rate = |v: &[f64]| {
        format!(
            "{:.0} ms ({:.0}k/s, {:.2} µs each)",
            median(v) * 1e3,
            cfg.endpoints as f64 / median(v) / 1e3,
            median(v) * 1e6 / cfg.endpoints as f64
        )
    };
    let rows = vec![
        vec![
            format!("agent: {} Nodes → maps (parse + map writes)", cfg.nodes),
            ms(&agent_total),
            format!("≤ {TARGET_SYNC_S} s"),
            yes_no(sync_val <= TARGET_SYNC_S),
        ],
        vec![
            "  of which: map writes (agent log: file parsed → routes updated)".into(),
            ms(&agent_add),
            "".into(),
            "".into(),
        ],
        vec![
            "  of which: parsing the NodeList (same code, in-process)".into(),
            ms(&parse_s),
            "".into(),
            "".into(),
        ],
        vec![
            "end to end: file written → map has all entries (incl. ≤ 500 ms file poll)".into(),
            ms(&e2e_add),
            "".into(),
            "".into(),
        ],
        vec![
            format!("agent: back to 1 Node (removes {remote}), map writes"),
            ms(&agent_del),
            "".into(),
            "".into(),
        ],
        vec![
            format!(
                "agent RSS after the {}-node sync (highest of {})",
                cfg.nodes,
                plural(rss_after.len(), "sync")
            ),
            format!(
                "{rss_mb:.1} MB (after each: {}; before any: {:.1} MB; peak VmHWM {:.1} MB)",
                rss_after
                    .iter()
                    .map(|k| format!("{:.1}", k / 1024.0))
                    .collect::<Vec<_>>()
                    .join(" / "),
                rss_before.unwrap_or(f64::NAN) / 1024.0,
                hwm.unwrap_or(f64::NAN) / 1024.0
            ),
            format!("≤ {TARGET_RSS_MB} MB"),
            yes_no(rss_mb <= TARGET_RSS_MB),
        ],
        vec![
            format!("`Datapath::sync_remote`: empty → {remote} CIDRs"),
            ms(&sync_add),
            "".into(),
            "".into(),
        ],
        vec![
            format!("`Datapath::sync_remote`: {remote} unchanged (diff only)"),
            ms(&sync_noop),
            "".into(),
            "".into(),
        ],
        vec![
            format!("`Datapath::sync_remote`: {remote} → empty"),
            ms(&sync_del),
            "".into(),
            "".into(),
        ],
        vec![
            format!(
                "`table::apply`: nftables table with {} masquerade exceptions",
                exceptions.len()
            ),
            match (&masq_error, masq_max_ok) {
                (Some(e), Some(n)) => format!("**fails**: {e} (works up to {n} exceptions)"),
                (Some(e), None) => format!("**fails**: {e}"),
                _ => ms(&masq_s),
            },
            "".into(),
            "".into(),
        ],
        vec![
            format!("endpoint map: insert {} (`upsert_endpoint`)", cfg.endpoints),
            rate(&ep_insert),
            "".into(),
            "".into(),
        ],
        vec![
            format!("endpoint map: dump {ep_count} entries"),
            ms(&ep_dump),
            "".into(),
            "".into(),
        ],
        vec![
            format!("endpoint map: remove {}", cfg.endpoints),
            rate(&ep_remove),
            "".into(),
            "".into(),
        ],
        vec![
            "datapath load (every program through the verifier, maps pinned)".into(),
            ms(&load_s),
            "".into(),
            "".into(),
        ],
    ];
    md.push_str(&table(&["metric", "median", "target", "met"], rows));
    if !agent_warnings.is_empty() {
        md.push_str("\nThe agent logged these warnings during the scale run:\n\n");
        for w in &agent_warnings {
            md.push_str(&format!("- `{w}`\n"));
        }
    }
    Ok(Output {
        json: vec![(
            "phase5_agent_scale".into(),
            json!({
                "nodes": cfg.nodes,
                "endpoints": cfg.endpoints,
                "agent_sync_total_s": agent_total,
                "agent_log_sync_s": agent_add,
                "agent_log_remove_s": agent_del,
                "end_to_end_add_s": e2e_add,
                "end_to_end_remove_s": e2e_del,
                "parse_s": parse_s,
                "agent_rss_kib_before": rss_before,
                "agent_rss_kib_after_sync": rss_after,
                "agent_vmhwm_kib": hwm,
                "agent_comm": comm.trim(),
                "sync_remote_add_s": sync_add,
                "sync_remote_noop_s": sync_noop,
                "sync_remote_remove_s": sync_del,
                "masquerade_apply_s": masq_s,
                "masquerade_exceptions": exceptions.len(),
                "masquerade_error": masq_error,
                "masquerade_max_exceptions_ok": masq_max_ok,
                "agent_warnings": agent_warnings,
                "endpoint_insert_s": ep_insert,
                "endpoint_dump_s": ep_dump,
                "endpoint_dump_count": ep_count,
                "endpoint_remove_s": ep_remove,
                "datapath_load_s": load_s,
            }),
        )],
        sections: vec![(5, md)],
        conditions: vec![(
            "5 agent scale".into(),
            json!({ "attempts": [env], "discarded_results": [] }),
        )],
        ..Default::default()
    })
}
