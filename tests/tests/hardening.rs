//! Issue: hardening. The agent under fd exhaustion and a client that leaks
//! connections, concurrent ADD/ADD and ADD/DEL of one attachment, forged
//! registrations, several interfaces per pod, malformed requests.
use std::{
    io::{BufRead, BufReader, Write},
    net::Ipv4Addr,
    os::unix::net::UnixStream,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use beeline_proto::{ApiError, Client, ClientError, Endpoint};
use beeline_tests::*;

fn node(cidr: &str, ip: Ipv4Addr, args: &[&str]) -> Node {
    require_root();
    let mut node = Node::new(cidr, ip);
    node.start_agent(args);
    node
}

/// CPU seconds a process has used so far.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let ticks: f64 = fields.get(11).and_then(|f| f.parse().ok()).unwrap_or(0.0)
        + fields.get(12).and_then(|f| f.parse().ok()).unwrap_or(0.0);
    ticks / 100.0
}

/// A connection to `path` if the listener takes it at once (a Unix
/// socket's connect otherwise waits while the backlog is full).
fn connect_now(path: &std::path::Path) -> Option<UnixStream> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, UnixAddr, connect, socket};
    let fd = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK,
        None,
    )
    .ok()?;
    connect(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &UnixAddr::new(path).ok()?,
    )
    .ok()?;
    Some(UnixStream::from(fd))
}

#[test]
fn a_client_leaking_connections_at_a_1024_fd_limit_cannot_break_the_agent() {
    require_root();
    let mut node = Node::new("10.244.11.0/24", Ipv4Addr::new(192, 168, 111, 1));
    node.agent_nofile = Some(1024);
    node.start_agent(&["--resync-period=1s"]);
    let live = Pod::add(&node, "1.1.0");
    let mut check_conf = node.cni_conf("1.1.0");
    check_conf["prevResult"] = live.result.clone();
    // This test holds more connections than the agent may open files.
    let (_, hard) =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).unwrap();
    nix::sys::resource::setrlimit(
        nix::sys::resource::Resource::RLIMIT_NOFILE,
        hard.min(65536),
        hard,
    )
    .unwrap();

    let agent_pid = {
        // nsenter exec'd the agent: same pid.
        node.agent.as_ref().unwrap().pid()
    };
    let log_before = node.agent.as_ref().unwrap().log_text().len();
    let cpu_before = cpu_seconds(agent_pid);
    let started = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let socket = node.socket();
    /// Stops the leaker however the scope ends (a failed assertion too).
    struct Stop(Arc<AtomicBool>);
    impl Drop for Stop {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Relaxed);
        }
    }
    let outcomes = std::thread::scope(|s| {
        let _stop = Stop(stop.clone());
        // The leaking client: about 1,100 connections that never send a
        // line, replaced as the agent drops them.
        let leaker = {
            let stop = stop.clone();
            let socket = socket.clone();
            s.spawn(move || {
                let mut held: Vec<UnixStream> = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    // Connections the agent answered (its read deadline) and closed.
                    held.retain(|c| {
                        let mut probe = [0u8; 256];
                        std::io::Read::read(&mut &*c, &mut probe).is_err()
                    });
                    while held.len() < 1100 {
                        match connect_now(&socket) {
                            Some(c) => held.push(c),
                            None => break,
                        }
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
                held.len()
            })
        };
        std::thread::sleep(Duration::from_secs(1));
        // Meanwhile: the live pod's entry stays, CHECK never finds a
        // difference, and ADDs succeed or say "try again" (11), never fail.
        let mut outcomes = Vec::new();
        let mut pods = Vec::new();
        while started.elapsed() < Duration::from_secs(12) {
            assert!(
                node.map_endpoints()
                    .iter()
                    .any(|e| e["ip"] == live.ip.to_string()),
                "the live pod's map entry went"
            );
            let check = node.cni(
                "CHECK",
                &check_conf,
                &live.container_id,
                Some(&live.ns.path()),
                "eth0",
            );
            if !check.success {
                assert_eq!(
                    check.error_code(),
                    11,
                    "CHECK under pressure: {}",
                    check.stdout
                );
            }
            let ns = NetNs::new("blp");
            let id = format!("ctr-{}", ns.name);
            let out = node.cni(
                "ADD",
                &node.cni_conf("1.1.0"),
                &id,
                Some(&ns.path()),
                "eth0",
            );
            if out.success {
                outcomes.push(0);
                pods.push((ns, id));
            } else {
                outcomes.push(out.error_code());
            }
        }
        stop.store(true, Ordering::Relaxed);
        leaker.join().unwrap();
        for (ns, id) in &pods {
            node.cni("DEL", &node.cni_conf("1.1.0"), id, Some(&ns.path()), "eth0")
                .expect_ok("DEL after the flood");
        }
        outcomes
    });
    assert!(
        outcomes.iter().all(|c| *c == 0 || *c == 11),
        "ADD outcomes: {outcomes:?}"
    );
    let log_growth = node.agent.as_ref().unwrap().log_text().len() - log_before;
    assert!(
        log_growth < 2 << 20,
        "the agent logged {log_growth} bytes under the flood"
    );
    let cpu = cpu_seconds(agent_pid) - cpu_before;
    let wall = started.elapsed().as_secs_f64();
    assert!(
        cpu < wall * 0.6,
        "the agent spun: {cpu:.1} CPU s in {wall:.1} s"
    );
    // Afterwards, everything works as before.
    let pod = Pod::add(&node, "1.1.0");
    assert!(pod.ns.ping(live.ip, 2));
    node.cni(
        "CHECK",
        &check_conf,
        &live.container_id,
        Some(&live.ns.path()),
        "eth0",
    )
    .expect_ok("CHECK after the flood");
    pod.del(&node);
    live.del(&node);
}

