//! Issue: agent lifecycle and observability. Restarts must not touch pod
//! traffic, state is restored from disk and the kernel, the CNI config
//! appears only when the node is ready, and everything is inspectable.
use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use aya::programs::links::{FdLink, PinnedLink};
use beeline_tests::*;

/// Program id behind the node's pinned TCX link for `program`.
fn linked_program_id(node: &Node, program: &str) -> u32 {
    let links = node.bpffs.path.join("links");
    let pin = std::fs::read_dir(&links)
        .unwrap()
        .filter_map(|e| e.ok())
        .find(|e| e.file_name().to_string_lossy().starts_with(program))
        .unwrap_or_else(|| panic!("no pinned link for {program}"));
    let link = PinnedLink::from_pin(pin.path()).unwrap();
    FdLink::from(link).info().unwrap().program_id()
}

/// Program id of the cls_bpf filter on a pod's host veth.
fn pod_filter_program_id(node: &Node, host_ifname: &str) -> u32 {
    node.ns
        .ingress_filter_program_id(host_ifname)
        .unwrap_or_else(|| panic!("no bpf filter on {host_ifname}"))
}

/// A TCP stream that sends continuously and counts what the receiver got,
/// sampled every `SAMPLE`.
struct Stream {
    received: Arc<AtomicU64>,
    failed: Arc<AtomicBool>,
}

const SAMPLE: Duration = Duration::from_millis(200);

fn start_stream<'scope, 'env>(
    scope: &'scope std::thread::Scope<'scope, 'env>,
    server: &'env NetNs,
    server_ip: Ipv4Addr,
    client: &'env NetNs,
    stop: Arc<AtomicBool>,
) -> Stream {
    let received = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicBool::new(false));
    let listener = server
        .enter(|| TcpListener::bind(SocketAddr::from((server_ip, 0))))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let (r, f) = (received.clone(), failed.clone());
    scope.spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        let mut buf = vec![0u8; 1 << 16];
        loop {
            match conn.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => {
                    r.fetch_add(n as u64, Ordering::Relaxed);
                }
                Err(_) => {
                    f.store(true, Ordering::Relaxed);
                    return;
                }
            }
        }
    });
    let f = failed.clone();
    scope.spawn(move || {
        let mut conn = client
            .enter(|| TcpStream::connect_timeout(&addr, Duration::from_secs(5)))
            .unwrap();
        conn.set_write_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        let buf = vec![7u8; 1 << 14];
        while !stop.load(Ordering::Relaxed) {
            if conn.write_all(&buf).is_err() {
                f.store(true, Ordering::Relaxed);
                return;
            }
        }
    });
    Stream { received, failed }
}

/// Request/response over one connection; returns the worst round trip.
fn ping_pong<'scope, 'env>(
    scope: &'scope std::thread::Scope<'scope, 'env>,
    server: &'env NetNs,
    server_ip: Ipv4Addr,
    client: &'env NetNs,
    stop: Arc<AtomicBool>,
) -> std::thread::ScopedJoinHandle<'scope, Result<Duration, String>> {
    let listener = server
        .enter(|| TcpListener::bind(SocketAddr::from((server_ip, 0))))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    scope.spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        let mut b = [0u8; 1];
        while conn.read_exact(&mut b).is_ok() {
            if conn.write_all(&b).is_err() {
                break;
            }
        }
    });
    scope.spawn(move || {
        let mut conn = client
            .enter(|| TcpStream::connect_timeout(&addr, Duration::from_secs(5)))
            .map_err(|e| e.to_string())?;
        conn.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut worst = Duration::ZERO;
        let mut b = [1u8; 1];
        while !stop.load(Ordering::Relaxed) {
            let t = Instant::now();
            conn.write_all(&b).map_err(|e| format!("write: {e}"))?;
            conn.read_exact(&mut b).map_err(|e| format!("read: {e}"))?;
            worst = worst.max(t.elapsed());
        }
        Ok(worst)
    })
}

