//! Simulated nodes and clusters: [`Node`], [`Cluster`], the bpffs dir for
//! an agent's pins and the running agent.
use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use beeline_proto::RETIRED_PREFIX;
use serde_json::{Value, json};

use crate::{
    cni::CniOutput,
    cni::exec_cni_binary,
    netns::NetNs,
    util::{bin, eventually, require_root, run, unique},
};

/// A simulated node: a namespace with an address, a scratch dir, a bpffs
/// dir for pins, and (while running) an agent.
pub struct Node {
    pub name: String,
    pub ns: NetNs,
    pub ip: Ipv4Addr,
    pub dir: tempfile::TempDir,
    pub bpffs: BpffsDir,
    pub agent: Option<AgentProcess>,
    /// Where this node's `beeline-agent` and `beeline` come from: this
    /// build's unless a test runs another release.
    pub binaries: Option<PathBuf>,
    /// The agent's open-file limit, when a test lowers it.
    pub agent_nofile: Option<u64>,
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
            binaries: None,
            agent_nofile: None,
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
    /// This node's copy of `name` (`beeline-agent` or `beeline`).
    pub fn binary(&self, name: &str) -> PathBuf {
        match &self.binaries {
            Some(dir) => dir.join(name),
            None => bin(name),
        }
    }

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
        exec_cni_binary(
            &self.binary("beeline"),
            &self.ns,
            command,
            conf,
            container_id,
            netns,
            ifname,
        )
    }

    /// `GET path` on the agent's health server (127.0.0.1:9962 in the
    /// node's netns): the status code and body.
    pub fn http_get(&self, path: &str) -> (u16, String) {
        use std::io::{Read, Write};
        self.ns.enter(|| {
            let mut conn =
                std::net::TcpStream::connect("127.0.0.1:9962").expect("the health server");
            write!(
                conn,
                "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
            )
            .unwrap();
            let mut out = String::new();
            conn.read_to_string(&mut out).unwrap();
            let status = out.split_whitespace().nth(1).unwrap().parse().unwrap();
            let body = out.split("\r\n\r\n").nth(1).unwrap_or_default().to_string();
            (status, body)
        })
    }

    /// The value of the Prometheus series `series` (e.g.
    /// `beeline_repairs_total{kind="pod_program"}`), 0 if absent.
    pub fn metric(&self, series: &str) -> f64 {
        let (_, body) = self.http_get("/metrics");
        body.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or(0.0)
    }

    pub fn agent_cli(&self, subcommand: &str) -> Value {
        let mut cmd = Command::new(bin("beeline-agent"));
        cmd.args([subcommand, "--json", "--bpffs-dir"])
            .arg(&self.bpffs.path);
        if subcommand == "endpoints" || subcommand == "services" {
            cmd.arg("--state-dir").arg(self.state_dir());
        }
        serde_json::from_slice(&run(&mut cmd).stdout).unwrap()
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

    /// A host on the fabric that is not a node (outside the cluster), with
    /// `ip`/24 on its `eth0`.
    pub fn external_host(&self, ip: Ipv4Addr) -> NetNs {
        let host = NetNs::new("ble");
        self.plug(&host, "eth0");
        host.ip(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"]);
        host.ip(&["link", "set", "eth0", "up"]);
        host
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
        let mut cmd = node.ns.cmd(node.binary("beeline-agent"));
        if let Some(limit) = node.agent_nofile {
            // SAFETY: only setrlimit between fork and exec.
            unsafe {
                cmd.pre_exec(move || {
                    nix::sys::resource::setrlimit(
                        nix::sys::resource::Resource::RLIMIT_NOFILE,
                        limit,
                        limit,
                    )
                    .map_err(std::io::Error::from)
                });
            }
        }
        let child = cmd
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

    /// Whether the agent process is still alive.
    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().is_ok_and(|status| status.is_none())
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
