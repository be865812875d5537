//! `cargo xtask bench [--quick]`: Beeline against Debian's `bridge` plugin
//! and the physical limits (a bare veth pair, the underlay, kernel routing),
//! all on simulated nodes in network namespaces made by the test harness.
//!
//! Phases (each interleaves its contenders A/B/A/B... over the repetitions):
//! 1. pod setup cost: CNI ADD / DEL wall time, one at a time and 8 at once;
//! 2. same-node pod-to-pod throughput and TCP request/response latency,
//!    with a 4-instruction `bpf_redirect_peer` program as the floor of the design;
//! 3. the same with 10,000 iptables rules per chain and br_netfilter on;
//! 4. cross-node: Beeline direct / VXLAN vs the underlay and kernel routing;
//! 5. agent scale: a 5,000-node NodeList, 60,000 endpoints, agent RSS;
//! 6. CPU cost per packet of each tc program and verifier instruction counts.
//!
//! Writes `bench/results/<date>.json` (raw samples and summaries) and
//! `<date>.md` (`<date>-quick.*` with `--quick`), prints the Markdown.
//! Everything it creates in the kernel lives in namespaces, bpffs dirs and
//! processes owned by guards, so every exit path (error, panic, Ctrl-C)
//! removes it.
use std::{
    collections::{BTreeMap, BTreeSet},
    fs::File,
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    os::fd::OwnedFd,
    panic::AssertUnwindSafe,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Mutex,
        atomic::{AtomicBool, AtomicU16, AtomicUsize, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use beeline_agent::{datapath::Datapath, masquerade, nodes::parse_node_list, remote};
use beeline_common::{Endpoint, RemoteNode, map_names, program_names};
use beeline_tests::{
    BpffsDir, Cluster, NetNs, Node, bin, eventually, eventually_every, hand_wired_pod,
    tcp_throughput, unique,
};
use ipnet::Ipv4Net;
use serde_json::{Value, json};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);
static NEXT_PORT: AtomicU16 = AtomicU16::new(21000);

type R<T> = Result<T, String>;

const BRIDGE_PLUGIN_DIR: &str = "/usr/lib/cni";
const POD_CIDR: &str = "10.244.1.0/24";
const NODE_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 100, 1);

// Targets from the issue.
const TARGET_ADD_MS: f64 = 8.0;
const TARGET_DEL_MS: f64 = 8.0;
const TARGET_SAME_NODE_TPUT: f64 = 1.0;
const TARGET_SAME_NODE_LAT: f64 = 1.05;
const TARGET_DIRECT_TPUT: f64 = 0.97;
const TARGET_VXLAN_TPUT: f64 = 0.85;
const TARGET_SYNC_S: f64 = 1.0;
const TARGET_RSS_MB: f64 = 40.0;

struct Tools {
    iperf3: bool,
    sockperf: bool,
    iptables_restore: bool,
    bridge: bool,
}

struct Cfg {
    quick: bool,
    reps: usize,
    pods: usize,
    parallel: usize,
    /// 1-s throughput runs per path and repetition.
    tput_rounds: usize,
    /// Latency runs per path and repetition, `lat_secs` each (sockperf
    /// spends a fixed ~2 s connecting before each run).
    lat_rounds: usize,
    lat_secs: u64,
    nodes: usize,
    endpoints: usize,
    rules: usize,
    quiet_wait: Duration,
    budget: Duration,
    phases: BTreeSet<u8>,
    out_dir: PathBuf,
    started: Instant,
    tools: Tools,
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!(
            "beeline-bench [--quick] [--phases 1,2,3,4,5,6] [--out DIR]\n\
             Benchmarks Beeline against the bridge plugin and the physical limits (root)."
        );
        return;
    }
    let quick = args.iter().any(|a| a == "--quick");
    let value = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1).cloned())
    };
    let phases: BTreeSet<u8> = value("--phases")
        .map(|s| s.split(',').filter_map(|p| p.trim().parse().ok()).collect())
        .unwrap_or_else(|| (1..=6).collect());
    let out_dir = value("--out").map(PathBuf::from).unwrap_or_else(|| {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .unwrap()
            .join("bench/results")
    });
    if !nix::unistd::geteuid().is_root() {
        eprintln!("the benchmarks create network namespaces and load eBPF: run them as root");
        std::process::exit(1);
    }
    ctrlc::set_handler(|| {
        eprintln!("\ninterrupted: cleaning up");
        INTERRUPTED.store(true, Ordering::SeqCst);
    })
    .expect("install the Ctrl-C handler");
    // SIGTERM and SIGHUP clean up too.
    extern "C" fn on_signal(_: libc::c_int) {
        INTERRUPTED.store(true, Ordering::SeqCst);
    }
    for sig in [
        nix::sys::signal::Signal::SIGTERM,
        nix::sys::signal::Signal::SIGHUP,
    ] {
        // SAFETY: the handler only stores to an atomic (async-signal-safe).
        let _ = unsafe {
            nix::sys::signal::signal(sig, nix::sys::signal::SigHandler::Handler(on_signal))
        };
    }
    let tools = Tools {
        iperf3: on_path("iperf3"),
        sockperf: on_path("sockperf"),
        iptables_restore: on_path("iptables-restore") && on_path("iptables"),
        bridge: Path::new(BRIDGE_PLUGIN_DIR).join("bridge").exists()
            && Path::new(BRIDGE_PLUGIN_DIR).join("host-local").exists(),
    };
    let cfg = Cfg {
        quick,
        reps: if quick { 1 } else { 3 },
        pods: 40,
        parallel: 8,
        tput_rounds: if quick { 2 } else { 4 },
        lat_rounds: if quick { 1 } else { 2 },
        lat_secs: 2,
        nodes: 5000,
        endpoints: 60_000,
        rules: 10_000,
        quiet_wait: Duration::from_secs(if quick { 5 } else { 20 }),
        budget: Duration::from_secs(if quick { 150 } else { 840 }),
        phases,
        out_dir,
        started: Instant::now(),
        tools,
    };
    step(&format!(
        "beeline-bench{}: phases {:?}, {} repetition(s)",
        if cfg.quick { " --quick" } else { "" },
        cfg.phases,
        cfg.reps
    ));
    let code = run(&cfg);
    // Every guard is gone by now: say whether anything is left.
    let leftovers = leftovers();
    if leftovers.is_empty() {
        eprintln!("cleanup: no namespaces, bpffs dirs or processes left behind");
    } else {
        eprintln!("cleanup: LEFT BEHIND: {leftovers:?}");
    }
    std::process::exit(code);
}

fn run(cfg: &Cfg) -> i32 {
    let mut report = Report::default();
    report.json.insert("machine".into(), machine());
    report.json.insert(
        "config".into(),
        json!({
            "quick": cfg.quick, "repetitions": cfg.reps, "pods": cfg.pods,
            "parallel": cfg.parallel, "throughput_runs_per_repetition": cfg.tput_rounds,
            "throughput_run_seconds": 1, "latency_runs_per_repetition": cfg.lat_rounds,
            "latency_run_seconds": cfg.lat_secs, "nodes": cfg.nodes,
            "endpoints": cfg.endpoints, "iptables_rules_per_chain": cfg.rules,
            "tools": {
                "iperf3": cfg.tools.iperf3, "sockperf": cfg.tools.sockperf,
                "iptables_restore": cfg.tools.iptables_restore,
                "bridge_plugin": cfg.tools.bridge,
            },
            "phases": cfg.phases,
        }),
    );
    let want = |p: u8| cfg.phases.contains(&p);
    if want(1) {
        guarded(&mut report, "1", || phase_setup_cost(cfg));
    }
    if want(2) || want(3) || want(6) {
        guarded(&mut report, "2/3", || same_node_phases(cfg));
    }
    if want(4) || want(6) {
        guarded(&mut report, "4", || cross_node_phases(cfg));
    }
    if want(5) {
        guarded(&mut report, "5", || phase_scale(cfg));
    }
    let elapsed = cfg.started.elapsed().as_secs_f64();
    report
        .json
        .insert("duration_seconds".into(), json!(elapsed));
    if let Some(md) = phase6_section(&report.json) {
        report.sections.insert(6, md);
    }
    let md = report.markdown(cfg, elapsed);
    println!("{md}");
    match write_results(cfg, &report, &md) {
        Ok(paths) => eprintln!("results: {paths}"),
        Err(e) => {
            eprintln!("cannot write the results: {e}");
            return 1;
        }
    }
    if INTERRUPTED.load(Ordering::SeqCst) {
        130
    } else if report.errors.is_empty() {
        0
    } else {
        1
    }
}

// ---------------------------------------------------------------- report

#[derive(Default)]
struct Report {
    json: serde_json::Map<String, Value>,
    /// Markdown sections by phase number.
    sections: BTreeMap<u8, String>,
    conditions: Vec<(String, Value)>,
    errors: Vec<String>,
    notes: Vec<String>,
}

/// What a phase block hands back.
#[derive(Default)]
struct Output {
    json: Vec<(String, Value)>,
    sections: Vec<(u8, String)>,
    conditions: Vec<(String, Value)>,
    notes: Vec<String>,
    errors: Vec<String>,
}

impl Output {
    /// A phase's output, or its error as a report entry.
    fn absorb_phase(&mut self, phase: &str, result: R<Output>) {
        match result {
            Ok(o) => self.absorb(o),
            Err(e) => self.errors.push(format!("phase {phase}: {e}")),
        }
    }

    fn absorb(&mut self, other: Output) {
        self.json.extend(other.json);
        self.sections.extend(other.sections);
        self.conditions.extend(other.conditions);
        self.notes.extend(other.notes);
        self.errors.extend(other.errors);
    }
}

/// Runs a phase block, turning errors and panics into report entries; its
/// guards are dropped (cleanup) before this returns either way.
fn guarded(report: &mut Report, name: &str, f: impl FnOnce() -> R<Output>) {
    if INTERRUPTED.load(Ordering::SeqCst) {
        report
            .errors
            .push(format!("phase {name}: skipped (interrupted)"));
        return;
    }
    let result = std::panic::catch_unwind(AssertUnwindSafe(f));
    let out = match result {
        Ok(Ok(out)) => out,
        Ok(Err(e)) => {
            eprintln!("phase {name} failed: {e}");
            Output {
                errors: vec![format!("phase {name}: {e}")],
                ..Default::default()
            }
        }
        Err(panic) => {
            let msg = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "panic".into());
            eprintln!("phase {name} panicked: {msg}");
            Output {
                errors: vec![format!("phase {name}: panicked: {msg}")],
                ..Default::default()
            }
        }
    };
    for (k, v) in out.json {
        report.json.insert(k, v);
    }
    for (n, s) in out.sections {
        report.sections.insert(n, s);
    }
    report.conditions.extend(out.conditions);
    report.notes.extend(out.notes);
    report.errors.extend(out.errors);
}

