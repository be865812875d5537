//! Phase 6: CPU cost per packet of each tc program (BPF run-time stats)
//! and verifier instruction counts.
use std::{
    collections::{BTreeMap, BTreeSet},
    os::fd::OwnedFd,
};

use beeline_common::Program;
use beeline_tests::Node;
use serde_json::{Value, json};

use crate::{
    Cfg, R,
    machine::{measured, step},
    report::{f1, table},
    traffic::{Path2, Servers, latency, throughput},
};

/// Program name -> ids of the programs attached to `nodes`: through their
/// pinned links (uplink, VXLAN device) and the pod veths' tc filters.
fn program_ids(nodes: &[&Node]) -> R<BTreeMap<String, BTreeSet<u32>>> {
    use aya::programs::links::{FdLink, PinnedLink};
    let mut out: BTreeMap<String, BTreeSet<u32>> = BTreeMap::new();
    for node in nodes {
        for veth in node.pod_veths() {
            if let Some(id) = node.ns.ingress_filter_program_id(&veth) {
                out.entry(Program::FromPod.function().to_string())
                    .or_default()
                    .insert(id);
            }
        }
        let dir = node.bpffs.path.join("links");
        for e in std::fs::read_dir(&dir)
            .map_err(|e| format!("{}: {e}", dir.display()))?
            .flatten()
        {
            let name = e.file_name().to_string_lossy().into_owned();
            let program = name.split('-').next().unwrap_or(&name).to_string();
            let link = PinnedLink::from_pin(e.path()).map_err(|e| format!("{name}: {e}"))?;
            let info = FdLink::from(link)
                .info()
                .map_err(|e| format!("{name}: {e}"))?;
            out.entry(program).or_default().insert(info.program_id());
        }
    }
    Ok(out)
}

#[derive(Clone, Copy, Default)]
struct ProgStats {
    run_ns: u64,
    runs: u64,
    verified: Option<u32>,
    jited: u32,
}

fn prog_stats(ids: &BTreeSet<u32>) -> BTreeMap<u32, ProgStats> {
    aya::programs::loaded_programs()
        .flatten()
        .filter(|p| ids.contains(&p.id()))
        .map(|p| {
            (
                p.id(),
                ProgStats {
                    run_ns: p.run_time().as_nanos() as u64,
                    runs: p.run_count(),
                    verified: p.verified_instruction_count(),
                    jited: p.size_jitted(),
                },
            )
        })
        .collect()
}

