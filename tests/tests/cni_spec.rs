//! Issue: the whole CNI spec, hardened. Bad input, CHECK, GC, IPAM
//! delegation, chaining with Debian's plugins, concurrency and crashes, all
//! through the exec protocol against real namespaces.
use std::{
    collections::{HashMap, HashSet},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    process::Stdio,
    sync::Mutex,
    time::Duration,
};

use beeline_tests::{conformance, *};
use serde_json::Value;

const POD_CIDR: &str = "10.244.1.0/24";
const DEBIAN_CNI: &str = "/usr/lib/cni";

fn node_with(cidr: &str) -> Node {
    require_root();
    let mut node = Node::new(cidr, Ipv4Addr::new(192, 168, 90, 1));
    node.start_agent(&[]);
    node
}

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

fn runtime<'a>(node: &'a Node, plugins: Vec<Value>) -> conformance::Runtime<'a> {
    conformance::Runtime {
        host: &node.ns,
        conflist: json!({ "name": "beeline-test", "plugins": plugins }),
        cni_path: vec![
            bin("beeline").parent().unwrap().to_path_buf(),
            DEBIAN_CNI.into(),
        ],
    }
}

fn beeline_plugin(node: &Node) -> Value {
    let mut plugin = node.cni_conf("1.1.0");
    plugin.as_object_mut().unwrap().remove("cniVersion");
    plugin.as_object_mut().unwrap().remove("name");
    plugin
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

#[test]
fn ipam_is_delegated_to_host_local_and_static_through_cni_path() {
    let node = node_with(POD_CIDR);
    let data = tempfile::tempdir().unwrap();
    let mut plugin = beeline_plugin(&node);
    plugin["ipam"] = json!({
        "type": "host-local",
        "ranges": [[{ "subnet": POD_CIDR, "rangeStart": "10.244.1.100", "rangeEnd": "10.244.1.110" }]],
        "dataDir": data.path(),
    });
    let rt = runtime(&node, vec![plugin.clone()]);
    let pod = NetNs::new("blp");
    let at = conformance::Attachment {
        container_id: "ctr-hostlocal",
        netns: Some(&pod.path()),
        ifname: "eth0",
    };
    let result = rt.add("1.0.0", at).unwrap();
    let ip: Ipv4Addr = result["ips"][0]["address"]
        .as_str()
        .unwrap()
        .trim_end_matches("/32")
        .parse()
        .unwrap();
    assert!(
        (100..=110).contains(&ip.octets()[3]),
        "{ip} is not from host-local's range"
    );
    assert!(node.ns.ping(ip, 2));
    rt.check("1.0.0", at, &result)
        .expect("CHECK with a delegated IPAM");
    let held = data.path().join("beeline-test").join(ip.to_string());
    assert!(held.exists(), "host-local did not record {ip}");
    rt.del("1.0.0", at, Some(&result)).unwrap();
    assert!(!held.exists(), "DEL did not reach host-local");
    assert!(
        node.allocated_ips().is_empty(),
        "the built-in allocator was used"
    );

    // A failure after the delegate allocated (its address is outside the
    // node's podCIDR): the delegate gets DEL.
    let mut outside = plugin.clone();
    outside["ipam"]["ranges"] = json!([[{ "subnet": "10.99.0.0/24" }]]);
    let err = runtime(&node, vec![outside]).add("1.0.0", at).unwrap_err();
    assert_eq!(err.error_code(), Some(106), "{}", err.stdout);
    assert!(
        err.stdout.contains("outside this node's podCIDR"),
        "{}",
        err.stdout
    );
    let leftovers: Vec<_> = std::fs::read_dir(data.path().join("beeline-test"))
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().parse::<Ipv4Addr>().is_ok())
        .collect();
    assert!(
        leftovers.is_empty(),
        "the delegate kept an address after a failed ADD"
    );
    assert_eq!(pod.settled_links(), vec!["lo".to_string()]);

    let mut static_plugin = beeline_plugin(&node);
    static_plugin["ipam"] =
        json!({ "type": "static", "addresses": [{ "address": "10.244.1.77/24" }] });
    let rt = runtime(&node, vec![static_plugin]);
    let result = rt.add("1.0.0", at).unwrap();
    assert_eq!(result["ips"][0]["address"], "10.244.1.77/32");
    assert!(node.ns.ping(Ipv4Addr::new(10, 244, 1, 77), 2));
    rt.del("1.0.0", at, Some(&result)).unwrap();
    node.assert_nothing_left();
}