impl Report {
    fn markdown(&self, cfg: &Cfg, elapsed: f64) -> String {
        let m = &self.json["machine"];
        let mut md = String::new();
        md.push_str(&format!(
            "# Beeline benchmarks, {}{}\n\n",
            today(),
            if cfg.quick { " (--quick)" } else { "" }
        ));
        md.push_str(&format!(
            "Machine: Linux {}, {} CPUs ({}), {} MiB RAM. Commit {}. {} per measurement \
             (`--quick`: 1, full run: 3), contenders interleaved; took {:.0} s.\n\n",
            m["kernel"].as_str().unwrap_or("?"),
            m["nproc"],
            m["cpu_model"].as_str().unwrap_or("?"),
            m["mem_total_mib"],
            m["git"].as_str().unwrap_or("?"),
            plural(cfg.reps, "repetition"),
            elapsed
        ));
        md.push_str(&format!(
            "Tools: {}.\n\n",
            m["tools"]
                .as_object()
                .map(|o| o
                    .iter()
                    .map(|(k, v)| format!("{k} {}", v.as_str().unwrap_or("-")))
                    .collect::<Vec<_>>()
                    .join(", "))
                .unwrap_or_default()
        ));
        for s in self.sections.values() {
            md.push_str(s);
            md.push('\n');
        }
        if !self.conditions.is_empty() {
            md.push_str("## Machine load per measurement\n\n");
            let rows = self
                .conditions
                .iter()
                .map(|(name, c)| {
                    let attempts = c["attempts"].as_array().cloned().unwrap_or_default();
                    let last = attempts.last().cloned().unwrap_or_default();
                    vec![
                        name.clone(),
                        f2(last["load1_before"].as_f64()),
                        f1(last["waited_s"].as_f64()),
                        pctf(last["busy_before"].as_f64()),
                        f2(last["load1_after"].as_f64()),
                        pctf(last["busy_during"].as_f64()),
                        pctf(last["other_processes_cpus"].as_f64()),
                        match attempts.len() {
                            0 | 1 => "no".into(),
                            _ => format!(
                                "yes ({})",
                                attempts[0]["noisy"].as_str().unwrap_or("noisy")
                            ),
                        },
                    ]
                })
                .collect();
            md.push_str(&table(
                &[
                    "measurement",
                    "load1 before",
                    "waited s",
                    "CPU busy before",
                    "load1 after",
                    "CPU busy during",
                    "other processes",
                    "repeated",
                ],
                rows,
            ));
            md.push_str(
                "\nCPU busy = share of both CPUs not idle over 1 s before the run, and over the \
                 whole run (which includes the benchmark itself). Other processes = CPU time of \
                 user-space processes outside the benchmark's process tree during the run, in % \
                 of one CPU. A measurement is repeated once (the repeat is reported) when other \
                 processes used more than 25 % of a CPU during it, when the machine was busy \
                 before it, or when its per-round ratios vary by more than 15 % (setup cost: \
                 Beeline's per-repetition p50 by more than 30 %).\n\n",
            );
        }
        if !self.notes.is_empty() {
            md.push_str("## Notes\n\n");
            for n in &self.notes {
                md.push_str(&format!("- {n}\n"));
            }
            md.push('\n');
        }
        if !self.errors.is_empty() {
            md.push_str("## Errors\n\n");
            for e in &self.errors {
                md.push_str(&format!("- {e}\n"));
            }
            md.push('\n');
        }
        md
    }
}

fn write_results(cfg: &Cfg, report: &Report, md: &str) -> R<String> {
    std::fs::create_dir_all(&cfg.out_dir).map_err(|e| format!("{}: {e}", cfg.out_dir.display()))?;
    let stem = format!("{}{}", today(), if cfg.quick { "-quick" } else { "" });
    let mut json = report.json.clone();
    json.insert("date".into(), json!(today()));
    json.insert(
        "conditions".into(),
        Value::Object(report.conditions.iter().cloned().collect()),
    );
    json.insert("notes".into(), json!(report.notes));
    json.insert("errors".into(), json!(report.errors));
    let jpath = cfg.out_dir.join(format!("{stem}.json"));
    let mpath = cfg.out_dir.join(format!("{stem}.md"));
    std::fs::write(
        &jpath,
        serde_json::to_vec_pretty(&Value::Object(json)).unwrap(),
    )
    .map_err(|e| format!("{}: {e}", jpath.display()))?;
    std::fs::write(&mpath, md).map_err(|e| format!("{}: {e}", mpath.display()))?;
    Ok(format!("{} and {}", jpath.display(), mpath.display()))
}

fn table(headers: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut s = format!("| {} |\n|", headers.join(" | "));
    for (i, _) in headers.iter().enumerate() {
        s.push_str(if i == 0 { "---|" } else { "---:|" });
    }
    s.push('\n');
    for r in rows {
        s.push_str(&format!("| {} |\n", r.join(" | ")));
    }
    s
}

fn f1(v: Option<f64>) -> String {
    v.filter(|x| x.is_finite())
        .map_or("–".into(), |x| format!("{x:.1}"))
}
fn f2(v: Option<f64>) -> String {
    v.filter(|x| x.is_finite())
        .map_or("–".into(), |x| format!("{x:.2}"))
}
fn pctf(v: Option<f64>) -> String {
    v.filter(|x| x.is_finite())
        .map_or("–".into(), |x| format!("{:.0} %", x * 100.0))
}
fn plural(n: usize, word: &str) -> String {
    format!("{n} {word}{}", if n == 1 { "" } else { "s" })
}

fn ratio(v: f64) -> String {
    if v.is_finite() {
        format!("{v:.3}x")
    } else {
        "–".into()
    }
}
fn yes_no(met: bool) -> String {
    if met { "yes".into() } else { "**no**".into() }
}

// ---------------------------------------------------------------- statistics

fn sorted(v: &[f64]) -> Vec<f64> {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    s.sort_by(|a, b| a.partial_cmp(b).unwrap());
    s
}

/// Nearest-rank percentile.
fn pct(v: &[f64], p: f64) -> f64 {
    let s = sorted(v);
    if s.is_empty() {
        return f64::NAN;
    }
    let rank = (p / 100.0 * s.len() as f64).ceil() as usize;
    s[rank.clamp(1, s.len()) - 1]
}

/// Median (mean of the middle two for an even count).
fn median(v: &[f64]) -> f64 {
    let s = sorted(v);
    match s.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => s[n / 2],
        n => (s[n / 2 - 1] + s[n / 2]) / 2.0,
    }
}

/// (max - min) / median.
fn spread(v: &[f64]) -> f64 {
    let s = sorted(v);
    if s.len() < 2 {
        return 0.0;
    }
    (s[s.len() - 1] - s[0]) / median(&s)
}

fn summary(v: &[f64]) -> Value {
    let s = sorted(v);
    json!({
        "n": s.len(),
        "p50": median(&s), "p95": pct(&s, 95.0), "p99": pct(&s, 99.0),
        "min": s.first(), "max": s.last(),
        "mean": if s.is_empty() { f64::NAN } else { s.iter().sum::<f64>() / s.len() as f64 },
    })
}

fn round3(v: &[f64]) -> Vec<f64> {
    v.iter().map(|x| (x * 1000.0).round() / 1000.0).collect()
}

// ---------------------------------------------------------------- machine state

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
}

fn check_interrupted() -> R<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        return Err("interrupted".into());
    }
    Ok(())
}

fn step(msg: &str) {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let t = START.get_or_init(Instant::now).elapsed().as_secs_f64();
    eprintln!("\x1b[1;34m==>\x1b[0m [{t:5.1} s] {msg}");
}

fn cmd_stdout(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program).args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn machine() -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_kib: u64 = meminfo
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let git = cmd_stdout(
        "git",
        &[
            "-C",
            &root.display().to_string(),
            "describe",
            "--always",
            "--dirty",
        ],
    )
    .unwrap_or_else(|| "unknown".into());
    let first_line = |s: Option<String>| s.and_then(|s| s.lines().next().map(String::from));
    let pkg = |p: &str| cmd_stdout("dpkg-query", &["-W", "-f", "${Version}", p]);
    json!({
        "kernel": cmd_stdout("uname", &["-r"]).unwrap_or_default(),
        "nproc": nproc,
        "cpu_model": cpu,
        "mem_total_mib": mem_kib / 1024,
        "git": git,
        "tools": {
            "iperf3": first_line(cmd_stdout("iperf3", &["--version"])),
            "sockperf": pkg("sockperf"),
            "iptables": cmd_stdout("iptables", &["--version"]),
            "containernetworking-plugins": pkg("containernetworking-plugins"),
        },
    })
}

fn loadavg() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(f64::NAN)
}

/// (busy, total) jiffies over all CPUs.
fn cpu_times() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = stat.lines().next() else {
        return (0, 0);
    };
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

fn busy_since(start: (u64, u64)) -> f64 {
    let now = cpu_times();
    let total = now.1.saturating_sub(start.1);
    if total == 0 {
        return f64::NAN;
    }
    now.0.saturating_sub(start.0) as f64 / total as f64
}

/// CPU ticks (utime + stime) of every user-space process outside this
/// process's tree, by pid. Kernel threads are left out: they also do our
/// packet processing (softirqs) and namespace cleanup.
fn foreign_ticks() -> BTreeMap<u32, u64> {
    let me = std::process::id();
    let mut procs: BTreeMap<u32, (u32, u64, bool)> = BTreeMap::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some(close) = stat.rfind(')') else {
            continue;
        };
        // After "pid (comm) ": state ppid pgrp session tty tpgid flags minflt
        // cminflt majflt cmajflt utime stime ...
        let f: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        let num = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        let kthread = num(6) & 0x0020_0000 != 0;
        procs.insert(pid, (num(1) as u32, num(11) + num(12), kthread));
    }
    let ours = |mut pid: u32| {
        for _ in 0..64 {
            if pid == me {
                return true;
            }
            match procs.get(&pid) {
                Some((ppid, _, _)) if *ppid > 1 => pid = *ppid,
                _ => return false,
            }
        }
        false
    };
    procs
        .iter()
        .filter(|(pid, (_, _, kthread))| !kthread && !ours(**pid))
        .map(|(pid, (_, ticks, _))| (*pid, *ticks))
        .collect()
}

/// CPUs' worth of time other processes used since `start` (processes that
/// exited in between are missed).
fn foreign_cpus(start: &BTreeMap<u32, u64>, wall: Duration) -> f64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let ticks: u64 = foreign_ticks()
        .iter()
        .map(|(pid, t)| t.saturating_sub(start.get(pid).copied().unwrap_or(0)))
        .sum();
    ticks as f64 / hz / wall.as_secs_f64().max(1e-3)
}

/// Waits (up to the configured time) for a quiet machine: the 1-minute load
/// below 1.0, or, since that average lags our own previous phase by a
/// minute, both CPUs mostly idle right now.
fn wait_quiet(cfg: &Cfg) -> Value {
    let start = Instant::now();
    loop {
        let load = loadavg();
        let t = cpu_times();
        std::thread::sleep(Duration::from_secs(1));
        let busy = busy_since(t);
        let waited = start.elapsed();
        if load < 1.0 || busy < 0.25 || waited >= cfg.quiet_wait || check_interrupted().is_err() {
            return json!({
                "load1_before": load, "busy_before": busy,
                "waited_s": waited.as_secs_f64(), "quiet": load < 1.0 || busy < 0.25,
            });
        }
    }
}

