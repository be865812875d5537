//! The CNI binary as a runtime runs it: [`exec_cni`], its output, and
//! [`Pod`]s it attaches.
use std::{net::Ipv4Addr, path::Path, process::Stdio};

use serde_json::Value;

use crate::{cluster::Node, netns::NetNs, util::bin};

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
    exec_cni_binary(
        &bin("beeline"),
        host_ns,
        command,
        conf,
        container_id,
        netns,
        ifname,
    )
}

/// The pod identity the kubelet passes in CNI_ARGS, made up for a container:
/// namespace `default`, name `pod-<container id>`.
pub fn kubelet_cni_args(container_id: &str) -> String {
    format!(
        "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=pod-{container_id};\
         K8S_POD_INFRA_CONTAINER_ID={container_id};K8S_POD_UID=uid-{container_id}"
    )
}

/// [`exec_cni`] with a given `beeline` binary (the previous release's, say).
pub fn exec_cni_binary(
    binary: &Path,
    host_ns: &NetNs,
    command: &str,
    conf: &Value,
    container_id: &str,
    netns: Option<&Path>,
    ifname: &str,
) -> CniOutput {
    use std::io::Write;
    let mut cmd = host_ns.cmd(binary);
    cmd.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", container_id)
        .env("CNI_IFNAME", ifname)
        .env("CNI_ARGS", kubelet_cni_args(container_id))
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
