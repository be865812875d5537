//! `cargo xtask demo`: a simulated 3-node cluster on this machine. Node
//! namespaces on a bridged underlay, one agent each, two pods per node made
//! by executing the CNI binary, then what a user wants to see.
use std::{
    path::PathBuf,
    process::Command,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use beeline_tests::{
    Cluster, NetNs, Pod,
    service_lb::{
        Backend, Cgroup, Endpoint, Port, ServiceSpec, ServicesFile, TCP_PORT, services_of,
        start_replacing_kube_proxy,
    },
    tcp_throughput,
};
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
        "starting one beeline-agent per node (--mode {mode} --kube-proxy-replacement), fed by a \
         generated NodeList and Service list, each with a cgroup of its own"
    ))?;
    let services = ServicesFile::new();
    let cgroups = start_replacing_kube_proxy(&mut cluster, &services, &["--mode", mode]);

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

    let outside = cluster.external_host(OUTSIDE);
    let backends = service_demo(&cluster, &cgroups, &services, &pods[0].1, &outside)?;

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
        keep_up(cluster, pods, cgroups, outside, backends, services)?;
    } else {
        step("cleaning up (DEL every pod, stop the agents, remove namespaces and pins)")?;
        for (i, pod) in &pods {
            pod.del(&cluster.nodes[*i]);
        }
        drop(backends);
        drop(cluster);
    }
    Ok(())
}

const OUTSIDE: std::net::Ipv4Addr = std::net::Ipv4Addr::new(192, 168, 100, 200);
const CLUSTER_IP: std::net::Ipv4Addr = std::net::Ipv4Addr::new(10, 96, 0, 10);
const NODE_PORT: u16 = 30080;

/// A Service with backends on node2 and node3, reached by ClusterIP from a
/// pod on node1 and from node3 itself, and by NodePort from a host outside.
fn service_demo(
    cluster: &Cluster,
    cgroups: &[Cgroup],
    services: &ServicesFile,
    client: &Pod,
    outside: &NetNs,
) -> Result<Vec<Backend>, String> {
    step(
        "Service demo/echo: ClusterIP 10.96.0.10:80 and NodePort 30080, backends on node2 and node3",
    )?;
    let backends = vec![
        Backend::start(&cluster.nodes[1]),
        Backend::start(&cluster.nodes[2]),
    ];
    let spec = ServiceSpec {
        endpoints: backends
            .iter()
            .zip([1, 2])
            .map(|(b, i)| Endpoint::ready(b.pod.ip, &cluster.nodes[i].name))
            .collect(),
        ..ServiceSpec::new(
            "echo",
            CLUSTER_IP,
            vec![Port {
                name: "http",
                protocol: "TCP",
                port: 80,
                target_port: TCP_PORT,
                named_target: None,
                node_port: Some(NODE_PORT),
            }],
        )
    };
    services.write(&[spec]);
    let node1 = &cluster.nodes[0];
    let ready = beeline_tests::eventually(Duration::from_secs(10), || {
        services_of(&node1.bpffs.path, &node1.state_dir())
            .as_array()
            .is_some_and(|rows| rows.iter().any(|r| r["state"] == "ok"))
    });
    if !ready {
        return Err("the agents never translated the Service".into());
    }
    let clusterip = format!("{CLUSTER_IP}:80");
    println!(
        "
Service demo/echo (each answer is the backend pod's address)"
    );
    for (what, i, ns) in [
        (format!("pod {} on node1", client.ip), 0, &client.ns),
        (
            "node3 itself (a host process)".to_string(),
            2,
            &cluster.nodes[2].ns,
        ),
    ] {
        let answers: Vec<String> = (0..4)
            .map(|_| {
                let out = cgroups[i].probe(ns, &["tcp", &clusterip, "who"]);
                out["reply"].as_str().unwrap_or("FAILED").to_string()
            })
            .collect();
        println!("  {what:<32} -> {clusterip}: {}", answers.join(", "));
    }
    let nodeport = format!("{}:{NODE_PORT}", Cluster::node_ip(0));
    let answers: Vec<String> = (0..4)
        .map(|_| {
            let out = beeline_tests::run(
                outside
                    .cmd(beeline_tests::bin("beeline-probe"))
                    .args(["tcp", &nodeport, "who"]),
            );
            serde_json::from_slice::<Value>(&out.stdout).unwrap_or_default()["reply"]
                .as_str()
                .unwrap_or("FAILED")
                .to_string()
        })
        .collect();
    println!(
        "  {:<32} -> {nodeport}: {}",
        format!("host {OUTSIDE} outside the cluster"),
        answers.join(", ")
    );
    step("node1's Service maps (beeline-agent services)")?;
    let out = Command::new(beeline_tests::bin("beeline-agent"))
        .args(["services", "--bpffs-dir"])
        .arg(&node1.bpffs.path)
        .arg("--state-dir")
        .arg(node1.state_dir())
        .output()
        .map_err(|e| e.to_string())?;
    println!(
        "
{}",
        String::from_utf8_lossy(&out.stdout)
    );
    Ok(backends)
}

/// Leaves everything running and records it so `--down` can remove it.
/// The Service's backends answer only while this process runs: they stop,
/// the Service stays in the maps.
fn keep_up(
    cluster: Cluster,
    pods: Vec<(usize, Pod)>,
    cgroups: Vec<Cgroup>,
    outside: NetNs,
    backends: Vec<Backend>,
    services: ServicesFile,
) -> Result<(), String> {
    let mut netns: Vec<String> = vec![cluster.fabric.name.clone(), outside.name.clone()];
    let cgroup_dirs: Vec<PathBuf> = cgroups.iter().map(|c| c.path.clone()).collect();
    let mut dirs: Vec<PathBuf> = vec![services.path.parent().unwrap().to_path_buf()];
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
    for b in &backends {
        netns.push(b.pod.ns.name.clone());
    }
    let state = json!({ "netns": netns, "dirs": dirs, "bpffs": bpffs, "agent_pids": pids, "cgroups": cgroup_dirs });
    std::fs::write(STATE_FILE, serde_json::to_vec_pretty(&state).unwrap())
        .map_err(|e| e.to_string())?;
    // Everything now belongs to the state file, not to this process.
    std::mem::forget(pods);
    std::mem::forget(cluster);
    std::mem::forget(cgroups);
    std::mem::forget(outside);
    std::mem::forget(services);
    for b in backends {
        b.stop_serving();
    }
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
    for dir in list("cgroups") {
        let _ = std::fs::remove_dir(dir);
    }
    let _ = std::fs::remove_file(STATE_FILE);
    eprintln!("demo cluster removed");
    true
}
