//! Issue: Kubernetes Services on Beeline pods with kube-proxy, and every
//! node reaching every pod. kube-proxy cannot be installed here: each node
//! gets the rules of the exact shapes kube-proxy writes (`kube_proxy`
//! harness, from its source), in iptables and in nftables mode, on direct
//! and VXLAN datapaths, with `rp_filter` set as distributions ship it.
use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use beeline_tests::{
    cni_spec::{beeline_plugin, runtime},
    kube_proxy::{
        self, InstalledRules, NodeSettings, Protocol, ProxyMode, Service, ServiceEndpoint,
        ServicePort,
    },
    service_lb::{Backend, TCP_PORT, UDP_PORT, tcp_request, udp_ask},
    *,
};
use ipnet::Ipv4Net;

const SERVICE_CIDR: &str = "10.96.0.0/16";

/// One TCP request to `addr` from `ns`: the address of the backend that answered.
fn tcp_ask(ns: &NetNs, addr: SocketAddr) -> Result<String, String> {
    tcp_request(ns, addr, b"who")
}

/// The client address the backend behind `addr` sees for a connection from `ns`.
fn tcp_peer(ns: &NetNs, addr: SocketAddr) -> Result<String, String> {
    tcp_request(ns, addr, b"peer")
}

fn port(
    name: &str,
    protocol: Protocol,
    port: u16,
    target: u16,
    node_port: Option<u16>,
) -> ServicePort {
    ServicePort {
        name: name.into(),
        protocol,
        port,
        target_port: target,
        node_port,
    }
}

fn service(
    name: &str,
    ip: [u8; 4],
    endpoints: &[(Ipv4Addr, bool)],
    node_ports: (Option<u16>, Option<u16>),
    local: bool,
) -> Service {
    Service {
        namespace: "default".into(),
        name: name.into(),
        cluster_ip: Ipv4Addr::from(ip),
        ports: vec![
            port("http", Protocol::Tcp, 80, TCP_PORT, node_ports.0),
            port("dns", Protocol::Udp, 53, UDP_PORT, node_ports.1),
        ],
        endpoints: endpoints
            .iter()
            .map(|(ip, local)| ServiceEndpoint {
                ip: *ip,
                local: *local,
                ready: true,
            })
            .collect(),
        external_traffic_policy_local: local,
        session_affinity_seconds: None,
    }
}

/// The test cluster: two nodes, a host outside, backends b0 (node 0) and
/// b1 (node 1), clients a0 and a1, and kube-proxy's rules on both nodes.
struct Setup {
    cluster: Cluster,
    outside: NetNs,
    a0: Pod,
    a1: Pod,
    b0: Backend,
    b1: Backend,
    _rules: Vec<InstalledRules>,
}

const OUTSIDE: Ipv4Addr = Ipv4Addr::new(192, 168, 100, 200);
const BOTH: [u8; 4] = [10, 96, 0, 10];
const REMOTE_ONLY: [u8; 4] = [10, 96, 0, 12];
const SAME_ONLY: [u8; 4] = [10, 96, 0, 13];
const LOCAL_POLICY: [u8; 4] = [10, 96, 0, 11];
const IDLE: [u8; 4] = [10, 96, 0, 20];
const IDLE_PORT: u16 = 9000;