#[test]
fn killing_and_restarting_the_agent_never_stops_pod_traffic() {
    let mut cluster = Cluster::new(2);
    cluster.start(&["--mode", "auto"]);
    let (a, b) = (
        Pod::add(&cluster.nodes[0], "1.1.0"),
        Pod::add(&cluster.nodes[0], "1.1.0"),
    );
    let c = Pod::add(&cluster.nodes[1], "1.1.0");
    let program_before = pod_filter_program_id(&cluster.nodes[0], &a.host_ifname);
    let uplink_before = linked_program_id(&cluster.nodes[0], "beeline_from_uplink-");
    let stats_before = cluster.nodes[0].stats();

    let stop = Arc::new(AtomicBool::new(false));
    let (samples_same, samples_cross, worst_rtt, failed) = std::thread::scope(|s| {
        let same = start_stream(s, &b.ns, b.ip, &a.ns, stop.clone());
        let cross = start_stream(s, &c.ns, c.ip, &a.ns, stop.clone());
        let rr = ping_pong(s, &b.ns, b.ip, &a.ns, stop.clone());
        let mut samples = (Vec::new(), Vec::new());
        let mut last = (0, 0);
        let mut sample = |samples: &mut (Vec<u64>, Vec<u64>)| {
            std::thread::sleep(SAMPLE);
            let now = (
                same.received.load(Ordering::Relaxed),
                cross.received.load(Ordering::Relaxed),
            );
            samples.0.push(now.0 - last.0);
            samples.1.push(now.1 - last.1);
            last = now;
        };
        for _ in 0..5 {
            sample(&mut samples);
        }
        // SIGKILL: a crash. Pinned links and maps keep forwarding.
        cluster.nodes[0].kill_agent();
        for _ in 0..5 {
            sample(&mut samples);
        }
        cluster.nodes[0].start_agent(&["--mode", "auto"]);
        for _ in 0..5 {
            sample(&mut samples);
        }
        // Once more: the new process swaps its program into the pinned links.
        cluster.nodes[0].kill_agent();
        cluster.nodes[0].start_agent(&["--mode", "auto"]);
        for _ in 0..5 {
            sample(&mut samples);
        }
        stop.store(true, Ordering::Relaxed);
        let worst = rr.join().unwrap();
        let failed = same.failed.load(Ordering::Relaxed) || cross.failed.load(Ordering::Relaxed);
        (samples.0, samples.1, worst, failed)
    });

    assert!(!failed, "a stream failed");
    let worst = worst_rtt.expect("the request/response connection failed");
    assert!(worst < Duration::from_secs(1), "a request waited {worst:?}");
    // No gap longer than one sample interval: every sample saw bytes.
    assert!(
        samples_same.iter().all(|b| *b > 0),
        "same-node gap: {samples_same:?}"
    );
    assert!(
        samples_cross.iter().all(|b| *b > 0),
        "cross-node gap: {samples_cross:?}"
    );

    let program_after = pod_filter_program_id(&cluster.nodes[0], &a.host_ifname);
    assert_ne!(
        program_before, program_after,
        "the restarted agent did not swap its program into the pod's filter"
    );
    assert_ne!(
        uplink_before,
        linked_program_id(&cluster.nodes[0], "beeline_from_uplink-"),
        "the restarted agent did not swap its program into the uplink's link"
    );
    let stats_after = cluster.nodes[0].stats();
    let redirected = |s: &serde_json::Value| s["from_pod"]["redirected_local"].as_u64().unwrap();
    assert!(
        redirected(&stats_after) > redirected(&stats_before),
        "counters were reset or stopped"
    );
    let log = cluster.nodes[0].agent.as_ref().unwrap().log_text();
    assert!(
        log.contains("restored: 2"),
        "the restart should restore both endpoints: {log}"
    );
    for pod in [&a, &b] {
        pod.del(&cluster.nodes[0]);
    }
    c.del(&cluster.nodes[1]);
}

#[test]
fn a_pod_deleted_while_the_agent_was_down_is_cleaned_up_on_start() {
    require_root();
    let mut node = Node::new("10.244.1.0/24", Ipv4Addr::new(192, 168, 90, 1));
    node.start_agent(&[]);
    let gone = Pod::add(&node, "1.1.0");
    let kept = Pod::add(&node, "1.1.0");
    node.kill_agent();
    gone.del(&node); // the agent is down: DEL still succeeds
    assert_eq!(
        node.map_endpoints().len(),
        2,
        "nobody should have touched the map yet"
    );
    node.start_agent(&[]);
    let entries = node.map_endpoints();
    assert_eq!(entries.len(), 1, "{entries:?}");
    assert_eq!(entries[0]["ip"], kept.ip.to_string());
    let log = node.agent.as_ref().unwrap().log_text();
    assert!(
        log.contains(&gone.container_id),
        "the log should name what was removed: {log}"
    );
    assert!(node.ns.ping(kept.ip, 2));
    kept.del(&node);
}

