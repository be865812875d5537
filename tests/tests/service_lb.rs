//! Issue: Beeline's own Service load balancing (`--kube-proxy-replacement`).
//! Two nodes, each agent with its socket programs on its own cgroup; the
//! clients are processes of a node (in a pod's netns or the node's, in the
//! node's cgroup), the way pods and node daemons are; the outside client is
//! a host on the nodes' network. No kube-proxy rule exists anywhere.
use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddr},
    time::{Duration, Instant},
};

use beeline_tests::{
    service_lb::{
        Backend, Cgroup, Endpoint, Port, ServiceSpec, ServicesFile, TCP_PORT, UDP_PORT,
        services_of, start_replacing_kube_proxy, tcp_request, udp_ask,
    },
    *,
};
use serde_json::Value;

const OUTSIDE: Ipv4Addr = Ipv4Addr::new(192, 168, 100, 200);
const BOTH: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const LOCAL_POLICY: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 11);
const REMOTE_ONLY: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 12);
const SAME_ONLY: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 13);
const EMPTY: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 14);
const STICKY: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 15);
const NODE_LOCAL: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 16);
const EXTERNAL_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
const NP_BOTH: u16 = 30080;
const NP_LOCAL: u16 = 30081;
const NP_REMOTE: u16 = 30082;
const NP_UDP: u16 = 30053;

fn ports(node_ports: (Option<u16>, Option<u16>)) -> Vec<Port> {
    vec![
        Port {
            name: "http",
            protocol: "TCP",
            port: 80,
            target_port: TCP_PORT,
            // The Service names its target port; the slice resolves it.
            named_target: Some("web"),
            node_port: node_ports.0,
        },
        Port {
            name: "dns",
            protocol: "UDP",
            port: 53,
            target_port: UDP_PORT,
            named_target: None,
            node_port: node_ports.1,
        },
    ]
}

struct Lb {
    cluster: Cluster,
    cgroups: Vec<Cgroup>,
    file: ServicesFile,
    outside: NetNs,
    a0: Pod,
    a1: Pod,
    b0: Backend,
    b1: Backend,
}

impl Lb {
    fn new(mode: &str) -> Lb {
        let mut cluster = Cluster::new(2);
        let outside = cluster.external_host(OUTSIDE);
        let file = ServicesFile::new();
        let cgroups = start_replacing_kube_proxy(
            &mut cluster,
            &file,
            &["--mode", mode, "--resync-period=1s"],
        );
        let (a0, a1) = (
            Pod::add(&cluster.nodes[0], "1.1.0"),
            Pod::add(&cluster.nodes[1], "1.1.0"),
        );
        let (b0, b1) = (
            Backend::start(&cluster.nodes[0]),
            Backend::start(&cluster.nodes[1]),
        );
        let lb = Lb {
            cluster,
            cgroups,
            file,
            outside,
            a0,
            a1,
            b0,
            b1,
        };
        lb.publish(&lb.services());
        lb
    }

    fn node_name(&self, i: usize) -> String {
        self.cluster.nodes[i].name.clone()
    }

    fn services(&self) -> Vec<ServiceSpec> {
        let (b0, b1) = (
            Endpoint::ready(self.b0.pod.ip, &self.node_name(0)),
            Endpoint::ready(self.b1.pod.ip, &self.node_name(1)),
        );
        let svc = |name: &str, ip, eps: Vec<Endpoint>, np| ServiceSpec {
            endpoints: eps,
            ..ServiceSpec::new(name, ip, ports(np))
        };
        vec![
            ServiceSpec {
                external_ips: vec![EXTERNAL_IP],
                ..svc(
                    "both",
                    BOTH,
                    vec![b0.clone(), b1.clone()],
                    (Some(NP_BOTH), Some(NP_UDP)),
                )
            },
            svc(
                "remote-only",
                REMOTE_ONLY,
                vec![b1.clone()],
                (Some(NP_REMOTE), None),
            ),
            svc("same-only", SAME_ONLY, vec![b0.clone()], (None, None)),
            ServiceSpec {
                external_local: true,
                ..svc(
                    "local-policy",
                    LOCAL_POLICY,
                    vec![b0.clone()],
                    (Some(NP_LOCAL), None),
                )
            },
            svc("empty", EMPTY, vec![], (None, None)),
            ServiceSpec {
                affinity_seconds: Some(60),
                ..svc("sticky", STICKY, vec![b0.clone(), b1.clone()], (None, None))
            },
            ServiceSpec {
                internal_local: true,
                ..svc("node-local", NODE_LOCAL, vec![b0, b1], (None, None))
            },
        ]
    }

