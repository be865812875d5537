//! Issue: same-node datapath. Pods made by executing the CNI binary exactly
//! as a runtime would, an agent per node namespace, real tc + maps.
use std::{collections::HashSet, net::Ipv4Addr, time::Duration};

use beeline_tests::*;

const POD_CIDR: &str = "10.244.1.0/24";

fn node() -> Node {
    require_root();
    let mut node = Node::new(POD_CIDR, Ipv4Addr::new(192, 168, 90, 1));
    node.start_agent(&[]);
    node
}

fn counter(stats: &serde_json::Value, program: &str, field: &str) -> u64 {
    stats[program][field].as_u64().unwrap()
}

#[test]
fn pods_on_one_node_talk_in_one_hop() {
    let node = node();
    let pods: Vec<Pod> = (0..3).map(|_| Pod::add(&node, "1.1.0")).collect();

    // The result follows the spec and the pod is set up as it says.
    for pod in &pods {
        let r = &pod.result;
        assert_eq!(r["cniVersion"], "1.1.0");
        assert_eq!(r["interfaces"][1]["name"], "eth0");
        assert_eq!(
            r["interfaces"][1]["sandbox"],
            pod.ns.path().display().to_string()
        );
        assert_eq!(r["routes"][0]["dst"], "0.0.0.0/0");
        assert_eq!(r["ips"][0]["gateway"], "169.254.1.1");
        assert!(pod.ip.to_string().starts_with("10.244.1."));
        let routes = pod.ns.ip(&["route", "show"]);
        assert!(
            routes.contains("default via 169.254.1.1 dev eth0"),
            "{routes}"
        );
        assert!(routes.contains("onlink"), "{routes}");
        let mtu = pod.ns.ip(&["-j", "link", "show", "eth0"]);
        assert!(
            mtu.contains("\"mtu\":1450"),
            "pod MTU should be uplink-50: {mtu}"
        );
    }
    let ips: HashSet<Ipv4Addr> = pods.iter().map(|p| p.ip).collect();
    assert_eq!(ips.len(), 3, "duplicate IPs");

    // Operators see which pod each endpoint is: the kubelet's CNI_ARGS.
    let endpoints = node.map_endpoints();
    for pod in &pods {
        let row = endpoints
            .iter()
            .find(|e| e["ip"] == pod.ip.to_string())
            .unwrap_or_else(|| panic!("{} not listed: {endpoints:?}", pod.ip));
        assert_eq!(row["namespace"], "default", "{row}");
        assert_eq!(row["pod"], format!("pod-{}", pod.container_id), "{row}");
        assert_eq!(row["host_ifname"], pod.host_ifname, "{row}");
    }

    // Every pod reaches every other pod; redirect counters grow while the
    // receiver's host veth transmits (almost) nothing: the packets went from
    // the sender's host veth straight into the receiver's netns.
    for a in &pods {
        for b in &pods {
            if a.ip == b.ip {
                continue;
            }
            let before = node.stats();
            let (_, tx_before) = node.ns.link_packets(&b.host_ifname);
            assert!(a.ns.ping(b.ip, 50), "{} cannot ping {}", a.ip, b.ip);
            let after = node.stats();
            let (_, tx_after) = node.ns.link_packets(&b.host_ifname);
            let redirected = counter(&after, "from_pod", "redirected_local")
                - counter(&before, "from_pod", "redirected_local");
            assert!(
                redirected >= 100,
                "only {redirected} packets redirected for 50 pings"
            );
            // Echo requests enter b's netns by redirect_peer, never via b's
            // host veth; a few IPv6 housekeeping packets may still go out.
            assert!(
                tx_after - tx_before < 10,
                "receiver host veth {} transmitted {} packets: traffic took the host path",
                b.host_ifname,
                tx_after - tx_before
            );
        }
    }

    // The node reaches every pod (kubelet probes), and TCP works both ways.
    for pod in &pods {
        assert!(node.ns.ping(pod.ip, 3), "node cannot ping {}", pod.ip);
        tcp_echo(&node.ns, node.ip, &pod.ns).expect("pod -> node TCP");
        tcp_echo(&pod.ns, pod.ip, &node.ns).expect("node -> pod TCP");
    }
    tcp_echo(&pods[0].ns, pods[0].ip, &pods[1].ns).expect("pod1 -> pod0 TCP");
    tcp_echo(&pods[1].ns, pods[1].ip, &pods[0].ns).expect("pod0 -> pod1 TCP");

    assert_eq!(node.map_endpoints().len(), 3);
    for pod in &pods {
        pod.del(&node);
    }
    node.assert_nothing_left();
}