/// Runs one measurement under the quiet-machine rules: waits for quiet,
/// records the load, and repeats it once when it looks noisy (machine busy
/// before, or `noisy` says its repetitions disagree) if time allows.
fn measured<T>(
    cfg: &Cfg,
    name: &str,
    mut run: impl FnMut() -> R<T>,
    noisy: impl Fn(&T) -> Option<String>,
    to_json: impl Fn(&T) -> Value,
) -> R<(T, (String, Value))> {
    let mut attempts = Vec::new();
    let mut discarded = Vec::new();
    loop {
        check_interrupted()?;
        let mut env = wait_quiet(cfg);
        let t0 = Instant::now();
        let cpu0 = cpu_times();
        let others0 = foreign_ticks();
        let result = run()?;
        let took = t0.elapsed();
        let others = foreign_cpus(&others0, took);
        env["busy_during"] = json!(busy_since(cpu0));
        env["other_processes_cpus"] = json!(others);
        env["load1_after"] = json!(loadavg());
        env["seconds"] = json!(took.as_secs_f64());
        let reason = noisy(&result)
            .or_else(|| {
                (others > 0.25).then(|| {
                    format!(
                        "other processes used {:.0} % of a CPU during the run",
                        others * 100.0
                    )
                })
            })
            .or_else(|| {
                (env["busy_before"].as_f64().unwrap_or(0.0) > 0.5
                    && env["load1_before"].as_f64().unwrap_or(0.0) >= 1.0)
                    .then(|| "machine busy before the run".to_string())
            });
        env["noisy"] = json!(reason);
        attempts.push(env);
        let time_left = cfg.budget.saturating_sub(cfg.started.elapsed());
        if let Some(reason) = &reason
            && attempts.len() == 1
            && time_left > took * 2
        {
            eprintln!("    {name}: noisy ({reason}), repeating once");
            discarded.push(to_json(&result));
            continue;
        }
        let cond = json!({ "attempts": attempts, "discarded_results": discarded });
        return Ok((result, (name.to_string(), cond)));
    }
}

/// Namespaces, bpffs dirs and processes this run may have left.
fn leftovers() -> Vec<String> {
    let mut out = Vec::new();
    let tag = format!("{:x}", std::process::id() & 0xffff);
    if let Ok(d) = std::fs::read_dir("/run/netns") {
        for e in d.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if ["bln", "blp", "blf", "blb", "blv", "blm"]
                .iter()
                .any(|p| n.starts_with(&format!("{p}{tag}")))
            {
                out.push(format!("netns {n}"));
            }
        }
    }
    if let Ok(d) = std::fs::read_dir("/sys/fs/bpf") {
        for e in d.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if n.starts_with(&format!("beeline-test-{tag}")) {
                out.push(format!("bpffs {n}"));
            }
        }
    }
    out
}

// ---------------------------------------------------------------- processes

/// A child process killed (by its pid) when dropped.
struct ChildGuard(Child);

impl ChildGuard {
    fn spawn(cmd: &mut Command) -> R<ChildGuard> {
        cmd.spawn()
            .map(ChildGuard)
            .map_err(|e| format!("cannot start {cmd:?}: {e}"))
    }
    fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs `cmd`, killing it after `timeout`; returns its stdout on success.
fn run_timeout(cmd: &mut Command, timeout: Duration) -> R<String> {
    let mut out = tempfile::tempfile().map_err(|e| e.to_string())?;
    let mut err = tempfile::tempfile().map_err(|e| e.to_string())?;
    cmd.stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(err.try_clone().unwrap());
    let mut child = ChildGuard::spawn(cmd)?;
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.0.try_wait().map_err(|e| e.to_string())? {
            break s;
        }
        if start.elapsed() > timeout {
            return Err(format!("{cmd:?} timed out after {timeout:?}"));
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let read = |f: &mut File| {
        use std::io::Seek;
        let mut s = String::new();
        let _ = f.seek(std::io::SeekFrom::Start(0));
        let _ = f.read_to_string(&mut s);
        s
    };
    let stdout = read(&mut out);
    if !status.success() {
        return Err(format!(
            "{cmd:?} failed ({status}): {} {}",
            stdout.chars().take(500).collect::<String>(),
            read(&mut err).chars().take(500).collect::<String>()
        ));
    }
    Ok(stdout)
}

/// Waits until process `pid` has a TCP socket listening on `port` (read
/// from /proc/<pid>/net/tcp, i.e. in the process's own namespace).
fn wait_listening(pid: u32, port: u16, timeout: Duration) -> R<()> {
    let needle = format!(":{port:04X} ");
    let ok = eventually_every(timeout, Duration::from_millis(5), || {
        ["tcp", "tcp6"].iter().any(|f| {
            std::fs::read_to_string(format!("/proc/{pid}/net/{f}"))
                .unwrap_or_default()
                .lines()
                .skip(1)
                .any(|l| {
                    let cols: Vec<&str> = l.split_whitespace().collect();
                    cols.len() > 3 && format!("{} ", cols[1]).ends_with(&needle) && cols[3] == "0A"
                })
        })
    });
    if ok {
        Ok(())
    } else {
        Err(format!("no listener on port {port} after {timeout:?}"))
    }
}

fn next_port() -> u16 {
    NEXT_PORT.fetch_add(1, Ordering::Relaxed)
}

// ---------------------------------------------------------------- CNI

/// A CNI plugin as a runtime would execute it, inside a node namespace.
struct Plugin<'a> {
    name: &'static str,
    host: &'a NetNs,
    binary: PathBuf,
    cni_path: String,
    conf: Value,
}

impl Plugin<'_> {
    /// Executes the plugin; returns its wall time and (for ADD) its result.
    fn exec(&self, command: &str, container_id: &str, netns: &Path) -> R<(Duration, Value)> {
        let mut cmd = self.host.cmd(&self.binary);
        cmd.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", container_id)
            .env("CNI_NETNS", netns)
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", &self.cni_path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let conf = serde_json::to_vec(&self.conf).unwrap();
        let start = Instant::now();
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", self.binary.display()))?;
        let _ = child.stdin.take().unwrap().write_all(&conf);
        let out = child.wait_with_output().map_err(|e| e.to_string())?;
        let took = start.elapsed();
        if !out.status.success() {
            return Err(format!(
                "{} {command} {container_id} failed: {} {}",
                self.name,
                String::from_utf8_lossy(&out.stdout).trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        let result = if command == "ADD" {
            serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
        } else {
            Value::Null
        };
        Ok((took, result))
    }

    /// ADDs a pod in `ns` and returns its IPv4 address.
    fn add_pod(&self, ns: &NetNs, container_id: &str) -> R<Ipv4Addr> {
        let (_, result) = self.exec("ADD", container_id, &ns.path())?;
        result["ips"][0]["address"]
            .as_str()
            .and_then(|a| a.split('/').next())
            .and_then(|a| a.parse().ok())
            .ok_or_else(|| format!("{} ADD: no IP in {result}", self.name))
    }
}

fn beeline_plugin(node: &Node) -> Plugin<'_> {
    Plugin {
        name: "beeline",
        host: &node.ns,
        binary: bin("beeline"),
        cni_path: BRIDGE_PLUGIN_DIR.into(),
        conf: json!({
            "cniVersion": "1.0.0",
            "name": "beeline-bench",
            "type": "beeline",
            "agentSocket": node.socket(),
            "dataDir": node.ipam_dir(),
        }),
    }
}

/// Debian's bridge + host-local, with a bridge name unique to this run.
fn bridge_plugin<'a>(host: &'a NetNs, data_dir: &Path) -> Plugin<'a> {
    Plugin {
        name: "bridge",
        host,
        binary: Path::new(BRIDGE_PLUGIN_DIR).join("bridge"),
        cni_path: BRIDGE_PLUGIN_DIR.into(),
        conf: json!({
            "cniVersion": "1.0.0",
            "name": "benchbr",
            "type": "bridge",
            "bridge": unique("bbr"),
            "isGateway": true,
            "ipMasq": false,
            "ipam": { "type": "host-local", "subnet": "10.99.0.0/16", "dataDir": data_dir },
        }),
    }
}

/// A Beeline node (its own namespace, agent and pins) for `extra_args`.
fn beeline_node(extra_args: &[&str]) -> Node {
    let mut node = Node::new(POD_CIDR, NODE_IP);
    node.start_agent(extra_args);
    node
}

// ---------------------------------------------------------------- phase 1

#[derive(Default, Clone)]
struct SetupSamples {
    /// plugin -> mode -> op -> milliseconds.
    ms: BTreeMap<String, BTreeMap<String, BTreeMap<String, Vec<f64>>>>,
    /// plugin -> mode -> op -> per-repetition p50.
    rep_p50: BTreeMap<String, BTreeMap<String, BTreeMap<String, Vec<f64>>>>,
    /// plugin -> mode -> op -> batch wall seconds.
    batch_s: BTreeMap<String, BTreeMap<String, BTreeMap<String, Vec<f64>>>>,
}

impl SetupSamples {
    fn push(&mut self, plugin: &str, mode: &str, op: &str, ms: Vec<f64>, batch: f64) {
        self.rep_p50
            .entry(plugin.into())
            .or_default()
            .entry(mode.into())
            .or_default()
            .entry(op.into())
            .or_default()
            .push(median(&ms));
        self.batch_s
            .entry(plugin.into())
            .or_default()
            .entry(mode.into())
            .or_default()
            .entry(op.into())
            .or_default()
            .push(batch);
        self.ms
            .entry(plugin.into())
            .or_default()
            .entry(mode.into())
            .or_default()
            .entry(op.into())
            .or_default()
            .extend(ms);
    }
    fn get(&self, plugin: &str, mode: &str, op: &str) -> Vec<f64> {
        self.ms
            .get(plugin)
            .and_then(|m| m.get(mode))
            .and_then(|m| m.get(op))
            .cloned()
            .unwrap_or_default()
    }
    fn json(&self) -> Value {
        let mut out = serde_json::Map::new();
        for (plugin, modes) in &self.ms {
            let mut pm = serde_json::Map::new();
            for (mode, ops) in modes {
                let mut mm = serde_json::Map::new();
                for (op, v) in ops {
                    mm.insert(
                        op.clone(),
                        json!({
                            "summary_ms": summary(v),
                            "per_repetition_p50_ms": self.rep_p50[plugin][mode][op],
                            "batch_seconds": self.batch_s[plugin][mode][op],
                            "samples_ms": round3(v),
                        }),
                    );
                }
                pm.insert(mode.clone(), Value::Object(mm));
            }
            out.insert(plugin.clone(), Value::Object(pm));
        }
        Value::Object(out)
    }
}