    /// Writes the Services and waits until both agents translate them.
    fn publish(&self, services: &[ServiceSpec]) {
        self.file.write(services);
        let want: usize = services
            .iter()
            .filter(|s| !in_use(&s.endpoints).is_empty())
            .count();
        for node in &self.cluster.nodes {
            let ok = eventually(Duration::from_secs(10), || {
                let rows = services_of(&node.bpffs.path, &node.state_dir());
                let named: BTreeSet<String> = rows
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter(|r| r["state"] == "ok")
                    .filter_map(|r| {
                        r["service"]
                            .as_str()
                            .map(|s| s.split(':').next().unwrap().to_string())
                    })
                    .collect();
                named.len() >= want && same_backends(&rows, services)
            });
            assert!(
                ok,
                "{} never translated the Services: {:#}",
                node.name,
                services_of(&node.bpffs.path, &node.state_dir())
            );
        }
    }

    /// The probe as a process of node `i`, in `ns`.
    fn probe(&self, i: usize, ns: &NetNs, args: &[&str]) -> Value {
        self.cgroups[i].probe(ns, args)
    }

    fn tcp(&self, i: usize, ns: &NetNs, addr: SocketAddr, message: &str) -> Value {
        self.probe(i, ns, &["tcp", &addr.to_string(), message])
    }

    fn stats(&self, i: usize) -> Value {
        self.cluster.nodes[i].stats()
    }
}

/// Whether every Service's ClusterIP port 80 (socket scope) sends to exactly
/// the endpoints `services` put in use (a subset of them for node-local).
fn same_backends(rows: &Value, services: &[ServiceSpec]) -> bool {
    services.iter().all(|s| {
        let frontend = format!("{}:80", s.cluster_ip);
        let row = rows
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["frontend"] == frontend.as_str() && r["scope"] == "socket");
        let Some(row) = row else { return false };
        let have: BTreeSet<Ipv4Addr> = row["backends"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b.as_str().unwrap().parse::<SocketAddr>().unwrap())
            .map(|b| match b.ip() {
                std::net::IpAddr::V4(ip) => ip,
                other => panic!("{other}"),
            })
            .collect();
        let want = in_use(&s.endpoints);
        if s.internal_local {
            have.is_subset(&want)
        } else {
            have == want
        }
    })
}

/// The endpoints a Service sends to: the ready ones, or the serving
/// terminating ones while none is ready (KEP-1669).
fn in_use(endpoints: &[Endpoint]) -> BTreeSet<Ipv4Addr> {
    let pick = |f: fn(&Endpoint) -> bool| -> BTreeSet<Ipv4Addr> {
        endpoints.iter().filter(|e| f(e)).map(|e| e.ip).collect()
    };
    let ready = pick(|e| e.ready);
    if ready.is_empty() {
        pick(|e| e.serving && e.terminating)
    } else {
        ready
    }
}

fn at(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::from((ip, port))
}

/// Asks until every backend in `expect` answered; fails on an error.
fn reaches_all(lb: &Lb, i: usize, ns: &NetNs, addr: SocketAddr, expect: &[Ipv4Addr]) {
    let mut seen = BTreeSet::new();
    for _ in 0..40 {
        let out = lb.tcp(i, ns, addr, "who");
        let who = out["reply"]
            .as_str()
            .unwrap_or_else(|| panic!("{addr} from node {i}: {out}"));
        seen.insert(who.parse::<Ipv4Addr>().unwrap());
        if expect.iter().all(|e| seen.contains(e)) {
            return;
        }
    }
    panic!("{addr}: only {seen:?} of {expect:?} answered");
}