impl Setup {
    fn new(mode: &str, proxy: ProxyMode, rp_filter: u8) -> Setup {
        let mut cluster = Cluster::new(2);
        let outside = cluster.external_host(OUTSIDE);
        for node in &cluster.nodes {
            // Distributions' reverse-path filtering, on every interface to come.
            for key in ["all", "default"] {
                run(node
                    .ns
                    .cmd("sysctl")
                    .args(["-qw", &format!("net.ipv4.conf.{key}.rp_filter={rp_filter}")]));
            }
            // A default route, as nodes have (ClusterIPs are routed before
            // kube-proxy translates them).
            node.ns
                .ip(&["route", "add", "default", "via", &OUTSIDE.to_string()]);
        }
        cluster.start(&["--mode", mode]);
        let (a0, a1) = (
            Pod::add(&cluster.nodes[0], "1.1.0"),
            Pod::add(&cluster.nodes[1], "1.1.0"),
        );
        let (b0, b1) = (
            Backend::start(&cluster.nodes[0]),
            Backend::start(&cluster.nodes[1]),
        );
        let mut rules = Vec::new();
        for (i, node) in cluster.nodes.iter().enumerate() {
            let (b0_local, b1_local) = (i == 0, i == 1);
            let services = vec![
                service(
                    "both",
                    BOTH,
                    &[(b0.pod.ip, b0_local), (b1.pod.ip, b1_local)],
                    (Some(30080), Some(30053)),
                    false,
                ),
                service(
                    "remote-only",
                    REMOTE_ONLY,
                    &[(b1.pod.ip, b1_local)],
                    (Some(30082), None),
                    false,
                ),
                service(
                    "same-only",
                    SAME_ONLY,
                    &[(b0.pod.ip, b0_local)],
                    (None, None),
                    false,
                ),
                service(
                    "local-policy",
                    LOCAL_POLICY,
                    &[(b1.pod.ip, b1_local)],
                    (Some(30081), None),
                    true,
                ),
                Service {
                    ports: vec![port("idle", Protocol::Tcp, IDLE_PORT, IDLE_PORT, None)],
                    ..service("idle", IDLE, &[(b0.pod.ip, b0_local)], (None, None), false)
                },
            ];
            let settings = NodeSettings {
                node_ips: vec![Cluster::node_ip(i)],
                cluster_cidr: Some("10.244.0.0/16".parse().unwrap()),
                service_cidrs: vec![SERVICE_CIDR.parse::<Ipv4Net>().unwrap()],
                ..Default::default()
            };
            rules.push(
                kube_proxy::install_guarded(&node.ns.name, proxy, &services, &settings)
                    .unwrap_or_else(|e| panic!("installing kube-proxy's rules: {e:#}")),
            );
        }
        Setup {
            cluster,
            outside,
            a0,
            a1,
            b0,
            b1,
            _rules: rules,
        }
    }

    /// A listener on b0, the idle Service's one backend, and that Service.
    fn idle_backend(&self) -> (TcpListener, SocketAddr) {
        let listener = self
            .b0
            .pod
            .ns
            .enter(|| TcpListener::bind((self.b0.pod.ip, IDLE_PORT)))
            .unwrap();
        (
            listener,
            SocketAddr::from((Ipv4Addr::from(IDLE), IDLE_PORT)),
        )
    }

    fn node(&self, i: usize) -> &Node {
        &self.cluster.nodes[i]
    }

    fn counter(&self, i: usize, program: &str, verdict: &str) -> u64 {
        self.node(i).stats()[program][verdict].as_u64().unwrap()
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        // Rules first (guards), then pods, then the cluster.
        self._rules.clear();
    }
}

/// Asks `addr` until every one of `expect` answered (load balancing is
/// random): fails on the first error.
fn reaches_all(from: &NetNs, addr: SocketAddr, expect: &[Ipv4Addr], what: &str) {
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..60 {
        let who = tcp_ask(from, addr).unwrap_or_else(|e| panic!("{what}: {e}"));
        seen.insert(who);
        if expect.iter().all(|ip| seen.contains(&ip.to_string())) {
            return;
        }
    }
    panic!("{what}: only {seen:?} answered, expected {expect:?}");
}