#[test]
fn concurrent_add_add_and_add_del_of_one_attachment_never_break_a_pod() {
    let node = node("10.244.12.0/24", Ipv4Addr::new(192, 168, 112, 1), &[]);
    let conf = node.cni_conf("1.1.0");
    let probe = Pod::add(&node, "1.1.0");
    for round in 0..20 {
        let ns = NetNs::new("blp");
        let id = format!("ctr-race{round}-{}", ns.name);
        let second = if round % 2 == 0 { "ADD" } else { "DEL" };
        let (first, other) = std::thread::scope(|s| {
            let a = s.spawn(|| node.cni("ADD", &conf, &id, Some(&ns.path()), "eth0"));
            let b = s.spawn(|| node.cni(second, &conf, &id, Some(&ns.path()), "eth0"));
            (a.join().unwrap(), b.join().unwrap())
        });
        // A failed ADD fails cleanly ("exists"), never half done.
        for out in [&first, &other].into_iter().filter(|o| !o.success) {
            assert_eq!(
                out.error_code(),
                101,
                "round {round} ({second}): {}",
                out.stdout
            );
        }
        if second == "ADD" {
            assert!(
                first.success != other.success,
                "round {round}: both or neither ADD won"
            );
        } else {
            assert!(other.success, "round {round}: DEL failed: {}", other.stdout);
        }
        // The attachment is whole or gone: with a veth, CHECK passes and
        // the pod answers; without one, nothing of it is left.
        let added = [&first, &other]
            .into_iter()
            .find(|o| o.success && !o.stdout.is_empty())
            .map(|o| o.json());
        let host_veth = node.pod_veths().into_iter().any(|v| v != probe.host_ifname);
        match added {
            Some(result) if host_veth => {
                let ip: Ipv4Addr = result["ips"][0]["address"]
                    .as_str()
                    .unwrap()
                    .trim_end_matches("/32")
                    .parse()
                    .unwrap();
                let mut check = conf.clone();
                check["prevResult"] = result;
                let checked = node.cni("CHECK", &check, &id, Some(&ns.path()), "eth0");
                assert!(
                    checked.success,
                    "round {round} ({second}): {}",
                    checked.stdout
                );
                assert!(
                    probe.ns.ping(ip, 1),
                    "round {round} ({second}): the pod is unreachable"
                );
            }
            _ => {
                assert!(
                    !host_veth,
                    "round {round} ({second}): a veth without a successful ADD"
                );
                assert_eq!(
                    node.map_endpoints().len(),
                    1,
                    "round {round} ({second}): an endpoint without a veth"
                );
                assert_eq!(
                    node.allocated_ips().len(),
                    1,
                    "round {round} ({second}): an address without a veth"
                );
            }
        }
        node.cni("DEL", &conf, &id, Some(&ns.path()), "eth0")
            .expect_ok("the final DEL");
        // DEL retires the pair; the agent deletes it in the background.
        assert_eq!(
            ns.settled_links(),
            vec!["lo".to_string()],
            "round {round} ({second}): pod interfaces left"
        );
    }
    probe.del(&node);
    node.assert_nothing_left();
}

