//! Harness for Beeline's own Service load balancing: a cgroup per simulated
//! node (the agent attaches its socket programs there), the probe client
//! run as a process of that node, and the Services and EndpointSlices the
//! agents read, written as `kubectl get svc,endpointslices -A -o json`
//! prints them.
use std::{
    net::Ipv4Addr,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use std::{
    io::{Read, Write},
    net::{TcpListener, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use serde_json::{Value, json};

use crate::{Cluster, NetNs, Node, Pod, bin, unique};

/// The ports every [`Backend`] serves.
pub const TCP_PORT: u16 = 8080;
pub const UDP_PORT: u16 = 8053;

/// A backend pod answering on TCP and UDP with its own address: which
/// backend served a connection is what the client reads.
pub struct Backend {
    pub pod: Pod,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Backend {
    pub fn start(node: &Node) -> Backend {
        let pod = Pod::add(node, "1.1.0");
        let stop = Arc::new(AtomicBool::new(false));
        let ip = pod.ip;
        let tcp = pod
            .ns
            .enter(|| TcpListener::bind((Ipv4Addr::UNSPECIFIED, TCP_PORT)))
            .unwrap();
        tcp.set_nonblocking(true).unwrap();
        let udp = pod
            .ns
            .enter(|| UdpSocket::bind((Ipv4Addr::UNSPECIFIED, UDP_PORT)))
            .unwrap();
        udp.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let done = stop.clone();
        let tcp_thread = std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                match tcp.accept() {
                    Ok((mut conn, _)) => {
                        std::thread::spawn(move || {
                            conn.set_nonblocking(false).unwrap();
                            let mut buf = [0u8; 64];
                            let peer = conn
                                .peer_addr()
                                .map(|p| p.ip().to_string())
                                .unwrap_or_default();
                            // "who" gets the backend's address, "peer" the
                            // client address it sees.
                            while let Ok(n) = conn.read(&mut buf) {
                                let answer = if &buf[..n] == b"peer" {
                                    peer.clone()
                                } else {
                                    ip.to_string()
                                };
                                if n == 0 || conn.write_all(answer.as_bytes()).is_err() {
                                    break;
                                }
                            }
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        let done = stop.clone();
        let udp_thread = std::thread::spawn(move || {
            let mut buf = [0u8; 64];
            while !done.load(Ordering::Relaxed) {
                if let Ok((_, peer)) = udp.recv_from(&mut buf) {
                    let _ = udp.send_to(ip.to_string().as_bytes(), peer);
                }
            }
        });
        Backend {
            pod,
            stop,
            threads: vec![tcp_thread, udp_thread],
        }
    }
}

impl Backend {
    /// Stops the servers and leaves the pod running (its netns and veth
    /// belong to the caller from now on).
    pub fn stop_serving(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        std::mem::forget(self);
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// A cgroup2 directory of a test's own, removed on drop.
pub struct Cgroup {
    pub path: PathBuf,
}

impl Cgroup {
    pub fn new() -> Cgroup {
        let root = cgroup2_root();
        let path = root.join(unique("beeline-test-"));
        std::fs::create_dir(&path)
            .unwrap_or_else(|e| panic!("creating the cgroup {}: {e}", path.display()));
        Cgroup { path }
    }

    /// The agent flag that attaches the socket programs here.
    pub fn arg(&self) -> String {
        format!("--cgroup-root={}", self.path.display())
    }

    /// A command run in `ns`, as a process of this cgroup.
    pub fn cmd(&self, ns: &NetNs, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = ns.cmd(program);
        let procs = std::ffi::CString::new(
            self.path
                .join("cgroup.procs")
                .into_os_string()
                .into_encoded_bytes(),
        )
        .unwrap();
        // SAFETY: only async-signal-safe calls (open, write, close) between
        // fork and exec, nothing allocated.
        unsafe {
            cmd.pre_exec(move || {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let written = libc::write(fd, b"0".as_ptr().cast(), 1);
                libc::close(fd);
                if written != 1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        cmd
    }

    /// Runs the probe client (`beeline-probe ARGS`) in `ns` and this cgroup.
    pub fn probe(&self, ns: &NetNs, args: &[&str]) -> Value {
        let out = self
            .cmd(ns, bin("beeline-probe"))
            .args(args)
            .output()
            .expect("running beeline-probe");
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "beeline-probe {args:?}: {e}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        })
    }
}

impl Default for Cgroup {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // Its processes (probes) have exited; the kernel may take a moment
        // to let the directory go.
        for _ in 0..50 {
            if std::fs::remove_dir(&self.path).is_ok() || !self.path.exists() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("warning: cgroup {} left behind", self.path.display());
    }
}

/// The host's cgroup2 mount.
pub fn cgroup2_root() -> PathBuf {
    beeline_agent::datapath::cgroup2_root().expect("a cgroup2 mount")
}

/// One TCP request to `addr` from `ns` (`who`: the backend's address,
/// `peer`: the client address it sees): the answer.
pub fn tcp_request(
    ns: &NetNs,
    addr: std::net::SocketAddr,
    request: &[u8],
) -> Result<String, String> {
    ns.enter(|| {
        let mut conn = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(3))
            .map_err(|e| format!("connect {addr}: {e}"))?;
        conn.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        conn.write_all(request).map_err(|e| e.to_string())?;
        let mut buf = [0u8; 64];
        let n = conn
            .read(&mut buf)
            .map_err(|e| format!("read from {addr}: {e}"))?;
        Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
    })
}

/// One UDP request to `addr` from `ns`: the answer, and who it came from.
pub fn udp_ask(
    ns: &NetNs,
    addr: std::net::SocketAddr,
) -> Result<(String, std::net::SocketAddr), String> {
    ns.enter(|| {
        let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(3)))
            .unwrap();
        socket.send_to(b"who", addr).map_err(|e| e.to_string())?;
        let mut buf = [0u8; 64];
        let (n, from) = socket
            .recv_from(&mut buf)
            .map_err(|e| format!("UDP answer from {addr}: {e}"))?;
        Ok((String::from_utf8_lossy(&buf[..n]).into_owned(), from))
    })
}

/// Publishes every node and starts each agent with
/// `--kube-proxy-replacement`, `file` and a cgroup of its own (returned),
/// plus `args`.
pub fn start_replacing_kube_proxy(
    cluster: &mut Cluster,
    file: &ServicesFile,
    args: &[&str],
) -> Vec<Cgroup> {
    let cgroups: Vec<Cgroup> = cluster.nodes.iter().map(|_| Cgroup::new()).collect();
    let all: Vec<usize> = (0..cluster.nodes.len()).collect();
    cluster.publish_nodes(&all);
    for (node, cgroup) in cluster.nodes.iter_mut().zip(&cgroups) {
        let mut node_args = vec![
            "--kube-proxy-replacement".to_string(),
            file.arg(),
            cgroup.arg(),
        ];
        node_args.extend(args.iter().map(|a| a.to_string()));
        let node_args: Vec<&str> = node_args.iter().map(String::as_str).collect();
        node.start_agent(&node_args);
    }
    cgroups
}

/// One Service port.
#[derive(Clone, Debug)]
pub struct Port {
    pub name: &'static str,
    /// "TCP" or "UDP".
    pub protocol: &'static str,
    pub port: u16,
    /// The endpoints' port; named in the Service (`targetPort: <name>`) when
    /// `named_target` is set, as for a container port name.
    pub target_port: u16,
    pub named_target: Option<&'static str>,
    pub node_port: Option<u16>,
}

/// One endpoint of a Service (every port).
#[derive(Clone, Debug)]
pub struct Endpoint {
    pub ip: Ipv4Addr,
    pub node: String,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
}

impl Endpoint {
    pub fn ready(ip: Ipv4Addr, node: &str) -> Endpoint {
        Endpoint {
            ip,
            node: node.into(),
            ready: true,
            serving: true,
            terminating: false,
        }
    }
}

#[derive(Clone, Debug)]
pub struct ServiceSpec {
    pub name: String,
    pub cluster_ip: Ipv4Addr,
    pub ports: Vec<Port>,
    pub endpoints: Vec<Endpoint>,
    pub external_ips: Vec<Ipv4Addr>,
    pub external_local: bool,
    pub internal_local: bool,
    pub affinity_seconds: Option<u32>,
}

impl ServiceSpec {
    pub fn new(name: &str, cluster_ip: Ipv4Addr, ports: Vec<Port>) -> ServiceSpec {
        ServiceSpec {
            name: name.into(),
            cluster_ip,
            ports,
            endpoints: Vec::new(),
            external_ips: Vec::new(),
            external_local: false,
            internal_local: false,
            affinity_seconds: None,
        }
    }

    fn service(&self) -> Value {
        let node_port = self.ports.iter().any(|p| p.node_port.is_some());
        let mut spec = json!({
            "type": if node_port { "NodePort" } else { "ClusterIP" },
            "clusterIP": self.cluster_ip.to_string(),
            "clusterIPs": [self.cluster_ip.to_string()],
            "ipFamilies": ["IPv4"],
            "ipFamilyPolicy": "SingleStack",
            "internalTrafficPolicy": if self.internal_local { "Local" } else { "Cluster" },
            "selector": {"app": self.name},
            "sessionAffinity": if self.affinity_seconds.is_some() { "ClientIP" } else { "None" },
            "ports": self.ports.iter().map(|p| {
                let mut port = json!({
                    "name": p.name,
                    "protocol": p.protocol,
                    "port": p.port,
                    "targetPort": match p.named_target {
                        Some(name) => json!(name),
                        None => json!(p.target_port),
                    },
                });
                if let Some(n) = p.node_port {
                    port["nodePort"] = json!(n);
                }
                port
            }).collect::<Vec<_>>(),
        });
        if node_port || !self.external_ips.is_empty() {
            spec["externalTrafficPolicy"] = json!(if self.external_local {
                "Local"
            } else {
                "Cluster"
            });
        }
        if !self.external_ips.is_empty() {
            spec["externalIPs"] = json!(
                self.external_ips
                    .iter()
                    .map(|i| i.to_string())
                    .collect::<Vec<_>>()
            );
        }
        if let Some(seconds) = self.affinity_seconds {
            spec["sessionAffinityConfig"] = json!({"clientIP": {"timeoutSeconds": seconds}});
        }
        json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {
                "name": self.name,
                "namespace": "default",
                "uid": format!("uid-{}", self.name),
                "resourceVersion": "1",
            },
            "spec": spec,
            "status": {"loadBalancer": {}},
        })
    }

    fn slice(&self) -> Value {
        json!({
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": format!("{}-abcde", self.name),
                "namespace": "default",
                "labels": {
                    "kubernetes.io/service-name": self.name,
                    "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
                },
                "resourceVersion": "1",
            },
            "addressType": "IPv4",
            "ports": self.ports.iter().map(|p| json!({
                "name": p.name, "protocol": p.protocol, "port": p.target_port,
            })).collect::<Vec<_>>(),
            "endpoints": self.endpoints.iter().map(|e| json!({
                "addresses": [e.ip.to_string()],
                "nodeName": e.node,
                "conditions": {"ready": e.ready, "serving": e.serving, "terminating": e.terminating},
            })).collect::<Vec<_>>(),
        })
    }
}

/// The Services and EndpointSlices every agent of a test reads
/// (`--services-file`), rewritten atomically on every change.
pub struct ServicesFile {
    pub path: PathBuf,
    _dir: tempfile::TempDir,
}

impl ServicesFile {
    pub fn new() -> ServicesFile {
        let dir = tempfile::tempdir().unwrap();
        let file = ServicesFile {
            path: dir.path().join("services.json"),
            _dir: dir,
        };
        file.write(&[]);
        file
    }

    pub fn arg(&self) -> String {
        format!("--services-file={}", self.path.display())
    }

    pub fn write(&self, services: &[ServiceSpec]) {
        let items: Vec<Value> = services
            .iter()
            .map(ServiceSpec::service)
            .chain(services.iter().map(ServiceSpec::slice))
            .collect();
        let list = json!({"apiVersion": "v1", "kind": "List", "items": items, "metadata": {"resourceVersion": ""}});
        let tmp = self.path.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(&list).unwrap()).unwrap();
        std::fs::rename(&tmp, &self.path).unwrap();
    }
}

impl Default for ServicesFile {
    fn default() -> Self {
        Self::new()
    }
}

/// `beeline-agent services --json` of a node's pins.
pub fn services_of(bpffs: &Path, state_dir: &Path) -> Value {
    let out = crate::run(
        Command::new(bin("beeline-agent"))
            .args(["services", "--json", "--bpffs-dir"])
            .arg(bpffs)
            .arg("--state-dir")
            .arg(state_dir),
    );
    serde_json::from_slice(&out.stdout).unwrap()
}