fn the_matrix(mode: &str, proxy: ProxyMode, rp_filter: u8) {
    let s = Setup::new(mode, proxy, rp_filter);
    let (b0, b1) = (s.b0.pod.ip, s.b1.pod.ip);
    let svc = |ip: [u8; 4], port| SocketAddr::from((Ipv4Addr::from(ip), port));
    let replies_before = s.counter(0, "from_pod", "passed_stack_nat");

    // Pods to ClusterIPs, TCP and UDP: backend on the same node, on the
    // other node, several backends.
    assert_eq!(
        tcp_ask(&s.a0.ns, svc(SAME_ONLY, 80)).unwrap(),
        b0.to_string(),
        "pod -> ClusterIP, backend on the same node"
    );
    assert_eq!(
        tcp_ask(&s.a0.ns, svc(REMOTE_ONLY, 80)).unwrap(),
        b1.to_string(),
        "pod -> ClusterIP, backend on the other node"
    );
    for (ip, backend) in [(SAME_ONLY, b0), (REMOTE_ONLY, b1)] {
        let (who, from) =
            udp_ask(&s.a0.ns, svc(ip, 53)).unwrap_or_else(|e| panic!("UDP to {ip:?}: {e}"));
        assert_eq!(who, backend.to_string());
        assert_eq!(
            from,
            svc(ip, 53),
            "the UDP reply did not come from the Service address"
        );
    }
    reaches_all(
        &s.a0.ns,
        svc(BOTH, 80),
        &[b0, b1],
        "pod -> ClusterIP with two backends",
    );
    reaches_all(
        &s.a1.ns,
        svc(BOTH, 80),
        &[b0, b1],
        "pod on node 1 -> ClusterIP with two backends",
    );
    // Hairpin: a backend reaching itself through its own Service.
    assert_eq!(
        tcp_ask(&s.b0.pod.ns, svc(SAME_ONLY, 80)).unwrap(),
        b0.to_string(),
        "hairpin"
    );
    // The replies took the stack; plain pod-to-pod traffic still takes one hop.
    assert!(
        s.counter(0, "from_pod", "passed_stack_nat") > replies_before,
        "no reply was left to the stack"
    );
    let redirected = s.counter(0, "from_pod", "redirected_local");
    assert_eq!(
        tcp_ask(&s.a0.ns, SocketAddr::from((b0, TCP_PORT))).unwrap(),
        b0.to_string()
    );
    assert!(
        s.counter(0, "from_pod", "redirected_local") > redirected,
        "pod -> pod left the one-hop path"
    );

    // Node (and hostNetwork) processes to every pod, and to ClusterIPs.
    let node0 = &s.node(0).ns;
    for (ip, what) in [
        (b0, "the node -> a pod on it"),
        (b1, "the node -> a pod on the other node"),
    ] {
        assert_eq!(
            tcp_ask(node0, SocketAddr::from((ip, TCP_PORT))).unwrap(),
            ip.to_string(),
            "{what}"
        );
    }
    assert_eq!(
        tcp_ask(node0, svc(REMOTE_ONLY, 80)).unwrap(),
        b1.to_string(),
        "node -> ClusterIP"
    );
    let (who, _) = udp_ask(node0, svc(REMOTE_ONLY, 53)).expect("node -> ClusterIP over UDP");
    assert_eq!(who, b1.to_string());
    reaches_all(
        node0,
        svc(BOTH, 80),
        &[b0, b1],
        "node -> ClusterIP with two backends",
    );

    // NodePorts from outside: externalTrafficPolicy Cluster with the backend
    // on this node or only on the other node; Local keeps the client's address.
    let node_port = |i: usize, port| SocketAddr::from((Cluster::node_ip(i), port));
    reaches_all(
        &s.outside,
        node_port(0, 30080),
        &[b0, b1],
        "NodePort (Cluster) on node 0",
    );
    assert_eq!(
        tcp_ask(&s.outside, node_port(0, 30082)).unwrap(),
        b1.to_string(),
        "NodePort, backend on the other node"
    );
    let (who, _) = udp_ask(&s.outside, node_port(1, 30053)).expect("UDP NodePort");
    assert!(who == b0.to_string() || who == b1.to_string(), "{who}");
    assert_eq!(
        tcp_ask(&s.outside, node_port(1, 30081)).unwrap(),
        b1.to_string(),
        "NodePort (Local)"
    );
    assert_eq!(
        tcp_peer(&s.outside, node_port(1, 30081)).unwrap(),
        OUTSIDE.to_string(),
        "Local keeps the client's address"
    );
    assert_eq!(
        tcp_peer(&s.outside, node_port(0, 30082)).unwrap(),
        Cluster::node_ip(0).to_string(),
        "Cluster masquerades to the node"
    );
}