/// A node-local DHCP server (dnsmasq) on the pods' host veths, reached
/// through Debian's `dhcp` IPAM plugin and its daemon.
struct DhcpService {
    dir: tempfile::TempDir,
    _dnsmasq: Background,
    daemon: Background,
}

impl DhcpService {
    fn start(node: &Node, first: u8, last: u8) -> DhcpService {
        let dir = tempfile::tempdir().unwrap();
        let log = std::fs::File::create(dir.path().join("dnsmasq.log")).unwrap();
        let dnsmasq = Background::spawn(
            node.ns
                .cmd("dnsmasq")
                .args(["--keep-in-foreground", "--conf-file=/dev/null", "--port=0"])
                .args(["--user=root", "--group=root", "--no-ping", "--log-dhcp"])
                // Beeline's host veths; they come and go.
                .args(["--interface=bl*", "--bind-dynamic"])
                // They carry only the pods' gateway 169.254.1.1/32.
                .arg("--shared-network=169.254.1.1,10.244.1.0")
                .arg(format!(
                    "--dhcp-range=10.244.1.{first},10.244.1.{last},255.255.255.0,1h"
                ))
                .arg("--dhcp-option=option:router,169.254.1.1")
                .arg(format!(
                    "--dhcp-leasefile={}",
                    dir.path().join("leases").display()
                ))
                .arg(format!(
                    "--pid-file={}",
                    dir.path().join("dnsmasq.pid").display()
                ))
                .arg("--log-facility=-")
                .stdout(log.try_clone().unwrap())
                .stderr(log),
        );
        let socket = dir.path().join("dhcp.sock");
        let daemon = Background::spawn(
            node.ns
                .cmd(format!("{DEBIAN_CNI}/dhcp"))
                .args(["daemon", "-socketpath"])
                .arg(&socket)
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        );
        assert!(
            eventually(Duration::from_secs(10), || socket.exists()),
            "the dhcp daemon did not create its socket"
        );
        DhcpService {
            dir,
            _dnsmasq: dnsmasq,
            daemon,
        }
    }

    fn ipam(&self) -> Value {
        json!({ "type": "dhcp", "daemonSocketPath": self.dir.path().join("dhcp.sock") })
    }

    /// Addresses dnsmasq has leased right now.
    fn leases(&self) -> Vec<Ipv4Addr> {
        std::fs::read_to_string(self.dir.path().join("leases"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split_whitespace().nth(2)?.parse().ok())
            .collect()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("dnsmasq.log")).unwrap_or_default()
    }
}

fn address_of(result: &Value) -> Ipv4Addr {
    result["ips"][0]["address"]
        .as_str()
        .unwrap()
        .trim_end_matches("/32")
        .parse()
        .unwrap()
}