#[test]
fn twenty_concurrent_adds_get_distinct_reachable_ips_and_dels_leave_nothing() {
    let node = node();
    let pods: Vec<Pod> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..20)
            .map(|_| s.spawn(|| Pod::add(&node, "1.0.0")))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let ips: HashSet<Ipv4Addr> = pods.iter().map(|p| p.ip).collect();
    assert_eq!(
        ips.len(),
        20,
        "duplicate IPs among {:?}",
        pods.iter().map(|p| p.ip).collect::<Vec<_>>()
    );
    for pod in &pods {
        assert!(node.ns.ping(pod.ip, 2), "node cannot reach {}", pod.ip);
    }
    assert!(pods[0].ns.ping(pods[19].ip, 2));
    assert_eq!(node.map_endpoints().len(), 20);
    assert_eq!(node.allocated_ips().len(), 20);

    std::thread::scope(|s| {
        for pod in &pods {
            let node = &node;
            s.spawn(move || pod.del(node));
        }
    });
    node.assert_nothing_left();
}

#[test]
fn agent_down_gives_code_11_and_leaves_nothing() {
    require_root();
    let node = Node::new(POD_CIDR, Ipv4Addr::new(192, 168, 90, 1));
    let pod_ns = NetNs::new("blp");
    let out = node.cni(
        "ADD",
        &node.cni_conf("1.1.0"),
        "ctr-down",
        Some(&pod_ns.path()),
        "eth0",
    );
    assert_eq!(out.error_code(), 11);
    let msg = out.json()["msg"].as_str().unwrap().to_string();
    assert!(
        msg.contains("agent is down"),
        "message should say the agent is down: {msg}"
    );
    assert_eq!(node.pod_veths(), Vec::<String>::new());
    assert_eq!(node.allocated_ips(), Vec::<String>::new());
    assert_eq!(
        pod_ns.settled_links(),
        vec!["lo".to_string()],
        "pod netns got an interface"
    );

    // DEL while the agent is down still succeeds (the spec requires it).
    node.cni(
        "DEL",
        &node.cni_conf("1.1.0"),
        "ctr-down",
        Some(&pod_ns.path()),
        "eth0",
    )
    .expect_ok("DEL with the agent down");
}

#[test]
fn a_failed_registration_undoes_the_add() {
    let node = node();
    let first = Pod::add(&node, "1.1.0");
    // A second allocator directory hands out the same first address; the
    // node refuses the duplicate (its host route exists, and the agent would
    // refuse it too): ADD fails after creating the veth and must remove
    // everything it made.
    let mut conf = node.cni_conf("1.1.0");
    conf["dataDir"] = json!(node.dir.path().join("other-ipam"));
    let pod_ns = NetNs::new("blp");
    let out = node.cni("ADD", &conf, "ctr-dup", Some(&pod_ns.path()), "eth0");
    assert!([102, 103].contains(&out.error_code()), "{}", out.stdout);
    assert_eq!(
        node.pod_veths(),
        vec![first.host_ifname.clone()],
        "the failed ADD left a veth"
    );
    assert_eq!(pod_ns.settled_links(), vec!["lo".to_string()]);
    let other_ipam = node.dir.path().join("other-ipam/beeline-test");
    let leftovers: Vec<_> = std::fs::read_dir(other_ipam)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().parse::<Ipv4Addr>().is_ok())
        .collect();
    assert!(leftovers.is_empty(), "the failed ADD kept its IP");
    assert_eq!(node.map_endpoints().len(), 1);
    // The first pod is untouched.
    assert!(node.ns.ping(first.ip, 2));
    first.del(&node);
    node.assert_nothing_left();
}