fn phase_setup_cost(cfg: &Cfg) -> R<Output> {
    step("phase 1: pod setup cost (CNI ADD/DEL wall time): beeline vs bridge + host-local");
    let node = beeline_node(&[]);
    let br_host = NetNs::new("blb");
    let br_dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let mut plugins = vec![beeline_plugin(&node)];
    if cfg.tools.bridge {
        plugins.push(bridge_plugin(&br_host, br_dir.path()));
    }
    // One set of pod namespaces per plugin, reused by every batch.
    let pods: Vec<Vec<NetNs>> = plugins
        .iter()
        .map(|_| (0..cfg.pods).map(|_| NetNs::new("blp")).collect())
        .collect();
    let mut attempt = 0;
    let (samples, cond) = measured(
        cfg,
        "1 pod setup",
        || {
            attempt += 1;
            let mut s = SetupSamples::default();
            let n = plugins.len();
            let id = |rep: usize, mode: &str, pi: usize, i: usize| {
                format!("bench-{attempt}-{rep}-{mode}-{pi}-{i}")
            };
            for rep in 0..cfg.reps {
                // One at a time, the plugins taking turns pod by pod.
                // VERSION does no work: the cost of exec'ing the plugin.
                for op in ["VERSION", "ADD", "DEL"] {
                    let mut ms: Vec<Vec<f64>> = vec![Vec::new(); n];
                    // Pod i of every plugin, in turn.
                    #[allow(clippy::needless_range_loop)]
                    for i in 0..cfg.pods {
                        check_interrupted()?;
                        for k in 0..n {
                            let pi = (k + i + rep) % n;
                            let (t, _) = plugins[pi].exec(
                                op,
                                &id(rep, "seq", pi, i),
                                &pods[pi][i].path(),
                            )?;
                            ms[pi].push(t.as_secs_f64() * 1e3);
                        }
                    }
                    for (pi, v) in ms.into_iter().enumerate() {
                        let total = v.iter().sum::<f64>() / 1e3;
                        s.push(plugins[pi].name, "sequential", op, v, total);
                    }
                }
                // `parallel` at once: one batch per plugin, taking turns.
                for k in 0..n {
                    let pi = (k + rep) % n;
                    check_interrupted()?;
                    let ids: Vec<String> = (0..cfg.pods).map(|i| id(rep, "par", pi, i)).collect();
                    for op in ["ADD", "DEL"] {
                        let (ms, wall) =
                            cni_batch(&plugins[pi], op, &pods[pi], &ids, cfg.parallel)?;
                        s.push(plugins[pi].name, "parallel", op, ms, wall);
                    }
                }
            }
            Ok(s)
        },
        |s| {
            let spreads = ["ADD", "DEL"].map(|op| spread(&s.rep_p50["beeline"]["sequential"][op]));
            (spreads.iter().any(|x| *x > 0.3)).then(|| {
                format!(
                    "beeline per-repetition p50 spread {:.0} % / {:.0} %",
                    spreads[0] * 100.0,
                    spreads[1] * 100.0
                )
            })
        },
        SetupSamples::json,
    )?;
    drop(pods);
    let mut rows = Vec::new();
    for mode in ["sequential", "parallel"] {
        for p in &plugins {
            let add = samples.get(p.name, mode, "ADD");
            let del = samples.get(p.name, mode, "DEL");
            let version = samples.get(p.name, mode, "VERSION");
            let wall = |op: &str| median(&samples.batch_s[p.name][mode][op]);
            rows.push(vec![
                format!(
                    "{} ({})",
                    p.name,
                    if mode == "sequential" {
                        "one at a time".to_string()
                    } else {
                        format!("{} at once", cfg.parallel)
                    }
                ),
                f1(Some(median(&add))),
                f1(Some(pct(&add, 95.0))),
                f1(Some(pct(&add, 99.0))),
                f1(Some(median(&del))),
                f1(Some(pct(&del, 95.0))),
                f1(Some(pct(&del, 99.0))),
                f1(Some(median(&version))),
                f2(Some(wall("ADD"))),
                f2(Some(wall("DEL"))),
                add.len().to_string(),
            ]);
        }
    }
    let mut md = format!(
        "## 1. Pod setup cost (CNI ADD / DEL wall time of the plugin exec)\n\n\
         {} pods per batch, {}. One at a time: the plugins take turns pod by pod (VERSION \
         all, ADD all, then DEL all). {} at once: one batch per plugin, taking turns. Times in \
         ms from spawning `nsenter --net=<node netns> <plugin>` (as a runtime would, config on \
         stdin) to its exit. VERSION does no work: it is the cost of starting the plugin. Batch \
         = wall time for all {} pods in s (one at a time: the sum). Beeline: a node with a \
         running agent (default flags), its built-in IPAM; bridge: Debian's `bridge` + \
         `host-local` (`isGateway`, no `ipMasq`). The issue's reference for the bridge plugin \
         on this machine was ~38 ms ADD / ~83 ms DEL.\n\n",
        cfg.pods,
        plural(cfg.reps, "repetition"),
        cfg.parallel,
        cfg.pods
    );
    md.push_str(&table(
        &[
            "plugin",
            "ADD p50",
            "ADD p95",
            "ADD p99",
            "DEL p50",
            "DEL p95",
            "DEL p99",
            "VERSION p50",
            "batch ADD s",
            "batch DEL s",
            "samples",
        ],
        rows,
    ));
    let bl_add = median(&samples.get("beeline", "sequential", "ADD"));
    let bl_del = median(&samples.get("beeline", "sequential", "DEL"));
    let mut targets = vec![
        vec![
            "beeline ADD p50 (one at a time)".into(),
            format!("{bl_add:.1} ms"),
            format!("≤ {TARGET_ADD_MS} ms"),
            yes_no(bl_add <= TARGET_ADD_MS),
        ],
        vec![
            "beeline DEL p50 (one at a time)".into(),
            format!("{bl_del:.1} ms"),
            format!("≤ {TARGET_DEL_MS} ms"),
            yes_no(bl_del <= TARGET_DEL_MS),
        ],
    ];
    if cfg.tools.bridge {
        for op in ["ADD", "DEL"] {
            for mode in ["sequential", "parallel"] {
                let b = median(&samples.get("bridge", mode, op));
                let a = median(&samples.get("beeline", mode, op));
                targets.push(vec![
                    format!("beeline / bridge {op} p50 ({mode})"),
                    ratio(a / b),
                    "–".into(),
                    "–".into(),
                ]);
            }
        }
    }
    md.push('\n');
    md.push_str(&table(&["check", "measured", "target", "met"], targets));
    let mut out = Output {
        json: vec![(
            "phase1_setup_cost".into(),
            json!({
                "description": "CNI ADD/DEL wall time (spawn to exit, through nsenter into the node netns), ms",
                "plugins": samples.json(),
                "beeline_agent_args": [],
                "bridge_conf": plugins.get(1).map(|p| p.conf.clone()),
            }),
        )],
        sections: vec![(1, md)],
        conditions: vec![cond],
        ..Default::default()
    };
    if !cfg.tools.bridge {
        out.notes.push(format!(
            "{BRIDGE_PLUGIN_DIR}/bridge or host-local is missing (apt-get install \
             containernetworking-plugins): the bridge plugin was not measured"
        ));
    }
    Ok(out)
}

/// One batch of `op` over all pods with `width` execs at once; returns the
/// per-exec times (ms) and the batch wall time (s).
fn cni_batch(
    p: &Plugin,
    op: &str,
    pods: &[NetNs],
    ids: &[String],
    width: usize,
) -> R<(Vec<f64>, f64)> {
    let next = AtomicUsize::new(0);
    let times = Mutex::new(Vec::with_capacity(pods.len()));
    let errors = Mutex::new(Vec::new());
    let start = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..width {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= pods.len() {
                        return;
                    }
                    match p.exec(op, &ids[i], &pods[i].path()) {
                        Ok((t, _)) => times.lock().unwrap().push(t.as_secs_f64() * 1e3),
                        Err(e) => errors.lock().unwrap().push(e),
                    }
                }
            });
        }
    });
    let wall = start.elapsed().as_secs_f64();
    let errors = errors.into_inner().unwrap();
    if let Some(e) = errors.first() {
        return Err(format!(
            "{} of {} {op} failed, first: {e}",
            errors.len(),
            pods.len()
        ));
    }
    Ok((times.into_inner().unwrap(), wall))
}

// ---------------------------------------------------------------- traffic

/// A client/server pair to measure between.
struct Path2<'a> {
    name: &'static str,
    server: &'a NetNs,
    ip: Ipv4Addr,
    client: &'a NetNs,
}

#[derive(Clone, Debug, Default)]
struct Lat {
    p50: f64,
    p99: f64,
    avg: f64,
    max: f64,
    n: u64,
}

/// One path's 1-second runs. Run i of every path of a measurement was made
/// in the same round, so per-round ratios compare like with like.
#[derive(Clone, Default)]
struct PathSamples {
    name: String,
    gbps: Vec<f64>,
    lat: Vec<Lat>,
}

fn paired(a: &[f64], b: &[f64]) -> Vec<f64> {
    a.iter().zip(b).map(|(x, y)| x / y).collect()
}

impl PathSamples {
    fn tput(&self) -> f64 {
        median(&self.gbps)
    }
    fn p50s(&self) -> Vec<f64> {
        self.lat.iter().map(|l| l.p50).collect()
    }
    fn p50(&self) -> f64 {
        median(&self.p50s())
    }
    fn p99(&self) -> f64 {
        median(&self.lat.iter().map(|l| l.p99).collect::<Vec<_>>())
    }
    /// Median of the per-round throughput ratios to `base`.
    fn tput_ratio(&self, base: &PathSamples) -> f64 {
        median(&self.tput_ratios(base))
    }
    /// Median of the per-round RTT p50 ratios to `base`.
    fn p50_ratio(&self, base: &PathSamples) -> f64 {
        median(&self.p50_ratios(base))
    }
    fn tput_ratios(&self, base: &PathSamples) -> Vec<f64> {
        paired(&self.gbps, &base.gbps)
    }
    fn p50_ratios(&self, base: &PathSamples) -> Vec<f64> {
        paired(&self.p50s(), &base.p50s())
    }
    fn json(&self, base: Option<&PathSamples>) -> Value {
        json!({
            "throughput_gbps_per_run": round3(&self.gbps),
            "throughput_median_gbps": self.tput(),
            "rtt_us_per_run": self.lat.iter().map(|l| json!({
                "p50": l.p50, "p99": l.p99, "avg": l.avg, "max": l.max, "observations": l.n,
            })).collect::<Vec<_>>(),
            "rtt_p50_median_us": self.p50(),
            "rtt_p99_median_us": self.p99(),
            "vs_baseline": base.map(|b| json!({
                "baseline": b.name,
                "throughput_ratio_per_round": round3(&paired(&self.gbps, &b.gbps)),
                "throughput_ratio_median": self.tput_ratio(b),
                "rtt_p50_ratio_per_round": round3(&paired(&self.p50s(), &b.p50s())),
                "rtt_p50_ratio_median": self.p50_ratio(b),
            })),
        })
    }
}

fn paths_json(v: &[PathSamples], baseline: &str) -> Value {
    let base = path_named(v, baseline);
    Value::Object(v.iter().map(|p| (p.name.clone(), p.json(base))).collect())
}

/// The iperf3 and sockperf servers of one path, kept for a whole measurement
/// (killed on drop).
struct Servers {
    iperf3: Option<(ChildGuard, u16)>,
    sockperf: Option<(ChildGuard, u16)>,
}

impl Servers {
    fn start(cfg: &Cfg, p: &Path2) -> R<Servers> {
        let ip = p.ip.to_string();
        let spawn = |mut cmd: Command| -> R<(ChildGuard, u16)> {
            let port = next_port();
            let server = ChildGuard::spawn(
                cmd.args(["-p", &port.to_string()])
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null()),
            )?;
            wait_listening(server.pid(), port, Duration::from_secs(5))
                .map_err(|e| format!("{}: {e}", p.name))?;
            Ok((server, port))
        };
        let iperf3 = if cfg.tools.iperf3 {
            let mut cmd = p.server.cmd("iperf3");
            cmd.args(["-s", "-B", &ip]);
            Some(spawn(cmd)?)
        } else {
            None
        };
        let sockperf = if cfg.tools.sockperf {
            let mut cmd = pinned(p.server.cmd("sockperf"), LATENCY_CPU);
            cmd.args(["sr", "--tcp", "-i", &ip]);
            Some(spawn(cmd)?)
        } else {
            None
        };
        Ok(Servers { iperf3, sockperf })
    }
}

fn throughput(p: &Path2, srv: &Servers, seconds: u64) -> R<f64> {
    let secs = Duration::from_secs(seconds);
    let Some((_, port)) = &srv.iperf3 else {
        return tcp_throughput(p.server, p.ip, p.client, secs);
    };
    let ip = p.ip.to_string();
    let out = run_timeout(
        p.client.cmd("iperf3").args([
            "-c",
            &ip,
            "-p",
            &port.to_string(),
            "-t",
            &seconds.to_string(),
            "-J",
            "--connect-timeout",
            "3000",
        ]),
        secs + Duration::from_secs(20),
    )?;
    let v: Value = serde_json::from_str(&out).map_err(|e| format!("iperf3 -J output: {e}"))?;
    let bps = v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .ok_or_else(|| format!("iperf3: no sum_received in {}", v["end"]))?;
    Ok(bps / 1e9)
}