#[test]
fn ipam_is_delegated_to_dhcp_with_a_node_local_server() {
    let node = node_with(POD_CIDR);
    let dhcp = DhcpService::start(&node, 150, 160);
    let mut plugin = beeline_plugin(&node);
    plugin["ipam"] = dhcp.ipam();
    let rt = runtime(&node, vec![plugin.clone()]);
    let pods: Vec<NetNs> = (0..3).map(|_| NetNs::new("bld")).collect();
    let ids = ["ctr-dhcp-a", "ctr-dhcp-b", "ctr-dhcp-c"];
    let paths: Vec<_> = pods.iter().map(|p| p.path()).collect();
    let at = |i: usize| conformance::Attachment {
        container_id: ids[i],
        netns: Some(&paths[i]),
        ifname: "eth0",
    };
    let results: Vec<Value> = (0..3)
        .map(|i| {
            rt.add("1.0.0", at(i))
                .unwrap_or_else(|e| panic!("ADD {i}: {}\n{}", e.stdout, dhcp.log()))
        })
        .collect();
    let ips: Vec<Ipv4Addr> = results.iter().map(address_of).collect();
    for ip in &ips {
        assert!(
            (150..=160).contains(&ip.octets()[3]),
            "{ip} is not from the DHCP range"
        );
    }
    let mut leased = dhcp.leases();
    leased.sort();
    let mut expected = ips.clone();
    expected.sort();
    assert_eq!(
        leased, expected,
        "dnsmasq's leases are not the pods' addresses"
    );
    assert!(
        node.allocated_ips().is_empty(),
        "the built-in allocator was used"
    );

    // The pods are wired like any other: to each other and to the node.
    assert!(pods[0].ping(ips[1], 2), "pod a cannot reach pod b");
    assert!(node.ns.ping(ips[2], 2), "the node cannot reach pod c");
    rt.check("1.0.0", at(0), &results[0]).expect("CHECK");

    // GC releases the lease of an attachment no longer valid, DEL the rest.
    rt.gc(&[at(0), at(1)]).expect("GC");
    assert!(
        eventually(Duration::from_secs(5), || !dhcp.leases().contains(&ips[2])),
        "GC did not release {}:\n{}",
        ips[2],
        dhcp.log()
    );
    assert_eq!(pods[2].settled_links(), vec!["lo".to_string()]);
    for (i, result) in results.iter().enumerate().take(2) {
        rt.del("1.0.0", at(i), Some(result)).unwrap();
    }
    assert!(
        eventually(Duration::from_secs(5), || dhcp.leases().is_empty()),
        "DEL did not release the leases: {:?}",
        dhcp.leases()
    );
    node.assert_nothing_left();

    // No DHCP service: ADD fails with the plugin's error and leaves nothing.
    let mut broken = beeline_plugin(&node);
    broken["ipam"] =
        json!({ "type": "dhcp", "daemonSocketPath": dhcp.dir.path().join("nobody.sock") });
    let err = runtime(&node, vec![broken])
        .add("1.0.0", at(0))
        .unwrap_err();
    assert!(err.stdout.contains("dhcp"), "{}", err.stdout);
    node.assert_nothing_left();
    assert_eq!(pods[0].settled_links(), vec!["lo".to_string()]);

    // An ADD killed while dhcp works on the new veth: only the veth (and its
    // alias) records the attachment, and GC finds it.
    let signal = |sig: &str| {
        run(std::process::Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(dhcp.daemon.0.id().to_string()));
    };
    signal("STOP");
    let mut add = node
        .ns
        .cmd(bin("beeline"))
        .env("CNI_COMMAND", "ADD")
        .env("CNI_CONTAINERID", ids[0])
        .env("CNI_NETNS", &paths[0])
        .env("CNI_IFNAME", "eth0")
        .env(
            "CNI_PATH",
            format!(
                "{}:{DEBIAN_CNI}",
                bin("beeline").parent().unwrap().display()
            ),
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut conf = plugin.clone();
    conf["cniVersion"] = json!("1.0.0");
    conf["name"] = json!("beeline-test");
    std::io::Write::write_all(
        &mut add.stdin.take().unwrap(),
        &serde_json::to_vec(&conf).unwrap(),
    )
    .unwrap();
    // Up with its alias: IPAM (stalled in the stopped daemon) comes next.
    let waiting = eventually(Duration::from_secs(10), || {
        node.ns
            .ip(&["-o", "link", "show", "up"])
            .contains("alias beeline beeline-test eth0 ctr-dhcp-a")
    });
    std::thread::sleep(Duration::from_millis(300));
    let _ = add.kill();
    let _ = add.wait();
    signal("CONT");
    assert!(waiting, "ADD never created the veth");
    // The stalled request completes once the daemon runs again.
    assert!(eventually(Duration::from_secs(10), || dhcp.leases().len() == 1));
    rt.gc(&[]).expect("GC after a killed ADD");
    assert!(
        eventually(Duration::from_secs(5), || dhcp.leases().is_empty()),
        "GC did not release the killed ADD's lease"
    );
    node.assert_nothing_left();
    assert_eq!(pods[0].settled_links(), vec!["lo".to_string()]);
}

#[test]
fn chained_with_portmap_and_bandwidth() {
    let mut cluster = Cluster::new(1);
    let external = NetNs::new("ble");
    cluster.plug(&external, "eth0");
    external.ip(&["addr", "add", "192.168.100.200/24", "dev", "eth0"]);
    external.ip(&["link", "set", "eth0", "up"]);
    // bandwidth's egressRate needs the veth's ingress qdisc slot.
    cluster.start(&["--mode", "direct", "--pod-attach", "tcx"]);
    let node = &cluster.nodes[0];
    let rate_bits = 8_000_000u64; // 8 Mbit/s
    let rt = runtime(
        node,
        vec![
            beeline_plugin(node),
            json!({
                "type": "portmap",
                "capabilities": { "portMappings": true },
                "runtimeConfig": { "portMappings": [{ "hostPort": 8080, "containerPort": 80, "protocol": "tcp" }] },
            }),
            json!({
                "type": "bandwidth",
                "ingressRate": rate_bits, "ingressBurst": rate_bits / 8,
                "egressRate": rate_bits, "egressBurst": rate_bits / 8,
            }),
        ],
    );
    let pod = NetNs::new("blp");
    let at = conformance::Attachment {
        container_id: "ctr-chain",
        netns: Some(&pod.path()),
        ifname: "eth0",
    };
    let result = rt.add("1.0.0", at).expect("ADD through the chain");
    let pod_ip: Ipv4Addr = result["ips"]
        .as_array()
        .unwrap()
        .iter()
        .find_map(|ip| ip["address"].as_str()?.strip_suffix("/32")?.parse().ok())
        .expect("the chain's result keeps beeline's address");
    // Beeline's CHECK finds its interface in the chain's merged result.
    // (Debian's portmap 1.1.1 fails its own CHECK on IPv4-only pods: it
    // looks for an IPv6 DNAT chain it never made.)
    runtime(node, vec![beeline_plugin(node)])
        .check("1.0.0", at, &result)
        .expect("beeline CHECK with the chain's result");

    // hostPort: the external host reaches the pod's port 80 at node:8080.
    let listener = pod
        .enter(|| TcpListener::bind(SocketAddr::from((pod_ip, 80))))
        .unwrap();
    let seen = std::thread::scope(|s| {
        let server = s.spawn(move || listener.accept().map(|(_, peer)| peer));
        let connected = external.enter(|| {
            TcpStream::connect_timeout(
                &SocketAddr::from((Cluster::node_ip(0), 8080)),
                Duration::from_secs(5),
            )
        });
        if connected.is_err() {
            let _ = pod.enter(|| TcpStream::connect((pod_ip, 80)));
        }
        (connected.map(|_| ()), server.join().unwrap())
    });
    seen.0.expect("hostPort 8080 on the node is not reachable");

    // bandwidth: the host veth carries the plugin's token bucket, and
    // traffic the host delivers into the pod is held to the rate.
    let host_veth = result["interfaces"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["sandbox"].is_null() && i["name"].as_str().is_some_and(|n| n.starts_with("bl")))
        .unwrap()["name"]
        .as_str()
        .unwrap()
        .to_string();
    let qdisc = node
        .ns
        .cmd("tc")
        .args(["qdisc", "show", "dev", &host_veth])
        .output()
        .unwrap();
    let qdisc = String::from_utf8_lossy(&qdisc.stdout).into_owned();
    assert!(
        qdisc.contains("tbf"),
        "no token bucket on {host_veth}: {qdisc}"
    );
    let gbits = tcp_throughput(&pod, pod_ip, &node.ns, Duration::from_secs(2)).unwrap();
    assert!(
        gbits * 1e9 < rate_bits as f64 * 2.5,
        "host->pod ran at {gbits} Gbit/s despite an {rate_bits} bit/s limit"
    );

    rt.del("1.0.0", at, Some(&result))
        .expect("DEL through the chain");
    assert!(node.pod_veths().is_empty());
    let nat = node
        .ns
        .cmd("iptables")
        .args(["-t", "nat", "-S"])
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&nat.stdout).contains("8080"),
        "portmap rules left"
    );
}

