//! kube-proxy's rules as `beeline_tests::kube_proxy` writes them, proven on
//! plain kernel routing with no Beeline: a node namespace routing to pods on
//! /32 host routes (veth, link-local gateway), an outside client on the
//! node's uplink, and the rules of each proxy mode. Pods reach a ClusterIP
//! over TCP and UDP, a backend reaches itself through its own Service
//! (hairpin masquerade), the outside client reaches NodePorts (masqueraded
//! for `externalTrafficPolicy: Cluster`, its own address kept for `Local`),
//! ClientIP affinity sticks, and a Service with no endpoints refuses at once.
use std::{
    io::{ErrorKind, Read, Write},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use beeline_tests::{
    NetNs, hand_wired_pod,
    kube_proxy::{self, *},
    require_root,
};

const NODE_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 1);
const OUTSIDE_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 2);
const POD_A: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 2);
const POD_B: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 3);
const POD_C: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 4);
const ECHO_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const EMPTY_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);
const LOCAL_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 30);
const STICKY_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 40);
const TCP_TARGET: u16 = 8080;
const UDP_TARGET: u16 = 5353;

/// A backend pod's TCP and UDP servers: each answers "<name> <peer ip>",
/// so the client learns which backend it reached and what source address
/// the backend saw. Stopped on drop.
struct Backend {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Backend {
    fn start(pod: &NetNs, name: &'static str) -> Backend {
        let tcp = pod
            .enter(|| TcpListener::bind((Ipv4Addr::UNSPECIFIED, TCP_TARGET)))
            .expect("bind tcp");
        tcp.set_nonblocking(true).unwrap();
        let udp = pod
            .enter(|| UdpSocket::bind((Ipv4Addr::UNSPECIFIED, UDP_TARGET)))
            .expect("bind udp");
        udp.set_read_timeout(Some(Duration::from_millis(20)))
            .unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let tcp_stop = stop.clone();
        let tcp_thread = std::thread::spawn(move || {
            while !tcp_stop.load(Ordering::Relaxed) {
                match tcp.accept() {
                    Ok((mut conn, peer)) => {
                        let _ = conn.set_nonblocking(false);
                        let _ = conn.write_all(format!("{name} {}", peer.ip()).as_bytes());
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(2))
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(2)),
                }
            }
        });
        let udp_stop = stop.clone();
        let udp_thread = std::thread::spawn(move || {
            let mut buf = [0u8; 64];
            while !udp_stop.load(Ordering::Relaxed) {
                if let Ok((_, peer)) = udp.recv_from(&mut buf) {
                    let _ = udp.send_to(format!("{name} {}", peer.ip()).as_bytes(), peer);
                }
            }
        });
        Backend {
            stop,
            threads: vec![tcp_thread, udp_thread],
        }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Which backend answered, and the source address it saw.
type Answer = (String, Ipv4Addr);

fn parse_answer(text: &str) -> Answer {
    let (name, ip) = text.split_once(' ').unwrap_or_else(|| panic!("{text:?}"));
    (name.to_string(), ip.parse().unwrap())
}

fn tcp_ask(client: &NetNs, ip: Ipv4Addr, port: u16) -> std::io::Result<Answer> {
    client.enter(|| {
        let addr = SocketAddr::V4(SocketAddrV4::new(ip, port));
        let mut conn = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
        conn.set_read_timeout(Some(Duration::from_secs(3)))?;
        let mut text = String::new();
        conn.read_to_string(&mut text)?;
        Ok(parse_answer(&text))
    })
}

fn udp_ask(client: &NetNs, ip: Ipv4Addr, port: u16) -> std::io::Result<Answer> {
    client.enter(|| {
        // A fresh socket (source port) each time: a new conntrack entry.
        let sock = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
        sock.connect((ip, port))?;
        sock.set_read_timeout(Some(Duration::from_secs(2)))?;
        let mut buf = [0u8; 64];
        for _ in 0..3 {
            sock.send(b"q")?;
            match sock.recv(&mut buf) {
                Ok(n) => return Ok(parse_answer(&String::from_utf8_lossy(&buf[..n]))),
                Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::TimedOut => {}
                Err(e) => return Err(e),
            }
        }
        Err(ErrorKind::TimedOut.into())
    })
}

/// Asks up to `tries` times until every backend in `want` has answered.
fn reaches_all(
    want: &[&str],
    tries: usize,
    mut ask: impl FnMut() -> std::io::Result<Answer>,
) -> Vec<Answer> {
    let mut seen: Vec<Answer> = Vec::new();
    for _ in 0..tries {
        let answer = ask().unwrap_or_else(|e| panic!("no answer: {e}"));
        seen.push(answer);
        if want.iter().all(|w| seen.iter().any(|(n, _)| n == w)) {
            return seen;
        }
    }
    panic!("not every backend of {want:?} answered in {tries} tries: {seen:?}");
}

fn tcp_port(name: &str, port: u16, node_port: Option<u16>) -> ServicePort {
    ServicePort {
        name: name.into(),
        protocol: Protocol::Tcp,
        port,
        target_port: TCP_TARGET,
        node_port,
    }
}

fn endpoint(ip: Ipv4Addr, local: bool) -> ServiceEndpoint {
    ServiceEndpoint {
        ip,
        local,
        ready: true,
    }
}

fn services() -> Vec<Service> {
    let service = |name: &str, cluster_ip, ports, endpoints| Service {
        namespace: "default".into(),
        name: name.into(),
        cluster_ip,
        ports,
        endpoints,
        external_traffic_policy_local: false,
        session_affinity_seconds: None,
    };
    let both = vec![endpoint(POD_A, true), endpoint(POD_B, true)];
    let mut local = service(
        "local",
        LOCAL_IP,
        vec![tcp_port("http", 80, Some(30081))],
        // B counts as another node's: Local policy must never pick it.
        vec![endpoint(POD_A, true), endpoint(POD_B, false)],
    );
    local.external_traffic_policy_local = true;
    let mut sticky = service(
        "sticky",
        STICKY_IP,
        vec![tcp_port("http", 80, None)],
        both.clone(),
    );
    sticky.session_affinity_seconds = Some(10800);
    vec![
        service(
            "echo",
            ECHO_IP,
            vec![
                tcp_port("http", 80, Some(30080)),
                ServicePort {
                    name: "dns".into(),
                    protocol: Protocol::Udp,
                    port: 53,
                    target_port: UDP_TARGET,
                    node_port: Some(30053),
                },
            ],
            both.clone(),
        ),
        service(
            "empty",
            EMPTY_IP,
            vec![tcp_port("http", 80, Some(30090))],
            // Not ready: the Service has no usable endpoint.
            vec![ServiceEndpoint {
                ip: POD_B,
                local: true,
                ready: false,
            }],
        ),
        local,
        sticky,
    ]
}

fn node_settings() -> NodeSettings {
    NodeSettings {
        node_ips: vec![NODE_IP],
        cluster_cidr: Some("10.244.0.0/16".parse().unwrap()),
        service_cidrs: vec!["10.96.0.0/16".parse().unwrap()],
        ..NodeSettings::default()
    }
}

/// The node, its pods and the outside client; everything goes on drop.
struct Topology {
    node: NetNs,
    outside: NetNs,
    pod_a: NetNs,
    pod_b: NetNs,
    pod_c: NetNs,
}

impl Topology {
    fn new() -> Topology {
        require_root();
        let node = NetNs::new("kpn");
        let outside = NetNs::new("kpo");
        node.ip(&[
            "link",
            "add",
            "uplink",
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &outside.name,
        ]);
        node.ip(&["addr", "add", &format!("{NODE_IP}/24"), "dev", "uplink"]);
        node.ip(&["link", "set", "uplink", "up"]);
        outside.ip(&["addr", "add", &format!("{OUTSIDE_IP}/24"), "dev", "eth0"]);
        outside.ip(&["link", "set", "eth0", "up"]);
        beeline_tests::run(node.cmd("sysctl").args(["-qw", "net.ipv4.ip_forward=1"]));
        // A node routes the service range somewhere (here: to the outside
        // namespace, which forwards nothing), so packets to a ClusterIP
        // reach the FORWARD hook rather than failing the route lookup.
        node.ip(&[
            "route",
            "add",
            "10.96.0.0/16",
            "via",
            &OUTSIDE_IP.to_string(),
        ]);
        let pod = |host_if: &str, ip: Ipv4Addr| {
            let pod = hand_wired_pod(&node, host_if, ip, None);
            node.ip(&["route", "add", &format!("{ip}/32"), "dev", host_if]);
            pod
        };
        let pod_a = pod("vetha", POD_A);
        let pod_b = pod("vethb", POD_B);
        let pod_c = pod("vethc", POD_C);
        Topology {
            node,
            outside,
            pod_a,
            pod_b,
            pod_c,
        }
    }
}

fn check_mode(mode: ProxyMode) {
    let topo = Topology::new();
    let services = services();
    let settings = node_settings();
    let rules = install_guarded(&topo.node.name, mode, &services, &settings)
        .unwrap_or_else(|e| panic!("{mode:?}: {e:#}"));
    println!("{mode:?}: installed in {:?}", rules.report.total_time);
    let _a = Backend::start(&topo.pod_a, "a");
    let _b = Backend::start(&topo.pod_b, "b");

    // The dump holds kube-proxy's chains.
    let dump = kube_proxy::dump(&topo.node.name, mode).unwrap();
    let echo = &services[0];
    let empty = &services[1];
    let expected: Vec<String> = match mode {
        ProxyMode::Iptables => {
            let c = iptables_chains(echo, &echo.ports[0]);
            let udp = iptables_chains(echo, &echo.ports[1]);
            let local = iptables_chains(&services[2], &services[2].ports[0]);
            let mut v: Vec<String> = [
                ":KUBE-SERVICES - [0:0]",
                ":KUBE-NODEPORTS - [0:0]",
                ":KUBE-POSTROUTING - [0:0]",
                ":KUBE-MARK-MASQ - [0:0]",
                ":KUBE-FORWARD - [0:0]",
                ":KUBE-EXTERNAL-SERVICES - [0:0]",
                ":KUBE-PROXY-FIREWALL - [0:0]",
                ":KUBE-PROXY-CANARY - [0:0]",
                "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES",
                "-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES",
                "-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING",
                "-A FORWARD -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD",
                "-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP",
                // iptables-save prints --or-mark/--xor-mark as --set-xmark.
                "-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000",
                "-A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0",
                "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS",
                "-A KUBE-SERVICES -d 10.96.0.20/32 -p tcp -m comment --comment \"default/empty:http has no endpoints\" -m tcp --dport 80 -j REJECT --reject-with icmp-port-unreachable",
                "--probability 0.50000000000 -j KUBE-SEP-",
                "-m recent --rcheck --seconds 10800 --reap --name KUBE-SEP-",
            ]
            .map(String::from)
            .to_vec();
            v.extend([
                format!(":{} - [0:0]", c.svc),
                format!(":{} - [0:0]", c.ext),
                format!(":{} - [0:0]", udp.svc),
                format!(":{} - [0:0]", local.svl),
                format!(":{} - [0:0]", local.ext),
                format!(
                    ":{} - [0:0]",
                    iptables_endpoint_chain(echo, &echo.ports[0], POD_A)
                ),
                format!(
                    "-A {} -s 10.244.0.2/32 -m comment --comment \"default/echo:http\" -j KUBE-MARK-MASQ",
                    iptables_endpoint_chain(echo, &echo.ports[0], POD_A)
                ),
            ]);
            v
        }
        ProxyMode::Nftables => {
            let c = nft_chains(echo, &echo.ports[0]);
            let local = nft_chains(&services[2], &services[2].ports[0]);
            let mut v: Vec<String> = [
                "table ip kube-proxy {",
                "chain services {",
                "chain masquerading {",
                "chain mark-for-masquerade {",
                "chain service-endpoints-check {",
                "chain nodeport-endpoints-check {",
                "chain cluster-ips-check {",
                "chain firewall-check {",
                "chain reject-chain {",
                "chain filter-forward {",
                "set cluster-ips {",
                "set nodeport-ips {",
                "map service-ips {",
                "map service-nodeports {",
                "map no-endpoint-services {",
                "map no-endpoint-nodeports {",
                "map firewall-ips {",
                "10.96.0.20 . tcp . 80 comment \"default/empty:http\" : goto reject-chain",
                "numgen random mod 2 vmap { 0 : goto endpoint-",
            ]
            .map(String::from)
            .to_vec();
            v.extend([
                format!("chain {} {{", c.service),
                format!("chain {} {{", c.external),
                format!("chain {} {{", local.local),
                format!(
                    "chain endpoint-{} {{",
                    nft_endpoint_chain_base(echo, &echo.ports[0], POD_B)
                ),
            ]);
            v
        }
    };
    for want in &expected {
        assert!(
            dump.contains(want.as_str()),
            "{mode:?}: no {want:?} in\n{dump}"
        );
    }
    assert_eq!(empty.endpoints.len(), 1);

    // A pod reaches the ClusterIP over TCP and UDP, both backends, with its
    // own address (pod traffic is not masqueraded).
    let seen = reaches_all(&["a", "b"], 40, || tcp_ask(&topo.pod_c, ECHO_IP, 80));
    assert!(seen.iter().all(|(_, src)| *src == POD_C), "{seen:?}");
    let seen = reaches_all(&["a", "b"], 40, || udp_ask(&topo.pod_c, ECHO_IP, 53));
    assert!(seen.iter().all(|(_, src)| *src == POD_C), "{seen:?}");

    // Hairpin: a backend reaching itself through its Service is
    // masqueraded (KUBE-SEP's `-s <endpoint> -j KUBE-MARK-MASQ`), to the
    // node's address; reaching the other backend keeps its own address.
    let seen = reaches_all(&["a", "b"], 40, || tcp_ask(&topo.pod_a, ECHO_IP, 80));
    for (backend, src) in &seen {
        let want = if backend == "a" { NODE_IP } else { POD_A };
        assert_eq!(
            *src, want,
            "{mode:?}: pod a via its Service to {backend}: {seen:?}"
        );
    }

    // The outside client reaches the NodePort; Cluster policy masquerades.
    let seen = reaches_all(&["a", "b"], 40, || tcp_ask(&topo.outside, NODE_IP, 30080));
    assert!(seen.iter().all(|(_, src)| *src == NODE_IP), "{seen:?}");
    let seen = reaches_all(&["a", "b"], 40, || udp_ask(&topo.outside, NODE_IP, 30053));
    assert!(seen.iter().all(|(_, src)| *src == NODE_IP), "{seen:?}");

    // externalTrafficPolicy Local: only the local endpoint, source kept.
    for _ in 0..12 {
        let answer = tcp_ask(&topo.outside, NODE_IP, 30081).unwrap();
        assert_eq!(answer, ("a".to_string(), OUTSIDE_IP), "{mode:?}");
    }
    // ... while pods still use both endpoints through the ClusterIP.
    reaches_all(&["a", "b"], 40, || tcp_ask(&topo.pod_c, LOCAL_IP, 80));

    // sessionAffinity ClientIP: one client sticks to one backend.
    let first = tcp_ask(&topo.pod_c, STICKY_IP, 80).unwrap();
    for _ in 0..10 {
        assert_eq!(
            tcp_ask(&topo.pod_c, STICKY_IP, 80).unwrap(),
            first,
            "{mode:?}"
        );
    }

    // No endpoints: refused at once, from a pod and at the NodePort.
    for (client, ip, port) in [(&topo.pod_c, EMPTY_IP, 80), (&topo.outside, NODE_IP, 30090)] {
        let start = Instant::now();
        let err = tcp_ask(client, ip, port).expect_err("no endpoints, yet an answer");
        assert_eq!(
            err.kind(),
            ErrorKind::ConnectionRefused,
            "{mode:?} {ip}:{port}: {err}"
        );
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "{:?}",
            start.elapsed()
        );
    }