#[test]
fn the_cni_config_appears_only_when_ready_and_uninstall_removes_everything() {
    require_root();
    let mut node = Node::new("10.244.1.0/24", Ipv4Addr::new(192, 168, 90, 1));
    let name = node.name.clone();
    node.write_nodes_file(&[(name.as_str(), None, node.ip)]);
    let conf_dir = node.dir.path().join("net.d");
    let bin_dir = node.dir.path().join("bin");
    let conf_dir_arg = format!("--cni-conf-dir={}", conf_dir.display());
    let bin_dir_arg = format!("--cni-bin-dir={}", bin_dir.display());
    node.start_agent_unready(&[&conf_dir_arg, &bin_dir_arg]);
    let conflist = conf_dir.join("10-beeline.conflist");

    assert!(eventually(Duration::from_secs(5), || node
        .http_get("/healthz")
        .0
        == 200));
    let (status, body) = node.http_get("/readyz");
    assert_eq!(status, 503);
    assert!(body.contains("no podCIDR"), "{body}");
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        !conflist.exists(),
        "config written before the node could network pods"
    );

    node.write_nodes_file(&[(name.as_str(), Some("10.244.1.0/24"), node.ip)]);
    assert!(eventually(Duration::from_secs(10), || conflist.exists()));
    assert_eq!(node.http_get("/readyz").0, 200);
    let conf: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&conflist).unwrap()).unwrap();
    assert_eq!(conf["plugins"][0]["type"], "beeline");
    assert_eq!(
        conf["plugins"][0]["agentSocket"],
        node.socket().display().to_string()
    );
    let installed = bin_dir.join("beeline");
    assert_eq!(
        std::fs::read(&installed).unwrap(),
        std::fs::read(bin("beeline")).unwrap()
    );
    assert!(
        std::fs::read_dir(&conf_dir).unwrap().count() == 1,
        "temp files left in net.d"
    );

    let pod = Pod::add(&node, "1.1.0");
    assert!(pod.ns.ping(Ipv4Addr::new(192, 168, 90, 1), 2));
    let (status, metrics) = node.http_get("/metrics");
    assert_eq!(status, 200);
    for needle in [
        "beeline_endpoints 1",
        "beeline_cni_requests_total{verb=\"register\",result=\"ok\"} 1",
        "beeline_map_entries{map=\"endpoints\"} 1",
        "beeline_datapath_packets_total{program=\"from_pod\",verdict=\"passed_to_host\"}",
    ] {
        assert!(
            metrics.contains(needle),
            "/metrics lacks {needle}:\n{metrics}"
        );
    }
    let node_ns = node.ns.borrowed();
    let pod_filter = || {
        String::from_utf8_lossy(
            &node_ns
                .cmd("tc")
                .args(["filter", "show", "dev", &pod.host_ifname, "ingress"])
                .output()
                .unwrap()
                .stdout,
        )
        .into_owned()
    };
    assert!(
        pod_filter().contains("beeline_from_pod"),
        "{}",
        pod_filter()
    );

    let state_dir = format!("--state-dir={}", node.state_dir().display());
    let bpffs = format!("--bpffs-dir={}", node.bpffs.path.display());
    node.kill_agent();
    let out = node
        .ns
        .cmd(bin("beeline-agent"))
        .args(["uninstall", &bpffs, &state_dir, &conf_dir_arg, &bin_dir_arg])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!conflist.exists() && !installed.exists());
    assert!(
        !pod_filter().contains("beeline_from_pod"),
        "a running pod kept the program: {}",
        pod_filter()
    );
    pod.del(&node);
    assert!(!node.bpffs.path.exists(), "pins left");
    assert!(
        !node.ns.links().iter().any(|l| l == "beeline-vxlan"),
        "VXLAN device left"
    );
    let nft = node.ns.cmd("nft").args(["list", "tables"]).output();
    if let Ok(nft) = nft {
        assert!(
            !String::from_utf8_lossy(&nft.stdout).contains("beeline"),
            "masquerade table left"
        );
    }
}

#[test]
fn bpftool_prints_the_field_names_of_every_pinned_map() {
    require_root();
    if Command::new("bpftool").arg("version").output().is_err() {
        panic!("bpftool is needed for this test (apt-get install bpftool)");
    }
    let mut node = Node::new("10.244.1.0/24", Ipv4Addr::new(192, 168, 90, 1));
    node.start_agent(&[]);
    let pod = Pod::add(&node, "1.1.0");
    for (map, fields) in [
        (
            "BEELINE_ENDPOINTS",
            &["addr", "host_ifindex", "pod_mac", "host_mac"][..],
        ),
        (
            "BEELINE_NODE_CONFIG",
            &[
                "uplink_ifindex",
                "vxlan_ifindex",
                "vni",
                "node_addr",
                "vxlan_port",
                "vxlan_encap",
            ][..],
        ),
        ("BEELINE_STATS", &["packets", "bytes"][..]),
    ] {
        let out = Command::new("bpftool")
            .args(["map", "dump", "pinned"])
            .arg(node.bpffs.path.join(map))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        for field in fields {
            assert!(
                text.contains(&format!("\"{field}\"")),
                "{map} dump lacks {field}:\n{text}"
            );
        }
    }
    pod.del(&node);
}

