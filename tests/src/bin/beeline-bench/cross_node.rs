//! Phase 4 (and 6's cross-node setups): two-node clusters, Beeline direct
//! and VXLAN against the underlay, kernel routing and kernel VXLAN.
use std::net::Ipv4Addr;

use beeline_tests::{Cluster, NetNs, Node, hand_wired_pod};
use serde_json::json;

use crate::{
    Cfg, R, TARGET_DIRECT_TPUT, TARGET_VXLAN_TPUT,
    cni::beeline_plugin,
    cpu_cost::phase6,
    machine::step,
    report::{Output, table},
    same_node::netns_sysctl,
    stats::{RATIO_HEADERS, Target, ratio_row},
    traffic::{
        Path2, check_paths, measured_traffic, path_named, paths_json, ratio_pair, traffic_method,
        traffic_table,
    },
};

/// Two-node clusters: Beeline direct, Beeline VXLAN, and kernel routing
/// (host-gw style, no BPF) whose nodes also give the underlay baseline.
struct CrossNode {
    direct_pods: Vec<(NetNs, Ipv4Addr)>,
    vxlan_pods: Vec<(NetNs, Ipv4Addr)>,
    vxlan_device_pods: Vec<(NetNs, Ipv4Addr)>,
    kr_pods: Vec<(NetNs, Ipv4Addr)>,
    kvx_pods: Vec<(NetNs, Ipv4Addr)>,
    direct: Cluster,
    vxlan: Cluster,
    _vxlan_device: Cluster,
    kr: Cluster,
    _kvx: Cluster,
}

fn beeline_cluster(mode: &str, extra_args: &[&str]) -> R<(Cluster, Vec<(NetNs, Ipv4Addr)>)> {
    let mut c = Cluster::new(2);
    let mut args = vec!["--mode", mode];
    args.extend_from_slice(extra_args);
    c.start(&args);
    let mut pods = Vec::new();
    for (i, node) in c.nodes.iter().enumerate() {
        let ns = NetNs::new("blp");
        let ip = beeline_plugin(node).add_pod(&ns, &format!("bench-{mode}-{i}"))?;
        pods.push((ns, ip));
    }
    Ok((c, pods))
}

/// Kernel routing: per node a pod behind a veth with a /32 and a host
/// route, and a route to the other node's podCIDR via its underlay IP
/// (`vxlan`: via the peer's end of a kernel VXLAN device, flannel style).
fn kernel_routing_cluster(vxlan: bool) -> R<(Cluster, Vec<(NetNs, Ipv4Addr)>)> {
    let c = Cluster::new(2);
    // flannel's vxlan backend: one VXLAN device per node, its address the
    // podCIDR's .0, static neighbour + FDB entries for every peer.
    let vtep = |j: usize| Ipv4Addr::new(10, 244, j as u8 + 1, 0);
    if vxlan {
        for (i, node) in c.nodes.iter().enumerate() {
            let local = Cluster::node_ip(i).to_string();
            node.ns.ip(&[
                "link", "add", "kvx0", "type", "vxlan", "id", "42", "dstport", "4789", "local",
                &local,
            ]);
            node.ns
                .ip(&["addr", "add", &format!("{}/32", vtep(i)), "dev", "kvx0"]);
            node.ns.ip(&["link", "set", "kvx0", "up"]);
        }
        for (i, node) in c.nodes.iter().enumerate() {
            for (j, peer) in c.nodes.iter().enumerate().filter(|(j, _)| *j != i) {
                let mac = peer.ns.mac("kvx0").to_string();
                let peer_vtep = vtep(j).to_string();
                node.ns.ip(&[
                    "neigh",
                    "add",
                    &peer_vtep,
                    "lladdr",
                    &mac,
                    "dev",
                    "kvx0",
                    "nud",
                    "permanent",
                ]);
                beeline_tests::run(node.ns.cmd("bridge").args([
                    "fdb",
                    "append",
                    &mac,
                    "dev",
                    "kvx0",
                    "dst",
                    &Cluster::node_ip(j).to_string(),
                ]));
            }
        }
    }
    let mut pods = Vec::new();
    for (i, node) in c.nodes.iter().enumerate() {
        let ip = Ipv4Addr::new(10, 244, i as u8 + 1, 10);
        let ips = ip.to_string();
        let pod = hand_wired_pod(&node.ns, "krh0", ip, vxlan.then_some(1450));
        let pod_mac = pod.mac("eth0").to_string();
        node.ns.ip(&[
            "route",
            "add",
            &format!("{ip}/32"),
            "dev",
            "krh0",
            "scope",
            "link",
        ]);
        node.ns.ip(&[
            "neigh",
            "add",
            &ips,
            "lladdr",
            &pod_mac,
            "dev",
            "krh0",
            "nud",
            "permanent",
        ]);
        for j in (0..c.nodes.len()).filter(|j| *j != i) {
            if vxlan {
                let via = vtep(j).to_string();
                node.ns.ip(&[
                    "route",
                    "add",
                    &Cluster::pod_cidr(j),
                    "via",
                    &via,
                    "dev",
                    "kvx0",
                    "onlink",
                ]);
            } else {
                node.ns.ip(&[
                    "route",
                    "add",
                    &Cluster::pod_cidr(j),
                    "via",
                    &Cluster::node_ip(j).to_string(),
                ]);
            }
        }
        netns_sysctl(&node.ns, "net.ipv4.ip_forward", "1")
            .filter(|v| v == "1")
            .ok_or("cannot enable ip_forward in a node namespace")?;
        pods.push((pod, ip));
    }
    Ok((c, pods))
}