fn latency(p: &Path2, srv: &Servers, seconds: u64) -> R<Lat> {
    match &srv.sockperf {
        Some((_, port)) => sockperf(p, *port, seconds),
        None => pingpong(p, Duration::from_secs(seconds)),
    }
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// CPU both ends of a latency test run on.
const LATENCY_CPU: usize = 0;

/// Pins the calling thread (and what it execs) to `cpu`.
fn pin_to(cpu: usize) {
    let mut set = nix::sched::CpuSet::new();
    if set.set(cpu).is_ok() {
        let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set);
    }
}

/// A command whose process is pinned to `cpu` (set between fork and exec).
fn pinned(mut cmd: Command, cpu: usize) -> Command {
    use std::os::unix::process::CommandExt;
    // SAFETY: sched_setaffinity is a plain syscall, async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            pin_to(cpu);
            Ok(())
        });
    }
    cmd
}

/// `sockperf ping-pong --tcp --full-rtt` (14-byte messages, as fast as it
/// goes), both ends on the same CPU.
fn sockperf(p: &Path2, port: u16, seconds: u64) -> R<Lat> {
    let port = port.to_string();
    let ip = p.ip.to_string();
    let out = run_timeout(
        pinned(p.client.cmd("sockperf"), LATENCY_CPU).args([
            "pp",
            "--tcp",
            "-i",
            &ip,
            "-p",
            &port,
            "-t",
            &seconds.to_string(),
            "--full-rtt",
            "--dontwarmup",
        ]),
        Duration::from_secs(seconds + 20),
    )?;
    let out = strip_ansi(&out);
    let find = |key: &str| -> Option<f64> {
        out.lines().find_map(|l| {
            let i = l.find(key)?;
            l[i + key.len()..]
                .trim_start_matches([' ', '='])
                .split(|c: char| !(c.is_ascii_digit() || c == '.'))
                .next()?
                .parse()
                .ok()
        })
    };
    let n = out
        .lines()
        .find_map(|l| {
            let i = l.find("Total ")?;
            l[i + 6..].split_whitespace().next()?.parse().ok()
        })
        .unwrap_or(0);
    Ok(Lat {
        p50: find("percentile 50.000").ok_or_else(|| format!("sockperf output: {out}"))?,
        p99: find("percentile 99.000").ok_or_else(|| format!("sockperf output: {out}"))?,
        avg: find("avg-rtt=").unwrap_or(f64::NAN),
        max: find("<MAX> observation").unwrap_or(f64::NAN),
        n,
    })
}

/// Fallback without sockperf: a TCP 1-byte ping-pong (TCP_NODELAY).
fn pingpong(p: &Path2, duration: Duration) -> R<Lat> {
    let listener = p
        .server
        .enter(|| TcpListener::bind(SocketAddr::from((p.ip, 0))))
        .map_err(|e| format!("bind {}: {e}", p.ip))?;
    let addr = listener.local_addr().unwrap();
    std::thread::scope(|s| {
        let server = s.spawn(move || -> std::io::Result<()> {
            pin_to(LATENCY_CPU);
            let (mut c, _) = listener.accept()?;
            c.set_nodelay(true)?;
            let mut b = [0u8; 1];
            loop {
                if c.read(&mut b)? == 0 {
                    return Ok(());
                }
                c.write_all(&b)?;
            }
        });
        let samples = p.client.enter(|| -> std::io::Result<Vec<f64>> {
            pin_to(LATENCY_CPU);
            let mut c = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
            c.set_nodelay(true)?;
            c.set_read_timeout(Some(Duration::from_secs(2)))?;
            let mut b = [0u8; 1];
            for _ in 0..1000 {
                c.write_all(b"x")?;
                c.read_exact(&mut b)?;
            }
            let mut v = Vec::with_capacity(200_000);
            let end = Instant::now() + duration;
            while Instant::now() < end {
                let t = Instant::now();
                c.write_all(b"x")?;
                c.read_exact(&mut b)?;
                v.push(t.elapsed().as_secs_f64() * 1e6);
            }
            Ok(v)
        });
        let samples = match samples {
            Ok(v) => v,
            Err(e) => {
                let _ = p
                    .server
                    .enter(|| TcpStream::connect_timeout(&addr, Duration::from_millis(500)));
                return Err(format!("ping-pong to {addr}: {e}"));
            }
        };
        let _ = server.join();
        Ok(Lat {
            p50: pct(&samples, 50.0),
            p99: pct(&samples, 99.0),
            avg: samples.iter().sum::<f64>() / samples.len().max(1) as f64,
            max: pct(&samples, 100.0),
            n: samples.len() as u64,
        })
    })
}

/// Checks every path answers pings before measuring it.
fn check_paths(paths: &[Path2]) -> R<()> {
    for p in paths {
        if !eventually(Duration::from_secs(10), || {
            p.client.ping_once(p.ip, Duration::from_secs(1))
        }) {
            return Err(format!("{}: {} does not answer pings", p.name, p.ip));
        }
    }
    Ok(())
}

/// Throughput then latency for every path in 1-second runs, round-robin
/// (A, B, C, A, B, C, ...), rotating who goes first; `reps` times.
fn traffic_reps(cfg: &Cfg, paths: &[Path2]) -> R<Vec<PathSamples>> {
    let n = paths.len();
    let mut out: Vec<PathSamples> = paths
        .iter()
        .map(|p| PathSamples {
            name: p.name.into(),
            ..Default::default()
        })
        .collect();
    let servers: Vec<Servers> = paths
        .iter()
        .map(|p| Servers::start(cfg, p))
        .collect::<R<_>>()?;
    for rep in 0..cfg.reps {
        for round in 0..cfg.tput_rounds {
            for k in 0..n {
                let i = (k + rep + round) % n;
                check_interrupted()?;
                let g = throughput(&paths[i], &servers[i], 1)
                    .map_err(|e| format!("{}: {e}", paths[i].name))?;
                out[i].gbps.push(g);
            }
        }
        for round in 0..cfg.lat_rounds {
            for k in 0..n {
                let i = (k + rep + round) % n;
                check_interrupted()?;
                let l = latency(&paths[i], &servers[i], cfg.lat_secs)
                    .map_err(|e| format!("{}: {e}", paths[i].name))?;
                out[i].lat.push(l);
            }
        }
        for p in &out {
            let g = &p.gbps[p.gbps.len() - cfg.tput_rounds..];
            let l: Vec<f64> = p.lat[p.lat.len() - cfg.lat_rounds..]
                .iter()
                .map(|l| l.p50)
                .collect();
            eprintln!(
                "    repetition {}: {:<16} {:6.2} Gbit/s   RTT p50 {:7.1} µs",
                rep + 1,
                p.name,
                median(g),
                median(&l)
            );
        }
    }
    Ok(out)
}

/// Spread of per-round values: interquartile range / median (range /
/// median with fewer than 4).
fn rel_spread(v: &[f64]) -> f64 {
    if v.len() >= 4 {
        (pct(v, 75.0) - pct(v, 25.0)) / median(v)
    } else {
        spread(v)
    }
}

/// Throughput and latency of `paths`, repeated while the machine is noisy
/// or the ratios to `baseline` vary too much.
fn measured_traffic(
    cfg: &Cfg,
    name: &str,
    paths: &[Path2],
    baseline: &str,
) -> R<(Vec<PathSamples>, (String, Value))> {
    measured(
        cfg,
        name,
        || traffic_reps(cfg, paths),
        |v: &Vec<PathSamples>| traffic_noisy(v, baseline),
        |v| paths_json(v, baseline),
    )
}

/// Noisy when a Beeline path's per-round throughput ratio to the baseline
/// varies by more than 15 %.
fn traffic_noisy(v: &[PathSamples], baseline: &str) -> Option<String> {
    let base = path_named(v, baseline)?;
    v.iter()
        .filter(|p| p.name.starts_with("beeline"))
        .map(|p| (p, rel_spread(&paired(&p.gbps, &base.gbps))))
        .find(|(_, s)| *s > 0.15)
        .map(|(p, s)| {
            format!(
                "{} / {baseline} throughput ratio varies {:.0} % between rounds",
                p.name,
                s * 100.0
            )
        })
}

/// The traffic table: one row per path, ratios against `baseline`.
fn traffic_table(v: &[PathSamples], baseline: &str) -> String {
    let base = v.iter().find(|p| p.name == baseline);
    let rows = v
        .iter()
        .map(|p| {
            let (tr, lr) = base.map_or((f64::NAN, f64::NAN), |b| (p.tput_ratio(b), p.p50_ratio(b)));
            vec![
                p.name.clone(),
                f2(Some(p.tput())),
                format!(
                    "{}–{}",
                    f2(sorted(&p.gbps).first().copied()),
                    f2(sorted(&p.gbps).last().copied())
                ),
                f1(Some(p.p50())),
                f1(Some(p.p99())),
                ratio(tr),
                ratio(lr),
            ]
        })
        .collect();
    table(
        &[
            "path",
            "Gbit/s (median)",
            "range",
            "RTT p50 µs",
            "RTT p99 µs",
            &format!("Gbit/s vs {baseline}"),
            &format!("RTT p50 vs {baseline}"),
        ],
        rows,
    )
}

/// Which way a ratio has to go to meet its target.
#[derive(Clone, Copy)]
enum Target {
    AtLeast(f64),
    AtMost(f64),
}

const RATIO_HEADERS: [&str; 5] = [
    "ratio",
    "measured",
    "middle half of rounds",
    "target",
    "met",
];

/// A row of a ratio table: the median of the per-round ratios, the middle
/// half of them (how much one round can be trusted: a target inside that band
/// is within this machine's noise), the target and whether the median meets it.
fn ratio_row(what: impl Into<String>, per_round: &[f64], target: Option<Target>) -> Vec<String> {
    let m = median(per_round);
    let (target, met) = match target {
        Some(Target::AtLeast(t)) => (format!("≥ {t:.2}x"), yes_no(m >= t)),
        Some(Target::AtMost(t)) => (format!("≤ {t:.2}x"), yes_no(m <= t)),
        None => ("–".into(), "–".into()),
    };
    let band = if per_round.len() >= 4 {
        format!(
            "{}–{}",
            ratio(pct(per_round, 25.0)),
            ratio(pct(per_round, 75.0))
        )
    } else {
        "–".into()
    };
    vec![what.into(), ratio(m), band, target, met]
}

/// Throughput and RTT p50 rows for `a / b`, with no target; none when either
/// path was not measured.
fn ratio_pair(label: &str, a: Option<&PathSamples>, b: Option<&PathSamples>) -> Vec<Vec<String>> {
    let (Some(a), Some(b)) = (a, b) else {
        return Vec::new();
    };
    vec![
        ratio_row(format!("{label} throughput"), &a.tput_ratios(b), None),
        ratio_row(format!("{label} RTT p50"), &a.p50_ratios(b), None),
    ]
}

fn path_named<'a>(v: &'a [PathSamples], name: &str) -> Option<&'a PathSamples> {
    v.iter().find(|p| p.name == name)
}