#[test]
fn services_with_kube_proxy_iptables_on_direct_routing_with_strict_rp_filter() {
    the_matrix("direct", ProxyMode::Iptables, 1);
}

#[test]
fn services_with_kube_proxy_nftables_on_direct_routing_with_loose_rp_filter() {
    the_matrix("direct", ProxyMode::Nftables, 2);
}

#[test]
fn services_with_kube_proxy_iptables_over_vxlan_with_loose_rp_filter() {
    the_matrix("vxlan", ProxyMode::Iptables, 2);
}

#[test]
fn services_with_kube_proxy_nftables_over_vxlan_with_strict_rp_filter() {
    the_matrix("vxlan", ProxyMode::Nftables, 1);
}

#[test]
fn a_host_port_is_reached_from_a_pod_on_the_same_node() {
    let s = Setup::new("auto", ProxyMode::Iptables, 1);
    let node = s.node(0);
    let rt = runtime(
        node,
        vec![
            beeline_plugin(node),
            serde_json::json!({
                "type": "portmap",
                "capabilities": { "portMappings": true },
                "snat": true,
                "runtimeConfig": { "portMappings": [{ "hostPort": 9090, "containerPort": TCP_PORT, "protocol": "tcp" }] },
            }),
        ],
    );
    let pod = NetNs::new("blp");
    let at = conformance::Attachment {
        container_id: "ctr-hostport",
        netns: Some(&pod.path()),
        ifname: "eth0",
    };
    let result = rt.add("1.0.0", at).expect("ADD with portmap");
    let ip: Ipv4Addr = result["ips"][0]["address"]
        .as_str()
        .unwrap()
        .trim_end_matches("/32")
        .parse()
        .unwrap();
    let listener = pod.enter(|| TcpListener::bind((ip, TCP_PORT))).unwrap();
    let server = std::thread::spawn(move || {
        for _ in 0..2 {
            let (mut conn, peer) = listener.accept().unwrap();
            let mut buf = [0u8; 8];
            let _ = conn.read(&mut buf);
            let _ = conn.write_all(peer.ip().to_string().as_bytes());
        }
    });
    for (from, what) in [
        (&s.a0.ns, "a pod on the same node"),
        (&s.a1.ns, "a pod on the other node"),
    ] {
        tcp_ask(from, SocketAddr::from((Cluster::node_ip(0), 9090)))
            .unwrap_or_else(|e| panic!("hostPort from {what}: {e}"));
    }
    server.join().unwrap();
    rt.del("1.0.0", at, Some(&result))
        .expect("DEL with portmap");
}

