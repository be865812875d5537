//! Issue: cross-node forwarding. Three node namespaces on a bridged
//! underlay, one agent each fed by a NodeList file, pods made by the CNI
//! binary. Nodes have no kernel routes to other nodes' podCIDRs, so only the
//! eBPF programs can carry pod-to-pod traffic between nodes.
use std::{net::Ipv4Addr, time::Duration};

use beeline_tests::*;

fn sum(cluster: &Cluster, program: &str, field: &str) -> u64 {
    cluster
        .nodes
        .iter()
        .map(|n| n.stats()[program][field].as_u64().unwrap())
        .sum()
}

fn full_matrix(mode: &str, forward_counter: &str, ingress_program: &str, pod_mtu: u32) {
    let mut cluster = Cluster::new(3);
    cluster.start(&["--mode", mode]);
    let mut pods: Vec<(usize, Pod)> = Vec::new();
    for (i, node) in cluster.nodes.iter().enumerate() {
        for _ in 0..2 {
            pods.push((i, Pod::add(node, "1.1.0")));
        }
    }

    for (i, node) in cluster.nodes.iter().enumerate() {
        let routes = node.ns.ip(&["route", "show"]);
        for j in (0..3).filter(|j| *j != i) {
            let remote = format!("10.244.{}.", j + 1);
            assert!(
                !routes.contains(&remote),
                "node {i} has a kernel route to {remote}: {routes}"
            );
        }
        let remote = node.map_remote_cidrs();
        assert_eq!(remote.len(), 2, "node {i} remote CIDRs: {remote:?}");
        assert!(remote.iter().all(|r| r["tunnel"] == mode), "{remote:?}");
    }
    for (_, pod) in &pods {
        let link = pod.ns.ip(&["-j", "link", "show", "eth0"]);
        assert!(
            link.contains(&format!("\"mtu\":{pod_mtu}")),
            "pod MTU should be {pod_mtu}: {link}"
        );
    }

    let forwarded_before = sum(&cluster, "from_pod", forward_counter);
    let delivered_before = sum(&cluster, ingress_program, "redirected_local");
    let mut cross_pairs = 0;
    for (na, a) in &pods {
        for (nb, b) in &pods {
            if a.ip == b.ip {
                continue;
            }
            assert!(
                a.ns.ping(b.ip, 2),
                "ping {} (node {na}) -> {} (node {nb}) failed",
                a.ip,
                b.ip
            );
            let peer = tcp_echo(&b.ns, b.ip, &a.ns)
                .unwrap_or_else(|e| panic!("TCP {} -> {}: {e}", a.ip, b.ip));
            assert_eq!(peer.ip(), a.ip, "pod-to-pod traffic must keep the pod IP");
            if na != nb {
                cross_pairs += 1;
            }
        }
    }
    assert_eq!(cross_pairs, 24);
    let forwarded = sum(&cluster, "from_pod", forward_counter) - forwarded_before;
    let delivered = sum(&cluster, ingress_program, "redirected_local") - delivered_before;
    // 24 cross-node pairs × (2 echo requests + 2 replies) at least.
    assert!(forwarded >= 24 * 4, "{forward_counter}: only {forwarded}");
    assert!(
        delivered >= 24 * 4,
        "{ingress_program} redirected only {delivered}"
    );
    assert_eq!(sum(&cluster, "from_pod", "dropped_helper_error"), 0);

    for (i, pod) in &pods {
        pod.del(&cluster.nodes[*i]);
    }
    for node in &cluster.nodes {
        assert!(node.map_endpoints().is_empty());
        assert!(node.pod_veths().is_empty());
    }
}

#[test]
fn six_pods_on_three_nodes_reach_each_other_by_direct_routing() {
    full_matrix("direct", "forwarded_direct", "from_uplink", 1500);
}

#[test]
fn six_pods_on_three_nodes_reach_each_other_over_vxlan() {
    full_matrix("vxlan", "forwarded_tunnel", "from_overlay", 1450);
}