fn matrix(mode: &str) {
    let lb = Lb::new(mode);
    let (b0, b1) = (lb.b0.pod.ip, lb.b1.pod.ip);
    let before = lb.stats(0);

    // ClusterIP, TCP, from a pod: a backend on this node, on the other, both.
    for (ip, expect) in [
        (SAME_ONLY, vec![b0]),
        (REMOTE_ONLY, vec![b1]),
        (BOTH, vec![b0, b1]),
    ] {
        reaches_all(&lb, 0, &lb.a0.ns, at(ip, 80), &expect);
    }
    // The socket's peer is the Service, not the backend.
    let out = lb.tcp(0, &lb.a0.ns, at(REMOTE_ONLY, 80), "peer");
    assert_eq!(out["peer"], at(REMOTE_ONLY, 80).to_string(), "{out}");
    // The backend sees the client pod's own address: nothing was NATed.
    assert_eq!(out["reply"], lb.a0.ip.to_string(), "{out}");

    // UDP: answers come from the Service's address, connected or not.
    for ip in [SAME_ONLY, REMOTE_ONLY] {
        let out = lb.probe(0, &lb.a0.ns, &["udp", &at(ip, 53).to_string()]);
        assert_eq!(out["from"], at(ip, 53).to_string(), "{out}");
        let out = lb.probe(
            0,
            &lb.a0.ns,
            &["udp", &at(ip, 53).to_string(), "--connected"],
        );
        assert_eq!(out["from"], at(ip, 53).to_string(), "{out}");
        assert_eq!(out["peer"], at(ip, 53).to_string(), "{out}");
    }

    // Hairpin: a backend reaching its own Service.
    let out = lb.tcp(0, &lb.b0.pod.ns, at(SAME_ONLY, 80), "who");
    assert_eq!(out["reply"], b0.to_string(), "{out}");
    // The node itself (a host process) reaches ClusterIPs.
    let node0 = &lb.cluster.nodes[0];
    reaches_all(&lb, 0, &node0.ns, at(BOTH, 80), &[b0, b1]);
    let out = lb.probe(0, &node0.ns, &["udp", &at(REMOTE_ONLY, 53).to_string()]);
    assert_eq!(out["from"], at(REMOTE_ONLY, 53).to_string(), "{out}");
    // Pods reach NodePorts and external IPs by the socket path too.
    reaches_all(
        &lb,
        1,
        &lb.a1.ns,
        at(Cluster::node_ip(1), NP_BOTH),
        &[b0, b1],
    );
    reaches_all(&lb, 1, &lb.a1.ns, at(EXTERNAL_IP, 80), &[b0, b1]);

    // ClusterIP traffic took the one-hop path: the socket hook translated,
    // and the packets were redirected by from_pod.
    let after = lb.stats(0);
    let grew = |program: &str, verdict: &str| {
        after[program][verdict].as_u64().unwrap() > before[program][verdict].as_u64().unwrap()
    };
    assert!(grew("sock_connect", "translated"), "{after}");
    assert!(grew("sock_sendmsg", "translated"), "{after}");
    assert!(grew("sock_recvmsg", "reverse_translated"), "{after}");
    assert!(grew("sock_getpeername", "reverse_translated"), "{after}");
    assert!(grew("from_pod", "redirected_local"), "{after}");

    // From outside: NodePorts with externalTrafficPolicy Cluster reach
    // backends on any node, the backend sees the node's address.
    let outside = &lb.outside;
    for node in 0..2 {
        let ip = Cluster::node_ip(node);
        let out = tcp_request(outside, at(ip, NP_REMOTE), b"peer");
        assert_eq!(
            out.as_deref(),
            Ok(ip.to_string().as_str()),
            "NodePort on node {node}"
        );
        let out = udp_ask(outside, at(ip, NP_UDP));
        let (who, from) = out.unwrap_or_else(|e| panic!("UDP NodePort on node {node}: {e}"));
        assert!(who == b0.to_string() || who == b1.to_string(), "{who}");
        assert_eq!(from, at(ip, NP_UDP), "UDP answers come from the NodePort");
    }
    let mut seen = BTreeSet::new();
    for _ in 0..40 {
        seen.insert(tcp_request(outside, at(Cluster::node_ip(0), NP_BOTH), b"who").unwrap());
        if seen.len() == 2 {
            break;
        }
    }
    assert_eq!(seen.len(), 2, "NodePort reached only {seen:?}");
    // An external IP routed to node 1.
    outside.ip(&[
        "route",
        "add",
        &format!("{EXTERNAL_IP}/32"),
        "via",
        &Cluster::node_ip(1).to_string(),
    ]);
    let who = tcp_request(outside, at(EXTERNAL_IP, 80), b"who").expect("external IP");
    assert!(who == b0.to_string() || who == b1.to_string(), "{who}");
    // externalTrafficPolicy Local: the client's address is kept; a node
    // without a local endpoint refuses.
    let out = tcp_request(outside, at(Cluster::node_ip(0), NP_LOCAL), b"peer");
    assert_eq!(out.as_deref(), Ok(OUTSIDE.to_string().as_str()));
    let started = Instant::now();
    let refused = tcp_request(outside, at(Cluster::node_ip(1), NP_LOCAL), b"peer");
    assert!(
        refused.as_ref().is_err_and(|e| e.contains("refused"))
            && started.elapsed() < Duration::from_secs(2),
        "{refused:?} after {:?}",
        started.elapsed()
    );
    let lb_stats = lb.stats(0);
    assert!(
        lb_stats["service_lb"]["translated"].as_u64().unwrap() > 0,
        "{lb_stats}"
    );

    // And no kube-proxy anywhere.
    for node in &lb.cluster.nodes {
        let rules = run(node
            .ns
            .cmd("sh")
            .args(["-c", "nft list ruleset; iptables-save 2>/dev/null"]));
        assert!(
            !String::from_utf8_lossy(&rules.stdout).contains("KUBE-"),
            "a KUBE- rule exists on {}",
            node.name
        );
    }
}