#[test]
fn del_succeeds_when_everything_is_already_gone() {
    let node = node();
    let pod = Pod::add(&node, "0.4.0");
    assert_eq!(
        pod.result["ips"][0]["version"], "4",
        "0.4.0 results carry the IP version"
    );
    // The container's netns vanishes before DEL (the veth dies with it).
    let Pod {
        ns, container_id, ..
    } = pod;
    let netns_path = ns.path();
    drop(ns);
    for _ in 0..2 {
        node.cni(
            "DEL",
            &node.cni_conf("0.4.0"),
            &container_id,
            Some(&netns_path),
            "eth0",
        )
        .expect_ok("DEL after the netns is gone");
    }
    node.cni("DEL", &node.cni_conf("0.4.0"), "never-added", None, "eth0")
        .expect_ok("DEL of an unknown container");
    assert!(eventually(Duration::from_secs(5), || node
        .pod_veths()
        .is_empty()));
    node.assert_nothing_left();
}

#[test]
fn add_of_an_existing_interface_is_an_error_that_keeps_the_pod() {
    let node = node();
    let pod = Pod::add(&node, "1.1.0");
    let out = node.cni(
        "ADD",
        &node.cni_conf("1.1.0"),
        &pod.container_id,
        Some(&pod.ns.path()),
        "eth0",
    );
    assert_eq!(out.error_code(), 101);
    assert!(
        node.ns.ping(pod.ip, 2),
        "the failed second ADD broke the pod"
    );
    assert_eq!(node.allocated_ips().len(), 1);
    pod.del(&node);
    node.assert_nothing_left();
}

#[test]
fn the_agent_waits_for_its_pod_cidr_and_says_so() {
    require_root();
    let mut node = Node::new(POD_CIDR, Ipv4Addr::new(192, 168, 90, 1));
    let name = node.name.clone();
    node.write_nodes_file(&[(name.as_str(), None, node.ip)]);
    node.start_agent_unready(&[]);
    let pod_ns = NetNs::new("blp");
    let out = node.cni(
        "ADD",
        &node.cni_conf("1.1.0"),
        "ctr-early",
        Some(&pod_ns.path()),
        "eth0",
    );
    assert_eq!(out.error_code(), 11, "{}", out.stdout);
    assert!(out.stdout.contains("no podCIDR yet"), "{}", out.stdout);
    assert_eq!(node.pod_veths(), Vec::<String>::new());
    let log = node.agent.as_ref().unwrap().log_text();
    assert!(
        log.contains("has no podCIDR yet"),
        "the log should say why: {log}"
    );

    // The controller assigns the podCIDR: the same ADD now works, with the
    // configured MTU overriding the agent's.
    node.write_nodes_file(&[(name.as_str(), Some(POD_CIDR), node.ip)]);
    let client = beeline_proto::Client::new(node.socket());
    assert!(eventually(Duration::from_secs(10), || client
        .node_info()
        .is_ok()));
    let mut conf = node.cni_conf("1.1.0");
    conf["mtu"] = json!(1400);
    node.cni("ADD", &conf, "ctr-early", Some(&pod_ns.path()), "eth0")
        .expect_ok("ADD after the podCIDR arrived");
    let link = pod_ns.ip(&["-j", "link", "show", "eth0"]);
    assert!(link.contains("\"mtu\":1400"), "{link}");
    node.cni("DEL", &conf, "ctr-early", Some(&pod_ns.path()), "eth0")
        .expect_ok("DEL");
    node.assert_nothing_left();
}

