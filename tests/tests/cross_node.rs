//! Issue: cross-node forwarding. Three node namespaces on a bridged
//! underlay, one agent each fed by a NodeList file, pods made by the CNI
//! binary. Nodes have no kernel routes to other nodes' podCIDRs, so only the
//! eBPF programs can carry pod-to-pod traffic between nodes.
use std::{net::Ipv4Addr, time::Duration};

use ipnet::Ipv4Net;

use beeline_tests::*;

fn sum(cluster: &Cluster, program: &str, field: &str) -> u64 {
    cluster
        .nodes
        .iter()
        .map(|n| counter(n, program, field))
        .sum()
}

fn counter(node: &Node, program: &str, field: &str) -> u64 {
    node.stats()[program][field].as_u64().unwrap()
}

/// Two pods per node; checks the maps and MTUs, then pings and TCP-echoes
/// between every pair and checks `forward_counter` counted the cross-node
/// half. The caller checks who delivered, then calls [`remove_all`].
fn full_matrix(
    cluster: &Cluster,
    mode: &str,
    forward_counter: &str,
    pod_mtu: u32,
) -> Vec<(usize, Pod)> {
    let mut pods: Vec<(usize, Pod)> = Vec::new();
    for (i, node) in cluster.nodes.iter().enumerate() {
        for _ in 0..2 {
            pods.push((i, Pod::add(node, "1.1.0")));
        }
    }

    for (i, node) in cluster.nodes.iter().enumerate() {
        // Kernel routes to the other podCIDRs are for the host stack (node
        // processes, Services); pod traffic takes the maps (counted below).
        let routes = node.ns.ip(&["route", "show", "proto", "199"]);
        for j in (0..3).filter(|j| *j != i) {
            let remote = format!("{} ", Cluster::pod_cidr(j));
            assert!(
                routes.contains(&remote),
                "node {i} has no route to {remote}: {routes}"
            );
        }
        // Two podCIDRs and two node addresses.
        let remote = node.map_remote_cidrs();
        assert_eq!(remote.len(), 4, "node {i} remote CIDRs: {remote:?}");
        assert!(remote.iter().all(|r| r["tunnel"] == mode), "{remote:?}");
    }
    for (_, pod) in &pods {
        let link = pod.ns.ip(&["-j", "link", "show", "eth0"]);
        assert!(
            link.contains(&format!("\"mtu\":{pod_mtu}")),
            "pod MTU should be {pod_mtu}: {link}"
        );
    }

    let forwarded_before = sum(cluster, "from_pod", forward_counter);
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
    let forwarded = sum(cluster, "from_pod", forward_counter) - forwarded_before;
    // 24 cross-node pairs × (2 echo requests + 2 replies) at least.
    assert!(forwarded >= 24 * 4, "{forward_counter}: only {forwarded}");
    assert_eq!(sum(cluster, "from_pod", "dropped_helper_error"), 0);
    pods
}

fn remove_all(cluster: &Cluster, pods: Vec<(usize, Pod)>) {
    for (i, pod) in &pods {
        pod.del(&cluster.nodes[*i]);
    }
    for node in &cluster.nodes {
        assert!(node.map_endpoints().is_empty());
        assert!(node.pod_veths().is_empty());
    }
}

/// Packets each pod's node receives from the other nodes in `full_matrix`:
/// 4 remote pods × 2 local pods × (2 echo requests + the TCP echo's 2+).
const DELIVERED_PER_NODE: u64 = 4 * 2 * 4;

#[test]
fn six_pods_on_three_nodes_reach_each_other_by_direct_routing() {
    let mut cluster = Cluster::new(3);
    cluster.start(&["--mode", "direct"]);
    let pods = full_matrix(&cluster, "direct", "forwarded_direct", 1500);
    let delivered = sum(&cluster, "from_uplink", "redirected_local");
    assert!(
        delivered >= 3 * DELIVERED_PER_NODE,
        "from_uplink redirected only {delivered}"
    );
    remove_all(&cluster, pods);
}

/// (rx, tx) packets of a node's VXLAN device.
type DevicePackets = (u64, u64);

/// `full_matrix` in VXLAN mode, with the packets each node's VXLAN device
/// carried meanwhile.
fn vxlan_matrix(cluster: &Cluster) -> (Vec<(usize, Pod)>, Vec<DevicePackets>) {
    let device_packets = || -> Vec<DevicePackets> {
        cluster
            .nodes
            .iter()
            .map(|n| n.ns.link_packets("beeline-vxlan"))
            .collect()
    };
    let before = device_packets();
    let pods = full_matrix(cluster, "vxlan", "forwarded_tunnel", 1450);
    let carried = device_packets()
        .iter()
        .zip(&before)
        .map(|(after, before)| (after.0 - before.0, after.1 - before.1))
        .collect();
    (pods, carried)
}