fn traffic_method(cfg: &Cfg) -> String {
    format!(
        "Throughput: {}, {} of 1 s per path; latency: {}, {} of {} s per path. Paths \
         take turns run by run (A, B, C, A, B, C, ...), so each round compares them within a \
         few seconds; the table gives the median over all runs, and each ratio is the median \
         of the per-round ratios, which cancels most of the drift of a shared machine. Latency \
         runs on one CPU because on this VM a cross-CPU wakeup (an IPI through the hypervisor) \
         costs 100-400 µs and would drown the datapath.",
        if cfg.tools.iperf3 {
            "`iperf3 -c` (one TCP stream)"
        } else {
            "one TCP stream (in-process; iperf3 missing)"
        },
        plural(cfg.tput_rounds * cfg.reps, "run"),
        if cfg.tools.sockperf {
            "`sockperf ping-pong --tcp --full-rtt --dontwarmup` (14-byte messages; sockperf \
             leaves the first 0.4 s of a run out of its statistics), client and server pinned \
             to CPU 0, p50 and p99 RTT of each run"
        } else {
            "a TCP 1-byte ping-pong (TCP_NODELAY; sockperf missing), client and server pinned \
             to CPU 0, p50 and p99 RTT of each run"
        },
        plural(cfg.lat_rounds * cfg.reps, "run"),
        cfg.lat_secs,
    )
}

// ---------------------------------------------------------------- phases 2, 3 (+6)

/// Two pods on one Beeline node, two on a bridge-plugin node, a bare veth pair.
struct SameNode {
    // Pods first, then their nodes (field order is drop order).
    bl_pods: Vec<(NetNs, Ipv4Addr)>,
    br_pods: Vec<(NetNs, Ipv4Addr)>,
    veth: (NetNs, NetNs),
    floor: RedirectPeerFloor,
    bl_node: Node,
    br_host: NetNs,
    _br_dir: tempfile::TempDir,
}

impl SameNode {
    fn new(cfg: &Cfg) -> R<SameNode> {
        // --mode direct: pod MTU = uplink MTU = 1500, like the other two.
        let bl_node = beeline_node(&["--mode", "direct"]);
        let br_host = NetNs::new("blb");
        let br_dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let mut bl_pods = Vec::new();
        let mut br_pods = Vec::new();
        {
            let bl = beeline_plugin(&bl_node);
            for i in 0..2 {
                let ns = NetNs::new("blp");
                let ip = bl.add_pod(&ns, &format!("bench-same-bl-{i}"))?;
                bl_pods.push((ns, ip));
            }
            if cfg.tools.bridge {
                let br = bridge_plugin(&br_host, br_dir.path());
                for i in 0..2 {
                    let ns = NetNs::new("blp");
                    let ip = br.add_pod(&ns, &format!("bench-same-br-{i}"))?;
                    br_pods.push((ns, ip));
                }
            }
        }
        let a = NetNs::new("blv");
        let b = NetNs::new("blv");
        a.ip(&[
            "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", &b.name,
        ]);
        a.ip(&["addr", "add", "10.98.0.1/24", "dev", "eth0"]);
        b.ip(&["addr", "add", "10.98.0.2/24", "dev", "eth0"]);
        a.ip(&["link", "set", "eth0", "up"]);
        b.ip(&["link", "set", "eth0", "up"]);
        Ok(SameNode {
            bl_pods,
            br_pods,
            veth: (a, b),
            floor: RedirectPeerFloor::new()?,
            bl_node,
            br_host,
            _br_dir: br_dir,
        })
    }

    /// Beeline, [the floor,] the bridge plugin, bare veth.
    fn paths(&self, with_floor: bool) -> Vec<Path2<'_>> {
        let mut v = vec![Path2 {
            name: "beeline",
            server: &self.bl_pods[1].0,
            ip: self.bl_pods[1].1,
            client: &self.bl_pods[0].0,
        }];
        if with_floor {
            v.push(self.floor.path());
        }
        if self.br_pods.len() == 2 {
            v.push(Path2 {
                name: "bridge",
                server: &self.br_pods[1].0,
                ip: self.br_pods[1].1,
                client: &self.br_pods[0].0,
            });
        }
        v.push(Path2 {
            name: "bare veth",
            server: &self.veth.1,
            ip: Ipv4Addr::new(10, 98, 0, 2),
            client: &self.veth.0,
        });
        v
    }
}

/// The least any `bpf_redirect_peer` datapath can do, as a contender: two
/// hand-wired pods on a node whose host veths each carry a cls_bpf filter
/// (like Beeline's default `--pod-attach tc`) running only `return
/// bpf_redirect_peer(<the other host veth>, 0)`. No lookup, no header
/// rewrite, no counters: beeline / floor is what Beeline's own program costs,
/// floor / bare veth what the mechanism (tc hook + peer redirect) costs.
struct RedirectPeerFloor {
    // Pods first, then their node (field order is drop order).
    pods: Vec<(NetNs, Ipv4Addr)>,
    _node: NetNs,
}

const FLOOR: &str = "redirect_peer floor";

impl RedirectPeerFloor {
    fn new() -> R<RedirectPeerFloor> {
        let node = NetNs::new("bln");
        let hosts = ["floor0", "floor1"];
        let pods: Vec<(NetNs, Ipv4Addr)> = hosts
            .iter()
            .enumerate()
            .map(|(i, host)| {
                let ip = Ipv4Addr::new(10, 97, 0, 1 + i as u8);
                (hand_wired_pod(&node, host, ip, None), ip)
            })
            .collect();
        let pins = BpffsDir::new();
        std::fs::create_dir_all(&pins.path).map_err(|e| format!("{}: {e}", pins.path.display()))?;
        node.enter(|| -> R<()> {
            use aya::programs::{
                SchedClassifier, TcAttachType,
                tc::{NlOptions, TcAttachOptions, qdisc_add_clsact},
            };
            let index = |name: &str| {
                nix::net::if_::if_nametoindex(name).map_err(|e| format!("{name}: {e}"))
            };
            for (i, host) in hosts.iter().enumerate() {
                let prog = load_redirect_peer_program(index(hosts[1 - i])?)?;
                // aya takes an already loaded program only from a pin.
                let pin = pins.path.join(host);
                bpf_obj_pin(&prog, &pin)?;
                let classifier = SchedClassifier::from_pin(&pin);
                let _ = std::fs::remove_file(&pin);
                let mut classifier = classifier.map_err(|e| format!("from_pin: {e}"))?;
                qdisc_add_clsact(host).map_err(|e| format!("clsact on {host}: {e}"))?;
                let id = classifier
                    .attach_with_options(
                        host,
                        TcAttachType::Ingress,
                        TcAttachOptions::Netlink(NlOptions::default()),
                    )
                    .map_err(|e| format!("attach on {host}: {e}"))?;
                // The filter holds the program and goes with the veth when the
                // node netns is deleted; dropping the link would detach it from
                // whatever netns the dropping thread is in.
                std::mem::forget(classifier.take_link(id).map_err(|e| e.to_string())?);
            }
            Ok(())
        })?;
        Ok(RedirectPeerFloor { pods, _node: node })
    }

    fn path(&self) -> Path2<'_> {
        Path2 {
            name: FLOOR,
            server: &self.pods[1].0,
            ip: self.pods[1].1,
            client: &self.pods[0].0,
        }
    }
}

/// One `bpf_attr` for the raw syscalls below (the kernel takes zeroes for
/// every field it does not use).
#[repr(C, align(8))]
struct BpfAttr([u8; 128]);

impl BpfAttr {
    fn put_u32(&mut self, off: usize, v: u32) {
        self.0[off..off + 4].copy_from_slice(&v.to_ne_bytes());
    }
    fn put_u64(&mut self, off: usize, v: u64) {
        self.0[off..off + 8].copy_from_slice(&v.to_ne_bytes());
    }
    fn call(&mut self, cmd: u32, what: &str) -> R<i64> {
        // SAFETY: `self` is a bpf_attr-sized buffer; the pointers in it point
        // to data the caller keeps alive across this call.
        let rc =
            unsafe { libc::syscall(libc::SYS_bpf, cmd, self.0.as_mut_ptr(), self.0.len() as u32) };
        if rc < 0 {
            return Err(format!("{what}: {}", std::io::Error::last_os_error()));
        }
        Ok(rc)
    }
}

/// A `BPF_PROG_TYPE_SCHED_CLS` program of four instructions:
/// `r1 = ifindex; r2 = 0; call bpf_redirect_peer; exit`. aya loads programs
/// only from ELF objects, and this one needs no compiler.
fn load_redirect_peer_program(ifindex: u32) -> R<OwnedFd> {
    const BPF_PROG_LOAD: u32 = 5;
    const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;
    const BPF_FUNC_REDIRECT_PEER: i32 = 155;
    let insn = |code: u8, dst: u8, imm: i32| -> u64 {
        code as u64 | (dst as u64) << 8 | (imm as u32 as u64) << 32
    };
    let insns = [
        insn(0xb7, 1, ifindex as i32), // BPF_ALU64 | BPF_MOV | BPF_K: r1 = ifindex
        insn(0xb7, 2, 0),              // r2 = 0 (flags)
        insn(0x85, 0, BPF_FUNC_REDIRECT_PEER), // BPF_JMP | BPF_CALL
        insn(0x95, 0, 0),              // BPF_JMP | BPF_EXIT: return r0
    ];
    let license = c"GPL";
    let mut attr = BpfAttr([0; 128]);
    attr.put_u32(0, BPF_PROG_TYPE_SCHED_CLS);
    attr.put_u32(4, insns.len() as u32);
    attr.put_u64(8, insns.as_ptr() as u64);
    attr.put_u64(16, license.as_ptr() as u64);
    attr.0[48..53].copy_from_slice(b"floor"); // prog_name
    let fd = attr.call(BPF_PROG_LOAD, "BPF_PROG_LOAD (redirect_peer floor)")?;
    // SAFETY: the kernel just returned this descriptor to us alone.
    Ok(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as i32) })
}

fn bpf_obj_pin(prog: &OwnedFd, path: &Path) -> R<()> {
    use std::os::{fd::AsRawFd, unix::ffi::OsStrExt};
    const BPF_OBJ_PIN: u32 = 6;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(|e| e.to_string())?;
    let mut attr = BpfAttr([0; 128]);
    attr.put_u64(0, c_path.as_ptr() as u64);
    attr.put_u32(8, prog.as_raw_fd() as u32);
    attr.call(BPF_OBJ_PIN, &format!("BPF_OBJ_PIN {}", path.display()))?;
    Ok(())
}

/// Writes a sysctl of `ns` (a /proc/sys/net file opened from inside it);
/// returns the value read back.
fn netns_sysctl(ns: &NetNs, key: &str, value: &str) -> Option<String> {
    let path = format!("/proc/sys/{}", key.replace('.', "/"));
    ns.enter(|| {
        std::fs::write(&path, value).ok()?;
        std::fs::read_to_string(&path)
            .ok()
            .map(|s| s.trim().to_string())
    })
}