/// DEL takes the veth out of service at once and leaves the kernel's slow
/// teardown to the agent.
#[test]
fn del_retires_the_veth_and_the_agent_deletes_it() {
    require_root();
    let mut node = Node::new("10.244.8.0/24", Ipv4Addr::new(192, 168, 90, 1));
    node.start_agent(&[]);
    let conf = node.cni_conf("1.1.0");
    let retired = |ns: &NetNs| -> Vec<String> {
        ns.links()
            .into_iter()
            .filter(|l| l.starts_with(beeline_proto::RETIRED_PREFIX))
            .collect()
    };

    let pod = Pod::add(&node, "1.1.0");
    pod.del(&node);
    // Right away: the names, the route and the neighbour are gone.
    assert!(!node.ns.links().contains(&pod.host_ifname));
    assert!(!pod.ns.links().contains(&"eth0".to_string()));
    assert_eq!(
        node.ns.ip(&["route", "show", &pod.ip.to_string()]).trim(),
        ""
    );
    assert!(!node.ns.ip(&["neigh", "show"]).contains(&pod.ip.to_string()));
    // So the same attachment can come back at once.
    let again = node
        .cni(
            "ADD",
            &conf,
            &pod.container_id,
            Some(&pod.ns.path()),
            "eth0",
        )
        .expect_ok("ADD right after DEL");
    let ip: Ipv4Addr = again.json()["ips"][0]["address"]
        .as_str()
        .unwrap()
        .trim_end_matches("/32")
        .parse()
        .unwrap();
    assert!(node.ns.ping(ip, 2), "the re-added pod is unreachable");
    pod.del(&node);
    // And the agent deletes the retired pairs.
    assert!(
        eventually(Duration::from_secs(5), || retired(&node.ns).is_empty()
            && retired(&pod.ns).is_empty()),
        "retired veths stay: {:?} {:?}",
        retired(&node.ns),
        retired(&pod.ns)
    );
    assert!(
        node.agent
            .as_ref()
            .unwrap()
            .log_text()
            .contains("retired veth deleted")
    );

    // DEL racing the kernel, which destroys the pair as the netns goes
    // (without care, about one DEL in 50 fails).
    for _ in 0..50 {
        let pod = Pod::add(&node, "1.1.0");
        let path = pod.ns.path();
        drop(pod.ns);
        node.cni("DEL", &conf, &pod.container_id, Some(&path), "eth0")
            .expect_ok("DEL while the netns is being destroyed");
    }
    assert!(
        eventually(Duration::from_secs(5), || node.pod_veths().is_empty()),
        "veths left: {:?}",
        node.pod_veths()
    );

    // Without an agent, DEL deletes the veth itself before it returns.
    let pod = Pod::add(&node, "1.1.0");
    node.kill_agent();
    pod.del(&node);
    assert_eq!(retired(&node.ns), Vec::<String>::new());
    assert_eq!(pod.ns.links(), vec!["lo".to_string()]);

    // A retired veth a dead agent left behind goes when the next one starts.
    node.ns.ip(&[
        "link",
        "add",
        "bx00000000test",
        "type",
        "veth",
        "peer",
        "name",
        "bx00000000tesp",
    ]);
    node.ns
        .ip(&["link", "set", "bx00000000test", "alias", "beeline retired"]);
    node.ns.ip(&[
        "link",
        "add",
        "bx00000000keep",
        "type",
        "veth",
        "peer",
        "name",
        "bx00000000kepp",
    ]);
    node.start_agent(&[]);
    assert!(
        eventually(Duration::from_secs(5), || !node
            .ns
            .links()
            .contains(&"bx00000000test".to_string())),
        "the leftover retired veth stays"
    );
    assert!(
        node.ns.links().contains(&"bx00000000keep".to_string()),
        "a veth without the retired alias was deleted"
    );
    node.ns.ip(&["link", "del", "bx00000000keep"]);
    node.assert_nothing_left();
}

/// The programs route like a router: TTL down by one with a valid header
/// checksum (the receiver's stack drops anything else), and a packet whose
/// TTL would expire goes to the host stack, which answers time-exceeded.
#[test]
fn ttl_is_decremented_and_expiring_packets_reach_the_host() {
    let node = node();
    let (a, b) = (Pod::add(&node, "1.1.0"), Pod::add(&node, "1.1.0"));
    let ping = |ttl: &str| {
        let out =
            a.ns.cmd("ping")
                .args(["-c", "1", "-W", "2", "-t", ttl, &b.ip.to_string()])
                .output()
                .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let before = counter(&node.stats(), "from_pod", "redirected_local");
    let reply = ping("64");
    // b answers with TTL 64; b's program makes it 63 on the way back.
    assert!(reply.contains("ttl=63"), "{reply}");
    assert!(counter(&node.stats(), "from_pod", "redirected_local") >= before + 2);
    let expired = ping("1");
    assert!(expired.contains("Time to live exceeded"), "{expired}");
    a.del(&node);
    b.del(&node);
    node.assert_nothing_left();
}