#[test]
fn cluster_ips_and_node_ports_on_direct_routing() {
    matrix("direct");
}

#[test]
fn cluster_ips_and_node_ports_over_vxlan() {
    matrix("vxlan");
}

#[test]
fn no_endpoints_refuses_at_once_affinity_sticks_and_local_policy_stays_local() {
    let lb = Lb::new("direct");
    // No endpoints: refused at once, TCP and UDP, as kube-proxy's REJECT.
    let started = Instant::now();
    let out = lb.tcp(0, &lb.a0.ns, at(EMPTY, 80), "who");
    assert_eq!(out["kind"], "ConnectionRefused", "{out}");
    let out = lb.probe(0, &lb.a0.ns, &["udp", &at(EMPTY, 53).to_string()]);
    assert_eq!(out["kind"], "ConnectionRefused", "{out}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert!(
        lb.stats(0)["sock_connect"]["refused_no_endpoints"]
            .as_u64()
            .unwrap()
            >= 1
    );

    // sessionAffinity ClientIP: every connection of a client to one backend.
    let first = lb.tcp(0, &lb.a0.ns, at(STICKY, 80), "who")["reply"].clone();
    for _ in 0..15 {
        assert_eq!(lb.tcp(0, &lb.a0.ns, at(STICKY, 80), "who")["reply"], first);
    }
    // Without affinity the same two backends both answer.
    reaches_all(
        &lb,
        0,
        &lb.a0.ns,
        at(BOTH, 80),
        &[lb.b0.pod.ip, lb.b1.pod.ip],
    );

    // internalTrafficPolicy Local: each node's clients get its own backend.
    for _ in 0..10 {
        assert_eq!(
            lb.tcp(0, &lb.a0.ns, at(NODE_LOCAL, 80), "who")["reply"],
            lb.b0.pod.ip.to_string()
        );
        assert_eq!(
            lb.tcp(1, &lb.a1.ns, at(NODE_LOCAL, 80), "who")["reply"],
            lb.b1.pod.ip.to_string()
        );
    }
}

