//! Test harness: real network namespaces as nodes and pods, the real agent
//! and CNI binaries, and guards that clean up on every path (including
//! panics), with unique names so tests run in parallel.
use std::{
    fs::File,
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use beeline_proto::RETIRED_PREFIX;
use serde_json::Value;

pub use serde_json::json;

pub mod conformance;

pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "these tests create network namespaces and load eBPF: run them as root \
         (`sudo cargo xtask test`)"
    );
}

/// A name unique to this process and call, short enough for interface names.
pub fn unique(prefix: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}{:x}{:x}",
        std::process::id() & 0xffff,
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Where the `beeline` and `beeline-agent` binaries are.
pub fn bin(name: &str) -> PathBuf {
    let dir = std::env::var_os("BEELINE_BIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target/release"));
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo xtask test` (it builds the binaries) or set BEELINE_BIN_DIR",
        path.display()
    );
    path
}

pub fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A network namespace (under /run/netns), deleted on drop if we made it.
pub struct NetNs {
    pub name: String,
    owned: bool,
}

impl NetNs {
    pub fn new(prefix: &str) -> NetNs {
        let ns = NetNs {
            name: unique(prefix),
            owned: true,
        };
        run(Command::new("ip").args(["netns", "add", &ns.name]));
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// A namespace someone else made (`ip netns add NAME`): never deleted.
    pub fn existing(name: &str) -> NetNs {
        let ns = NetNs {
            name: name.to_string(),
            owned: false,
        };
        assert!(
            ns.path().exists(),
            "no network namespace {name} under /run/netns"
        );
        ns
    }

    /// A second handle on this namespace that does not delete it.
    pub fn borrowed(&self) -> NetNs {
        NetNs {
            name: self.name.clone(),
            owned: false,
        }
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// A command run inside the namespace (`nsenter --net`, which keeps
    /// /sys and bpffs visible, unlike `ip netns exec`).
    pub fn cmd(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.path().display()))
            .arg(program);
        cmd
    }

    /// `ip -n <ns> args...`, asserting success.
    pub fn ip(&self, args: &[&str]) -> String {
        let out = run(Command::new("ip").arg("-n").arg(&self.name).args(args));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs `f` on a thread that has entered this namespace.
    pub fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let file = File::open(self.path()).expect("open netns");
        std::thread::scope(|s| {
            s.spawn(move || {
                nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
                f()
            })
            .join()
            .expect("thread in netns panicked")
        })
    }

    /// `ping -q -n -c count -i interval -W wait ip` inside the namespace.
    fn ping_cmd(&self, ip: Ipv4Addr, count: u32, interval: &str, wait: &str) -> Command {
        let mut cmd = self.cmd("ping");
        cmd.args([
            "-q",
            "-n",
            "-c",
            &count.to_string(),
            "-i",
            interval,
            "-W",
            wait,
        ])
        .arg(ip.to_string())
        .stderr(Stdio::null());
        cmd
    }

    fn ping_ok(mut cmd: Command) -> bool {
        cmd.stdout(Stdio::null())
            .status()
            .expect("ping runs (install iputils-ping)")
            .success()
    }

    pub fn ping(&self, ip: Ipv4Addr, count: u32) -> bool {
        Self::ping_ok(self.ping_cmd(ip, count, "0.01", "2"))
    }

    /// Average round-trip time in milliseconds over `count` echo requests,
    /// or `None` if any was lost.
    pub fn ping_rtt(&self, ip: Ipv4Addr, count: u32) -> Option<f64> {
        let out = self.ping_cmd(ip, count, "0.05", "2").output().ok()?;
        if !out.status.success() {
            return None;
        }
        // "rtt min/avg/max/mdev = 0.041/0.052/0.066/0.010 ms"
        let text = String::from_utf8_lossy(&out.stdout);
        let stats = text.lines().find(|l| l.contains("min/avg/max"))?;
        stats
            .split('=')
            .nth(1)?
            .trim()
            .split('/')
            .nth(1)?
            .parse()
            .ok()
    }

    /// One echo request, waiting at most `timeout` for the reply.
    pub fn ping_once(&self, ip: Ipv4Addr, timeout: Duration) -> bool {
        let wait = format!("{:.1}", timeout.as_secs_f32());
        Self::ping_ok(self.ping_cmd(ip, 1, "0.01", &wait))
    }

    /// Names of the links in this namespace.
    pub fn links(&self) -> Vec<String> {
        let out = self.ip(&["-j", "link", "show"]);
        let links: Value = serde_json::from_str(&out).unwrap();
        links
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["ifname"].as_str().unwrap().to_string())
            .collect()
    }

    /// The links once every veth DEL retired is deleted (the agent does that
    /// in the background, within tens of milliseconds).
    pub fn settled_links(&self) -> Vec<String> {
        let retired = |l: &Vec<String>| l.iter().any(|n| n.starts_with(RETIRED_PREFIX));
        let mut links = self.links();
        let deadline = Instant::now() + Duration::from_secs(5);
        while retired(&links) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
            links = self.links();
        }
        links
    }

    /// The MAC address of `dev`.
    pub fn mac(&self, dev: &str) -> beeline_proto::MacAddr {
        let v: Value = serde_json::from_str(&self.ip(&["-j", "link", "show", "dev", dev])).unwrap();
        v[0]["address"].as_str().unwrap().parse().unwrap()
    }

    /// The id of the bpf program filtering `dev`'s tc ingress, as `tc` shows it.
    pub fn ingress_filter_program_id(&self, dev: &str) -> Option<u32> {
        let out = self
            .cmd("tc")
            .args(["filter", "show", "dev", dev, "ingress"])
            .output()
            .ok()?;
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .skip_while(|w| *w != "id")
            .nth(1)?
            .parse()
            .ok()
    }

    /// (rx, tx) packet counters of `dev`.
    pub fn link_packets(&self, dev: &str) -> (u64, u64) {
        let out = self.ip(&["-j", "-s", "link", "show", "dev", dev]);
        let v: Value = serde_json::from_str(&out).unwrap();
        let s = &v[0]["stats64"];
        (
            s["rx"]["packets"].as_u64().unwrap(),
            s["tx"]["packets"].as_u64().unwrap(),
        )
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        if !self.owned {
            return;
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stderr(Stdio::null())
            .status();
    }
}

/// Checks a TCP connection from `client` to `server_ip` in `server` (the
/// server echoes what it reads) and returns the client address the server saw.
pub fn tcp_echo(server: &NetNs, server_ip: Ipv4Addr, client: &NetNs) -> Result<SocketAddr, String> {
    use std::io::{Read, Write};
    let listener = server.enter(|| TcpListener::bind(SocketAddr::from((server_ip, 0))));
    let listener = listener.map_err(|e| format!("bind {server_ip}: {e}"))?;
    let addr = listener.local_addr().unwrap();
    std::thread::scope(|s| {
        let echo = s.spawn(move || -> std::io::Result<SocketAddr> {
            let (mut conn, peer) = listener.accept()?;
            conn.set_read_timeout(Some(Duration::from_secs(5)))?;
            let mut buf = [0u8; 64];
            let n = conn.read(&mut buf)?;
            conn.write_all(&buf[..n])?;
            Ok(peer)
        });
        let reply = client.enter(|| -> std::io::Result<Vec<u8>> {
            let mut conn = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
            conn.set_read_timeout(Some(Duration::from_secs(5)))?;
            conn.write_all(b"beeline")?;
            let mut buf = vec![0u8; 7];
            conn.read_exact(&mut buf)?;
            Ok(buf)
        });
        match reply {
            Ok(buf) if buf == b"beeline" => {
                echo.join().unwrap().map_err(|e| format!("server: {e}"))
            }
            Ok(buf) => Err(format!("wrong echo {buf:?}")),
            Err(e) => {
                // Unblock the accept so the scope can end.
                let _ =
                    server.enter(|| TcpStream::connect_timeout(&addr, Duration::from_millis(500)));
                Err(format!("connect to {addr}: {e}"))
            }
        }
    })
}

/// One TCP connection from `client` to `server_ip` in `server`: `receive`
/// runs on the accepted end in a thread, `send` on the client's end. When
/// sending fails the accept is unblocked and the send error returned.
fn tcp_one_way<T: Send>(
    server: &NetNs,
    server_ip: Ipv4Addr,
    client: &NetNs,
    receive: impl FnOnce(TcpStream) -> Result<T, String> + Send,
    send: impl FnOnce(&mut TcpStream) -> std::io::Result<()> + Send,
) -> Result<T, String> {
    let listener = server
        .enter(|| TcpListener::bind(SocketAddr::from((server_ip, 0))))
        .map_err(|e| format!("bind {server_ip}: {e}"))?;
    let addr = listener.local_addr().unwrap();
    std::thread::scope(|s| {
        let receiver = s.spawn(move || {
            let (conn, _) = listener.accept().map_err(|e| format!("accept: {e}"))?;
            receive(conn)
        });
        let sent = client.enter(|| {
            let mut conn = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
            send(&mut conn)
        });
        if let Err(e) = sent {
            let _ = server.enter(|| TcpStream::connect_timeout(&addr, Duration::from_millis(500)));
            let _ = receiver.join();
            return Err(format!("sending to {addr}: {e}"));
        }
        receiver.join().unwrap()
    })
}

/// Sends `bytes` of a pseudo-random stream over TCP from `client` to
/// `server_ip` in `server`, which checks every byte against the same stream
/// (TCP checksums are not verified between namespaces of one kernel, so a
/// datapath that corrupts GSO packets would otherwise go unnoticed).
pub fn tcp_transfer_intact(
    server: &NetNs,
    server_ip: Ipv4Addr,
    client: &NetNs,
    bytes: u64,
) -> Result<(), String> {
    use std::io::{Read, Write};
    fn fill(stream: &mut u64, buf: &mut [u8]) {
        for b in buf {
            // xorshift64: cheap and never repeats within the transfer.
            *stream ^= *stream << 13;
            *stream ^= *stream >> 7;
            *stream ^= *stream << 17;
            *b = *stream as u8;
        }
    }
    const SEED: u64 = 0x9e37_79b9_7f4a_7c15;
    let check = move |mut conn: TcpStream| -> Result<(), String> {
        conn.set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(|e| e.to_string())?;
        let (mut stream, mut offset) = (SEED, 0u64);
        let mut got = vec![0u8; 1 << 16];
        let mut want = vec![0u8; 1 << 16];
        loop {
            let n = conn
                .read(&mut got)
                .map_err(|e| format!("at {offset}: {e}"))?;
            if n == 0 {
                break;
            }
            fill(&mut stream, &mut want[..n]);
            if let Some(i) = (0..n).find(|&i| got[i] != want[i]) {
                return Err(format!("byte {} differs", offset + i as u64));
            }
            offset += n as u64;
        }
        if offset != bytes {
            return Err(format!("received {offset} of {bytes} bytes"));
        }
        Ok(())
    };
    let send = move |conn: &mut TcpStream| -> std::io::Result<()> {
        // A datapath that loses data stalls the stream: fail, not hang.
        conn.set_write_timeout(Some(Duration::from_secs(10)))?;
        let (mut stream, mut left) = (SEED, bytes);
        let mut buf = vec![0u8; 1 << 17];
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            fill(&mut stream, &mut buf[..n]);
            conn.write_all(&buf[..n])?;
            left -= n as u64;
        }
        Ok(())
    };
    tcp_one_way(server, server_ip, client, check, send)
}

/// Bulk TCP from `client` to `server_ip` in `server` for `duration`;
/// returns the goodput in Gbit/s.
pub fn tcp_throughput(
    server: &NetNs,
    server_ip: Ipv4Addr,
    client: &NetNs,
    duration: Duration,
) -> Result<f64, String> {
    use std::io::{Read, Write};
    let sink = |mut conn: TcpStream| -> Result<f64, String> {
        let start = Instant::now();
        let mut buf = vec![0u8; 1 << 17];
        let mut total = 0u64;
        loop {
            match conn.read(&mut buf).map_err(|e| format!("receiving: {e}"))? {
                0 => return Ok(total as f64 * 8.0 / start.elapsed().as_secs_f64() / 1e9),
                n => total += n as u64,
            }
        }
    };
    let send = move |conn: &mut TcpStream| -> std::io::Result<()> {
        let buf = vec![0x5au8; 1 << 17];
        let end = Instant::now() + duration;
        while Instant::now() < end {
            conn.write_all(&buf)?;
        }
        Ok(())
    };
    tcp_one_way(server, server_ip, client, sink, send)
}

/// A simulated node: a namespace with an address, a scratch dir, a bpffs
/// dir for pins, and (while running) an agent.
pub struct Node {
    pub name: String,
    pub ns: NetNs,
    pub ip: Ipv4Addr,
    pub dir: tempfile::TempDir,
    pub bpffs: BpffsDir,
    pub agent: Option<AgentProcess>,
}

impl Node {
    /// A lone node: its address sits on an uplink veth (MTU 1500) whose
    /// peer stays in the node namespace.
    pub fn new(pod_cidr: &str, ip: Ipv4Addr) -> Node {
        let ns = NetNs::new("bln");
        ns.ip(&[
            "link", "add", "uplink0", "type", "veth", "peer", "name", "uplink0p",
        ]);
        ns.ip(&["link", "set", "uplink0p", "up"]);
        let node = Node::with_uplink(ns, ip);
        let name = node.name.clone();
        node.write_nodes_file(&[(name.as_str(), Some(pod_cidr), ip)]);
        node
    }

    /// A node whose `uplink0` (already in `ns`) gets `ip/24`.
    fn with_uplink(ns: NetNs, ip: Ipv4Addr) -> Node {
        ns.ip(&["addr", "add", &format!("{ip}/24"), "dev", "uplink0"]);
        ns.ip(&["link", "set", "uplink0", "up"]);
        Node {
            name: format!("node-{}", ns.name),
            ns,
            ip,
            dir: tempfile::tempdir().unwrap(),
            bpffs: BpffsDir::new(),
            agent: None,
        }
    }

    pub fn nodes_file(&self) -> PathBuf {
        self.dir.path().join("nodes.json")
    }

    /// Writes the NodeList the agent reads (atomically, so it never sees half).
    pub fn write_nodes_file(&self, nodes: &[(&str, Option<&str>, Ipv4Addr)]) {
        let items: Vec<Value> = nodes
            .iter()
            .map(|(name, cidr, ip)| {
                let mut spec = json!({});
                if let Some(c) = cidr {
                    spec = json!({ "podCIDR": c, "podCIDRs": [c] });
                }
                json!({
                    "apiVersion": "v1", "kind": "Node",
                    "metadata": { "name": name },
                    "spec": spec,
                    "status": { "addresses": [{ "type": "InternalIP", "address": ip.to_string() }] },
                })
            })
            .collect();
        let list = json!({ "apiVersion": "v1", "kind": "List", "items": items });
        let tmp = self.dir.path().join("nodes.json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(&list).unwrap()).unwrap();
        std::fs::rename(&tmp, self.nodes_file()).unwrap();
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("agent.sock")
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    pub fn ipam_dir(&self) -> PathBuf {
        self.dir.path().join("ipam")
    }

    /// Starts the agent and waits until it can network pods.
    pub fn start_agent(&mut self, extra_args: &[&str]) {
        self.start_agent_unready(extra_args);
        let client = beeline_proto::Client::new(self.socket());
        let ready = eventually(Duration::from_secs(30), || client.node_info().is_ok());
        assert!(
            ready,
            "agent never became ready: {:?}\n{}",
            client.node_info(),
            self.agent.as_ref().unwrap().log_text()
        );
    }

    /// Starts the agent and waits only for its socket.
    pub fn start_agent_unready(&mut self, extra_args: &[&str]) {
        assert!(self.agent.is_none(), "agent already running");
        self.agent = Some(AgentProcess::start(self, extra_args));
    }

    /// Stops the agent with SIGKILL (a crash).
    pub fn kill_agent(&mut self) {
        if let Some(mut a) = self.agent.take() {
            a.kill();
        }
    }

    /// The network configuration a runtime would pass to `beeline`.
    pub fn cni_conf(&self, version: &str) -> Value {
        json!({
            "cniVersion": version,
            "name": "beeline-test",
            "type": "beeline",
            "agentSocket": self.socket(),
            "dataDir": self.ipam_dir(),
            "logLevel": "debug",
            "logFile": self.dir.path().join("cni.log"),
        })
    }

    /// Executes the CNI binary inside the node namespace, as a runtime does.
    pub fn cni(
        &self,
        command: &str,
        conf: &Value,
        container_id: &str,
        netns: Option<&Path>,
        ifname: &str,
    ) -> CniOutput {
        exec_cni(&self.ns, command, conf, container_id, netns, ifname)
    }

    pub fn agent_cli(&self, subcommand: &str) -> Value {
        let out = run(Command::new(bin("beeline-agent"))
            .args([subcommand, "--json", "--bpffs-dir"])
            .arg(&self.bpffs.path));
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// Summed per-program counters (`beeline-agent stats --json`).
    pub fn stats(&self) -> Value {
        self.agent_cli("stats")
    }

    /// Remote CIDR map entries (`beeline-agent nodes --json`).
    pub fn map_remote_cidrs(&self) -> Vec<Value> {
        self.agent_cli("nodes").as_array().unwrap().clone()
    }

    /// Endpoint map entries (`beeline-agent endpoints --json`).
    pub fn map_endpoints(&self) -> Vec<Value> {
        self.agent_cli("endpoints").as_array().unwrap().clone()
    }

    /// IPs recorded by the built-in allocator.
    pub fn allocated_ips(&self) -> Vec<String> {
        let dir = self.ipam_dir().join("beeline-test");
        let Ok(entries) = std::fs::read_dir(dir) else {
            return vec![];
        };
        entries
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.parse::<Ipv4Addr>().is_ok())
            .collect()
    }

    /// Host-side pod veths in the node namespace, retired ones included
    /// until the agent has deleted them.
    pub fn pod_veths(&self) -> Vec<String> {
        self.ns
            .settled_links()
            .into_iter()
            .filter(|l| l.starts_with("bl") || l.starts_with(RETIRED_PREFIX))
            .collect()
    }

    /// Asserts that no pod state is left on the node: host veths, IP
    /// allocations, endpoint map entries, pod link pins.
    pub fn assert_nothing_left(&self) {
        assert_eq!(self.pod_veths(), Vec::<String>::new(), "host veths left");
        assert_eq!(
            self.allocated_ips(),
            Vec::<String>::new(),
            "IP allocations left"
        );
        assert_eq!(
            self.map_endpoints(),
            Vec::<Value>::new(),
            "map entries left"
        );
        assert_eq!(
            self.pod_link_pins(),
            Vec::<String>::new(),
            "tc link pins left"
        );
    }

    /// Pinned tc links of pod veths (the uplink's and VXLAN's stay).
    pub fn pod_link_pins(&self) -> Vec<String> {
        std::fs::read_dir(self.bpffs.path.join("links"))
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.starts_with("beeline_from_pod-"))
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        // Agent first (it holds the pins open), then bpffs, then the netns.
        self.agent.take();
    }
}

/// Several nodes on one L2 underlay: a "fabric" namespace holding a bridge,
/// each node's `uplink0` plugged into it. Node i has 192.168.100.(i+1)/24
/// and podCIDR 10.244.(i+1).0/24.
pub struct Cluster {
    // Dropped in this order: nodes (agents first), then the fabric.
    pub nodes: Vec<Node>,
    pub fabric: NetNs,
}

impl Cluster {
    pub fn new(count: usize) -> Cluster {
        require_root();
        let fabric = NetNs::new("blf");
        fabric.ip(&["link", "add", "br0", "type", "bridge"]);
        fabric.ip(&["link", "set", "br0", "up"]);
        let mut cluster = Cluster {
            nodes: Vec::new(),
            fabric,
        };
        for _ in 0..count {
            cluster.add_node();
        }
        cluster
    }

    /// A new node on the fabric (not yet in anyone's node list).
    pub fn add_node(&mut self) -> &mut Node {
        let i = self.nodes.len();
        let ns = NetNs::new("bln");
        self.plug(&ns, "uplink0");
        let node = Node::with_uplink(ns, Self::node_ip(i));
        self.nodes.push(node);
        self.nodes.last_mut().unwrap()
    }

    /// Connects `ns` to the fabric bridge with a veth named `ifname` in `ns`.
    pub fn plug(&self, ns: &NetNs, ifname: &str) {
        let port = unique("blf");
        self.fabric.ip(&[
            "link", "add", &port, "type", "veth", "peer", "name", ifname, "netns", &ns.name,
        ]);
        self.fabric
            .ip(&["link", "set", &port, "master", "br0", "up"]);
    }

    pub fn node_ip(i: usize) -> Ipv4Addr {
        Ipv4Addr::new(192, 168, 100, i as u8 + 1)
    }

    pub fn pod_cidr(i: usize) -> String {
        format!("10.244.{}.0/24", i + 1)
    }

    /// Writes a NodeList holding `members` into every node's nodes file.
    pub fn publish_nodes(&self, members: &[usize]) {
        for node in &self.nodes {
            self.publish_nodes_to(node, members);
        }
    }

    /// Writes a NodeList holding `members` into `node`'s nodes file.
    pub fn publish_nodes_to(&self, node: &Node, members: &[usize]) {
        let list: Vec<(String, String, Ipv4Addr)> = members
            .iter()
            .map(|&i| {
                (
                    self.nodes[i].name.clone(),
                    Self::pod_cidr(i),
                    Self::node_ip(i),
                )
            })
            .collect();
        let entries: Vec<(&str, Option<&str>, Ipv4Addr)> = list
            .iter()
            .map(|(n, c, ip)| (n.as_str(), Some(c.as_str()), *ip))
            .collect();
        node.write_nodes_file(&entries);
    }

    /// Publishes all nodes and starts every agent with `extra_args`.
    pub fn start(&mut self, extra_args: &[&str]) {
        let all: Vec<usize> = (0..self.nodes.len()).collect();
        self.publish_nodes(&all);
        for node in &mut self.nodes {
            node.start_agent(extra_args);
        }
    }
}

/// A bpffs directory for one agent's pins, removed on drop.
pub struct BpffsDir {
    pub path: PathBuf,
}

impl BpffsDir {
    pub fn new() -> BpffsDir {
        BpffsDir {
            path: PathBuf::from("/sys/fs/bpf").join(unique("beeline-test-")),
        }
    }
}

impl Default for BpffsDir {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for BpffsDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// A running `beeline-agent run` in a node namespace; killed on drop.
pub struct AgentProcess {
    child: Child,
    pub log: PathBuf,
}

impl AgentProcess {
    fn start(node: &Node, extra_args: &[&str]) -> AgentProcess {
        let log = node.dir.path().join("agent.log");
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        use std::os::unix::process::CommandExt;
        let child = node
            .ns
            .cmd(bin("beeline-agent"))
            // Its own process group: a Ctrl-C meant for the test or demo
            // must not kill it before the cleanup runs.
            .process_group(0)
            .arg("run")
            .args(["--node-name", &node.name])
            .arg("--socket")
            .arg(node.socket())
            .arg("--bpffs-dir")
            .arg(&node.bpffs.path)
            .arg("--state-dir")
            .arg(node.state_dir())
            .arg("--nodes-file")
            .arg(node.nodes_file())
            .args(extra_args)
            .env("BEELINE_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().unwrap())
            .stderr(log_file)
            .spawn()
            .expect("start beeline-agent");
        let mut agent = AgentProcess { child, log };
        agent.wait_ready(&node.socket());
        agent
    }

    fn wait_ready(&mut self, socket: &Path) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("agent exited with {status}:\n{}", self.log_text());
            }
            let client = beeline_proto::Client::new(socket);
            match client.list_endpoints() {
                Ok(_) => return,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                Err(e) => panic!("agent not ready after 30 s ({e}):\n{}", self.log_text()),
            }
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A pod netns wired to `node` by hand the way the CNI wires one, with no
/// Beeline involved: veth `host_if` (up) to `eth0`, `ip/32`, a permanent
/// neighbour for the link-local gateway and `default via 169.254.1.1
/// onlink`. Routes towards the pod are the caller's.
pub fn hand_wired_pod(node: &NetNs, host_if: &str, ip: Ipv4Addr, mtu: Option<u32>) -> NetNs {
    let pod = NetNs::new("blp");
    node.ip(&[
        "link", "add", host_if, "type", "veth", "peer", "name", "eth0", "netns", &pod.name,
    ]);
    node.ip(&["link", "set", host_if, "up"]);
    pod.ip(&["addr", "add", &format!("{ip}/32"), "dev", "eth0"]);
    if let Some(mtu) = mtu {
        pod.ip(&["link", "set", "eth0", "mtu", &mtu.to_string()]);
    }
    pod.ip(&["link", "set", "eth0", "up"]);
    let gateway_mac = node.mac(host_if).to_string();
    pod.ip(&[
        "neigh",
        "add",
        "169.254.1.1",
        "lladdr",
        &gateway_mac,
        "dev",
        "eth0",
        "nud",
        "permanent",
    ]);
    pod.ip(&[
        "route",
        "add",
        "default",
        "via",
        "169.254.1.1",
        "dev",
        "eth0",
        "onlink",
    ]);
    pod
}

