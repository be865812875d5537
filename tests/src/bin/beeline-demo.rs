//! `cargo xtask demo`: a simulated 3-node cluster on this machine. Node
//! namespaces on a bridged underlay, one agent each, two pods per node made
//! by executing the CNI binary, then what a user wants to see.
use std::{
    path::PathBuf,
    process::Command,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use beeline_tests::{Cluster, Pod, tcp_throughput};
use serde_json::{Value, json};

const STATE_FILE: &str = "/run/beeline-demo.json";
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let keep = args.iter().any(|a| a == "--keep");
    let down = args.iter().any(|a| a == "--down");
    let mode = args
        .iter()
        .position(|a| a == "--mode")
        .and_then(|i| args.get(i + 1).cloned())
        .unwrap_or_else(|| "auto".into());
    if !nix::unistd::geteuid().is_root() {
        eprintln!("the demo creates network namespaces and loads eBPF: run it as root");
        std::process::exit(1);
    }
    if down {
        std::process::exit(if tear_down() { 0 } else { 1 });
    }
    if std::path::Path::new(STATE_FILE).exists() {
        eprintln!("a demo cluster is still up (kept with --keep): `cargo xtask demo --down` first");
        std::process::exit(1);
    }
    ctrlc::set_handler(|| {
        eprintln!("\ninterrupted: cleaning up");
        INTERRUPTED.store(true, Ordering::SeqCst);
    })
    .expect("install the Ctrl-C handler");
    if let Err(e) = run(keep, &mode) {
        eprintln!("demo stopped: {e}");
        std::process::exit(1);
    }
}

fn step(msg: &str) -> Result<(), String> {
    check_interrupted()?;
    eprintln!("\x1b[1;34m==>\x1b[0m {msg}");
    Ok(())
}

fn check_interrupted() -> Result<(), String> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        return Err("interrupted".into());
    }
    Ok(())
}

fn run(keep: bool, mode: &str) -> Result<(), String> {
    let started = Instant::now();
    step("creating 3 node namespaces on a bridged underlay (192.168.100.0/24)")?;
    let mut cluster = Cluster::new(3);
    step(&format!(
        "starting one beeline-agent per node (--mode {mode}), fed by a generated NodeList"
    ))?;
    cluster.start(&["--mode", mode]);

    step("creating 2 pods per node by executing the CNI binary (CNI_COMMAND=ADD)")?;
    let mut pods: Vec<(usize, Pod)> = Vec::new();
    for (i, node) in cluster.nodes.iter().enumerate() {
        for _ in 0..2 {
            let t = Instant::now();
            let pod = Pod::add(node, "1.1.0");
            eprintln!(
                "    {} on node{} -> {} ({:.1} ms)",
                pod.container_id,
                i + 1,
                pod.ip,
                t.elapsed().as_secs_f64() * 1e3
            );
            pods.push((i, pod));
        }
    }

    println!("\nPods");
    println!(
        "{:<8} {:<22} {:<14} {:<16}",
        "NODE", "POD", "IP", "HOST VETH"
    );
    for (i, pod) in &pods {
        println!(
            "{:<8} {:<22} {:<14} {:<16}",
            format!("node{}", i + 1),
            pod.container_id,
            pod.ip,
            pod.host_ifname
        );
    }

    step("ping matrix (3 echo requests per pair)")?;
    println!("\nPing matrix: average RTT in ms (rows: from, columns: to)");
    print!("{:<14}", "");
    for (_, b) in &pods {
        print!("{:>12}", b.ip);
    }
    println!();
    let mut lost = 0;
    for (_, a) in &pods {
        print!("{:<14}", a.ip);
        for (_, b) in &pods {
            if a.ip == b.ip {
                print!("{:>12}", "-");
                continue;
            }
            match a.ns.ping_rtt(b.ip, 3) {
                Some(rtt) => print!("{rtt:>12.3}"),
                None => {
                    lost += 1;
                    print!("{:>12}", "LOST");
                }
            }
        }
        println!();
        check_interrupted()?;
    }
    println!(
        "{}",
        if lost == 0 {
            "all 30 pairs reachable".to_string()
        } else {
            format!("{lost} pairs unreachable")
        }
    );

    step("TCP throughput, 2 s each")?;
    let (a, b, c) = (&pods[0].1, &pods[1].1, &pods[2].1);
    let same = tcp_throughput(&b.ns, b.ip, &a.ns, Duration::from_secs(2))?;
    let cross = tcp_throughput(&c.ns, c.ip, &a.ns, Duration::from_secs(2))?;
    println!("\nThroughput");
    println!("  same node   {} -> {}: {same:6.2} Gbit/s", a.ip, b.ip);
    println!(
        "  cross node  {} -> {}: {cross:6.2} Gbit/s ({mode})",
        a.ip, c.ip
    );

    let node1 = &cluster.nodes[0];
    step("node1's endpoint map, as bpftool prints it")?;
    let map = node1.bpffs.path.join("BEELINE_ENDPOINTS");
    match Command::new("bpftool")
        .args(["map", "dump", "pinned"])
        .arg(&map)
        .output()
    {
        Ok(out) if out.status.success() => print!("\n{}", String::from_utf8_lossy(&out.stdout)),
        _ => println!(
            "(bpftool not installed; `apt-get install bpftool` to see {})",
            map.display()
        ),
    }
    step("node1's counters (beeline-agent stats) and remote CIDRs (beeline-agent nodes)")?;
    for sub in ["stats", "nodes"] {
        let out = Command::new(beeline_tests::bin("beeline-agent"))
            .args([sub, "--bpffs-dir"])
            .arg(&node1.bpffs.path)
            .output()
            .map_err(|e| e.to_string())?;
        println!("\n{}", String::from_utf8_lossy(&out.stdout));
    }
    eprintln!("demo took {:.1} s", started.elapsed().as_secs_f64());

    if keep {
        keep_up(cluster, pods)?;
    } else {
        step("cleaning up (DEL every pod, stop the agents, remove namespaces and pins)")?;
        for (i, pod) in &pods {
            pod.del(&cluster.nodes[*i]);
        }
    }
    Ok(())
}

