//! Issue: the whole CNI spec, hardened. Bad input and its error codes,
//! CHECK, GC and STATUS, all through the exec protocol against real
//! namespaces. IPAM delegation and chaining are in `cni_spec_ipam.rs`,
//! concurrency and crashes in `cni_spec_concurrency.rs`.
use std::{
    collections::{HashMap, HashSet},
    net::Ipv4Addr,
    process::Stdio,
    time::Duration,
};

use beeline_tests::{
    cni_spec::{DEBIAN_CNI, POD_CIDR, beeline_plugin, node_with, runtime},
    conformance, *,
};
use serde_json::Value;

/// Runs the CNI binary with full control over env and stdin.
fn raw_cni(node: &Node, env: &[(&str, &str)], stdin: &[u8]) -> CniOutput {
    use std::io::Write;
    let mut cmd = node.ns.cmd(bin("beeline"));
    cmd.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    // A plugin may refuse early and close stdin: ignore EPIPE.
    let _ = child.stdin.take().unwrap().write_all(stdin);
    let out = child.wait_with_output().unwrap();
    CniOutput {
        success: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

#[test]
fn every_bad_input_gets_the_right_error_code_and_leaves_nothing() {
    let node = node_with(POD_CIDR);
    let pod = NetNs::new("blp");
    let pod_path = pod.path().display().to_string();
    let conf = node.cni_conf("1.1.0");
    let conf_with = |key: &str, value: Value| {
        let mut c = conf.clone();
        c[key] = value;
        serde_json::to_vec(&c).unwrap()
    };
    let conf_without = |key: &str| {
        let mut c = conf.clone();
        c.as_object_mut().unwrap().remove(key);
        serde_json::to_vec(&c).unwrap()
    };
    let good = serde_json::to_vec(&conf).unwrap();
    let long_id = "c".repeat(2000);
    let huge = {
        let mut c = conf.clone();
        c["padding"] = json!("x".repeat(2 << 20));
        serde_json::to_vec(&c).unwrap()
    };
    type Case = (&'static str, Vec<(&'static str, String)>, Vec<u8>, u64);
    let base = |over: &[(&'static str, &str)]| -> Vec<(&'static str, String)> {
        let mut env: HashMap<&'static str, String> = [
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "bad-input"),
            ("CNI_NETNS", pod_path.as_str()),
            ("CNI_IFNAME", "eth0"),
            ("CNI_PATH", DEBIAN_CNI),
        ]
        .into_iter()
        .map(|(k, v)| (k, v.to_string()))
        .collect();
        for (k, v) in over {
            if v.is_empty() {
                env.remove(k);
            } else {
                env.insert(k, v.to_string());
            }
        }
        env.into_iter().collect()
    };
    let long_id = long_id.as_str();
    let cases: Vec<Case> = vec![
        ("malformed JSON", base(&[]), b"{".to_vec(), 6),
        (
            "truncated JSON",
            base(&[]),
            good[..good.len() / 2].to_vec(),
            6,
        ),
        ("not an object", base(&[]), b"[1, 2]".to_vec(), 6),
        ("empty stdin", base(&[]), Vec::new(), 6),
        ("huge stdin", base(&[]), huge, 6),
        ("missing name", base(&[]), conf_without("name"), 7),
        ("missing type", base(&[]), conf_without("type"), 7),
        (
            "name with a slash",
            base(&[]),
            conf_with("name", json!("../etc")),
            7,
        ),
        (
            "name of the wrong type",
            base(&[]),
            conf_with("name", json!(5)),
            7,
        ),
        (
            "mtu of the wrong type",
            base(&[]),
            conf_with("mtu", json!("big")),
            7,
        ),
        (
            "mtu too large",
            base(&[]),
            conf_with("mtu", json!(70000)),
            7,
        ),
        ("mtu negative", base(&[]), conf_with("mtu", json!(-1)), 7),
        (
            "unknown cniVersion",
            base(&[]),
            conf_with("cniVersion", json!("0.9.9")),
            1,
        ),
        (
            "cniVersion of the wrong type",
            base(&[]),
            conf_with("cniVersion", json!(1)),
            7,
        ),
        (
            "ipam without a type",
            base(&[]),
            conf_with("ipam", json!({"subnet": "10.1.0.0/16"})),
            7,
        ),
        (
            "ipam plugin not in CNI_PATH",
            base(&[]),
            conf_with("ipam", json!({"type": "nonexistent-ipam"})),
            7,
        ),
        (
            "ipam type with a path",
            base(&[]),
            conf_with("ipam", json!({"type": "../../bin/sh"})),
            7,
        ),
        (
            "invalid logLevel",
            base(&[]),
            conf_with("logLevel", json!("loud")),
            7,
        ),
        (
            "missing CNI_COMMAND",
            base(&[("CNI_COMMAND", "")]),
            good.clone(),
            4,
        ),
        (
            "unknown CNI_COMMAND",
            base(&[("CNI_COMMAND", "FROB")]),
            good.clone(),
            4,
        ),
        (
            "missing CNI_CONTAINERID",
            base(&[("CNI_CONTAINERID", "")]),
            good.clone(),
            4,
        ),
        (
            "container id too long",
            base(&[("CNI_CONTAINERID", long_id)]),
            good.clone(),
            4,
        ),
        (
            "container id with a slash",
            base(&[("CNI_CONTAINERID", "a/b")]),
            good.clone(),
            4,
        ),
        (
            "container id ..",
            base(&[("CNI_CONTAINERID", "..")]),
            good.clone(),
            4,
        ),
        (
            "container id with a newline",
            base(&[("CNI_CONTAINERID", "abc\ndef")]),
            good.clone(),
            4,
        ),
        (
            "missing CNI_IFNAME",
            base(&[("CNI_IFNAME", "")]),
            good.clone(),
            4,
        ),
        (
            "ifname too long",
            base(&[("CNI_IFNAME", "eth0123456789abcdef")]),
            good.clone(),
            4,
        ),
        (
            "ifname with a slash",
            base(&[("CNI_IFNAME", "et/h0")]),
            good.clone(),
            4,
        ),
        ("ifname ..", base(&[("CNI_IFNAME", "..")]), good.clone(), 4),
        (
            "ifname with a control character",
            base(&[("CNI_IFNAME", "eth\u{7}")]),
            good.clone(),
            4,
        ),
        (
            "missing CNI_NETNS",
            base(&[("CNI_NETNS", "")]),
            good.clone(),
            4,
        ),
        (
            "netns that does not exist",
            base(&[("CNI_NETNS", "/run/netns/does-not-exist")]),
            good.clone(),
            3,
        ),
        (
            "netns that is a regular file",
            base(&[("CNI_NETNS", "/etc/hostname")]),
            good.clone(),
            4,
        ),
        (
            "netns of another kind",
            base(&[("CNI_NETNS", "/proc/self/ns/mnt")]),
            good.clone(),
            4,
        ),
        (
            "CHECK before 0.4.0",
            base(&[("CNI_COMMAND", "CHECK")]),
            conf_with("cniVersion", json!("0.3.1")),
            1,
        ),
        (
            "CHECK without prevResult",
            base(&[("CNI_COMMAND", "CHECK")]),
            good.clone(),
            7,
        ),
        (
            "CHECK with a prevResult of the wrong shape",
            base(&[("CNI_COMMAND", "CHECK")]),
            conf_with("prevResult", json!({"interfaces": "eth0"})),
            7,
        ),
        (
            "GC before 1.1.0",
            base(&[("CNI_COMMAND", "GC")]),
            conf_with("cniVersion", json!("1.0.0")),
            1,
        ),
        (
            "GC with malformed valid-attachments",
            base(&[("CNI_COMMAND", "GC")]),
            conf_with("cni.dev/valid-attachments", json!([{"containerID": 3}])),
            7,
        ),
    ];
    let mut failures = Vec::new();
    for (name, env, stdin, expected) in &cases {
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let out = raw_cni(&node, &env, stdin);
        let code = if out.success {
            None
        } else {
            serde_json::from_str::<Value>(&out.stdout)
                .ok()
                .filter(|v| v["msg"].as_str().is_some_and(|m| !m.is_empty()))
                .and_then(|v| v["code"].as_u64())
        };
        if code != Some(*expected) {
            failures.push(format!(
                "{name}: expected code {expected}, got {code:?}: {}",
                out.stdout.trim()
            ));
        }
        assert_eq!(
            pod.settled_links(),
            vec!["lo".to_string()],
            "{name}: an interface was left in the pod"
        );
        node.assert_nothing_left();
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases wrong:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

#[test]
fn an_exhausted_pod_cidr_is_an_error_never_a_duplicate() {
    let node = node_with("10.244.7.0/29"); // 6 usable addresses
    let pods: Vec<Pod> = (0..6).map(|_| Pod::add(&node, "1.1.0")).collect();
    let ips: HashSet<Ipv4Addr> = pods.iter().map(|p| p.ip).collect();
    assert_eq!(ips.len(), 6);
    let extra = NetNs::new("blp");
    let out = node.cni(
        "ADD",
        &node.cni_conf("1.1.0"),
        "one-too-many",
        Some(&extra.path()),
        "eth0",
    );
    assert_eq!(out.error_code(), 100, "{}", out.stdout);
    assert!(out.stdout.contains("exhausted"), "{}", out.stdout);
    assert_eq!(extra.settled_links(), vec!["lo".to_string()]);
    for pod in &pods {
        pod.del(&node);
    }
    node.assert_nothing_left();
}

#[test]
fn check_names_what_drifted() {
    let node = node_with(POD_CIDR);
    let rt = runtime(&node, vec![beeline_plugin(&node)]);
    let pod = NetNs::new("blp");
    let at = conformance::Attachment {
        container_id: "ctr-check",
        netns: Some(&pod.path()),
        ifname: "eth0",
    };
    let result = rt.add("1.1.0", at).unwrap();
    rt.check("1.1.0", at, &result)
        .expect("a fresh pod passes CHECK");

    pod.ip(&["route", "del", "default"]);
    let err = rt.check("1.1.0", at, &result).unwrap_err();
    assert_eq!(err.error_code(), Some(105), "{}", err.stdout);
    assert!(err.stdout.contains("default route"), "{}", err.stdout);

    // The datapath side: the agent loses the endpoint.
    beeline_proto::Client::new(node.socket())
        .unregister("ctr-check", "eth0")
        .unwrap();
    let err = rt.check("1.1.0", at, &result).unwrap_err();
    assert!(
        err.stdout.contains("agent has no endpoint"),
        "{}",
        err.stdout
    );

    // A prevResult that does not match the interface.
    let mut wrong = result.clone();
    wrong["ips"][0]["address"] = json!("10.244.1.200/32");
    let err = rt.check("1.1.0", at, &wrong).unwrap_err();
    assert!(err.stdout.contains("10.244.1.200"), "{}", err.stdout);
    rt.del("1.1.0", at, Some(&result)).unwrap();
    node.assert_nothing_left();
}

#[test]
fn gc_releases_everything_not_in_the_valid_list() {
    let node = node_with(POD_CIDR);
    let keep = Pod::add(&node, "1.1.0");
    let stale: Vec<Pod> = (0..3).map(|_| Pod::add(&node, "1.1.0")).collect();
    // A crashed ADD: an allocation with no veth and no endpoint.
    let store_dir = node.ipam_dir().join("beeline-test");
    std::fs::write(store_dir.join("10.244.1.250"), "crashed-ctr\neth0\n").unwrap();
    let rt = runtime(&node, vec![beeline_plugin(&node)]);
    rt.gc(&[conformance::Attachment {
        container_id: &keep.container_id,
        netns: None,
        ifname: "eth0",
    }])
    .expect("GC");
    assert_eq!(node.allocated_ips(), vec![keep.ip.to_string()]);
    assert_eq!(node.pod_veths(), vec![keep.host_ifname.clone()]);
    assert_eq!(node.map_endpoints().len(), 1);
    for pod in &stale {
        assert_eq!(
            pod.ns.settled_links(),
            vec!["lo".to_string()],
            "a stale pod kept its interface"
        );
    }
    assert!(node.ns.ping(keep.ip, 2), "GC broke the valid pod");
    keep.del(&node);
    node.assert_nothing_left();
}

#[test]
fn status_reports_50_until_the_agent_can_serve() {
    require_root();
    let mut node = Node::new(POD_CIDR, Ipv4Addr::new(192, 168, 90, 1));
    let status = |node: &Node| {
        raw_cni(
            node,
            &[("CNI_COMMAND", "STATUS")],
            &serde_json::to_vec(&node.cni_conf("1.1.0")).unwrap(),
        )
    };
    assert_eq!(status(&node).error_code(), 50, "agent down");
    let name = node.name.clone();
    node.write_nodes_file(&[(name.as_str(), None, node.ip)]);
    node.start_agent_unready(&[]);
    let out = status(&node);
    assert_eq!(out.error_code(), 50, "no podCIDR yet");
    assert!(out.stdout.contains("podCIDR"), "{}", out.stdout);
    node.write_nodes_file(&[(name.as_str(), Some(POD_CIDR), node.ip)]);
    assert!(eventually(Duration::from_secs(10), || status(&node).success));
}