#[test]
fn a_node_added_to_the_list_becomes_reachable_and_a_removed_one_disappears() {
    let mut cluster = Cluster::new(3);
    // Nodes 0 and 1 do not know node 2 yet; node 2 knows everyone.
    cluster.publish_nodes(&[0, 1]);
    cluster.publish_nodes_to(&cluster.nodes[2], &[0, 1, 2]);
    for node in &mut cluster.nodes {
        node.start_agent(&["--mode", "auto"]);
    }
    let pod0 = Pod::add(&cluster.nodes[0], "1.1.0");
    let pod2 = Pod::add(&cluster.nodes[2], "1.1.0");
    assert_eq!(cluster.nodes[0].map_remote_cidrs().len(), 1);
    assert!(
        !pod0.ns.ping(pod2.ip, 1),
        "node 2 reachable before node 0 knew it"
    );

    // Traffic keeps trying while node 2 joins the list: a prober pings
    // every 100 ms until it has seen three replies in a row.
    let results = std::thread::scope(|s| {
        let prober = s.spawn(|| {
            let mut seen: Vec<bool> = Vec::new();
            while seen.len() < 150 && !seen.ends_with(&[true, true, true]) {
                seen.push(pod0.ns.ping_once(pod2.ip, Duration::from_millis(300)));
                std::thread::sleep(Duration::from_millis(100));
            }
            seen
        });
        std::thread::sleep(Duration::from_millis(500));
        cluster.publish_nodes(&[0, 1, 2]);
        let in_map = eventually(Duration::from_secs(10), || {
            cluster.nodes[0]
                .map_remote_cidrs()
                .iter()
                .any(|r| r["pod_cidr"] == Cluster::pod_cidr(2))
        });
        let reachable = eventually(Duration::from_secs(10), || pod0.ns.ping(pod2.ip, 1));
        assert!(in_map, "node 2's podCIDR never reached node 0's map");
        assert!(reachable, "node 2's pod never became reachable");
        prober.join().unwrap()
    });
    assert!(!results[0], "the prober reached node 2 before it joined");
    assert!(
        *results.last().unwrap(),
        "the running traffic never got through: {results:?}"
    );
    tcp_echo(&pod2.ns, pod2.ip, &pod0.ns).expect("TCP to the new node");

    // Node 2 leaves node 0's list: its entry goes, and so does reachability.
    cluster.publish_nodes_to(&cluster.nodes[0], &[0, 1]);
    assert!(eventually(Duration::from_secs(10), || cluster.nodes[0]
        .map_remote_cidrs()
        .len()
        == 1));
    assert!(!pod0.ns.ping(pod2.ip, 1));
    pod0.del(&cluster.nodes[0]);
    pod2.del(&cluster.nodes[2]);
}

#[test]
fn egress_leaves_with_the_node_ip_and_pod_traffic_keeps_the_pod_ip() {
    let mut cluster = Cluster::new(2);
    let external = NetNs::new("ble");
    cluster.plug(&external, "eth0");
    let external_ip = Ipv4Addr::new(192, 168, 100, 200);
    external.ip(&["addr", "add", "192.168.100.200/24", "dev", "eth0"]);
    external.ip(&["link", "set", "eth0", "up"]);
    cluster.start(&["--mode", "direct"]);
    let pod0 = Pod::add(&cluster.nodes[0], "1.1.0");
    let pod1 = Pod::add(&cluster.nodes[1], "1.1.0");

    let seen = tcp_echo(&external, external_ip, &pod0.ns).expect("pod -> external");
    assert_eq!(
        seen.ip(),
        Cluster::node_ip(0),
        "egress must be masqueraded to the node IP"
    );
    let seen = tcp_echo(&pod1.ns, pod1.ip, &pod0.ns).expect("pod -> pod");
    assert_eq!(seen.ip(), pod0.ip, "pod-to-pod must keep the pod IP");

    pod0.del(&cluster.nodes[0]);
    pod1.del(&cluster.nodes[1]);
}