/// Leaves everything running and records it so `--down` can remove it.
fn keep_up(cluster: Cluster, pods: Vec<(usize, Pod)>) -> Result<(), String> {
    let mut netns: Vec<String> = vec![cluster.fabric.name.clone()];
    let mut dirs: Vec<PathBuf> = Vec::new();
    let mut bpffs: Vec<PathBuf> = Vec::new();
    let mut pids: Vec<u32> = Vec::new();
    println!("\nThe cluster stays up. Enter a pod or a node with:");
    for node in &cluster.nodes {
        netns.push(node.ns.name.clone());
        dirs.push(node.dir.path().to_path_buf());
        bpffs.push(node.bpffs.path.clone());
        pids.extend(node.agent.as_ref().map(|a| a.pid()));
    }
    for (i, pod) in &pods {
        netns.push(pod.ns.name.clone());
        println!(
            "  nsenter --net=/run/netns/{}   # pod {} on node{}",
            pod.ns.name,
            pod.ip,
            i + 1
        );
    }
    for (i, node) in cluster.nodes.iter().enumerate() {
        println!(
            "  nsenter --net=/run/netns/{}   # node{} (agent socket {})",
            node.ns.name,
            i + 1,
            node.socket().display()
        );
    }
    println!("Remove it with: sudo cargo xtask demo --down");
    let state = json!({ "netns": netns, "dirs": dirs, "bpffs": bpffs, "agent_pids": pids });
    std::fs::write(STATE_FILE, serde_json::to_vec_pretty(&state).unwrap())
        .map_err(|e| e.to_string())?;
    // Everything now belongs to the state file, not to this process.
    std::mem::forget(pods);
    std::mem::forget(cluster);
    Ok(())
}

fn tear_down() -> bool {
    let Ok(bytes) = std::fs::read(STATE_FILE) else {
        eprintln!("no demo cluster is up ({STATE_FILE} does not exist)");
        return true;
    };
    let state: Value = serde_json::from_slice(&bytes).unwrap_or_default();
    let list = |k: &str| -> Vec<String> {
        state[k]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    };
    for pid in state["agent_pids"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p.as_u64())
    {
        // Only the agents this demo started: check the pid still is one.
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains("beeline-agent") {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
    }
    std::thread::sleep(Duration::from_millis(300));
    // Pod namespaces first (their veths go with them), then nodes and fabric.
    for ns in list("netns").iter().rev() {
        let _ = Command::new("ip").args(["netns", "del", ns]).status();
    }
    for dir in list("bpffs").into_iter().chain(list("dirs")) {
        let _ = std::fs::remove_dir_all(dir);
    }
    let _ = std::fs::remove_file(STATE_FILE);
    eprintln!("demo cluster removed");
    true
}
