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
//! 6. CPU cost per packet of each tc program and verifier instruction counts;
//! 7. Services: pod IP vs a ClusterIP through Beeline's socket hooks vs one
//!    through kube-proxy's iptables rules, with 10 and 10,000 Services, and
//!    10,000 Services into the agent's maps.
//!
//! Writes `bench/results/<date>.json` (raw samples and summaries) and
//! `<date>.md` (`<date>-quick.*` with `--quick`), prints the Markdown.
//! Everything it creates in the kernel lives in namespaces, bpffs dirs and
//! processes owned by guards, so every exit path (error, panic, Ctrl-C)
//! removes it.
//!
//! Layout: a module per phase (`setup_cost` 1, `same_node` 2 with the
//! `floor` contender, `rules` 3, `cross_node` 4, `scale` 5, `cpu_cost` 6, `services` 7),
//! and what they share: `cni` (the plugins as a runtime runs them), `traffic`
//! (throughput and latency between two namespaces), `machine` (machine state
//! and the quiet-machine rules), `process` (child processes), `stats` and
//! `report` (Markdown and JSON output).
mod cni;
mod cpu_cost;
mod cross_node;
mod floor;
mod machine;
mod process;
mod report;
mod rules;
mod same_node;
mod scale;
mod services;
mod setup_cost;
mod stats;
mod traffic;

use std::{
    collections::BTreeSet,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use serde_json::json;

use crate::{
    cpu_cost::phase6_section,
    cross_node::cross_node_phases,
    machine::{leftovers, machine, on_path, step},
    report::{Report, guarded, write_results},
    same_node::same_node_phases,
    scale::phase_scale,
    services::phase_services,
    setup_cost::phase_setup_cost,
};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

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
            "beeline-bench [--quick] [--phases 1,2,3,4,5,6,7] [--out DIR]\n\
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
        .unwrap_or_else(|| (1..=7).collect());
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
    if want(7) {
        guarded(&mut report, "7", || phase_services(cfg));
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
