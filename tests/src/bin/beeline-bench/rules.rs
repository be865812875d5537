//! Phase 3: the same-node paths again with a realistic host, thousands of
//! iptables rules and br_netfilter on.
use std::{
    collections::BTreeMap,
    io::Write,
    path::Path,
    process::{Command, Stdio},
    time::Instant,
};

use beeline_tests::NetNs;
use serde_json::json;

use crate::{
    Cfg, R,
    machine::{check_interrupted, cmd_stdout, on_path, step},
    report::Output,
    same_node::{SameNode, netns_sysctl, same_node_section},
    traffic::{Path2, check_paths, measured_traffic, paths_json, traffic_method},
};

/// `iptables-restore` of `n` non-matching rules into filter FORWARD and
/// `n` kube-proxy-like DNAT rules into nat PREROUTING, inside `ns`.
fn install_rules(ns: &NetNs, n: usize) -> R<(f64, usize, usize)> {
    let mut text = String::with_capacity(n * 160);
    text.push_str("*filter\n:FORWARD ACCEPT [0:0]\n");
    for i in 0..n {
        let (a, b) = (i / 256, i % 256);
        text.push_str(&format!(
            "-A FORWARD -s 100.64.{a}.{b}/32 -d 100.65.{a}.{b}/32 -p tcp -m tcp --dport 8080 -j DROP\n"
        ));
    }
    text.push_str("COMMIT\n*nat\n:PREROUTING ACCEPT [0:0]\n");
    for i in 0..n {
        let (a, b) = (i / 256, i % 256);
        text.push_str(&format!(
            "-A PREROUTING -d 100.96.{a}.{b}/32 -p tcp -m tcp --dport 80 -j DNAT --to-destination 100.97.{a}.{b}:8080\n"
        ));
    }
    text.push_str("COMMIT\n");
    let start = Instant::now();
    let mut child = ns
        .cmd("iptables-restore")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("iptables-restore: {e}"))?;
    let _ = child.stdin.take().unwrap().write_all(text.as_bytes());
    let o = child.wait_with_output().map_err(|e| e.to_string())?;
    let took = start.elapsed().as_secs_f64();
    if !o.status.success() {
        return Err(format!(
            "iptables-restore failed: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        ));
    }
    let count = |table: &str, chain: &str| {
        ns.cmd("iptables")
            .args(["-t", table, "-S", chain])
            .output()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .filter(|l| l.starts_with("-A "))
                    .count()
            })
            .unwrap_or(0)
    };
    Ok((took, count("filter", "FORWARD"), count("nat", "PREROUTING")))
}

/// Loaded (or loads, and unloads on drop) br_netfilter.
struct BrNetfilter {
    how: String,
    unload: bool,
}

impl BrNetfilter {
    fn ensure() -> BrNetfilter {
        let present = || Path::new("/proc/sys/net/bridge/bridge-nf-call-iptables").exists();
        if present() {
            let how = if std::fs::read_to_string("/proc/modules")
                .unwrap_or_default()
                .lines()
                .any(|l| l.starts_with("br_netfilter "))
            {
                "already loaded (module)"
            } else {
                "present (built into the kernel or already loaded)"
            };
            return BrNetfilter {
                how: how.into(),
                unload: false,
            };
        }
        if on_path("modprobe")
            && Command::new("modprobe")
                .arg("br_netfilter")
                .status()
                .is_ok_and(|s| s.success())
            && present()
        {
            return BrNetfilter {
                how: "loaded with modprobe by the benchmark (unloaded afterwards)".into(),
                unload: true,
            };
        }
        BrNetfilter {
            how: "unavailable (no /proc/sys/net/bridge and modprobe br_netfilter failed)".into(),
            unload: false,
        }
    }
}

impl Drop for BrNetfilter {
    fn drop(&mut self) {
        if self.unload {
            let _ = Command::new("modprobe")
                .args(["-r", "br_netfilter"])
                .status();
        }
    }
}

pub(crate) fn phase_rules(cfg: &Cfg, setup: &SameNode, paths: &[Path2]) -> R<Output> {
    step(&format!(
        "phase 3: same-node again with {} iptables rules in filter FORWARD and in nat PREROUTING, br_netfilter on",
        cfg.rules
    ));
    check_interrupted()?;
    if !cfg.tools.iptables_restore {
        return Err("iptables-restore is missing (apt-get install iptables)".into());
    }
    let brnf = BrNetfilter::ensure();
    let mut nf = BTreeMap::new();
    let mut install = BTreeMap::new();
    let mut hosts: Vec<(&str, &NetNs)> = vec![("beeline node", &setup.bl_node.ns)];
    if !setup.br_pods.is_empty() {
        hosts.push(("bridge node", &setup.br_host));
    }
    for (name, ns) in &hosts {
        nf.insert(
            *name,
            netns_sysctl(ns, "net.bridge.bridge-nf-call-iptables", "1"),
        );
        let (took, fwd, pre) = install_rules(ns, cfg.rules)?;
        eprintln!("    {name}: {fwd} FORWARD + {pre} PREROUTING rules in {took:.2} s");
        install.insert(
            *name,
            json!({ "seconds": took, "filter_forward": fwd, "nat_prerouting": pre }),
        );
    }
    check_paths(paths)?;
    let (v, cond) = measured_traffic(cfg, "3 same-node + iptables", paths, "bare veth")?;
    let section = same_node_section(
        &v,
        &format!(
            "## 3. Same-node with a realistic host: {} + {} iptables rules, br_netfilter",
            cfg.rules, cfg.rules
        ),
        &format!(
            "The node namespaces of Beeline and of the bridge plugin get {} non-matching rules in \
             filter FORWARD and {} DNAT rules in nat PREROUTING (`iptables-restore`, {}), and \
             `net.bridge.bridge-nf-call-iptables=1` (br_netfilter: {}). The bare veth pair has no \
             node namespace and is the same limit as in phase 2. {}",
            cfg.rules,
            cfg.rules,
            cmd_stdout("iptables", &["--version"]).unwrap_or_default(),
            brnf.how,
            traffic_method(cfg)
        ),
    );
    Ok(Output {
        json: vec![(
            "phase3_same_node_iptables".into(),
            json!({
                "paths": paths_json(&v, "bare veth"),
                "br_netfilter": brnf.how,
                "bridge_nf_call_iptables": nf,
                "rules_installed": install,
            }),
        )],
        sections: vec![(3, section)],
        conditions: vec![cond],
        ..Default::default()
    })
}