/// Sends one raw Ethernet frame out of `ifname` in `ns` (AF_PACKET).
fn send_raw_frame(ns: &NetNs, ifname: &str, frame: &[u8]) {
    ns.enter(|| {
        let index = nix::net::if_::if_nametoindex(ifname).unwrap();
        // SAFETY: plain socket calls on a socket this closure owns and closes.
        unsafe {
            let fd = libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW,
                (libc::ETH_P_ALL as u16).to_be() as i32,
            );
            assert!(
                fd >= 0,
                "AF_PACKET socket: {}",
                std::io::Error::last_os_error()
            );
            let mut addr: libc::sockaddr_ll = std::mem::zeroed();
            addr.sll_family = libc::AF_PACKET as u16;
            addr.sll_ifindex = index as i32;
            addr.sll_halen = 6;
            let sent = libc::sendto(
                fd,
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&addr as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            );
            libc::close(fd);
            assert_eq!(
                sent,
                frame.len() as isize,
                "sendto: {}",
                std::io::Error::last_os_error()
            );
        }
    });
}

#[test]
fn ebpf_debug_logs_reach_the_agent_log_only_when_asked_for() {
    require_root();
    let mut node = Node::new("10.244.1.0/24", Ipv4Addr::new(192, 168, 90, 1));
    // A frame claiming IPv4 but too short to hold an IPv4 header.
    let mut runt = vec![0xffu8; 12];
    runt.extend_from_slice(&[0x08, 0x00, 0x45, 0x00]);
    let message = format!("dropping a malformed frame of {} bytes", runt.len());

    node.start_agent(&[]);
    let pod = Pod::add(&node, "1.1.0");
    send_raw_frame(&pod.ns, "eth0", &runt);
    assert!(eventually(Duration::from_secs(5), || {
        node.stats()["from_pod"]["dropped_malformed"].as_u64() == Some(1)
    }));
    std::thread::sleep(Duration::from_millis(300));
    let log = node.agent.as_ref().unwrap().log_text();
    assert!(
        !log.contains(&message),
        "debug logs are on without --ebpf-debug-logs"
    );

    node.kill_agent();
    node.start_agent(&["--ebpf-debug-logs"]);
    send_raw_frame(&pod.ns, "eth0", &runt);
    assert!(
        eventually(Duration::from_secs(5), || node
            .agent
            .as_ref()
            .unwrap()
            .log_text()
            .contains(&message)),
        "the program's debug log never reached the agent's log"
    );
    pod.del(&node);
}

#[test]
fn changing_pod_attach_on_restart_moves_every_pod_to_the_new_hook() {
    require_root();
    let mut node = Node::new("10.244.7.0/24", Ipv4Addr::new(192, 168, 90, 1));
    node.start_agent(&[]);
    let (a, b) = (Pod::add(&node, "1.1.0"), Pod::add(&node, "1.1.0"));
    let filter = |node: &Node| {
        let out = run(node
            .ns
            .cmd("tc")
            .args(["filter", "show", "dev", &a.host_ifname, "ingress"]));
        String::from_utf8_lossy(&out.stdout).contains("beeline_from_pod")
    };
    let pinned = |node: &Node| {
        node.bpffs
            .path
            .join("links")
            .join(format!("beeline_from_pod-{}", a.host_ifname))
            .exists()
    };
    assert!(filter(&node) && !pinned(&node), "default: a cls_bpf filter");

    node.kill_agent();
    node.start_agent(&["--pod-attach", "tcx"]);
    assert!(pinned(&node) && !filter(&node), "tcx: a pinned link only");
    let redirected = |node: &Node| {
        node.stats()["from_pod"]["redirected_local"]
            .as_u64()
            .unwrap()
    };
    let before = redirected(&node);
    assert!(a.ns.ping(b.ip, 2));
    assert!(
        redirected(&node) > before,
        "the TCX program did not carry a -> b"
    );

    node.kill_agent();
    node.start_agent(&[]);
    assert!(
        filter(&node) && !pinned(&node),
        "back to tc: the filter only"
    );
    let before = redirected(&node);
    assert!(a.ns.ping(b.ip, 2));
    assert!(
        redirected(&node) > before,
        "the filter did not carry a -> b"
    );
    a.del(&node);
    b.del(&node);
    node.assert_nothing_left();
}