#[test]
fn two_hundred_concurrent_operations_never_duplicate_or_leak() {
    let node = node_with("10.244.3.0/24");
    let live: Mutex<HashMap<Ipv4Addr, String>> = Mutex::new(HashMap::new());
    let conf = node.cni_conf("1.1.0");
    // 50 containers × (ADD, DEL, ADD, DEL) = 200 operations on 10 threads.
    let namespaces: Vec<NetNs> = (0..50).map(|_| NetNs::new("blp")).collect();
    std::thread::scope(|s| {
        for chunk in namespaces.chunks(5) {
            let (node, live, conf) = (&node, &live, &conf);
            s.spawn(move || {
                for round in 0..2 {
                    for ns in chunk {
                        let id = format!("ctr-{}", ns.name);
                        let out = node
                            .cni("ADD", conf, &id, Some(&ns.path()), "eth0")
                            .expect_ok("ADD");
                        let ip: Ipv4Addr = out.json()["ips"][0]["address"]
                            .as_str()
                            .unwrap()
                            .trim_end_matches("/32")
                            .parse()
                            .unwrap();
                        if let Some(other) = live.lock().unwrap().insert(ip, id.clone()) {
                            panic!("{ip} handed to {id} while {other} holds it (round {round})");
                        }
                    }
                    for ns in chunk {
                        let id = format!("ctr-{}", ns.name);
                        live.lock().unwrap().retain(|_, holder| *holder != id);
                        node.cni("DEL", conf, &id, Some(&ns.path()), "eth0")
                            .expect_ok("DEL");
                    }
                }
            });
        }
    });
    node.assert_nothing_left();
    for ns in &namespaces {
        assert_eq!(ns.settled_links(), vec!["lo".to_string()]);
    }
}