/// Turns on BPF run-time statistics while alive: BPF_ENABLE_STATS (the
/// kernel turns them off again when the fd closes, even if we crash), or
/// the `kernel.bpf_stats_enabled` sysctl, restored on drop.
enum StatsGuard {
    Fd(#[allow(dead_code)] OwnedFd),
    Sysctl(String),
}

const BPF_STATS_SYSCTL: &str = "/proc/sys/kernel/bpf_stats_enabled";

impl StatsGuard {
    fn enable() -> R<(StatsGuard, String)> {
        match aya::sys::enable_stats(aya::sys::Stats::RunTime) {
            Ok(fd) => Ok((StatsGuard::Fd(fd), "BPF_ENABLE_STATS fd".into())),
            Err(e) => {
                let old = std::fs::read_to_string(BPF_STATS_SYSCTL)
                    .map_err(|e2| format!("BPF_ENABLE_STATS: {e}; {BPF_STATS_SYSCTL}: {e2}"))?;
                std::fs::write(BPF_STATS_SYSCTL, "1")
                    .map_err(|e2| format!("BPF_ENABLE_STATS: {e}; {BPF_STATS_SYSCTL}: {e2}"))?;
                Ok((
                    StatsGuard::Sysctl(old.trim().to_string()),
                    "sysctl kernel.bpf_stats_enabled=1".into(),
                ))
            }
        }
    }
}

impl Drop for StatsGuard {
    fn drop(&mut self) {
        if let StatsGuard::Sysctl(old) = self {
            let _ = std::fs::write(BPF_STATS_SYSCTL, old.as_bytes());
        }
    }
}

/// Phase 6 for one setup, under the quiet-machine rules.
pub(crate) fn phase6(
    cfg: &Cfg,
    label: &str,
    nodes: &[&Node],
    path: &Path2,
) -> R<(Value, (String, Value))> {
    measured(
        cfg,
        &format!("6 {label}"),
        || cpu_per_packet(cfg, label, nodes, path),
        |_| None,
        Value::clone,
    )
}

/// Per-program run time per invocation during bulk TCP (iperf3: GSO/GRO
/// super-packets) and during request/response (one packet per message).
fn cpu_per_packet(cfg: &Cfg, label: &str, nodes: &[&Node], path: &Path2) -> R<Value> {
    step(&format!(
        "phase 6: CPU per packet of the tc programs ({label})"
    ));
    let ids = program_ids(nodes)?;
    let all: BTreeSet<u32> = ids.values().flatten().copied().collect();
    let sysctl_before = std::fs::read_to_string(BPF_STATS_SYSCTL).unwrap_or_default();
    let servers = Servers::start(cfg, path)?;
    let (guard, how) = StatsGuard::enable()?;
    let sysctl_during = std::fs::read_to_string(BPF_STATS_SYSCTL).unwrap_or_default();
    let mut traffic = serde_json::Map::new();
    let mut result: R<()> = Ok(());
    for kind in ["bulk TCP", "TCP request/response"] {
        let before = prog_stats(&all);
        let r = if kind == "bulk TCP" {
            throughput(path, &servers, 2).map(|_| ())
        } else {
            latency(path, &servers, cfg.lat_secs).map(|_| ())
        };
        let after = prog_stats(&all);
        if let Err(e) = r {
            result = Err(e);
            break;
        }
        let mut per_prog = serde_json::Map::new();
        for (prog, pids) in &ids {
            let (mut ns, mut runs) = (0u64, 0u64);
            let mut verified = None;
            let mut jited = 0;
            for id in pids {
                let (Some(a), Some(b)) = (after.get(id), before.get(id)) else {
                    continue;
                };
                ns += a.run_ns.saturating_sub(b.run_ns);
                runs += a.runs.saturating_sub(b.runs);
                verified = verified.or(a.verified);
                jited = a.jited;
            }
            per_prog.insert(
                prog.clone(),
                json!({
                    "runs": runs, "run_time_ns": ns,
                    "ns_per_run": if runs > 0 { ns as f64 / runs as f64 } else { f64::NAN },
                    "verified_insns": verified, "jited_bytes": jited,
                    "program_ids": pids,
                }),
            );
        }
        traffic.insert(kind.into(), Value::Object(per_prog));
    }
    drop(guard);
    let sysctl_after = std::fs::read_to_string(BPF_STATS_SYSCTL).unwrap_or_default();
    result?;
    Ok(json!({
        "setup": label,
        "stats_enabled_with": how,
        "bpf_stats_enabled": {
            "before": sysctl_before.trim(), "during": sysctl_during.trim(), "after": sysctl_after.trim(),
        },
        "traffic": traffic,
    }))
}

pub(crate) fn phase6_section(json: &serde_json::Map<String, Value>) -> Option<String> {
    let keys = ["phase6_same_node", "phase6_direct", "phase6_vxlan"];
    let mut rows = Vec::new();
    let mut how = String::new();
    for k in keys {
        let Some(v) = json.get(k) else { continue };
        how = if v["stats_enabled_with"].as_str() == Some("BPF_ENABLE_STATS fd") {
            format!(
                "`BPF_ENABLE_STATS` (`aya::sys::enable_stats`): the kernel keeps run-time stats on \
                 while the benchmark holds the fd and turns them off when it is closed, even if \
                 the benchmark dies; the `kernel.bpf_stats_enabled` sysctl is not touched ({} \
                 before, {} after)",
                v["bpf_stats_enabled"]["before"].as_str().unwrap_or("?"),
                v["bpf_stats_enabled"]["after"].as_str().unwrap_or("?"),
            )
        } else {
            format!(
                "`sysctl kernel.bpf_stats_enabled=1`, restored to {} afterwards",
                v["bpf_stats_enabled"]["before"].as_str().unwrap_or("?"),
            )
        };
        for kind in ["bulk TCP", "TCP request/response"] {
            let progs = v["traffic"][kind].as_object().cloned().unwrap_or_default();
            let most = progs
                .values()
                .filter_map(|s| s["runs"].as_u64())
                .max()
                .unwrap_or(0);
            for (prog, s) in &progs {
                // Programs the traffic did not go through (a stray ARP).
                if s["runs"].as_u64().unwrap_or(0) * 100 < most.max(1) {
                    continue;
                }
                rows.push(vec![
                    v["setup"].as_str().unwrap_or("").to_string(),
                    kind.to_string(),
                    format!("`{prog}`"),
                    s["runs"].to_string(),
                    f1(s["ns_per_run"].as_f64()),
                    s["verified_insns"].to_string(),
                    s["jited_bytes"].to_string(),
                ]);
            }
        }
    }
    if rows.is_empty() {
        return None;
    }
    let mut md = format!(
        "## 6. CPU cost per packet of each tc program\n\n\
         run_time_ns / run_cnt of the programs attached to the nodes (pinned links, pod veth filters), over \
         one throughput run (bulk TCP: one run per GSO/GRO super-packet, up to 64 KB) and one \
         latency run (one run per small packet), with Beeline's own setups of phases 2 and 4. \
         Stats enabled with {how}. `verified insns` = instructions the verifier processed \
         (`verified_insns` of `bpf_prog_info`), JIT bytes = size of the JITed code.\n\n"
    );
    md.push_str(&table(
        &[
            "setup",
            "traffic",
            "program",
            "runs",
            "ns / run",
            "verified insns",
            "JIT bytes",
        ],
        rows,
    ));
    Some(md)
}