fn expect_refused(client: &Client, endpoint: &Endpoint, why: &str) {
    match client.register(endpoint) {
        Err(ClientError::Agent(ApiError {
            message,
            not_ready: false,
        })) => {
            assert!(
                message.contains(why),
                "refused for another reason: {message}"
            )
        }
        other => panic!("a forged registration ({why}) was not refused: {other:?}"),
    }
}

#[test]
fn forged_registrations_are_refused_and_change_nothing() {
    let node = node("10.244.13.0/24", Ipv4Addr::new(192, 168, 113, 1), &[]);
    let (a, b) = (Pod::add(&node, "1.1.0"), Pod::add(&node, "1.1.0"));
    let client = Client::new(node.socket());
    let records = client.list_endpoints().unwrap();
    let real = records.iter().find(|e| e.ip == a.ip).unwrap().clone();
    let before = node.map_endpoints();
    let ifindex = |name: &str| -> u32 {
        let v: serde_json::Value =
            serde_json::from_str(&node.ns.ip(&["-j", "link", "show", name])).unwrap();
        v[0]["ifindex"].as_u64().unwrap() as u32
    };
    let forged = |f: &dyn Fn(&mut Endpoint)| {
        let mut ep = real.clone();
        ep.container_id = "forged".into();
        ep.ip = "10.244.13.200".parse().unwrap();
        f(&mut ep);
        ep
    };
    // Addresses that are not a pod's to have.
    expect_refused(
        &client,
        &forged(&|e| e.ip = node.ip),
        "outside this node's podCIDR",
    );
    expect_refused(
        &client,
        &forged(&|e| e.ip = "169.254.1.1".parse().unwrap()),
        "outside this node's podCIDR",
    );
    expect_refused(
        &client,
        &forged(&|e| e.ip = "10.244.13.0".parse().unwrap()),
        "not a host address",
    );
    expect_refused(
        &client,
        &forged(&|e| e.ip = b.ip),
        "already used by container",
    );
    // Host interfaces that are not a new pod's veth.
    expect_refused(&client, &forged(&|_| {}), "is the host veth of container");
    let uplink = ifindex("uplink0");
    expect_refused(
        &client,
        &forged(&|e| {
            e.host_ifname = "uplink0".into();
            e.host_ifindex = uplink;
        }),
        "one of the node's own devices",
    );
    let vxlan = ifindex("beeline-vxlan");
    expect_refused(
        &client,
        &forged(&|e| {
            e.host_ifname = "beeline-vxlan".into();
            e.host_ifindex = vxlan;
        }),
        "one of the node's own devices",
    );
    // A veth whose peer never left the node's netns.
    node.ns.ip(&[
        "link",
        "add",
        "blforged0",
        "type",
        "veth",
        "peer",
        "name",
        "blforged1",
    ]);
    let forged_veth = ifindex("blforged0");
    expect_refused(
        &client,
        &forged(&|e| {
            e.host_ifname = "blforged0".into();
            e.host_ifindex = forged_veth;
        }),
        "peer is in the node's netns",
    );
    node.ns.ip(&["link", "del", "blforged0"]);
    // Nothing changed: the same entries, and a still works.
    assert_eq!(node.map_endpoints(), before);
    assert!(b.ns.ping(a.ip, 2));
    assert!(node.ns.ingress_filter_program_id(&a.host_ifname).is_some());
    a.del(&node);
    b.del(&node);
}