fn same_node_phases(cfg: &Cfg) -> R<Output> {
    let want = |p: u8| cfg.phases.contains(&p);
    step("phases 2/3/6: same-node setups (beeline node + 2 pods, bridge node + 2 pods, bare veth)");
    let setup = SameNode::new(cfg)?;
    let mut out = Output::default();
    // Phase 2 is a plain host: no bridge netfilter calls.
    let nf0 = netns_sysctl(&setup.br_host, "net.bridge.bridge-nf-call-iptables", "0");
    let paths = setup.paths(true);
    check_paths(&paths)?;
    if want(2) {
        let result = (|| -> R<Output> {
            let mut out = Output::default();
            step("phase 2: same-node pod-to-pod throughput and latency");
            let (v, cond) = measured_traffic(cfg, "2 same-node", &paths, "bare veth")?;
            out.conditions.push(cond);
            out.sections.push((
            2,
            same_node_section(
                &v,
                "## 2. Same-node pod-to-pod",
                &format!(
                    "Two pods on one node: Beeline (agent `--mode direct`, pod MTU 1500), Debian's \
                 `bridge` + `host-local` (br_netfilter calls {}), a bare veth pair between \
                 two namespaces (the limit), and the {FLOOR}: two pods whose host veths carry a \
                 cls_bpf filter that is only `return bpf_redirect_peer(<other host veth>, 0)` \
                 (4 instructions: the least any datapath built on `bpf_redirect_peer` does; \
                 beeline / floor is the cost of Beeline's own program, floor / bare veth the cost \
                 of the tc hook and the peer redirect). {}",
                    match nf0.as_deref() {
                        Some("0") => "off",
                        Some(_) => "on",
                        None => "n/a",
                    },
                    traffic_method(cfg)
                ),
            ),
        ));
            out.json.push((
                "phase2_same_node".into(),
                json!({ "paths": paths_json(&v, "bare veth"), "bridge_nf_call_iptables": nf0 }),
            ));
            Ok(out)
        })();
        out.absorb_phase("2", result);
    }
    if want(6) {
        match phase6(cfg, "same node", &[&setup.bl_node], &paths[0]) {
            Ok((v, cond)) => {
                out.json.push(("phase6_same_node".into(), v));
                out.conditions.push(cond);
            }
            Err(e) => out.errors.push(format!("phase 6 (same node): {e}")),
        }
    }
    if want(3) {
        // The floor has no host stack to load with rules: it is phase 2's.
        out.absorb_phase("3", phase_rules(cfg, &setup, &setup.paths(false)));
    }
    drop(paths);
    drop(setup);
    Ok(out)
}

fn same_node_section(v: &[PathSamples], title: &str, intro: &str) -> String {
    let mut md = format!("{title}\n\n{intro}\n\n");
    md.push_str(&traffic_table(v, "bare veth"));
    if let (Some(b), Some(veth)) = (path_named(v, "beeline"), path_named(v, "bare veth")) {
        let mut rows = vec![
            ratio_row(
                "beeline / bare veth throughput",
                &b.tput_ratios(veth),
                Some(Target::AtLeast(TARGET_SAME_NODE_TPUT)),
            ),
            ratio_row(
                "beeline / bare veth RTT p50",
                &b.p50_ratios(veth),
                Some(Target::AtMost(TARGET_SAME_NODE_LAT)),
            ),
        ];
        rows.extend(ratio_pair("beeline / floor", Some(b), path_named(v, FLOOR)));
        rows.extend(ratio_pair(
            "floor / bare veth",
            path_named(v, FLOOR),
            Some(veth),
        ));
        rows.extend(ratio_pair(
            "beeline / bridge",
            Some(b),
            path_named(v, "bridge"),
        ));
        md.push('\n');
        md.push_str(&table(&RATIO_HEADERS, rows));
    }
    md
}

/// `iptables-restore` of `n` non-matching rules into filter FORWARD and
/// `n` kube-proxy-like DNAT rules into nat PREROUTING, inside `ns`.
fn install_rules(ns: &NetNs, n: usize) -> R<(f64, usize, usize)> {
    let mut text = String::with_capacity(n * 160);
    text.push_str("*filter\n:FORWARD ACCEPT [0:0]\n");
    for i in 0..n {
        let (a, b) = (i / 256, i % 256);
        text.push_str(&format!(
            "-A FORWARD -s 100.64.{a}.{b}/32 -d 100.65.{a}.{b}/32 -p tcp -m tcp --dport 8080 -j DROP\n"
        ));
    }
    text.push_str("COMMIT\n*nat\n:PREROUTING ACCEPT [0:0]\n");
    for i in 0..n {
        let (a, b) = (i / 256, i % 256);
        text.push_str(&format!(
            "-A PREROUTING -d 100.96.{a}.{b}/32 -p tcp -m tcp --dport 80 -j DNAT --to-destination 100.97.{a}.{b}:8080\n"
        ));
    }
    text.push_str("COMMIT\n");
    let start = Instant::now();
    let mut child = ns
        .cmd("iptables-restore")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("iptables-restore: {e}"))?;
    let _ = child.stdin.take().unwrap().write_all(text.as_bytes());
    let o = child.wait_with_output().map_err(|e| e.to_string())?;
    let took = start.elapsed().as_secs_f64();
    if !o.status.success() {
        return Err(format!(
            "iptables-restore failed: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        ));
    }
    let count = |table: &str, chain: &str| {
        ns.cmd("iptables")
            .args(["-t", table, "-S", chain])
            .output()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .filter(|l| l.starts_with("-A "))
                    .count()
            })
            .unwrap_or(0)
    };
    Ok((took, count("filter", "FORWARD"), count("nat", "PREROUTING")))
}

/// Loaded (or loads, and unloads on drop) br_netfilter.
struct BrNetfilter {
    how: String,
    unload: bool,
}

impl BrNetfilter {
    fn ensure() -> BrNetfilter {
        let present = || Path::new("/proc/sys/net/bridge/bridge-nf-call-iptables").exists();
        if present() {
            let how = if std::fs::read_to_string("/proc/modules")
                .unwrap_or_default()
                .lines()
                .any(|l| l.starts_with("br_netfilter "))
            {
                "already loaded (module)"
            } else {
                "present (built into the kernel or already loaded)"
            };
            return BrNetfilter {
                how: how.into(),
                unload: false,
            };
        }
        if on_path("modprobe")
            && Command::new("modprobe")
                .arg("br_netfilter")
                .status()
                .is_ok_and(|s| s.success())
            && present()
        {
            return BrNetfilter {
                how: "loaded with modprobe by the benchmark (unloaded afterwards)".into(),
                unload: true,
            };
        }
        BrNetfilter {
            how: "unavailable (no /proc/sys/net/bridge and modprobe br_netfilter failed)".into(),
            unload: false,
        }
    }
}

impl Drop for BrNetfilter {
    fn drop(&mut self) {
        if self.unload {
            let _ = Command::new("modprobe")
                .args(["-r", "br_netfilter"])
                .status();
        }
    }
}

fn phase_rules(cfg: &Cfg, setup: &SameNode, paths: &[Path2]) -> R<Output> {
    step(&format!(
        "phase 3: same-node again with {} iptables rules in filter FORWARD and in nat PREROUTING, br_netfilter on",
        cfg.rules
    ));
    check_interrupted()?;
    if !cfg.tools.iptables_restore {
        return Err("iptables-restore is missing (apt-get install iptables)".into());
    }
    let brnf = BrNetfilter::ensure();
    let mut nf = BTreeMap::new();
    let mut install = BTreeMap::new();
    let mut hosts: Vec<(&str, &NetNs)> = vec![("beeline node", &setup.bl_node.ns)];
    if !setup.br_pods.is_empty() {
        hosts.push(("bridge node", &setup.br_host));
    }
    for (name, ns) in &hosts {
        nf.insert(
            *name,
            netns_sysctl(ns, "net.bridge.bridge-nf-call-iptables", "1"),
        );
        let (took, fwd, pre) = install_rules(ns, cfg.rules)?;
        eprintln!("    {name}: {fwd} FORWARD + {pre} PREROUTING rules in {took:.2} s");
        install.insert(
            *name,
            json!({ "seconds": took, "filter_forward": fwd, "nat_prerouting": pre }),
        );
    }
    check_paths(paths)?;
    let (v, cond) = measured_traffic(cfg, "3 same-node + iptables", paths, "bare veth")?;
    let section = same_node_section(
        &v,
        &format!(
            "## 3. Same-node with a realistic host: {} + {} iptables rules, br_netfilter",
            cfg.rules, cfg.rules
        ),
        &format!(
            "The node namespaces of Beeline and of the bridge plugin get {} non-matching rules in \
             filter FORWARD and {} DNAT rules in nat PREROUTING (`iptables-restore`, {}), and \
             `net.bridge.bridge-nf-call-iptables=1` (br_netfilter: {}). The bare veth pair has no \
             node namespace and is the same limit as in phase 2. {}",
            cfg.rules,
            cfg.rules,
            cmd_stdout("iptables", &["--version"]).unwrap_or_default(),
            brnf.how,
            traffic_method(cfg)
        ),
    );
    Ok(Output {
        json: vec![(
            "phase3_same_node_iptables".into(),
            json!({
                "paths": paths_json(&v, "bare veth"),
                "br_netfilter": brnf.how,
                "bridge_nf_call_iptables": nf,
                "rules_installed": install,
            }),
        )],
        sections: vec![(3, section)],
        conditions: vec![cond],
        ..Default::default()
    })
}

// ---------------------------------------------------------------- phase 4 (+6)

/// Two-node clusters: Beeline direct, Beeline VXLAN, and kernel routing
/// (host-gw style, no BPF) whose nodes also give the underlay baseline.
struct CrossNode {
    direct_pods: Vec<(NetNs, Ipv4Addr)>,
    vxlan_pods: Vec<(NetNs, Ipv4Addr)>,
    vxlan_device_pods: Vec<(NetNs, Ipv4Addr)>,
    kr_pods: Vec<(NetNs, Ipv4Addr)>,
    kvx_pods: Vec<(NetNs, Ipv4Addr)>,
    direct: Cluster,
    vxlan: Cluster,
    _vxlan_device: Cluster,
    kr: Cluster,
    _kvx: Cluster,
}

fn beeline_cluster(mode: &str, extra_args: &[&str]) -> R<(Cluster, Vec<(NetNs, Ipv4Addr)>)> {
    let mut c = Cluster::new(2);
    let mut args = vec!["--mode", mode];
    args.extend_from_slice(extra_args);
    c.start(&args);
    let mut pods = Vec::new();
    for (i, node) in c.nodes.iter().enumerate() {
        let ns = NetNs::new("blp");
        let ip = beeline_plugin(node).add_pod(&ns, &format!("bench-{mode}-{i}"))?;
        pods.push((ns, ip));
    }
    Ok((c, pods))
}

/// Kernel routing: per node a pod behind a veth with a /32 and a host
/// route, and a route to the other node's podCIDR via its underlay IP
/// (`vxlan`: via the peer's end of a kernel VXLAN device, flannel style).
fn kernel_routing_cluster(vxlan: bool) -> R<(Cluster, Vec<(NetNs, Ipv4Addr)>)> {
    let c = Cluster::new(2);
    // flannel's vxlan backend: one VXLAN device per node, its address the
    // podCIDR's .0, static neighbour + FDB entries for every peer.
    let vtep = |j: usize| Ipv4Addr::new(10, 244, j as u8 + 1, 0);
    if vxlan {
        for (i, node) in c.nodes.iter().enumerate() {
            let local = Cluster::node_ip(i).to_string();
            node.ns.ip(&[
                "link", "add", "kvx0", "type", "vxlan", "id", "42", "dstport", "4789", "local",
                &local,
            ]);
            node.ns
                .ip(&["addr", "add", &format!("{}/32", vtep(i)), "dev", "kvx0"]);
            node.ns.ip(&["link", "set", "kvx0", "up"]);
        }
        for (i, node) in c.nodes.iter().enumerate() {
            for (j, peer) in c.nodes.iter().enumerate().filter(|(j, _)| *j != i) {
                let mac = peer.ns.mac("kvx0").to_string();
                let peer_vtep = vtep(j).to_string();
                node.ns.ip(&[
                    "neigh",
                    "add",
                    &peer_vtep,
                    "lladdr",
                    &mac,
                    "dev",
                    "kvx0",
                    "nud",
                    "permanent",
                ]);
                beeline_tests::run(node.ns.cmd("bridge").args([
                    "fdb",
                    "append",
                    &mac,
                    "dev",
                    "kvx0",
                    "dst",
                    &Cluster::node_ip(j).to_string(),
                ]));
            }
        }
    }
    let mut pods = Vec::new();
    for (i, node) in c.nodes.iter().enumerate() {
        let ip = Ipv4Addr::new(10, 244, i as u8 + 1, 10);
        let ips = ip.to_string();
        let pod = hand_wired_pod(&node.ns, "krh0", ip, vxlan.then_some(1450));
        let pod_mac = pod.mac("eth0").to_string();
        node.ns.ip(&[
            "route",
            "add",
            &format!("{ip}/32"),
            "dev",
            "krh0",
            "scope",
            "link",
        ]);
        node.ns.ip(&[
            "neigh",
            "add",
            &ips,
            "lladdr",
            &pod_mac,
            "dev",
            "krh0",
            "nud",
            "permanent",
        ]);
        for j in (0..c.nodes.len()).filter(|j| *j != i) {
            if vxlan {
                let via = vtep(j).to_string();
                node.ns.ip(&[
                    "route",
                    "add",
                    &Cluster::pod_cidr(j),
                    "via",
                    &via,
                    "dev",
                    "kvx0",
                    "onlink",
                ]);
            } else {
                node.ns.ip(&[
                    "route",
                    "add",
                    &Cluster::pod_cidr(j),
                    "via",
                    &Cluster::node_ip(j).to_string(),
                ]);
            }
        }
        netns_sysctl(&node.ns, "net.ipv4.ip_forward", "1")
            .filter(|v| v == "1")
            .ok_or("cannot enable ip_forward in a node namespace")?;
        pods.push((pod, ip));
    }
    Ok((c, pods))
}

