//! The CRI harness works without Beeline: containerd's CRI plugin on a node
//! namespace, with the reference plugins (bridge + host-local + portmap)
//! from /usr/lib/cni, driven over gRPC the way the kubelet drives it.
use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    path::Path,
    time::{Duration, Instant},
};

use beeline_tests::{
    NetNs,
    cri::{Containerd, Footprint, PodSandboxState, Protocol},
    eventually, json, require_root,
};

/// A pod's web server: its hostname in /tmp/index.html, served on 8080.
const HTTPD: &[&str] = &[
    "sh",
    "-c",
    "hostname > /tmp/index.html && exec httpd -f -p 8080 -h /tmp",
];

fn mounts() -> Vec<String> {
    // Mount ids and parents change with every mount: compare the rest.
    let mut m: Vec<String> = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .map(|l| l.split(' ').skip(2).collect::<Vec<_>>().join(" "))
        .collect();
    m.sort();
    m
}

/// veth links in `ns` other than the uplink pair.
fn pod_veths(ns: &NetNs) -> Vec<String> {
    let out = ns.ip(&["-j", "link", "show", "type", "veth"]);
    let links: serde_json::Value = serde_json::from_str(&out).unwrap();
    links
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["ifname"].as_str().unwrap().to_string())
        .filter(|n| !n.starts_with("uplink0"))
        .collect()
}

/// An HTTP GET of / on `addr` from inside `ns`: the body.
fn http_get(ns: &NetNs, addr: SocketAddr) -> std::io::Result<String> {
    ns.enter(|| {
        let mut conn = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        conn.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(conn, "GET / HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
        let mut reply = String::new();
        conn.read_to_string(&mut reply)?;
        Ok(reply
            .split_once("\r\n\r\n")
            .map(|(_, body)| body.to_string())
            .unwrap_or(reply))
    })
}

/// A node namespace with an uplink veth and an address, and a CNI config
/// dir for the reference bridge + host-local + portmap conflist.
struct SmokeNode {
    ns: NetNs,
    ip: Ipv4Addr,
    dir: tempfile::TempDir,
    mounts_before: Vec<String>,
}

impl SmokeNode {
    fn new() -> SmokeNode {
        require_root();
        let ip = Ipv4Addr::new(192, 168, 93, 1);
        let ns = NetNs::new("blc");
        ns.ip(&[
            "link", "add", "uplink0", "type", "veth", "peer", "name", "uplink0p",
        ]);
        ns.ip(&["addr", "add", &format!("{ip}/24"), "dev", "uplink0"]);
        ns.ip(&["link", "set", "uplink0", "up"]);
        ns.ip(&["link", "set", "uplink0p", "up"]);
        let mounts_before = mounts();
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("net.d")).unwrap();
        SmokeNode {
            ns,
            ip,
            dir,
            mounts_before,
        }
    }

    /// The network config: bridge, host-local and portmap.
    fn write_conflist(&self) {
        // containerd 1.6's libcni takes results up to CNI 1.0.0.
        let conflist = json!({
            "cniVersion": "1.0.0",
            "name": "cri-smoke",
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": "cni0",
                    "isGateway": true,
                    "ipMasq": true,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{ "subnet": "10.88.0.0/24" }]],
                        "routes": [{ "dst": "0.0.0.0/0" }],
                        "dataDir": self.dir.path().join("ipam"),
                    },
                },
                { "type": "portmap", "capabilities": { "portMappings": true } },
            ],
        });
        // In place, in one write: containerd 1.6 ignores the CREATE event
        // (a rename into place goes unseen) and reloads on the WRITE.
        std::fs::write(
            self.dir.path().join("net.d/10-smoke.conflist"),
            serde_json::to_vec_pretty(&conflist).unwrap(),
        )
        .unwrap();
    }

    fn containerd(&self) -> Containerd {
        Containerd::start(
            &self.ns.name,
            &self.dir.path().join("net.d"),
            Path::new("/usr/lib/cni"),
        )
    }

    fn leases(&self) -> Vec<String> {
        std::fs::read_dir(self.dir.path().join("ipam/cri-smoke"))
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.parse::<Ipv4Addr>().is_ok())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Mounts that appeared since the node was made (other tests may run
    /// meanwhile: their netns and bpffs mounts are theirs).
    fn new_mounts(&self) -> Vec<String> {
        mounts()
            .into_iter()
            .filter(|m| !self.mounts_before.contains(m))
            .filter(|m| {
                let point = m.split(' ').nth(2).unwrap_or("");
                let others = point == "/run/netns"
                    || (point.starts_with("/run/netns/") && !point.starts_with("/run/netns/cni-"))
                    || point.starts_with("/sys/fs/bpf");
                !others
            })
            .collect()
    }

    /// Asserts that nothing of `footprint`'s containerd is left.
    fn assert_all_gone(&self, footprint: &Footprint) {
        let left = footprint.leftovers();
        assert!(left.is_empty(), "left behind: {left:#?}");
        assert_eq!(pod_veths(&self.ns), Vec::<String>::new(), "veths left");
        assert_eq!(self.new_mounts(), Vec::<String>::new(), "mounts left");
    }
}