#[test]
fn backends_come_and_go_under_load_and_the_agent_restarts_without_a_failed_connection() {
    let mut lb = Lb::new("vxlan");
    // Two more backends, one per node: four in all.
    let extra = [
        Backend::start(&lb.cluster.nodes[0]),
        Backend::start(&lb.cluster.nodes[1]),
    ];
    // Backends of node 0 are in its podCIDR, 10.244.1.0/24.
    let endpoints = |eps: &[&Backend]| -> Vec<Endpoint> {
        eps.iter()
            .map(|b| {
                let node = if b.pod.ip.octets()[2] == 1 { 0 } else { 1 };
                Endpoint::ready(b.pod.ip, &lb.node_name(node))
            })
            .collect()
    };
    let with = |eps: Vec<Endpoint>| -> Vec<ServiceSpec> {
        let mut all = lb.services();
        all[0].endpoints = eps;
        all
    };
    lb.publish(&with(endpoints(&[&lb.b0, &lb.b1, &extra[0], &extra[1]])));

    // 100 long connections and a stream of new ones, from node 0's pod.
    let target = at(BOTH, 80).to_string();
    let hold = lb.cgroups[0]
        .cmd(&lb.a0.ns, bin("beeline-probe"))
        .args(["hold", &target, "--count", "100", "--seconds", "12"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let load = lb.cgroups[0]
        .cmd(&lb.a0.ns, bin("beeline-probe"))
        .args(["load", &target, "--seconds", "12", "--parallel", "4"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(2));

    // extra[1] leaves the Service (its pod terminates after that), then
    // b1 is marked terminating but still serving, then comes back.
    let leaving = extra[1].pod.ip;
    lb.publish(&with(endpoints(&[&lb.b0, &lb.b1, &extra[0]])));
    let [kept, gone] = extra;
    drop(gone);
    let mut draining = endpoints(&[&lb.b0, &lb.b1, &kept]);
    draining[1].ready = false;
    draining[1].terminating = true;
    lb.publish(&with(draining));
    std::thread::sleep(Duration::from_secs(1));
    lb.publish(&with(endpoints(&[&lb.b0, &lb.b1, &kept])));

    // The agent of node 0 dies and comes back meanwhile.
    lb.cluster.nodes[0].kill_agent();
    std::thread::sleep(Duration::from_millis(500));
    let args = [
        "--mode",
        "vxlan",
        "--kube-proxy-replacement",
        "--resync-period=1s",
        &lb.file.arg(),
        &lb.cgroups[0].arg(),
    ];
    lb.cluster.nodes[0].start_agent(&args);

    let hold: Value = serde_json::from_slice(&hold.wait_with_output().unwrap().stdout).unwrap();
    let load: Value = serde_json::from_slice(&load.wait_with_output().unwrap().stdout).unwrap();
    assert_eq!(
        load["failures"],
        serde_json::json!([]),
        "new connections failed: {load}"
    );
    assert!(load["answers"].as_object().unwrap().len() >= 3, "{load}");
    // Only connections to the backend that went away broke.
    let broken = hold["broken"].as_object().unwrap();
    assert!(
        broken.keys().all(|b| *b == leaving.to_string()),
        "connections to backends that stayed broke: {hold}"
    );
    let alive: u64 = hold["alive"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_u64().unwrap())
        .sum();
    let lost: u64 = broken.values().map(|v| v.as_u64().unwrap()).sum();
    assert_eq!(alive + lost, 100, "{hold}");
    assert_eq!(hold["failures"], serde_json::json!([]), "{hold}");
}

#[test]
fn a_connected_udp_socket_of_a_removed_backend_moves_on() {
    let lb = Lb::new("direct");
    let target = at(REMOTE_ONLY, 53).to_string();
    let stay = lb.cgroups[0]
        .cmd(&lb.a0.ns, bin("beeline-probe"))
        .args(["udp-stay", &target, "--seconds", "5"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    // b1 leaves the Service (still running: only the Service changed), b0
    // joins it.
    let mut services = lb.services();
    services[1].endpoints = vec![Endpoint::ready(lb.b0.pod.ip, &lb.node_name(0))];
    lb.publish(&services);
    let out: Value = serde_json::from_slice(&stay.wait_with_output().unwrap().stdout).unwrap();
    // The socket was closed under the application, which opened a new one
    // and reached the new backend.
    assert!(
        out["answers"][lb.b1.pod.ip.to_string()]
            .as_u64()
            .unwrap_or(0)
            > 0,
        "{out}"
    );
    assert!(
        out["answers"][lb.b0.pod.ip.to_string()]
            .as_u64()
            .unwrap_or(0)
            > 0,
        "{out}"
    );
    // One socket closed under it (its next send finds no destination).
    assert_eq!(out["errors"].as_array().unwrap().len(), 1, "{out}");
    assert_eq!(out["sockets"], 2, "{out}");
    assert!(
        lb.cluster.nodes[0]
            .metric("beeline_reconcile_actions_total{action=\"destroyed_udp_socket\"}")
            >= 1.0
    );
}