#[test]
fn a_pod_with_two_interfaces_on_the_network_works_and_deleting_one_keeps_the_other() {
    let node = node("10.244.14.0/24", Ipv4Addr::new(192, 168, 114, 1), &[]);
    let conf = node.cni_conf("1.1.0");
    let other = Pod::add(&node, "1.1.0");
    let ns = NetNs::new("blp");
    let id = format!("ctr-{}", ns.name);
    let mut results = Vec::new();
    for ifname in ["eth0", "net1"] {
        let out = node.cni("ADD", &conf, &id, Some(&ns.path()), ifname);
        results.push(out.expect_ok(&format!("ADD of {ifname}")).json());
    }
    let ip_of = |r: &serde_json::Value| -> Ipv4Addr {
        r["ips"][0]["address"]
            .as_str()
            .unwrap()
            .trim_end_matches("/32")
            .parse()
            .unwrap()
    };
    let (eth0, net1) = (ip_of(&results[0]), ip_of(&results[1]));
    assert_ne!(eth0, net1);
    for ip in [eth0, net1] {
        assert!(other.ns.ping(ip, 2), "{ip} unreachable");
    }
    let endpoints = node.map_endpoints();
    for ip in [eth0, net1] {
        assert!(
            endpoints.iter().any(|e| e["ip"] == ip.to_string()),
            "{ip} not registered"
        );
    }
    // DEL of net1 keeps eth0.
    node.cni("DEL", &conf, &id, Some(&ns.path()), "net1")
        .expect_ok("DEL net1");
    let mut check = conf.clone();
    check["prevResult"] = results[0].clone();
    node.cni("CHECK", &check, &id, Some(&ns.path()), "eth0")
        .expect_ok("CHECK of eth0 after net1 went");
    assert!(other.ns.ping(eth0, 2));
    assert!(
        !node.allocated_ips().contains(&net1.to_string()),
        "net1's address stayed"
    );
    node.cni("DEL", &conf, &id, Some(&ns.path()), "eth0")
        .expect_ok("DEL eth0");
    other.del(&node);
    node.assert_nothing_left();
}

#[test]
fn every_malformed_request_gets_an_error_line() {
    let node = node("10.244.15.0/24", Ipv4Addr::new(192, 168, 115, 1), &[]);
    for request in [
        &b"\xff\xfe not utf-8\n"[..],
        b"{\"op\":\"frobnicate\"}\n",
        b"[]\n",
        b"\n",
        b"{\"op\":\"register\"}\n",
    ] {
        let mut conn = UnixStream::connect(node.socket()).unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        conn.write_all(request).unwrap();
        let mut line = String::new();
        BufReader::new(&conn).read_line(&mut line).unwrap();
        let answer: serde_json::Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("{request:?} got no JSON line ({e}): {line:?}"));
        assert!(
            answer["Err"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{request:?}: {answer}"
        );
    }
    // A request that never ends its line is answered at the deadline.
    let mut conn = UnixStream::connect(node.socket()).unwrap();
    conn.write_all(b"{\"op\":").unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    let mut line = String::new();
    BufReader::new(&conn).read_line(&mut line).unwrap();
    assert!(line.contains("no request line"), "{line}");
    // And the agent still serves.
    assert!(Client::new(node.socket()).list_endpoints().is_ok());
}
