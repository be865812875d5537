//! Issue: every owner retries a failed pass with backoff and resyncs
//! periodically, so damage done behind the agent's back is repaired without
//! a restart, and shows in `/metrics` and `/readyz` until it is.
use std::{net::Ipv4Addr, process::Command, time::Duration};

use beeline_tests::*;

/// Fast resyncs keep these tests short; the default is 10 s.
const RESYNC: &str = "--resync-period=1s";

/// Polls `/readyz` until it reports `needle` as degraded; returns the body.
fn degraded_readyz(node: &Node, needle: &str) -> String {
    let mut seen = String::new();
    let found = eventually_every(Duration::from_secs(10), Duration::from_millis(20), || {
        let (status, body) = node.http_get("/readyz");
        seen = body.clone();
        status == 503 && body.contains(needle)
    });
    assert!(found, "/readyz never reported {needle}: {seen}");
    seen
}

fn ready_again(node: &Node) {
    assert!(
        eventually(Duration::from_secs(10), || node.http_get("/readyz").0
            == 200),
        "/readyz stayed degraded: {}",
        node.http_get("/readyz").1
    );
}

fn repairs(node: &Node, kind: &str) -> f64 {
    node.metric(&format!("beeline_repairs_total{{kind=\"{kind}\"}}"))
}

#[test]
fn damage_done_by_hand_is_visible_and_repaired_without_a_restart() {
    require_root();
    let mut node = Node::new("10.244.6.0/24", Ipv4Addr::new(192, 168, 96, 1));
    node.start_agent(&[RESYNC]);
    let (a, b) = (Pod::add(&node, "1.1.0"), Pod::add(&node, "1.1.0"));
    assert!(a.ns.ping(b.ip, 2));
    assert_eq!(node.http_get("/readyz").0, 200);

    // 1. b's endpoint map entry, deleted with bpftool: b is reached through
    //    the host stack meanwhile, and one hop again once repaired.
    let pin = node.bpffs.path.join("BEELINE_ENDPOINTS");
    let key: Vec<String> = b.ip.octets().iter().map(|o| o.to_string()).collect();
    run(Command::new("bpftool")
        .args(["map", "delete", "pinned"])
        .arg(&pin)
        .arg("key")
        .args(&key));
    let body = degraded_readyz(&node, "endpoint_map_entry");
    assert!(body.contains(&b.ip.to_string()), "{body}");
    ready_again(&node);
    assert!(repairs(&node, "endpoint_map_entry") >= 1.0);
    assert!(
        node.map_endpoints()
            .iter()
            .any(|e| e["ip"] == b.ip.to_string()),
        "the entry did not come back"
    );

    // 2. a's program, detached by hand.
    run(node
        .ns
        .cmd("tc")
        .args(["filter", "del", "dev", &a.host_ifname, "ingress"]));
    let body = degraded_readyz(&node, "pod_program");
    assert!(body.contains(&a.host_ifname), "{body}");
    ready_again(&node);
    assert!(repairs(&node, "pod_program") >= 1.0);
    assert!(
        node.ns.ingress_filter_program_id(&a.host_ifname).is_some(),
        "no program on {} after the repair",
        a.host_ifname
    );

    // 3. The masquerade table, gone with every other table (a firewall
    //    reload does the same).
    run(node.ns.cmd("nft").args(["flush", "ruleset"]));
    degraded_readyz(&node, "nftables_table");
    ready_again(&node);
    assert!(repairs(&node, "nftables_table") >= 1.0);
    let tables = run(node.ns.cmd("nft").args(["list", "tables"]));
    assert!(
        String::from_utf8_lossy(&tables.stdout).contains("beeline"),
        "the masquerade table did not come back"
    );

    // Everything works as before, one hop: the redirect counter moves.
    let before = node.stats()["from_pod"]["redirected_local"]
        .as_u64()
        .unwrap();
    assert!(a.ns.ping(b.ip, 3) && b.ns.ping(a.ip, 3));
    let after = node.stats()["from_pod"]["redirected_local"]
        .as_u64()
        .unwrap();
    assert!(after >= before + 6, "redirected {before} -> {after}");
    assert!(node.agent.as_mut().unwrap().is_running());
    a.del(&node);
    b.del(&node);
}