#[test]
fn a_cni_killed_anywhere_in_add_converges_after_del_or_gc() {
    let node = node_with("10.244.4.0/24");
    let conf = node.cni_conf("1.1.0");
    let rt = runtime(&node, vec![beeline_plugin(&node)]);
    let mut seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as u64;
    let mut next = || {
        // xorshift: reproducible enough, no dependency.
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut killed_mid_way = 0;
    for i in 0..20 {
        let ns = NetNs::new("blp");
        let id = format!("ctr-kill-{i}");
        let delay = Duration::from_micros(next() % 15_000);
        let mut child = node
            .ns
            .cmd(bin("beeline"))
            .env("CNI_COMMAND", "ADD")
            .env("CNI_CONTAINERID", &id)
            .env("CNI_NETNS", ns.path())
            .env("CNI_IFNAME", "eth0")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        {
            use std::io::Write;
            let _ = child
                .stdin
                .take()
                .unwrap()
                .write_all(&serde_json::to_vec(&conf).unwrap());
        }
        std::thread::sleep(delay);
        let _ = child.kill(); // SIGKILL
        let status = child.wait().unwrap();
        if !status.success() {
            killed_mid_way += 1;
        }
        // Half the time the runtime DELs, half the time a GC cleans up.
        if i % 2 == 0 {
            node.cni("DEL", &conf, &id, Some(&ns.path()), "eth0")
                .expect_ok("DEL after a kill");
        } else {
            rt.gc(&[]).expect("GC after a kill");
        }
        node.assert_nothing_left();
        assert_eq!(
            ns.settled_links(),
            vec!["lo".to_string()],
            "kill {i} after {delay:?} left an interface"
        );
        // The store holds only complete records: no temp files survive
        // the lock taken by DEL/GC.
        if let Ok(entries) = std::fs::read_dir(node.ipam_dir().join("beeline-test")) {
            for entry in entries {
                let name = entry.unwrap().file_name().to_string_lossy().into_owned();
                assert!(
                    !name.starts_with("tmp-"),
                    "half-written record {name} left after kill {i}"
                );
            }
        }
    }
    assert!(
        killed_mid_way > 0,
        "no ADD was interrupted: the test proved nothing"
    );
    // The store still works after all that.
    let pod = Pod::add(&node, "1.1.0");
    pod.del(&node);
    node.assert_nothing_left();
}
