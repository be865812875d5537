//! Phase 2: two pods on one node with Beeline, with the bridge plugin and
//! with the redirect_peer floor, and a bare veth pair as the limit; the same
//! setup then serves phase 3 (`rules`) and phase 6's same-node run.
use std::net::Ipv4Addr;

use beeline_tests::{NetNs, Node};
use serde_json::json;

use crate::{
    Cfg, R, TARGET_SAME_NODE_LAT, TARGET_SAME_NODE_TPUT,
    cni::{beeline_node, beeline_plugin, bridge_plugin},
    cpu_cost::phase6,
    floor::{FLOOR, RedirectPeerFloor},
    machine::step,
    report::{Output, table},
    rules::phase_rules,
    stats::{RATIO_HEADERS, Target, ratio_row},
    traffic::{
        Path2, PathSamples, check_paths, measured_traffic, path_named, paths_json, ratio_pair,
        traffic_method, traffic_table,
    },
};

/// Two pods on one Beeline node, two on a bridge-plugin node, a bare veth pair.
pub(crate) struct SameNode {
    // Pods first, then their nodes (field order is drop order).
    bl_pods: Vec<(NetNs, Ipv4Addr)>,
    pub(crate) br_pods: Vec<(NetNs, Ipv4Addr)>,
    veth: (NetNs, NetNs),
    floor: RedirectPeerFloor,
    pub(crate) bl_node: Node,
    pub(crate) br_host: NetNs,
    _br_dir: tempfile::TempDir,
}

impl SameNode {
    fn new(cfg: &Cfg) -> R<SameNode> {
        // --mode direct: pod MTU = uplink MTU = 1500, like the other two.
        let bl_node = beeline_node(&["--mode", "direct"]);
        let br_host = NetNs::new("blb");
        let br_dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let mut bl_pods = Vec::new();
        let mut br_pods = Vec::new();
        {
            let bl = beeline_plugin(&bl_node);
            for i in 0..2 {
                let ns = NetNs::new("blp");
                let ip = bl.add_pod(&ns, &format!("bench-same-bl-{i}"))?;
                bl_pods.push((ns, ip));
            }
            if cfg.tools.bridge {
                let br = bridge_plugin(&br_host, br_dir.path());
                for i in 0..2 {
                    let ns = NetNs::new("blp");
                    let ip = br.add_pod(&ns, &format!("bench-same-br-{i}"))?;
                    br_pods.push((ns, ip));
                }
            }
        }
        let a = NetNs::new("blv");
        let b = NetNs::new("blv");
        a.ip(&[
            "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", &b.name,
        ]);
        a.ip(&["addr", "add", "10.98.0.1/24", "dev", "eth0"]);
        b.ip(&["addr", "add", "10.98.0.2/24", "dev", "eth0"]);
        a.ip(&["link", "set", "eth0", "up"]);
        b.ip(&["link", "set", "eth0", "up"]);
        Ok(SameNode {
            bl_pods,
            br_pods,
            veth: (a, b),
            floor: RedirectPeerFloor::new()?,
            bl_node,
            br_host,
            _br_dir: br_dir,
        })
    }

    /// Beeline, [the floor,] the bridge plugin, bare veth.
    fn paths(&self, with_floor: bool) -> Vec<Path2<'_>> {
        let mut v = vec![Path2 {
            name: "beeline",
            server: &self.bl_pods[1].0,
            ip: self.bl_pods[1].1,
            client: &self.bl_pods[0].0,
            via: None,
        }];
        if with_floor {
            v.push(self.floor.path());
        }
        if self.br_pods.len() == 2 {
            v.push(Path2 {
                name: "bridge",
                server: &self.br_pods[1].0,
                ip: self.br_pods[1].1,
                client: &self.br_pods[0].0,
                via: None,
            });
        }
        v.push(Path2 {
            name: "bare veth",
            server: &self.veth.1,
            ip: Ipv4Addr::new(10, 98, 0, 2),
            client: &self.veth.0,
            via: None,
        });
        v
    }
}