/// A helper process the test started (a DHCP server, say); killed on drop.
pub struct Background(pub Child);

impl Background {
    pub fn spawn(cmd: &mut Command) -> Background {
        Background(
            cmd.stdin(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}")),
        )
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub struct CniOutput {
    pub success: bool,
    pub stdout: String,
    pub stderr: String,
}

impl CniOutput {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("CNI output is not JSON ({e}): {:?}", self.stdout))
    }

    /// Panics with the plugin's error unless it succeeded.
    pub fn expect_ok(self, what: &str) -> CniOutput {
        assert!(
            self.success,
            "{what} failed: {}\nstderr: {}",
            self.stdout, self.stderr
        );
        self
    }

    /// The error code of a failed call (and checks the spec's error shape).
    pub fn error_code(&self) -> u64 {
        assert!(!self.success, "expected a failure, got {}", self.stdout);
        let v = self.json();
        assert!(
            v["msg"].as_str().is_some_and(|m| !m.is_empty()),
            "no msg: {v}"
        );
        assert!(v["cniVersion"].is_string(), "no cniVersion: {v}");
        v["code"].as_u64().unwrap_or_else(|| panic!("no code: {v}"))
    }
}

/// Runs the CNI binary as a runtime does: CNI_* env, config on stdin.
pub fn exec_cni(
    host_ns: &NetNs,
    command: &str,
    conf: &Value,
    container_id: &str,
    netns: Option<&Path>,
    ifname: &str,
) -> CniOutput {
    use std::io::Write;
    let mut cmd = host_ns.cmd(bin("beeline"));
    cmd.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", container_id)
        .env("CNI_IFNAME", ifname)
        .env("CNI_PATH", "/opt/cni/bin:/usr/lib/cni")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(ns) = netns {
        cmd.env("CNI_NETNS", ns);
    }
    let mut child = cmd.spawn().expect("run the beeline CNI binary");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(&serde_json::to_vec(conf).unwrap())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    CniOutput {
        success: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// A pod: its own netns plus the attachment the CNI binary made.
pub struct Pod {
    pub ns: NetNs,
    pub container_id: String,
    pub ip: Ipv4Addr,
    pub host_ifname: String,
    pub result: Value,
}

impl Pod {
    /// ADDs a pod on `node` with the given spec version.
    pub fn add(node: &Node, version: &str) -> Pod {
        let ns = NetNs::new("blp");
        let container_id = format!("ctr-{}", ns.name);
        let out = node
            .cni(
                "ADD",
                &node.cni_conf(version),
                &container_id,
                Some(&ns.path()),
                "eth0",
            )
            .expect_ok("ADD");
        let result = out.json();
        let addr = result["ips"][0]["address"].as_str().unwrap();
        let ip: Ipv4Addr = addr.trim_end_matches("/32").parse().unwrap();
        let host_ifname = result["interfaces"][0]["name"]
            .as_str()
            .unwrap()
            .to_string();
        Pod {
            ns,
            container_id,
            ip,
            host_ifname,
            result,
        }
    }

    pub fn del(&self, node: &Node) {
        node.cni(
            "DEL",
            &node.cni_conf("1.1.0"),
            &self.container_id,
            Some(&self.ns.path()),
            "eth0",
        )
        .expect_ok("DEL");
    }
}

/// Polls `f` every 100 ms until it returns true or `timeout` passes.
pub fn eventually(timeout: Duration, f: impl FnMut() -> bool) -> bool {
    eventually_every(timeout, Duration::from_millis(100), f)
}

/// Polls `f` every `interval` until it returns true or `timeout` passes.
pub fn eventually_every(
    timeout: Duration,
    interval: Duration,
    mut f: impl FnMut() -> bool,
) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(interval);
    }
}