/// From the first node's pod to the second node's.
fn pod_to_pod<'a>(name: &'static str, pods: &'a [(NetNs, Ipv4Addr)]) -> Path2<'a> {
    Path2 {
        name,
        server: &pods[1].0,
        ip: pods[1].1,
        client: &pods[0].0,
        via: None,
    }
}

impl CrossNode {
    fn new() -> R<CrossNode> {
        let (direct, direct_pods) = beeline_cluster("direct", &[])?;
        let (vxlan, vxlan_pods) = beeline_cluster("vxlan", &[])?;
        let (vxlan_device, vxlan_device_pods) =
            beeline_cluster("vxlan", &["--vxlan-encap", "device"])?;
        let (kr, kr_pods) = kernel_routing_cluster(false)?;
        let (kvx, kvx_pods) = kernel_routing_cluster(true)?;
        Ok(CrossNode {
            direct_pods,
            vxlan_pods,
            vxlan_device_pods,
            kr_pods,
            kvx_pods,
            direct,
            vxlan,
            _vxlan_device: vxlan_device,
            kr,
            _kvx: kvx,
        })
    }

    fn paths(&self) -> Vec<Path2<'_>> {
        vec![
            Path2 {
                name: "underlay",
                server: &self.kr.nodes[1].ns,
                ip: Cluster::node_ip(1),
                client: &self.kr.nodes[0].ns,
                via: None,
            },
            pod_to_pod("kernel routing", &self.kr_pods),
            pod_to_pod("beeline direct", &self.direct_pods),
            pod_to_pod("beeline vxlan", &self.vxlan_pods),
            pod_to_pod("kernel vxlan", &self.kvx_pods),
            pod_to_pod("beeline vxlan, device encap", &self.vxlan_device_pods),
        ]
    }
}

pub(crate) fn cross_node_phases(cfg: &Cfg) -> R<Output> {
    let want = |p: u8| cfg.phases.contains(&p);
    step(
        "phases 4/6: 2-node clusters (beeline direct, beeline vxlan (program and device encap), \
         kernel routing + underlay, kernel vxlan)",
    );
    let setup = CrossNode::new()?;
    let paths = setup.paths();
    check_paths(&paths)?;
    let mut out = Output::default();
    if want(4) {
        let result = (|| -> R<Output> {
            let mut out = Output::default();
            step("phase 4: cross-node pod-to-pod throughput and latency");
            let (v, cond) = measured_traffic(cfg, "4 cross-node", &paths, "underlay")?;
            out.conditions.push(cond);
            let mut md = format!(
                "## 4. Cross-node pod-to-pod\n\n\
             Two node namespaces on a bridged underlay (veths, MTU 1500). Underlay: node to node \
             over the uplinks (no BPF). Kernel routing: host-gw style, pods on veths with a /32 \
             and a host route, `ip route add <remote podCIDR> via <peer node IP>`, no BPF. \
             Kernel VXLAN: the same pods, routed through a kernel VXLAN device with static \
             neighbour and FDB entries (flannel's vxlan backend), pod MTU 1450, no BPF. \
             Beeline `--mode direct` (pod MTU 1500) and `--mode vxlan` (pod MTU 1450; the \
             programs build and strip the VXLAN headers on the uplink), and for comparison \
             `--mode vxlan --vxlan-encap device` (through the kernel's collect_md VXLAN device, \
             as before). {}\n\n",
                traffic_method(cfg)
            );
            md.push_str(&traffic_table(&v, "underlay"));
            if let Some(u) = path_named(&v, "underlay") {
                let mut rows = Vec::new();
                for (name, target) in [
                    ("beeline direct", TARGET_DIRECT_TPUT),
                    ("beeline vxlan", TARGET_VXLAN_TPUT),
                ] {
                    if let Some(p) = path_named(&v, name) {
                        rows.push(ratio_row(
                            format!("{name} / underlay throughput"),
                            &p.tput_ratios(u),
                            Some(Target::AtLeast(target)),
                        ));
                    }
                }
                // Ratios reported for context, with no target.
                let compare = |label: &str, a: &str, b: &str| {
                    ratio_pair(label, path_named(&v, a), path_named(&v, b))
                };
                rows.extend(compare(
                    "beeline direct / kernel routing",
                    "beeline direct",
                    "kernel routing",
                ));
                if let Some(k) = path_named(&v, "kernel vxlan") {
                    rows.push(ratio_row(
                        "kernel vxlan / underlay throughput",
                        &k.tput_ratios(u),
                        None,
                    ));
                }
                rows.extend(compare(
                    "beeline vxlan / kernel vxlan",
                    "beeline vxlan",
                    "kernel vxlan",
                ));
                rows.extend(compare(
                    "beeline vxlan: program / device encap",
                    "beeline vxlan",
                    "beeline vxlan, device encap",
                ));
                md.push('\n');
                md.push_str(&table(&RATIO_HEADERS, rows));
            }
            out.sections.push((4, md));
            out.json.push((
                "phase4_cross_node".into(),
                json!({ "paths": paths_json(&v, "underlay") }),
            ));
            Ok(out)
        })();
        out.absorb_phase("4", result);
    }
    if want(6) {
        let direct: Vec<&Node> = setup.direct.nodes.iter().collect();
        let vxlan: Vec<&Node> = setup.vxlan.nodes.iter().collect();
        for (key, label, nodes, path) in [
            ("phase6_direct", "cross node, direct", &direct, &paths[2]),
            ("phase6_vxlan", "cross node, vxlan", &vxlan, &paths[3]),
        ] {
            match phase6(cfg, label, nodes, path) {
                Ok((v, cond)) => {
                    out.json.push((key.into(), v));
                    out.conditions.push(cond);
                }
                Err(e) => out.errors.push(format!("phase 6 ({label}): {e}")),
            }
        }
    }
    drop(paths);
    drop(setup);
    Ok(out)
}
