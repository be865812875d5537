//! The CNI plugins as a runtime executes them (Beeline and Debian's
//! `bridge`), and a Beeline node to run them on.
use std::{
    io::Write,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use beeline_tests::{NetNs, Node, bin, unique};
use serde_json::{Value, json};

use crate::{BRIDGE_PLUGIN_DIR, NODE_IP, POD_CIDR, R};

/// A CNI plugin as a runtime would execute it, inside a node namespace.
pub(crate) struct Plugin<'a> {
    pub(crate) name: &'static str,
    host: &'a NetNs,
    binary: PathBuf,
    cni_path: String,
    pub(crate) conf: Value,
}

impl Plugin<'_> {
    /// Executes the plugin; returns its wall time and (for ADD) its result.
    pub(crate) fn exec(
        &self,
        command: &str,
        container_id: &str,
        netns: &Path,
    ) -> R<(Duration, Value)> {
        let mut cmd = self.host.cmd(&self.binary);
        cmd.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", container_id)
            .env("CNI_NETNS", netns)
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", &self.cni_path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let conf = serde_json::to_vec(&self.conf).unwrap();
        let start = Instant::now();
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", self.binary.display()))?;
        let _ = child.stdin.take().unwrap().write_all(&conf);
        let out = child.wait_with_output().map_err(|e| e.to_string())?;
        let took = start.elapsed();
        if !out.status.success() {
            return Err(format!(
                "{} {command} {container_id} failed: {} {}",
                self.name,
                String::from_utf8_lossy(&out.stdout).trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        let result = if command == "ADD" {
            serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
        } else {
            Value::Null
        };
        Ok((took, result))
    }

    /// ADDs a pod in `ns` and returns its IPv4 address.
    pub(crate) fn add_pod(&self, ns: &NetNs, container_id: &str) -> R<Ipv4Addr> {
        let (_, result) = self.exec("ADD", container_id, &ns.path())?;
        result["ips"][0]["address"]
            .as_str()
            .and_then(|a| a.split('/').next())
            .and_then(|a| a.parse().ok())
            .ok_or_else(|| format!("{} ADD: no IP in {result}", self.name))
    }
}

pub(crate) fn beeline_plugin(node: &Node) -> Plugin<'_> {
    Plugin {
        name: "beeline",
        host: &node.ns,
        binary: bin("beeline"),
        cni_path: BRIDGE_PLUGIN_DIR.into(),
        conf: json!({
            "cniVersion": "1.0.0",
            "name": "beeline-bench",
            "type": "beeline",
            "agentSocket": node.socket(),
            "dataDir": node.ipam_dir(),
        }),
    }
}

/// Debian's bridge + host-local, with a bridge name unique to this run.
pub(crate) fn bridge_plugin<'a>(host: &'a NetNs, data_dir: &Path) -> Plugin<'a> {
    Plugin {
        name: "bridge",
        host,
        binary: Path::new(BRIDGE_PLUGIN_DIR).join("bridge"),
        cni_path: BRIDGE_PLUGIN_DIR.into(),
        conf: json!({
            "cniVersion": "1.0.0",
            "name": "benchbr",
            "type": "bridge",
            "bridge": unique("bbr"),
            "isGateway": true,
            "ipMasq": false,
            "ipam": { "type": "host-local", "subnet": "10.99.0.0/16", "dataDir": data_dir },
        }),
    }
}

/// A Beeline node (its own namespace, agent and pins) for `extra_args`.
pub(crate) fn beeline_node(extra_args: &[&str]) -> Node {
    let mut node = Node::new(POD_CIDR, NODE_IP);
    node.start_agent(extra_args);
    node
}