#[test]
fn an_idle_service_connection_survives_100000_other_flows() {
    let s = Setup::new("direct", ProxyMode::Iptables, 1);
    let node0 = s.node(0);
    // UDP flows end 5 s after their last packet.
    for key in [
        "nf_conntrack_udp_timeout",
        "nf_conntrack_udp_timeout_stream",
    ] {
        run(node0
            .ns
            .cmd("sysctl")
            .args(["-qw", &format!("net.netfilter.{key}=5")]));
    }
    // An idle connection to a Service whose backend is on this node.
    let (listener, idle) = s.idle_backend();
    let mut client =
        s.a0.ns
            .enter(|| TcpStream::connect_timeout(&idle, Duration::from_secs(3)))
            .expect("connect to the idle Service");
    let (mut server_side, _) = listener.accept().unwrap();
    let entries = || {
        beeline_agent::maps::StackNatMap::open(&node0.bpffs.path)
            .unwrap()
            .keys()
            .unwrap()
            .len()
    };

    // 100,000 other Service flows come and go: UDP, from every source port
    // to two Services, so no two are one conntrack entry.
    let targets = [
        SocketAddr::from((Ipv4Addr::from(SAME_ONLY), 53)),
        SocketAddr::from((Ipv4Addr::from(BOTH), 53)),
    ];
    let recorded_on_node0 = || {
        let stats = node0.stats();
        ["to_pod", "to_uplink", "to_overlay"]
            .iter()
            .map(|p| stats[p]["recorded_stack_nat"].as_u64().unwrap_or(0))
            .sum::<u64>()
    };
    let recorded_before = recorded_on_node0();
    let mut peak = 0;
    let mut sent = 0u64;
    s.a0.ns.enter(|| {
        for i in 0..100_000u32 {
            let port = 1024 + (i % 64_000) as u16;
            let Ok(socket) = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port)) else {
                continue;
            };
            if socket.send_to(b"x", targets[(i / 64_000) as usize]).is_ok() {
                sent += 1;
            }
            if i % 5_000 == 4_999 {
                peak = peak.max(entries());
            }
        }
    });
    // The flows were recorded (conntrack evicts some unanswered ones early
    // under this load), and however fast this machine sends, many were in
    // the map at once.
    let recorded = recorded_on_node0() - recorded_before;
    assert!(
        recorded > 80_000 && sent > 90_000,
        "{sent} flows sent, {recorded} recorded"
    );
    assert!(peak > 5_000, "the flows did not fill the map: {peak}");
    // They end, and their entries go with them; the idle one's stays.
    assert!(
        eventually(Duration::from_secs(30), || entries() < 100),
        "ended flows stayed in the map: {}",
        entries()
    );
    // The server speaks first, after all that: the client hears it, from
    // the Service's address.
    server_side.write_all(b"still here").unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    let mut buf = [0u8; 16];
    let n = client.read(&mut buf).expect("the idle connection was lost");
    assert_eq!(&buf[..n], b"still here");
    assert_eq!(client.peer_addr().unwrap(), idle);
}

#[test]
fn a_hundred_service_connections_survive_pods_coming_and_going() {
    let s = Setup::new("vxlan", ProxyMode::Nftables, 2);
    let stop = Arc::new(AtomicBool::new(false));
    let failures = std::thread::scope(|scope| {
        let mut workers = Vec::new();
        for i in 0..100 {
            let client = if i % 2 == 0 { &s.a0.ns } else { &s.a1.ns };
            let stop = stop.clone();
            workers.push(scope.spawn(move || -> Result<u64, String> {
                let mut conn = client
                    .enter(|| {
                        TcpStream::connect_timeout(
                            &SocketAddr::from((Ipv4Addr::from(BOTH), 80)),
                            Duration::from_secs(5),
                        )
                    })
                    .map_err(|e| format!("connect: {e}"))?;
                conn.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
                let mut rounds = 0;
                let mut buf = [0u8; 64];
                while !stop.load(Ordering::Relaxed) {
                    conn.write_all(b"who")
                        .map_err(|e| format!("write after {rounds}: {e}"))?;
                    let n = conn
                        .read(&mut buf)
                        .map_err(|e| format!("read after {rounds}: {e}"))?;
                    if n == 0 {
                        return Err(format!("closed after {rounds}"));
                    }
                    rounds += 1;
                    std::thread::sleep(Duration::from_millis(20));
                }
                Ok(rounds)
            }));
        }
        // Meanwhile pods come and go on both nodes.
        for round in 0..10 {
            let node = s.node(round % 2);
            let pods: Vec<Pod> = (0..3).map(|_| Pod::add(node, "1.1.0")).collect();
            for pod in &pods {
                pod.del(node);
            }
        }
        stop.store(true, Ordering::Relaxed);
        workers
            .into_iter()
            .map(|w| w.join().unwrap())
            .filter_map(Result::err)
            .collect::<Vec<_>>()
    });
    assert!(
        failures.is_empty(),
        "{} connections failed: {failures:?}",
        failures.len()
    );
}