#[test]
fn an_internal_ip_that_arrives_late_makes_the_node_ready() {
    require_root();
    let mut node = Node::new("10.244.3.0/24", Ipv4Addr::new(192, 168, 93, 1));
    let address = format!("{}/24", node.ip);
    node.ns.ip(&["addr", "del", &address, "dev", "uplink0"]);
    let conf_dir = node.dir.path().join("net.d");
    let conf_arg = format!("--cni-conf-dir={}", conf_dir.display());
    node.start_agent_unready(&[RESYNC, &conf_arg]);
    let conflist = conf_dir.join("10-beeline.conflist");

    assert!(eventually(Duration::from_secs(5), || {
        let (status, body) = node.http_get("/readyz");
        status == 503 && body.contains("no interface holds its InternalIP")
    }));
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        !conflist.exists(),
        "config written before the node was ready"
    );

    // The address arrives (DHCP late, say): no restart needed.
    node.ns.ip(&["addr", "add", &address, "dev", "uplink0"]);
    assert!(
        eventually(Duration::from_secs(10), || conflist.exists()),
        "the late address never made the node ready: {}",
        node.http_get("/readyz").1
    );
    assert_eq!(node.http_get("/readyz").0, 200);
    let pod = Pod::add(&node, "1.1.0");
    assert!(pod.ns.ping(node.ip, 2));
    pod.del(&node);

    // The installed config, changed by hand, is put back.
    let installed = std::fs::read_to_string(&conflist).unwrap();
    std::fs::write(&conflist, "{}").unwrap();
    assert!(
        eventually(Duration::from_secs(10), || std::fs::read_to_string(
            &conflist
        )
        .is_ok_and(|c| c == installed)),
        "the network config was not put back"
    );
    assert!(repairs(&node, "cni_config") >= 1.0);
}

#[test]
fn a_deleted_route_to_another_node_comes_back() {
    let mut cluster = Cluster::new(2);
    cluster.start(&[RESYNC]);
    let node0 = &cluster.nodes[0];
    let remote = Cluster::pod_cidr(1);
    let routes = || {
        String::from_utf8_lossy(
            &run(node0.ns.cmd("ip").args(["route", "show", "proto", "199"])).stdout,
        )
        .into_owned()
    };
    assert!(routes().contains(&remote), "{}", routes());
    node0.ns.ip(&["route", "del", &remote]);
    assert!(
        eventually(Duration::from_secs(10), || routes().contains(&remote)),
        "the route to {remote} did not come back"
    );
    assert!(repairs(node0, "pod_cidr_route") >= 1.0);
}

#[test]
fn a_failed_node_sync_is_retried_until_it_succeeds() {
    require_root();
    let mut node = Node::new("10.244.4.0/24", Ipv4Addr::new(192, 168, 94, 1));
    // Something else holds the VXLAN device's name: setting up VXLAN fails.
    node.ns
        .ip(&["link", "add", "beeline-vxlan", "type", "bridge"]);
    node.start_agent_unready(&["--mode=vxlan", "--resync-period=30s"]);
    assert!(
        eventually(Duration::from_secs(10), || node
            .metric("beeline_reconcile_errors_total{owner=\"nodes\"}")
            >= 2.0),
        "the failure was not retried"
    );
    assert_eq!(node.http_get("/readyz").0, 503);
    let log = node.agent.as_ref().unwrap().log_text();
    assert!(log.contains("is not a VXLAN device"), "{log}");

    // Cleared: the next retry (well before the 30 s period) succeeds.
    node.ns.ip(&["link", "del", "beeline-vxlan"]);
    assert!(
        eventually(Duration::from_secs(10), || node.http_get("/readyz").0
            == 200),
        "never ready: {}",
        node.http_get("/readyz").1
    );
    let pod = Pod::add(&node, "1.1.0");
    assert!(pod.ns.ping(node.ip, 2));
    pod.del(&node);
}

#[test]
fn owners_resyncing_at_the_same_moment_never_fail_each_other() {
    require_root();
    let mut node = Node::new("10.244.12.0/24", Ipv4Addr::new(192, 168, 112, 1));
    // Both owners dump from the kernel (routes and addresses; each pod's tc
    // filters) on every pass: at 10 ms their passes overlap all the time.
    node.start_agent(&["--resync-period=10ms"]);
    let pods: Vec<Pod> = (0..6).map(|_| Pod::add(&node, "1.1.0")).collect();
    std::thread::sleep(Duration::from_secs(4));
    let (_, metrics) = node.http_get("/metrics");
    let errors: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("beeline_reconcile_errors_total") && !l.ends_with(" 0"))
        .collect();
    let log = node.agent.as_ref().unwrap().log_text();
    assert!(errors.is_empty(), "{errors:?}\n{log}");
    assert_eq!(node.http_get("/readyz").0, 200);
    for pod in pods {
        pod.del(&node);
    }
    node.assert_nothing_left();
}