/// Writes a sysctl of `ns` (a /proc/sys/net file opened from inside it);
/// returns the value read back.
pub(crate) fn netns_sysctl(ns: &NetNs, key: &str, value: &str) -> Option<String> {
    let path = format!("/proc/sys/{}", key.replace('.', "/"));
    ns.enter(|| {
        std::fs::write(&path, value).ok()?;
        std::fs::read_to_string(&path)
            .ok()
            .map(|s| s.trim().to_string())
    })
}

pub(crate) fn same_node_phases(cfg: &Cfg) -> R<Output> {
    let want = |p: u8| cfg.phases.contains(&p);
    step("phases 2/3/6: same-node setups (beeline node + 2 pods, bridge node + 2 pods, bare veth)");
    let setup = SameNode::new(cfg)?;
    let mut out = Output::default();
    // Phase 2 is a plain host: no bridge netfilter calls.
    let nf0 = netns_sysctl(&setup.br_host, "net.bridge.bridge-nf-call-iptables", "0");
    let paths = setup.paths(true);
    check_paths(&paths)?;
    if want(2) {
        let result = (|| -> R<Output> {
            let mut out = Output::default();
            step("phase 2: same-node pod-to-pod throughput and latency");
            let (v, cond) = measured_traffic(cfg, "2 same-node", &paths, "bare veth")?;
            out.conditions.push(cond);
            out.sections.push((
            2,
            same_node_section(
                &v,
                "## 2. Same-node pod-to-pod",
                &format!(
                    "Two pods on one node: Beeline (agent `--mode direct`, pod MTU 1500), Debian's \
                 `bridge` + `host-local` (br_netfilter calls {}), a bare veth pair between \
                 two namespaces (the limit), and the {FLOOR}: two pods whose host veths carry a \
                 cls_bpf filter that is only `return bpf_redirect_peer(<other host veth>, 0)` \
                 (4 instructions: the least any datapath built on `bpf_redirect_peer` does; \
                 beeline / floor is the cost of Beeline's own program, floor / bare veth the cost \
                 of the tc hook and the peer redirect). {}",
                    match nf0.as_deref() {
                        Some("0") => "off",
                        Some(_) => "on",
                        None => "n/a",
                    },
                    traffic_method(cfg)
                ),
            ),
        ));
            out.json.push((
                "phase2_same_node".into(),
                json!({ "paths": paths_json(&v, "bare veth"), "bridge_nf_call_iptables": nf0 }),
            ));
            Ok(out)
        })();
        out.absorb_phase("2", result);
    }
    if want(6) {
        match phase6(cfg, "same node", &[&setup.bl_node], &paths[0]) {
            Ok((v, cond)) => {
                out.json.push(("phase6_same_node".into(), v));
                out.conditions.push(cond);
            }
            Err(e) => out.errors.push(format!("phase 6 (same node): {e}")),
        }
    }
    if want(3) {
        // The floor has no host stack to load with rules: it is phase 2's.
        out.absorb_phase("3", phase_rules(cfg, &setup, &setup.paths(false)));
    }
    drop(paths);
    drop(setup);
    Ok(out)
}

pub(crate) fn same_node_section(v: &[PathSamples], title: &str, intro: &str) -> String {
    let mut md = format!("{title}\n\n{intro}\n\n");
    md.push_str(&traffic_table(v, "bare veth"));
    if let (Some(b), Some(veth)) = (path_named(v, "beeline"), path_named(v, "bare veth")) {
        let mut rows = vec![
            ratio_row(
                "beeline / bare veth throughput",
                &b.tput_ratios(veth),
                Some(Target::AtLeast(TARGET_SAME_NODE_TPUT)),
            ),
            ratio_row(
                "beeline / bare veth RTT p50",
                &b.p50_ratios(veth),
                Some(Target::AtMost(TARGET_SAME_NODE_LAT)),
            ),
        ];
        rows.extend(ratio_pair("beeline / floor", Some(b), path_named(v, FLOOR)));
        rows.extend(ratio_pair(
            "floor / bare veth",
            path_named(v, FLOOR),
            Some(veth),
        ));
        rows.extend(ratio_pair(
            "beeline / bridge",
            Some(b),
            path_named(v, "bridge"),
        ));
        md.push('\n');
        md.push_str(&table(&RATIO_HEADERS, rows));
    }
    md
}