    // Removing leaves nothing of kube-proxy behind.
    drop(rules);
    let dump = kube_proxy::dump(&topo.node.name, mode).unwrap();
    assert!(!dump.contains("KUBE-"), "{dump}");
    assert!(!dump.contains("kube-proxy"), "{dump}");
}

#[test]
fn iptables_mode_rules_work_like_kube_proxys() {
    check_mode(ProxyMode::Iptables);
}

#[test]
fn nftables_mode_rules_work_like_kube_proxys() {
    check_mode(ProxyMode::Nftables);
}

/// A load measurement more than a check (about half a minute with the
/// removals): `cargo test -p beeline-tests --test kube_proxy_shapes --
/// --ignored --nocapture`.
#[test]
#[ignore = "takes half a minute; run by hand to measure"]
fn ten_thousand_services_install_in_seconds() {
    require_root();
    let services = synthetic_services(10_000, 2);
    let settings = NodeSettings {
        node_ips: vec![NODE_IP],
        cluster_cidr: Some("10.244.0.0/16".parse().unwrap()),
        service_cidrs: vec!["10.96.0.0/12".parse().unwrap()],
        ..NodeSettings::default()
    };
    for mode in [ProxyMode::Iptables, ProxyMode::Nftables] {
        let node = NetNs::new("kpb");
        let rules = install_guarded(&node.name, mode, &services, &settings)
            .unwrap_or_else(|e| panic!("{mode:?}: {e:#}"));
        let r = rules.report.clone();
        println!(
            "{mode:?}: 10,000 Services, {} KiB of rules in {} calls: render {:?}, load {:?}, total {:?}",
            r.rule_bytes / 1024,
            r.calls,
            r.render_time,
            r.load_time,
            r.total_time
        );
        let dump = kube_proxy::dump(&node.name, mode).unwrap();
        let last = &services[9_999];
        let marker = match mode {
            ProxyMode::Iptables => iptables_chains(last, &last.ports[0]).svc,
            ProxyMode::Nftables => nft_chains(last, &last.ports[0]).service,
        };
        assert!(dump.contains(&marker), "{mode:?}: {marker} missing");
        let removing = Instant::now();
        drop(rules);
        println!("{mode:?}: removed in {:?}", removing.elapsed());
        assert!(
            !kube_proxy::dump(&node.name, mode)
                .unwrap()
                .contains(&marker)
        );
        // Generous: the machine may be shared; alone it takes a few seconds.
        assert!(r.total_time < Duration::from_secs(60), "{mode:?}: {r:?}");
    }
}
