//! Phase 7: Services. One node, a client pod and a backend pod. The client
//! reaches the backend by its pod IP, through a ClusterIP Beeline's socket
//! hooks translate (`--kube-proxy-replacement`, the client in the agent's
//! cgroup) and through a ClusterIP kube-proxy's iptables rules DNAT (the
//! client outside that cgroup, so Beeline leaves it to the stack), with 10
//! and then 10,000 Services (3 endpoints each) loaded into both. The agent's
//! side of the 10,000: time from the file to the maps, and its RSS.
use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use beeline_tests::{
    NetNs, Node, bin, eventually_every,
    kube_proxy::{
        NodeSettings, Protocol, ProxyMode, Service, ServiceEndpoint, ServicePort, install_guarded,
        synthetic_services,
    },
    service_lb::{Cgroup, Endpoint, Port, ServiceSpec, ServicesFile},
};
use serde_json::{Value, json};

use crate::{
    Cfg, NODE_IP, R, TARGET_SYNC_S,
    cni::{beeline_node, beeline_plugin},
    machine::{check_interrupted, measured, step},
    process::run_timeout,
    report::{Output, f1, ratio, table, yes_no},
    same_node::netns_sysctl,
    scale::{log_seconds, vm_kib},
    stats::{median, paired, rel_spread, round3},
    traffic::{Path2, Via, check_paths, measured_traffic, paths_json, traffic_table},
};

const BEELINE_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const KUBE_PROXY_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 11);
/// Service port = target port: iperf3, sockperf.
const BEELINE_PORTS: [u16; 2] = [15201, 15202];
const KUBE_PROXY_PORTS: [u16; 2] = [15211, 15212];
/// The connection-rate servers, one per path (pod IP, Beeline's Service,
/// kube-proxy's), so no two paths share a connection tuple: the Services
/// map port 80 to theirs.
const CONN_PORTS: [u16; 3] = [15300, 15301, 15302];
const SERVICE_COUNTS: [usize; 2] = [10, 10_000];
const ENDPOINTS_EACH: usize = 3;
const TARGET_SERVICES_RSS_MB: f64 = 50.0;

const POD_IP: &str = "pod IP";
const BEELINE: &str = "beeline ClusterIP";
const KUBE_PROXY: &str = "kube-proxy ClusterIP";

/// `n` Services: the two the clients use, the rest synthetic.
fn bench_services(n: usize, backend: Ipv4Addr) -> Vec<Service> {
    let mut v = synthetic_services(n.saturating_sub(2), ENDPOINTS_EACH);
    let svc = |name: &str, vip: Ipv4Addr, ports: [u16; 2], conn: u16| Service {
        namespace: "default".into(),
        name: name.into(),
        cluster_ip: vip,
        ports: [
            ("iperf3", ports[0], ports[0]),
            ("sockperf", ports[1], ports[1]),
            ("conn", 80, conn),
        ]
        .into_iter()
        .map(|(name, port, target_port)| ServicePort {
            name: name.into(),
            protocol: Protocol::Tcp,
            port,
            target_port,
            node_port: None,
        })
        .collect(),
        endpoints: vec![ServiceEndpoint {
            ip: backend,
            local: true,
            ready: true,
        }],
        external_traffic_policy_local: false,
        session_affinity_seconds: None,
    };
    v.push(svc(
        "bench-beeline",
        BEELINE_VIP,
        BEELINE_PORTS,
        CONN_PORTS[1],
    ));
    v.push(svc(
        "bench-kube-proxy",
        KUBE_PROXY_VIP,
        KUBE_PROXY_PORTS,
        CONN_PORTS[2],
    ));
    v
}

