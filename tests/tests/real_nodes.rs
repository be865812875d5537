//! Issue: real node conditions. A reboot (state dirs kept, everything else
//! gone), a runtime that crashes before its DEL and never calls GC, and
//! Docker's FORWARD policy DROP.
use std::{
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    process::Command,
    time::Duration,
};

use beeline_tests::{
    cni_spec::{beeline_plugin, runtime},
    *,
};

#[test]
fn after_a_reboot_nothing_of_before_is_held_and_a_full_pod_cidr_refills() {
    require_root();
    // A /28: 14 addresses.
    let mut node = Node::new("10.244.9.0/28", Ipv4Addr::new(192, 168, 99, 1));
    node.start_agent(&[]);
    let pods: Vec<Pod> = (0..14).map(|_| Pod::add(&node, "1.1.0")).collect();
    let full = node.cni(
        "ADD",
        &node.cni_conf("1.1.0"),
        "ctr-one-too-many",
        Some(&pods[0].ns.path()),
        "eth1",
    );
    assert_eq!(full.error_code(), 100, "the /28 should be full");

    // The reboot: the agent dies, every pod (netns, veth) with it, bpffs and
    // /run start empty; the state dir and the IP store survive.
    node.kill_agent();
    drop(pods);
    // The kernel destroys deleted netns (and their veths) in the background.
    assert!(eventually(Duration::from_secs(10), || node
        .pod_veths()
        .is_empty()));
    std::fs::remove_dir_all(&node.bpffs.path).unwrap();
    let _ = std::fs::remove_file(node.socket());
    assert_eq!(node.allocated_ips().len(), 14, "the IP store was not kept");
    node.start_agent(&[]);

    assert_eq!(
        node.allocated_ips(),
        Vec::<String>::new(),
        "addresses of before held"
    );
    assert_eq!(node.map_endpoints(), Vec::<serde_json::Value>::new());
    let state = std::fs::read_to_string(node.state_dir().join("endpoints.json")).unwrap();
    let state: serde_json::Value = serde_json::from_str(&state).unwrap();
    assert_eq!(
        state["endpoints"],
        serde_json::json!([]),
        "endpoints of before kept"
    );
    let pods: Vec<Pod> = (0..14).map(|_| Pod::add(&node, "1.1.0")).collect();
    assert!(pods[0].ns.ping(pods[13].ip, 1));
    for pod in &pods {
        pod.del(&node);
    }
    node.assert_nothing_left();
}

#[test]
fn a_pod_gone_without_a_del_is_released_and_a_live_pod_never_is() {
    require_root();
    let mut node = Node::new("10.244.8.0/24", Ipv4Addr::new(192, 168, 98, 1));
    // The bound the README states is two resync periods; 1 s here.
    node.start_agent(&["--resync-period=1s"]);
    let (a, b) = (Pod::add(&node, "1.1.0"), Pod::add(&node, "1.1.0"));

    // a's runtime crashed: its netns is deleted, no DEL ever comes.
    let a_ip = a.ip.to_string();
    let Pod { ns, .. } = a;
    drop(ns);
    assert!(
        eventually(Duration::from_secs(3), || !node
            .allocated_ips()
            .contains(&a_ip)),
        "the address of a pod that is gone was not released"
    );
    assert!(!node.map_endpoints().iter().any(|e| e["ip"] == a_ip));

    // b's veth is deleted by hand, but b lives on: its address stays.
    node.ns.ip(&["link", "del", &b.host_ifname]);
    let (status, body) = (0..30)
        .map(|_| {
            std::thread::sleep(Duration::from_millis(100));
            node.http_get("/readyz")
        })
        .find(|(s, _)| *s == 503)
        .unwrap_or_else(|| node.http_get("/readyz"));
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("pod_veth_missing"), "{body}");
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        node.allocated_ips().contains(&b.ip.to_string()),
        "a live pod's address was released"
    );
    b.del(&node);
    assert!(eventually(Duration::from_secs(3), || node
        .http_get("/readyz")
        .0
        == 200));
    node.assert_nothing_left();
}

