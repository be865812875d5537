//! Issue: the kubelet's runtime path. Debian's containerd 1.6 with its CRI
//! plugin runs on a node, with the network config and CNI binary the agent
//! installs, and is driven over the CRI gRPC API as the kubelet drives it.
use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    path::Path,
    time::Duration,
};

use beeline_tests::{
    cri::{self, Containerd, PodSandboxState, Protocol},
    *,
};

/// A pod's web server: its hostname at /, on 8080.
const HTTPD: &[&str] = &[
    "sh",
    "-c",
    "hostname > /tmp/index.html && exec httpd -f -p 8080 -h /tmp",
];

/// An HTTP GET of / on `addr` from inside `ns`: the body.
fn http_get(ns: &NetNs, addr: SocketAddr) -> std::io::Result<String> {
    ns.enter(|| {
        let mut conn = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        conn.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(conn, "GET /index.html HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
        let mut reply = String::new();
        conn.read_to_string(&mut reply)?;
        Ok(reply
            .split_once("\r\n\r\n")
            .map(|(_, body)| body.to_string())
            .unwrap_or(reply))
    })
}

/// Answers one HTTP request on `ip:port` in `ns` with the client's address.
fn serve_client_address(ns: &NetNs, ip: Ipv4Addr, port: u16) -> std::thread::JoinHandle<()> {
    let listener = ns
        .enter(|| TcpListener::bind((ip, port)))
        .expect("bind the outside server");
    std::thread::spawn(move || {
        if let Ok((mut conn, peer)) = listener.accept() {
            let mut buf = [0u8; 512];
            let _ = conn.read(&mut buf);
            let _ = write!(conn, "HTTP/1.0 200 OK\r\n\r\n{}\n", peer.ip());
        }
    })
}

#[test]
fn containerd_runs_pods_on_the_config_the_agent_installs() {
    let mut cluster = Cluster::new(2);
    let outside_ip = Ipv4Addr::new(192, 168, 100, 200);
    let outside = cluster.external_host(outside_ip);
    let node0 = &cluster.nodes[0];
    let conf_dir = node0.dir.path().join("net.d");
    let bin_dir = node0.dir.path().join("bin");
    let ipam_dir = node0.dir.path().join("ipam");
    std::fs::create_dir_all(&conf_dir).unwrap();
    // The node's CNI plugins, as the kubelet's packages install them.
    cri::cni_bin_dir(
        &bin_dir,
        &[
            Path::new("/usr/lib/cni/portmap"),
            Path::new("/usr/lib/cni/bandwidth"),
        ],
    );
    let args = [
        "--mode=direct".to_string(),
        format!("--cni-conf-dir={}", conf_dir.display()),
        format!("--cni-bin-dir={}", bin_dir.display()),
        format!("--ipam-data-dir={}", ipam_dir.display()),
        format!("--cni-binary={}", bin("beeline").display()),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    // Only node 0 installs into the runtime's directories.
    cluster.publish_nodes(&[0, 1]);
    cluster.nodes[0].start_agent(&args);
    cluster.nodes[1].start_agent(&["--mode=direct"]);
    let node0 = &cluster.nodes[0];
    let ctd = Containerd::start(&node0.ns.name, &conf_dir, &bin_dir);
    let cri = ctd.cri();

    // containerd 1.6 (libcni 1.1) takes the conflist: a result version it
    // knows, and the chained portmap and bandwidth.
    let ready = eventually(Duration::from_secs(10), || {
        ctd.block_on(cri.status()).unwrap().network_ready
    });
    assert!(
        ready,
        "{:?}\n{}",
        ctd.block_on(cri.status()),
        ctd.log_text()
    );
    let conflist: serde_json::Value =
        serde_json::from_slice(&std::fs::read(conf_dir.join("10-beeline.conflist")).unwrap())
            .unwrap();
    assert_eq!(conflist["cniVersion"], "1.0.0", "{conflist}");
    let types: Vec<&str> = conflist["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["type"].as_str().unwrap())
        .collect();
    assert_eq!(types, ["beeline", "portmap", "bandwidth"]);

    let node_name = node0.ns.name.clone();
    let uid = |n: &str| format!("{n}-{node_name}");
    let run = |name: &str, ports: &[(u16, u16, Protocol)]| {
        ctd.block_on(cri.run_pod_sandbox(name, "default", &uid(name), ports))
            .unwrap_or_else(|e| panic!("RunPodSandbox {name}: {e}\n{}", ctd.log_text()))
    };
    let a = run("web-a", &[(8080, 18080, Protocol::Tcp)]);
    let b = run("web-b", &[]);
    let (sa, sb) = (
        ctd.block_on(cri.pod_sandbox_status(&a)).unwrap(),
        ctd.block_on(cri.pod_sandbox_status(&b)).unwrap(),
    );
    for s in [&sa, &sb] {
        assert_eq!(s.state, PodSandboxState::SandboxReady);
        assert!(s.ip.starts_with("10.244.1."), "{s:?}");
    }
    // The agent knows each pod by name.
    let endpoints = node0.map_endpoints();
    for (s, name) in [(&sa, "web-a"), (&sb, "web-b")] {
        let row = endpoints
            .iter()
            .find(|e| e["ip"] == s.ip.as_str())
            .unwrap_or_else(|| panic!("{} not in the endpoint map: {endpoints:?}", s.ip));
        assert_eq!(
            (&row["namespace"], &row["pod"]),
            (&"default".into(), &name.into())
        );
    }

    let mut containers = Vec::new();
    for (pod, name) in [(&a, "httpd-a"), (&b, "httpd-b")] {
        let c = ctd
            .block_on(cri.create_container(pod, name, HTTPD))
            .unwrap_or_else(|e| panic!("CreateContainer: {e}\n{}", ctd.log_text()));
        ctd.block_on(cri.start_container(&c)).unwrap();
        containers.push(c);
    }
    let exec = |c: &str, cmd: &[&str]| {
        ctd.block_on(cri.exec_sync(c, cmd, Duration::from_secs(10)))
            .unwrap_or_else(|e| panic!("ExecSync {cmd:?}: {e}"))
    };
    let wget = |c: &str, url: &str| {
        let mut last = String::new();
        for _ in 0..50 {
            let (code, out, err) = exec(c, &["wget", "-q", "-O", "-", url]);
            if code == 0 {
                return out;
            }
            last = format!("exit {code}: {out}{err}");
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("wget {url} failed: {last}");
    };
    // Pod to pod, both ways.
    assert_eq!(
        wget(&containers[0], &format!("http://{}:8080/index.html", sb.ip)).trim(),
        "web-b"
    );
    assert_eq!(
        wget(&containers[1], &format!("http://{}:8080/index.html", sa.ip)).trim(),
        "web-a"
    );
    // Pod to outside the cluster: masqueraded to the node's address.
    let server = serve_client_address(&outside, outside_ip, 8081);
    let seen = wget(&containers[1], &format!("http://{outside_ip}:8081/"));
    server.join().unwrap();
    assert_eq!(seen.trim(), Cluster::node_ip(0).to_string());
    // The hostPort, from the node itself and from another host.
    let host_port = SocketAddr::from((Cluster::node_ip(0), 18080));
    for (from, who) in [(&node0.ns, "the node"), (&outside, "another host")] {
        let body = http_get(from, host_port)
            .unwrap_or_else(|e| panic!("hostPort {host_port} from {who}: {e}"));
        assert_eq!(body.trim(), "web-a", "from {who}");
    }

    // Stopped twice (DEL with and without the netns), then removed.
    for id in [&a, &b] {
        for _ in 0..2 {
            ctd.block_on(cri.stop_pod_sandbox(id))
                .unwrap_or_else(|e| panic!("StopPodSandbox: {e}\n{}", ctd.log_text()));
        }
        ctd.block_on(cri.remove_pod_sandbox(id))
            .unwrap_or_else(|e| panic!("RemovePodSandbox: {e}\n{}", ctd.log_text()));
    }
    assert!(ctd.block_on(cri.list_pod_sandbox()).unwrap().is_empty());
    assert_eq!(node0.pod_veths(), Vec::<String>::new(), "veths left");
    assert_eq!(
        node0.map_endpoints(),
        Vec::<serde_json::Value>::new(),
        "endpoints left"
    );
    assert_eq!(
        allocations(&ipam_dir),
        Vec::<String>::new(),
        "addresses left"
    );

    // The agent down: RunPodSandbox fails cleanly (try again later), and
    // works once the agent is back.
    cluster.nodes[0].kill_agent();
    let err = ctd
        .block_on(cri.run_pod_sandbox("late", "default", &uid("late"), &[]))
        .expect_err("a pod started without an agent");
    assert!(err.message().contains("try again later"), "{err}");
    let node0 = &cluster.nodes[0];
    assert_eq!(
        node0.pod_veths(),
        Vec::<String>::new(),
        "veths left by the failed pod"
    );
    assert_eq!(
        allocations(&ipam_dir),
        Vec::<String>::new(),
        "addresses left by the failed pod"
    );
    cluster.nodes[0].start_agent(&args);
    let late = ctd
        .block_on(cri.run_pod_sandbox("late", "default", &uid("late2"), &[]))
        .unwrap_or_else(|e| panic!("RunPodSandbox after the agent came back: {e}"));
    ctd.block_on(cri.stop_pod_sandbox(&late)).unwrap();
    ctd.block_on(cri.remove_pod_sandbox(&late)).unwrap();
    drop(cri);
    drop(ctd);
    cluster.nodes[0].assert_nothing_left();
}

/// Addresses in the built-in allocator's store of the network `beeline`.
fn allocations(ipam_dir: &Path) -> Vec<String> {
    std::fs::read_dir(ipam_dir.join("beeline"))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.parse::<Ipv4Addr>().is_ok())
                .collect()
        })
        .unwrap_or_default()
}