/// The same Services as the agent reads them (Service + EndpointSlice).
fn specs(services: &[Service], node: &str) -> Vec<ServiceSpec> {
    services
        .iter()
        .map(|s| {
            let mut spec = ServiceSpec::new(
                &format!("{}-{}", s.namespace, s.name),
                s.cluster_ip,
                s.ports
                    .iter()
                    .map(|p| Port {
                        name: match p.name.as_str() {
                            "iperf3" => "iperf3",
                            "sockperf" => "sockperf",
                            "conn" => "conn",
                            _ => "http",
                        },
                        protocol: "TCP",
                        port: p.port,
                        target_port: p.target_port,
                        named_target: None,
                        node_port: None,
                    })
                    .collect(),
            );
            spec.endpoints = s
                .endpoints
                .iter()
                .map(|e| Endpoint::ready(e.ip, if e.local { node } else { "elsewhere" }))
                .collect();
            spec
        })
        .collect()
}

/// Accepts connections one at a time, answers "who" with its address and
/// waits for the client to close first (TIME_WAIT stays with the client,
/// which reuses it: `tcp_tw_reuse`).
struct ConnServer {
    stop: Arc<AtomicBool>,
    addr: SocketAddr,
    ns_path: std::path::PathBuf,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ConnServer {
    fn start(ns: &NetNs, ip: Ipv4Addr, port: u16) -> R<ConnServer> {
        let listener = ns
            .enter(|| TcpListener::bind((ip, port)))
            .map_err(|e| format!("bind {ip}:{port}: {e}"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let done = stop.clone();
        let answer = ip.to_string();
        let thread = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if done.load(Ordering::Relaxed) {
                    return;
                }
                if let Ok(mut c) = conn {
                    // A lost connection must not stall the ones behind it.
                    let _ = c.set_read_timeout(Some(Duration::from_secs(1)));
                    let mut buf = [0u8; 64];
                    if matches!(c.read(&mut buf), Ok(n) if n > 0)
                        && c.write_all(answer.as_bytes()).is_ok()
                    {
                        let _ = c.read(&mut buf);
                    }
                }
            }
        });
        Ok(ConnServer {
            stop,
            addr: SocketAddr::from((ip, port)),
            ns_path: ns.path(),
            thread: Some(thread),
        })
    }
}

impl Drop for ConnServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wake the blocking accept from inside the server's namespace.
        let addr = self.addr;
        let path = self.ns_path.clone();
        let _ = std::thread::spawn(move || {
            let f = std::fs::File::open(&path).ok()?;
            nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).ok()?;
            TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()
        })
        .join();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One node with `--kube-proxy-replacement`, a client and a backend pod.
struct Setup {
    client: (NetNs, Ipv4Addr),
    backend: (NetNs, Ipv4Addr),
    node: Node,
    cgroup: Cgroup,
    file: ServicesFile,
}

impl Setup {
    fn new() -> R<Setup> {
        let cgroup = Cgroup::new();
        let file = ServicesFile::new();
        let node = beeline_node(&[
            "--mode",
            "direct",
            "--log-format",
            "json",
            "--kube-proxy-replacement",
            &cgroup.arg(),
            &file.arg(),
        ]);
        let (client, backend) = {
            let plugin = beeline_plugin(&node);
            let c = NetNs::new("blp");
            let cip = plugin.add_pod(&c, "bench-svc-client")?;
            let b = NetNs::new("blp");
            let bip = plugin.add_pod(&b, "bench-svc-backend")?;
            ((c, cip), (b, bip))
        };
        // Many short connections from one client: reuse TIME_WAIT ports.
        netns_sysctl(&client.0, "net.ipv4.tcp_tw_reuse", "1");
        netns_sysctl(&client.0, "net.ipv4.ip_local_port_range", "1024 65000");
        Ok(Setup {
            client,
            backend,
            node,
            cgroup,
            file,
        })
    }