/// A TCP connection from `port` in `ns` (bound first, as a client that
/// reuses its port does).
fn connect_from(ns: &NetNs, port: u16, to: SocketAddr) -> std::io::Result<TcpStream> {
    use nix::sys::socket::{
        AddressFamily, SockFlag, SockType, SockaddrIn, bind, connect, setsockopt, socket, sockopt,
    };
    use std::os::fd::AsRawFd;
    let SocketAddr::V4(to) = to else {
        unreachable!("IPv4 only")
    };
    let attempt = || {
        ns.enter(|| {
            let fd = socket(
                AddressFamily::Inet,
                SockType::Stream,
                SockFlag::SOCK_CLOEXEC,
                None,
            )?;
            setsockopt(&fd, sockopt::ReuseAddr, &true)?;
            bind(fd.as_raw_fd(), &SockaddrIn::new(0, 0, 0, 0, port))?;
            connect(fd.as_raw_fd(), &SockaddrIn::from(to))?;
            Ok::<_, std::io::Error>(TcpStream::from(fd))
        })
    };
    // A socket just reset can hold its tuple a moment longer on a busy
    // machine (EADDRNOTAVAIL): the kernel frees it by itself.
    let until = std::time::Instant::now() + Duration::from_secs(3);
    loop {
        match attempt() {
            Err(e)
                if e.raw_os_error() == Some(libc::EADDRNOTAVAIL)
                    && std::time::Instant::now() < until =>
            {
                std::thread::sleep(Duration::from_millis(50))
            }
            result => return result,
        }
    }
}

/// A client that reopens its connection on the same port at once (after a
/// reset): conntrack ends the old connection as the new one starts, and
/// both have the same reply tuple. The old one's end must not take the new
/// one's stack-NAT entry: its replies would skip conntrack and reach the
/// client from the backend's address (reset), as the server speaking first
/// after a while shows.
#[test]
fn a_connection_reopened_on_the_same_port_keeps_its_replies_translated() {
    let s = Setup::new("direct", ProxyMode::Iptables, 1);
    let (listener, idle) = s.idle_backend();
    let switch = || {
        beeline_agent::maps::StackNatMap::open(&s.node(0).bpffs.path)
            .unwrap()
            .is_on()
            .unwrap()
    };
    // Nothing NATed yet: the programs do not even look.
    assert!(
        !switch(),
        "the stack-NAT lookup is on before anything was NATed"
    );
    for round in 0..4 {
        let mut client = connect_from(&s.a0.ns, 40123, idle)
            .unwrap_or_else(|e| panic!("round {round}: connect: {e}"));
        let (mut server_side, _) = listener.accept().unwrap();
        // The old connection's end reaches the agent meanwhile.
        std::thread::sleep(Duration::from_millis(1500));
        server_side.write_all(b"hello").unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(3)))
            .unwrap();
        let mut buf = [0u8; 16];
        let n = client
            .read(&mut buf)
            .unwrap_or_else(|e| panic!("round {round}: the server's greeting was lost: {e}"));
        assert_eq!(&buf[..n], b"hello", "round {round}");
        assert_eq!(client.peer_addr().unwrap(), idle);
        assert!(
            switch(),
            "the first NATed connection did not switch the lookup on"
        );
        // A reset, so the next round reopens the same conntrack tuple.
        nix::sys::socket::setsockopt(
            &client,
            nix::sys::socket::sockopt::Linger,
            &libc::linger {
                l_onoff: 1,
                l_linger: 0,
            },
        )
        .unwrap();
        drop(client);
        drop(server_side);
    }
    // And the entry still goes once the last connection is over for good
    // (a reset connection stays in conntrack for 10 s).
    let ours = || {
        beeline_agent::maps::StackNatMap::open(&s.node(0).bpffs.path)
            .unwrap()
            .keys()
            .unwrap()
            .iter()
            .filter(|k| u16::from_be_bytes(k.dport) == 40123)
            .count()
    };
    assert!(
        eventually(Duration::from_secs(30), || ours() == 0),
        "the ended connection's stack-NAT entry stayed"
    );
}