/// From the first node's pod to the second node's.
fn pod_to_pod<'a>(name: &'static str, pods: &'a [(NetNs, Ipv4Addr)]) -> Path2<'a> {
    Path2 {
        name,
        server: &pods[1].0,
        ip: pods[1].1,
        client: &pods[0].0,
    }
}

impl CrossNode {
    fn new() -> R<CrossNode> {
        let (direct, direct_pods) = beeline_cluster("direct", &[])?;
        let (vxlan, vxlan_pods) = beeline_cluster("vxlan", &[])?;
        let (vxlan_device, vxlan_device_pods) =
            beeline_cluster("vxlan", &["--vxlan-encap", "device"])?;
        let (kr, kr_pods) = kernel_routing_cluster(false)?;
        let (kvx, kvx_pods) = kernel_routing_cluster(true)?;
        Ok(CrossNode {
            direct_pods,
            vxlan_pods,
            vxlan_device_pods,
            kr_pods,
            kvx_pods,
            direct,
            vxlan,
            _vxlan_device: vxlan_device,
            kr,
            _kvx: kvx,
        })
    }

    fn paths(&self) -> Vec<Path2<'_>> {
        vec![
            Path2 {
                name: "underlay",
                server: &self.kr.nodes[1].ns,
                ip: Cluster::node_ip(1),
                client: &self.kr.nodes[0].ns,
            },
            pod_to_pod("kernel routing", &self.kr_pods),
            pod_to_pod("beeline direct", &self.direct_pods),
            pod_to_pod("beeline vxlan", &self.vxlan_pods),
            pod_to_pod("kernel vxlan", &self.kvx_pods),
            pod_to_pod("beeline vxlan, device encap", &self.vxlan_device_pods),
        ]
    }
}

fn cross_node_phases(cfg: &Cfg) -> R<Output> {
    let want = |p: u8| cfg.phases.contains(&p);
    step(
        "phases 4/6: 2-node clusters (beeline direct, beeline vxlan (program and device encap), \
         kernel routing + underlay, kernel vxlan)",
    );
    let setup = CrossNode::new()?;
    let paths = setup.paths();
    check_paths(&paths)?;
    let mut out = Output::default();
    if want(4) {
        let result = (|| -> R<Output> {
            let mut out = Output::default();
            step("phase 4: cross-node pod-to-pod throughput and latency");
            let (v, cond) = measured_traffic(cfg, "4 cross-node", &paths, "underlay")?;
            out.conditions.push(cond);
            let mut md = format!(
                "## 4. Cross-node pod-to-pod\n\n\
             Two node namespaces on a bridged underlay (veths, MTU 1500). Underlay: node to node \
             over the uplinks (no BPF). Kernel routing: host-gw style, pods on veths with a /32 \
             and a host route, `ip route add <remote podCIDR> via <peer node IP>`, no BPF. \
             Kernel VXLAN: the same pods, routed through a kernel VXLAN device with static \
             neighbour and FDB entries (flannel's vxlan backend), pod MTU 1450, no BPF. \
             Beeline `--mode direct` (pod MTU 1500) and `--mode vxlan` (pod MTU 1450; the \
             programs build and strip the VXLAN headers on the uplink), and for comparison \
             `--mode vxlan --vxlan-encap device` (through the kernel's collect_md VXLAN device, \
             as before). {}\n\n",
                traffic_method(cfg)
            );
            md.push_str(&traffic_table(&v, "underlay"));
            if let Some(u) = path_named(&v, "underlay") {
                let mut rows = Vec::new();
                for (name, target) in [
                    ("beeline direct", TARGET_DIRECT_TPUT),
                    ("beeline vxlan", TARGET_VXLAN_TPUT),
                ] {
                    if let Some(p) = path_named(&v, name) {
                        rows.push(ratio_row(
                            format!("{name} / underlay throughput"),
                            &p.tput_ratios(u),
                            Some(Target::AtLeast(target)),
                        ));
                    }
                }
                // Ratios reported for context, with no target.
                let compare = |label: &str, a: &str, b: &str| {
                    ratio_pair(label, path_named(&v, a), path_named(&v, b))
                };
                rows.extend(compare(
                    "beeline direct / kernel routing",
                    "beeline direct",
                    "kernel routing",
                ));
                if let Some(k) = path_named(&v, "kernel vxlan") {
                    rows.push(ratio_row(
                        "kernel vxlan / underlay throughput",
                        &k.tput_ratios(u),
                        None,
                    ));
                }
                rows.extend(compare(
                    "beeline vxlan / kernel vxlan",
                    "beeline vxlan",
                    "kernel vxlan",
                ));
                rows.extend(compare(
                    "beeline vxlan: program / device encap",
                    "beeline vxlan",
                    "beeline vxlan, device encap",
                ));
                md.push('\n');
                md.push_str(&table(&RATIO_HEADERS, rows));
            }
            out.sections.push((4, md));
            out.json.push((
                "phase4_cross_node".into(),
                json!({ "paths": paths_json(&v, "underlay") }),
            ));
            Ok(out)
        })();
        out.absorb_phase("4", result);
    }
    if want(6) {
        let direct: Vec<&Node> = setup.direct.nodes.iter().collect();
        let vxlan: Vec<&Node> = setup.vxlan.nodes.iter().collect();
        for (key, label, nodes, path) in [
            ("phase6_direct", "cross node, direct", &direct, &paths[2]),
            ("phase6_vxlan", "cross node, vxlan", &vxlan, &paths[3]),
        ] {
            match phase6(cfg, label, nodes, path) {
                Ok((v, cond)) => {
                    out.json.push((key.into(), v));
                    out.conditions.push(cond);
                }
                Err(e) => out.errors.push(format!("phase 6 ({label}): {e}")),
            }
        }
    }
    drop(paths);
    drop(setup);
    Ok(out)
}

// ---------------------------------------------------------------- phase 6

/// Program name -> ids of the programs attached to `nodes`: through their
/// pinned links (uplink, VXLAN device) and the pod veths' tc filters.
fn program_ids(nodes: &[&Node]) -> R<BTreeMap<String, BTreeSet<u32>>> {
    use aya::programs::links::{FdLink, PinnedLink};
    let mut out: BTreeMap<String, BTreeSet<u32>> = BTreeMap::new();
    for node in nodes {
        for veth in node.pod_veths() {
            if let Some(id) = node.ns.ingress_filter_program_id(&veth) {
                out.entry(program_names::FROM_POD.to_string())
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
fn phase6(cfg: &Cfg, label: &str, nodes: &[&Node], path: &Path2) -> R<(Value, (String, Value))> {
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

fn phase6_section(json: &serde_json::Map<String, Value>) -> Option<String> {
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

// ---------------------------------------------------------------- phase 5

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
fn log_seconds(ts: &str) -> Option<f64> {
    let t = ts.split('T').nth(1)?.trim_end_matches('Z');
    let mut it = t.split(':');
    let h: f64 = it.next()?.parse().ok()?;
    let m: f64 = it.next()?.parse().ok()?;
    let s: f64 = it.next()?.split('+').next()?.parse().ok()?;
    Some(h * 3600.0 + m * 60.0 + s)
}

/// Agent-side time from "node list file changed" (after reading and
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
        if msg == "node list file changed" {
            changed = (v["fields"]["nodes"].as_u64() == Some(nodes as u64))
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

fn vm_kib(pid: u32, key: &str) -> Option<f64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find(|l| l.starts_with(key))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn phase_scale(cfg: &Cfg) -> R<Output> {
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
        let mut dp = Datapath::load(&bpffs.path, false).map_err(|e| format!("{e:#}"))?;
        load_s.push(t.elapsed().as_secs_f64());
        let empty = BTreeMap::new();
        for _ in 0..cfg.reps {
            check_interrupted()?;
            let t = Instant::now();
            dp.sync_remote(&desired).map_err(|e| format!("{e:#}"))?;
            sync_add.push(t.elapsed().as_secs_f64());
            let t = Instant::now();
            dp.sync_remote(&desired).map_err(|e| format!("{e:#}"))?;
            sync_noop.push(t.elapsed().as_secs_f64());
            let t = Instant::now();
            dp.sync_remote(&empty).map_err(|e| format!("{e:#}"))?;
            sync_del.push(t.elapsed().as_secs_f64());
        }
        for _ in 0..cfg.reps {
            check_interrupted()?;
            let ips: Vec<Ipv4Addr> = (0..cfg.endpoints as u32)
                .map(|i| Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 200, 0, 0)) + i))
                .collect();
            let t = Instant::now();
            for (i, ip) in ips.iter().enumerate() {
                dp.upsert_endpoint(
                    *ip,
                    Endpoint {
                        host_ifindex: 1000 + i as u32,
                        pod_mac: [0x02, 0, 0, 0, (i >> 8) as u8, i as u8],
                        host_mac: [0x02, 1, 0, 0, (i >> 8) as u8, i as u8],
                    },
                )
                .map_err(|e| format!("endpoint {i} of {}: {e:#}", cfg.endpoints))?;
            }
            ep_insert.push(t.elapsed().as_secs_f64());
            let t = Instant::now();
            ep_count = dp.endpoint_entries().map_err(|e| format!("{e:#}"))?.len();
            ep_dump.push(t.elapsed().as_secs_f64());
            let t = Instant::now();
            for ip in &ips {
                dp.remove_endpoint(*ip).map_err(|e| format!("{e:#}"))?;
            }
            ep_remove.push(t.elapsed().as_secs_f64());
        }
        let scratch_ns = NetNs::new("blm");
        let pod_cidr: Ipv4Net = POD_CIDR.parse().unwrap();
        let apply = |n: usize| scratch_ns.enter(|| masquerade::apply(pod_cidr, &exceptions[..n]));
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
            let ok = eventually_every(Duration::from_secs(30), Duration::from_millis(5), || {
                remote_count(&node.bpffs.path) == count
            });
            if !ok {
                return Err(format!(
                    "the agent did not reach {count} remote CIDRs in 30 s (has {})",
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
                "`masquerade::apply`: nftables table with {} exceptions",
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
            "datapath load (3 programs through the verifier, maps pinned)".into(),
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

// ---------------------------------------------------------------- dates

/// Today's date (UTC), YYYY-MM-DD.
fn today() -> String {
    let days = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() / 86400) as i64;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}