    fn paths(&self, kube_proxy: bool) -> Vec<Path2<'_>> {
        let path = |name, via| Path2 {
            name,
            server: &self.backend.0,
            ip: self.backend.1,
            client: &self.client.0,
            via,
        };
        let mut v = vec![
            path(POD_IP, None),
            path(
                BEELINE,
                Some(Via {
                    addr: BEELINE_VIP,
                    ports: BEELINE_PORTS,
                    cgroup: Some(&self.cgroup),
                }),
            ),
        ];
        if kube_proxy {
            v.push(path(
                KUBE_PROXY,
                Some(Via {
                    addr: KUBE_PROXY_VIP,
                    ports: KUBE_PROXY_PORTS,
                    cgroup: None,
                }),
            ));
        }
        v
    }

    /// Where each path's client connects for the connection rate.
    fn conn_target(&self, name: &str) -> SocketAddr {
        match name {
            BEELINE => SocketAddr::from((BEELINE_VIP, 80)),
            KUBE_PROXY => SocketAddr::from((KUBE_PROXY_VIP, 80)),
            _ => SocketAddr::from((self.backend.1, CONN_PORTS[0])),
        }
    }

    /// New connections per second over one `seconds` run (one at a time).
    fn conn_rate(&self, name: &str, seconds: f64) -> R<f64> {
        let mut cmd = if name == BEELINE {
            self.cgroup.cmd(&self.client.0, bin("beeline-probe"))
        } else {
            self.client.0.cmd(bin("beeline-probe"))
        };
        let out = run_timeout(
            cmd.args(["load", &self.conn_target(name).to_string()])
                .args(["--seconds", &seconds.to_string(), "--parallel", "1"]),
            Duration::from_secs_f64(seconds + 30.0),
        )
        .map_err(|e| format!("{name}: {e}"))?;
        let v: Value = serde_json::from_str(&out).map_err(|e| format!("{name}: {e}: {out}"))?;
        let ok: u64 = v["answers"]
            .as_object()
            .map(|o| o.values().filter_map(Value::as_u64).sum())
            .unwrap_or(0);
        let failed = v["failures"].as_array().map_or(0, Vec::len);
        if ok == 0 || failed > 0 {
            return Err(format!(
                "{name}: {ok} connections answered, {failed} failed: {}",
                v["failures"]
            ));
        }
        Ok(ok as f64 / seconds)
    }

    /// Writes `services` into the agent's file; returns (agent-side seconds
    /// from reading the file to the maps written, wall seconds from the
    /// write until then).
    fn load_into_agent(&self, services: &[Service]) -> R<(f64, f64)> {
        let agent = self.node.agent.as_ref().ok_or("no agent")?;
        let objects = 2 * services.len() as u64;
        let seen_before = agent.log_text().lines().count();
        let t = Instant::now();
        self.file.write(&specs(services, &self.node.name));
        let mut found = None;
        let done = eventually_every(Duration::from_secs(120), Duration::from_millis(20), || {
            found = sync_seconds(&agent.log_text(), seen_before, objects);
            found.is_some()
        });
        let wall = t.elapsed().as_secs_f64();
        match (done, found) {
            (true, Some(s)) => Ok((s, wall)),
            _ => Err(format!(
                "the agent did not write {} Services into its maps within 120 s",
                services.len()
            )),
        }
    }
}

/// Agent-side time between "input file changed" (with `objects` objects)
/// and the next "Service maps updated", in the log after line `skip`.
fn sync_seconds(log: &str, skip: usize, objects: u64) -> Option<f64> {
    let mut changed = None;
    for line in log.lines().skip(skip) {
        let Ok(v) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        let msg = v["fields"]["message"].as_str().unwrap_or("");
        let ts = v["timestamp"].as_str().and_then(log_seconds);
        if msg == "input file changed" && v["fields"]["objects"].as_u64() == Some(objects) {
            changed = ts;
        } else if msg == "Service maps updated"
            && let (Some(c), Some(t)) = (changed, ts)
        {
            let d = t - c;
            return Some(if d < 0.0 { d + 86400.0 } else { d });
        }
    }
    None
}