#[test]
fn containerd_cri_runs_pods_with_reference_plugins() {
    let started = Instant::now();
    let node = SmokeNode::new();
    let ctd = node.containerd();
    println!("containerd up, image imported: {:?}", started.elapsed());
    let cri = ctd.cri();
    // No network config yet: the runtime is ready, its network is not.
    let status = ctd.block_on(cri.status()).unwrap();
    assert!(status.runtime_ready, "{status:?}");
    assert!(!status.network_ready, "{status:?}");
    assert!(!status.network_reason.is_empty(), "{status:?}");
    println!("before any CNI config: {status:?}");
    // containerd watches its conf_dir: a config written later is picked up.
    node.write_conflist();
    let ready = eventually(Duration::from_secs(10), || {
        ctd.block_on(cri.status()).unwrap().network_ready
    });
    assert!(
        ready,
        "{:?}\n{}",
        ctd.block_on(cri.status()),
        ctd.log_text()
    );

    let uid = |n: &str| format!("{n}-{}", node.ns.name);
    let a = ctd
        .block_on(cri.run_pod_sandbox(
            "web-a",
            "default",
            &uid("a"),
            &[(8080, 18080, Protocol::Tcp)],
        ))
        .unwrap_or_else(|e| panic!("RunPodSandbox: {e}\n{}", ctd.log_text()));
    let b = ctd
        .block_on(cri.run_pod_sandbox("web-b", "default", &uid("b"), &[]))
        .unwrap_or_else(|e| panic!("RunPodSandbox: {e}\n{}", ctd.log_text()));
    let (sa, sb) = (
        ctd.block_on(cri.pod_sandbox_status(&a)).unwrap(),
        ctd.block_on(cri.pod_sandbox_status(&b)).unwrap(),
    );
    for s in [&sa, &sb] {
        assert_eq!(s.state, PodSandboxState::SandboxReady);
        assert!(s.ip.starts_with("10.88.0."), "{s:?}");
        assert!(s.additional_ips.is_empty(), "{s:?}");
        let ns = s.netns.as_ref().expect("a pod netns");
        assert!(
            ns.to_string_lossy().contains("/netns/cni-") && ns.exists(),
            "{s:?}"
        );
    }
    assert_eq!(pod_veths(&node.ns).len(), 2, "one host veth per pod");
    println!("sandboxes ready: {:?}", started.elapsed());
    let listed = ctd.block_on(cri.list_pod_sandbox()).unwrap();
    assert_eq!(listed.len(), 2);

    let mut containers = Vec::new();
    for (pod, name) in [(&a, "httpd-a"), (&b, "httpd-b")] {
        let c = ctd
            .block_on(cri.create_container(pod, name, HTTPD))
            .unwrap_or_else(|e| panic!("CreateContainer: {e}\n{}", ctd.log_text()));
        ctd.block_on(cri.start_container(&c))
            .unwrap_or_else(|e| panic!("StartContainer: {e}\n{}", ctd.log_text()));
        containers.push(c);
    }
    println!("containers started: {:?}", started.elapsed());
    let exec = |c: &str, cmd: &[&str]| {
        ctd.block_on(cri.exec_sync(c, cmd, Duration::from_secs(10)))
            .unwrap_or_else(|e| panic!("ExecSync {cmd:?}: {e}"))
    };
    let (code, out, err) = exec(&containers[0], &["hostname"]);
    assert_eq!((code, out.trim()), (0, "web-a"), "{err}");

    // Pod to pod, both ways: ping, then HTTP (busybox wget has no working -T:
    // ExecSync's timeout bounds it).
    let (code, out, err) = exec(&containers[0], &["ping", "-c", "2", "-W", "2", &sb.ip]);
    assert_eq!(code, 0, "a cannot ping b: {out}{err}");
    let url = |ip: &str| format!("http://{ip}:8080/index.html");
    let get = |c: &str, ip: &str| {
        let mut last = String::new();
        for _ in 0..50 {
            let (code, out, err) = exec(c, &["wget", "-q", "-O", "-", &url(ip)]);
            if code == 0 {
                return out;
            }
            // The server may still be starting.
            last = format!("exit {code}: {out}{err}");
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("wget {ip} failed: {last}");
    };
    assert_eq!(get(&containers[0], &sb.ip).trim(), "web-b");
    assert_eq!(get(&containers[1], &sa.ip).trim(), "web-a");

    // The hostPort (portmap's DNAT) from the node itself.
    let host_port = SocketAddr::from((node.ip, 18080));
    let body =
        http_get(&node.ns, host_port).unwrap_or_else(|e| panic!("hostPort {host_port}: {e}"));
    assert_eq!(body.trim(), "web-a");
    println!("pods up and talking: {:?}", started.elapsed());

    // The kubelet stops a pod (possibly more than once), then removes it.
    let footprint = ctd.footprint();
    assert_eq!(footprint.netns.len(), 2, "{footprint:?}");
    assert!(
        !footprint.cgroup_dirs().is_empty(),
        "pods are not under the harness' cgroup parent"
    );
    assert!(footprint.processes().len() >= 5, "{footprint:?}");
    for id in [&a, &b] {
        ctd.block_on(cri.stop_pod_sandbox(id))
            .unwrap_or_else(|e| panic!("StopPodSandbox: {e}\n{}", ctd.log_text()));
        ctd.block_on(cri.stop_pod_sandbox(id))
            .unwrap_or_else(|e| panic!("second StopPodSandbox: {e}\n{}", ctd.log_text()));
        let s = ctd.block_on(cri.pod_sandbox_status(id)).unwrap();
        assert_eq!(s.state, PodSandboxState::SandboxNotready);
    }
    assert_eq!(
        pod_veths(&node.ns),
        Vec::<String>::new(),
        "veths after stop"
    );
    for ns in &footprint.netns {
        assert!(!ns.exists(), "{} left after stop", ns.display());
    }
    for id in [&a, &b] {
        ctd.block_on(cri.remove_pod_sandbox(id))
            .unwrap_or_else(|e| panic!("RemovePodSandbox: {e}\n{}", ctd.log_text()));
    }
    assert!(ctd.block_on(cri.list_pod_sandbox()).unwrap().is_empty());
    assert_eq!(
        node.leases(),
        Vec::<String>::new(),
        "host-local leases left"
    );

    drop(cri);
    drop(ctd);
    node.assert_all_gone(&footprint);
    println!("all gone: {:?}", started.elapsed());
}

/// Starts containerd and a pod with a running container and a hostPort.
fn busy_containerd(node: &SmokeNode) -> (Containerd, Footprint) {
    node.write_conflist();
    let ctd = node.containerd();
    let cri = ctd.cri();
    let uid = format!("uid-{}", node.ns.name);
    let pod = ctd
        .block_on(cri.run_pod_sandbox("busy", "default", &uid, &[(8080, 18081, Protocol::Tcp)]))
        .unwrap_or_else(|e| panic!("RunPodSandbox: {e}\n{}", ctd.log_text()));
    let c = ctd
        .block_on(cri.create_container(&pod, "httpd", HTTPD))
        .unwrap();
    ctd.block_on(cri.start_container(&c)).unwrap();
    assert_eq!(pod_veths(&node.ns).len(), 1);
    let footprint = ctd.footprint();
    assert_eq!(footprint.netns.len(), 1, "{footprint:?}");
    (ctd, footprint)
}

/// Also from an async test: the calls are awaited on the test's runtime,
/// and starting and dropping the guard work there too.
#[tokio::test]
async fn dropping_the_guard_tears_running_pods_down() {
    let node = SmokeNode::new();
    node.write_conflist();
    let ctd = node.containerd();
    let cri = ctd.cri();
    let uid = format!("uid-{}", node.ns.name);
    let pod = cri
        .run_pod_sandbox("busy", "default", &uid, &[(8080, 18081, Protocol::Tcp)])
        .await
        .unwrap_or_else(|e| panic!("RunPodSandbox: {e}\n{}", ctd.log_text()));
    let c = cri.create_container(&pod, "httpd", HTTPD).await.unwrap();
    cri.start_container(&c).await.unwrap();
    let (code, out, _) = cri
        .exec_sync(&c, &["hostname"], Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!((code, out.trim()), (0, "busy"));
    let footprint = ctd.footprint();
    assert_eq!(footprint.netns.len(), 1, "{footprint:?}");
    assert_eq!(pod_veths(&node.ns).len(), 1);
    drop(ctd);
    node.assert_all_gone(&footprint);
    // Torn down through CRI, so CNI DEL ran.
    assert_eq!(
        node.leases(),
        Vec::<String>::new(),
        "host-local leases left"
    );
}

#[test]
fn a_killed_containerd_leaves_nothing_behind() {
    let node = SmokeNode::new();
    let (ctd, footprint) = busy_containerd(&node);
    // containerd dies: its shims and the pod's processes live on.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(ctd.pid() as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    drop(ctd);
    node.assert_all_gone(&footprint);
}