/// `iptables -S <chain>` in `ns` (iptables-nft, as Debian ships it).
fn iptables_s(ns: &NetNs, chain: &str) -> String {
    let out = ns
        .cmd("iptables")
        .args(["-w", "-S", chain])
        .output()
        .unwrap();
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn with_forward_policy_drop_egress_and_host_ports_work_and_uninstall_cleans_up() {
    let mut cluster = Cluster::new(2);
    let external_ip = Ipv4Addr::new(192, 168, 100, 201);
    let external = cluster.external_host(external_ip);
    // What Docker does to a node.
    run(cluster.nodes[0]
        .ns
        .cmd("iptables")
        .args(["-w", "-P", "FORWARD", "DROP"]));
    cluster.start(&["--mode", "direct", "--resync-period=1s"]);
    let node = &cluster.nodes[0];
    let forward = iptables_s(&node.ns, "FORWARD");
    assert!(forward.contains("-P FORWARD DROP"), "{forward}");
    assert!(
        forward.contains("-j BEELINE-FORWARD") && forward.contains("beeline: pod traffic"),
        "no jump to Beeline's chain, or iptables cannot read it: {forward}"
    );
    let ours = iptables_s(&node.ns, "BEELINE-FORWARD");
    for cidr in ["10.244.1.0/24", "10.244.2.0/24"] {
        for side in ["-s", "-d"] {
            assert!(
                ours.contains(&format!("{side} {cidr} -m comment")),
                "{ours}"
            );
        }
    }
    assert!(!ours.contains("incompatible"), "{ours}");

    // Pod egress (forwarded, masqueraded), a hostPort (DNAT, forwarded).
    let rt = runtime(
        node,
        vec![
            beeline_plugin(node),
            serde_json::json!({
                "type": "portmap",
                "capabilities": { "portMappings": true },
                "runtimeConfig": { "portMappings": [{ "hostPort": 8080, "containerPort": 80, "protocol": "tcp" }] },
            }),
        ],
    );
    let pod = NetNs::new("blp");
    let at = conformance::Attachment {
        container_id: "ctr-fwd-drop",
        netns: Some(&pod.path()),
        ifname: "eth0",
    };
    let result = rt.add("1.0.0", at).expect("ADD through the chain");
    let pod_ip: Ipv4Addr = result["ips"][0]["address"]
        .as_str()
        .unwrap()
        .trim_end_matches("/32")
        .parse()
        .unwrap();
    let seen = tcp_echo(&external, external_ip, &pod).expect("pod egress with FORWARD DROP");
    assert_eq!(seen.ip(), Cluster::node_ip(0));
    let listener = pod
        .enter(|| TcpListener::bind(SocketAddr::from((pod_ip, 80))))
        .unwrap();
    let accepted = std::thread::spawn(move || listener.accept().map(|(_, peer)| peer.ip()));
    let connected = external.enter(|| {
        TcpStream::connect_timeout(
            &SocketAddr::from((Cluster::node_ip(0), 8080)),
            Duration::from_secs(5),
        )
    });
    if connected.is_err() {
        let _ = pod.enter(|| TcpStream::connect((pod_ip, 80)));
    }
    connected.expect("the hostPort with FORWARD DROP");
    assert_eq!(accepted.join().unwrap().unwrap(), external_ip);
    // A pod on the other node still reaches it (that path bypasses FORWARD).
    let other = Pod::add(&cluster.nodes[1], "1.1.0");
    assert!(other.ns.ping(pod_ip, 2));

    // The rules come back after a flush, and the node's uninstall removes them.
    run(node.ns.cmd("iptables").args(["-w", "-F", "FORWARD"]));
    assert!(eventually(Duration::from_secs(5), || iptables_s(
        &node.ns, "FORWARD"
    )
    .contains("-j BEELINE-FORWARD")));
    assert!(node.metric("beeline_repairs_total{kind=\"forward_rules\"}") >= 1.0);
    rt.del("1.0.0", at, Some(&result))
        .expect("DEL through the chain");
    other.del(&cluster.nodes[1]);
    let node = &mut cluster.nodes[0];
    node.kill_agent();
    let out = node
        .ns
        .cmd(bin("beeline-agent"))
        .arg("uninstall")
        .arg(format!("--bpffs-dir={}", node.bpffs.path.display()))
        .arg(format!("--state-dir={}", node.state_dir().display()))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let forward = iptables_s(&node.ns, "FORWARD");
    assert!(!forward.contains("BEELINE"), "{forward}");
    assert!(
        forward.contains("-P FORWARD DROP"),
        "uninstall changed the policy: {forward}"
    );
    let chains = Command::new("nsenter")
        .arg(format!("--net={}", node.ns.path().display()))
        .args(["iptables", "-w", "-S"])
        .output()
        .unwrap();
    assert!(!String::from_utf8_lossy(&chains.stdout).contains("BEELINE-FORWARD"));
}