/// Connection rates of every path, taking turns, `rounds` of 1 s each.
fn conn_rates(setup: &Setup, names: &[&str], rounds: usize) -> R<Vec<Vec<f64>>> {
    let mut out = vec![Vec::new(); names.len()];
    for round in 0..rounds {
        for k in 0..names.len() {
            let i = (k + round) % names.len();
            check_interrupted()?;
            out[i].push(setup.conn_rate(names[i], 1.0)?);
        }
    }
    Ok(out)
}

pub(crate) fn phase_services(cfg: &Cfg) -> R<Output> {
    step("phase 7: Services (Beeline's socket load balancing, kube-proxy's iptables rules)");
    let setup = Setup::new()?;
    let kube_proxy = cfg.tools.iptables_restore;
    let _servers = CONN_PORTS
        .iter()
        .map(|port| ConnServer::start(&setup.backend.0, setup.backend.1, *port))
        .collect::<R<Vec<_>>>()?;
    let paths = setup.paths(kube_proxy);
    check_paths(&paths)?;
    let names: Vec<&str> = paths.iter().map(|p| p.name).collect();
    let settings = NodeSettings {
        node_ips: vec![NODE_IP],
        cluster_cidr: Some("10.244.0.0/16".parse().unwrap()),
        service_cidrs: vec!["10.96.0.0/12".parse().unwrap()],
        ..NodeSettings::default()
    };
    let mut out = Output::default();
    let mut md = format!(
        "## 7. Services\n\n\
         One node (`--mode direct --kube-proxy-replacement`), a client and a backend pod. The \
         client reaches the backend by its pod IP (`{POD_IP}`), through a ClusterIP that \
         Beeline's `connect()`/`sendmsg()` hooks translate (`{BEELINE}`: the client runs in the \
         agent's cgroup) and through a ClusterIP that kube-proxy's iptables rules DNAT \
         (`{KUBE_PROXY}`: rules in kube-proxy's exact shapes from `tests/src/kube_proxy/`, the \
         client outside Beeline's cgroup, so its packets go through the host's netfilter). Both \
         hold the same Services: the two the client uses plus synthetic ones with \
         {ENDPOINTS_EACH} endpoints each. Throughput and RTT use one long connection (the \
         translation happens once); the connection rate is `beeline-probe load --parallel 1` \
         (connect, ask, read, close; one at a time; a server per path, so no two paths share a connection tuple) for 1 s, paths taking turns.\n\n"
    );
    let mut json_counts = serde_json::Map::new();
    let mut scale_rows = Vec::new();
    for n in SERVICE_COUNTS {
        let services = bench_services(n, setup.backend.1);
        step(&format!("phase 7: {n} Services"));
        let (agent_s, wall_s) = setup.load_into_agent(&services)?;
        let rules = if kube_proxy {
            Some(
                install_guarded(
                    &setup.node.ns.name,
                    ProxyMode::Iptables,
                    &services,
                    &settings,
                )
                .map_err(|e| format!("kube-proxy rules: {e:#}"))?,
            )
        } else {
            None
        };
        let pid = setup.node.agent.as_ref().map(|a| a.pid()).unwrap_or(0);
        let rss = vm_kib(pid, "VmRSS:").map(|k| k / 1024.0);
        let hwm = vm_kib(pid, "VmHWM:").map(|k| k / 1024.0);
        let restore_s = rules.as_ref().map(|r| r.report.load_time.as_secs_f64());
        scale_rows.push(vec![
            n.to_string(),
            format!("{:.3}", agent_s),
            format!("{:.2}", wall_s),
            restore_s.map_or("–".into(), |s| format!("{s:.2}")),
            f1(rss),
            f1(hwm),
        ]);
        // A Service path's client runs in a cgroup: only as a process.
        let v = if cfg.tools.iperf3 && cfg.tools.sockperf {
            let (v, cond) = measured_traffic(cfg, &format!("7 services {n}"), &paths, POD_IP)?;
            out.conditions.push(cond);
            v
        } else {
            out.notes
                .push("phase 7: throughput and RTT need iperf3 and sockperf; not measured".into());
            Vec::new()
        };
        let rounds = cfg.tput_rounds * cfg.reps;
        let (rates, cond) = measured(
            cfg,
            &format!("7 connections {n}"),
            || conn_rates(&setup, &names, rounds),
            |r: &Vec<Vec<f64>>| {
                (1..r.len())
                    .map(|i| (i, rel_spread(&paired(&r[i], &r[0]))))
                    .find(|(_, s)| *s > 0.15)
                    .map(|(i, s)| {
                        format!(
                            "{} / {POD_IP} connection rate varies {:.0} %",
                            names[i],
                            s * 100.0
                        )
                    })
            },
            |r| json!(r.iter().map(|x| round3(x)).collect::<Vec<_>>()),
        )?;
        out.conditions.push(cond);
        md.push_str(&format!("### {n} Services\n\n"));
        if !v.is_empty() {
            md.push_str(&traffic_table(&v, POD_IP));
            md.push('\n');
        }
        md.push_str(&conn_table(&names, &rates));
        md.push('\n');
        json_counts.insert(
            n.to_string(),
            json!({
                "paths": paths_json(&v, POD_IP),
                "connections_per_second": names.iter().zip(&rates).map(|(name, r)| (name.to_string(), json!({
                    "per_run": round3(r),
                    "median": median(r),
                    "vs_pod_ip_median": median(&paired(r, &rates[0])),
                }))).collect::<serde_json::Map<_, _>>(),
                "agent_sync_seconds": agent_s,
                "wall_seconds_from_file_write": wall_s,
                "kube_proxy_iptables_restore_seconds": restore_s,
                "agent_rss_mb": rss,
                "agent_vmhwm_mb": hwm,
            }),
        );
        drop(rules);
    }
    let last = scale_rows.last().cloned().unwrap_or_default();
    let synced: f64 = last.get(1).and_then(|s| s.parse().ok()).unwrap_or(f64::NAN);
    let rss: f64 = last.get(4).and_then(|s| s.parse().ok()).unwrap_or(f64::NAN);
    md.push_str(&format!(
        "### Into the maps\n\n\
         The agent re-reads its `--services-file` when the mtime changes (polled every \
         500 ms). Agent-side = from its \"input file changed\" log line to \"Service maps \
         updated\" (parse, `desired_frontends`, write backends, slots and frontends); wall = from \
         the file write, poll included. kube-proxy = its `iptables-restore` calls for the same \
         Services (rendering excluded). RSS after each load; VmHWM is the peak.\n\n{}\n\
         10,000 Services × {ENDPOINTS_EACH} endpoints into the maps in {:.3} s (target ≤ \
         {TARGET_SYNC_S:.1} s: {}); agent RSS {:.1} MB (target ≤ {TARGET_SERVICES_RSS_MB:.0} \
         MB: {}).\n",
        table(
            &[
                "Services",
                "agent-side s",
                "wall s",
                "kube-proxy iptables-restore s",
                "agent RSS MB",
                "agent VmHWM MB",
            ],
            scale_rows,
        ),
        synced,
        yes_no(synced <= TARGET_SYNC_S),
        rss,
        yes_no(rss <= TARGET_SERVICES_RSS_MB),
    ));
    out.sections.push((7, md));
    out.json
        .push(("phase7_services".into(), Value::Object(json_counts)));
    drop(paths);
    Ok(out)
}

fn conn_table(names: &[&str], rates: &[Vec<f64>]) -> String {
    let rows = names
        .iter()
        .zip(rates)
        .map(|(name, r)| {
            vec![
                name.to_string(),
                format!("{:.0}", median(r)),
                ratio(median(&paired(r, &rates[0]))),
            ]
        })
        .collect();
    table(
        &["path", "connections/s (median)", &format!("vs {POD_IP}")],
        rows,
    )
}