/// Node `i` encapsulated and decapsulated in its programs: its VXLAN device
/// carried no packet, `from_overlay` delivered nothing, `from_uplink`
/// delivered what `full_matrix` sent to the node's pods.
fn assert_programs_carried_vxlan(cluster: &Cluster, i: usize, device_carried: DevicePackets) {
    let node = &cluster.nodes[i];
    assert_eq!(
        device_carried,
        (0, 0),
        "node {i}: (rx, tx) of the VXLAN device"
    );
    assert_eq!(
        counter(node, "from_overlay", "redirected_local"),
        0,
        "node {i}"
    );
    let delivered = counter(node, "from_uplink", "redirected_local");
    assert!(
        delivered >= DELIVERED_PER_NODE,
        "node {i}: from_uplink redirected only {delivered}"
    );
}

#[test]
fn six_pods_on_three_nodes_reach_each_other_over_vxlan() {
    let mut cluster = Cluster::new(3);
    cluster.start(&["--mode", "vxlan"]);
    // The programs encapsulate and decapsulate: the VXLAN device carries
    // nothing, every packet is delivered from the uplink.
    let (pods, device) = vxlan_matrix(&cluster);
    for (i, carried) in device.into_iter().enumerate() {
        assert_programs_carried_vxlan(&cluster, i, carried);
    }
    remove_all(&cluster, pods);
}

#[test]
fn vxlan_built_by_the_programs_and_by_the_kernel_device_interoperate() {
    let mut cluster = Cluster::new(3);
    cluster.publish_nodes(&[0, 1, 2]);
    cluster.nodes[0].start_agent(&["--mode", "vxlan", "--vxlan-encap", "device"]);
    cluster.nodes[1].start_agent(&["--mode", "vxlan"]);
    cluster.nodes[2].start_agent(&["--mode", "vxlan"]);
    let (pods, device) = vxlan_matrix(&cluster);

    // Node 0 sends and receives through the kernel's VXLAN device ...
    assert!(device[0].0 >= DELIVERED_PER_NODE, "node 0 device rx");
    assert!(device[0].1 >= DELIVERED_PER_NODE, "node 0 device tx");
    let delivered = counter(&cluster.nodes[0], "from_overlay", "redirected_local");
    assert!(
        delivered >= DELIVERED_PER_NODE,
        "node 0: from_overlay redirected only {delivered}"
    );
    // ... which decapsulates what the others' programs built, and theirs
    // decapsulate what its device built.
    for (i, carried) in device.into_iter().enumerate().skip(1) {
        assert_programs_carried_vxlan(&cluster, i, carried);
    }
    remove_all(&cluster, pods);
}

/// Two VXLAN-mode nodes with a pod each.
fn vxlan_pod_pair() -> (Cluster, Pod, Pod) {
    let mut cluster = Cluster::new(2);
    cluster.start(&["--mode", "vxlan"]);
    let a = Pod::add(&cluster.nodes[0], "1.1.0");
    let b = Pod::add(&cluster.nodes[1], "1.1.0");
    (cluster, a, b)
}

/// A packet whose outer header carries a congestion mark (CE, copied from the
/// inner header at encapsulation) needs the mark merged into the inner
/// header: the uplink program leaves it to the kernel's VXLAN device, which
/// decapsulates it, and `from_overlay` delivers it.
#[test]
fn vxlan_packets_the_programs_decline_take_the_kernel_device() {
    let (cluster, a, b) = vxlan_pod_pair();
    let node_b = &cluster.nodes[1];
    let overlay_before = counter(node_b, "from_overlay", "redirected_local");
    let (device_rx_before, _) = node_b.ns.link_packets("beeline-vxlan");
    // TOS 0x03: ECN field CE. `run` fails the test if a ping is lost.
    run(a
        .ns
        .cmd("ping")
        .args(["-c", "3", "-i", "0.2", "-W", "2", "-Q", "3"])
        .arg(b.ip.to_string()));
    let decapsulated_by_device = node_b.ns.link_packets("beeline-vxlan").0 - device_rx_before;
    let delivered = counter(node_b, "from_overlay", "redirected_local") - overlay_before;
    assert!(
        decapsulated_by_device >= 3,
        "device rx grew by {decapsulated_by_device}"
    );
    assert!(delivered >= 3, "from_overlay redirected {delivered}");
    a.del(&cluster.nodes[0]);
    b.del(&cluster.nodes[1]);
}

/// Bulk TCP keeps every byte through the programs' VXLAN: whole GSO packets
/// over a veth underlay (encapsulated and decapsulated in one piece), and
/// with the sender's uplink unable to segment UDP tunnels, so the kernel
/// cuts them into wire-sized VXLAN packets in software.
#[test]
fn bulk_tcp_over_vxlan_arrives_intact_with_and_without_tunnel_offload() {
    let (cluster, a, b) = vxlan_pod_pair();
    let uplink_tx = |node: &Node| node.ns.link_packets("uplink0").1;
    const BYTES: u64 = 32 << 20;

    let (tx_before, fwd_before) = (
        uplink_tx(&cluster.nodes[0]),
        counter(&cluster.nodes[0], "from_pod", "forwarded_tunnel"),
    );
    tcp_transfer_intact(&b.ns, b.ip, &a.ns, BYTES).expect("with offload");
    let packets = uplink_tx(&cluster.nodes[0]) - tx_before;
    let forwarded = counter(&cluster.nodes[0], "from_pod", "forwarded_tunnel") - fwd_before;
    // GSO packets of up to 64 KiB leave whole: far fewer than 1450-byte ones.
    assert!(
        packets < BYTES / 1400 / 4,
        "{packets} uplink packets for {BYTES} bytes"
    );
    assert!(
        forwarded > 0 && forwarded <= packets,
        "forwarded {forwarded}, sent {packets}"
    );

    run(cluster.nodes[0].ns.cmd("ethtool").args([
        "-K",
        "uplink0",
        "tx-udp_tnl-segmentation",
        "off",
        "tx-udp_tnl-csum-segmentation",
        "off",
    ]));
    let tx_before = uplink_tx(&cluster.nodes[0]);
    tcp_transfer_intact(&b.ns, b.ip, &a.ns, BYTES).expect("segmented in software");
    let packets = uplink_tx(&cluster.nodes[0]) - tx_before;
    assert!(
        packets > BYTES / 1450,
        "{packets} uplink packets: not segmented"
    );
    tcp_transfer_intact(&a.ns, a.ip, &b.ns, BYTES).expect("the other way");
    assert_eq!(sum(&cluster, "from_overlay", "redirected_local"), 0);
    a.del(&cluster.nodes[0]);
    b.del(&cluster.nodes[1]);
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
    // Node 1's podCIDR and its address.
    assert_eq!(cluster.nodes[0].map_remote_cidrs().len(), 2);
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
        == 2));
    assert!(!pod0.ns.ping(pod2.ip, 1));
    pod0.del(&cluster.nodes[0]);
    pod2.del(&cluster.nodes[2]);
}

#[test]
fn egress_leaves_with_the_node_ip_and_pod_traffic_keeps_the_pod_ip() {
    let mut cluster = Cluster::new(2);
    let external_ip = Ipv4Addr::new(192, 168, 100, 200);
    let external = cluster.external_host(external_ip);
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

/// Rules in the `beeline` table's postrouting chain, as `nft` lists them.
fn masquerade_rules(ns: &NetNs) -> usize {
    let out = run(ns
        .cmd("nft")
        .args(["-j", "list", "chain", "ip", "beeline", "postrouting"]));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("nft -j output");
    v["nftables"]
        .as_array()
        .expect("nftables array")
        .iter()
        .filter(|o| o.get("rule").is_some())
        .count()
}

#[test]
fn masquerade_takes_thousands_of_cidrs_that_do_not_merge() {
    require_root();
    let ns = NetNs::new("blm");
    // Every other /24 of 10.0.0.0/8 from 10.128.0.0 on: nothing aggregates.
    let scattered: Vec<Ipv4Net> = (0..5000u32)
        .map(|i| {
            let addr = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 128, 0, 0)) + i * 512);
            Ipv4Net::new(addr, 24).unwrap()
        })
        .collect();
    assert_eq!(Ipv4Net::aggregate(&scattered).len(), scattered.len());
    let pod_cidr: Ipv4Net = "10.244.1.0/24".parse().unwrap();
    let apply = |n: usize| {
        ns.enter(|| {
            beeline_agent::netfilter::table::apply(Some(
                &beeline_agent::netfilter::table::Masquerade {
                    pod_cidr,
                    exceptions: scattered[..n].to_vec(),
                },
            ))
        })
        .unwrap_or_else(|e| panic!("masquerade with {n} exceptions: {e}"))
    };
    apply(5000);
    assert_eq!(
        masquerade_rules(&ns),
        5001,
        "one return per CIDR + masquerade"
    );
    // A smaller set replaces the big table in one transaction.
    apply(10);
    assert_eq!(masquerade_rules(&ns), 11);
}
