//! A CNI conformance suite that drives any plugin (or conflist) only through
//! the spec's exec protocol: CNI_* environment, config on stdin, result or
//! error object on stdout, in network namespaces it creates. A small
//! runtime here does what libcni does for a conflist (prevResult chaining,
//! DEL in reverse order). No official suite exists (containernetworking/cni
//! #540); the checks follow the MUSTs of spec 1.1.0.
use std::{
    io::Write,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use serde_json::{Value, json};

use crate::NetNs;

/// Versions the suite knows how to check, oldest first.
pub const VERSIONS: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// One plugin execution's outcome.
#[derive(Debug, Clone)]
pub struct Exec {
    pub success: bool,
    pub stdout: String,
    pub stderr: String,
}

impl Exec {
    pub fn json(&self) -> Option<Value> {
        serde_json::from_str(&self.stdout).ok()
    }

    /// The error code, if this is a well-formed spec error object.
    pub fn error_code(&self) -> Option<u64> {
        let v = self.json()?;
        v["msg"].as_str()?;
        v["code"].as_u64()
    }

    fn describe(&self) -> String {
        format!(
            "stdout={:?} stderr={:?}",
            self.stdout.trim(),
            self.stderr.trim()
        )
    }
}

/// What libcni does for a network configuration list.
pub struct Runtime<'a> {
    /// The namespace plugins run in (the node's).
    pub host: &'a NetNs,
    /// `{"name", "plugins": [...]}`; `cniVersion` is set per call.
    pub conflist: Value,
    pub cni_path: Vec<PathBuf>,
}

#[derive(Clone, Copy)]
pub struct Attachment<'a> {
    pub container_id: &'a str,
    pub netns: Option<&'a Path>,
    pub ifname: &'a str,
}

impl Runtime<'_> {
    fn plugins(&self) -> Vec<Value> {
        self.conflist["plugins"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    fn binary(&self, plugin_type: &str) -> PathBuf {
        self.cni_path
            .iter()
            .map(|d| d.join(plugin_type))
            .find(|p| p.is_file())
            .unwrap_or_else(|| panic!("plugin {plugin_type} not found in {:?}", self.cni_path))
    }

    /// Runs one plugin with `stdin` as its config.
    pub fn exec_raw(
        &self,
        plugin_type: &str,
        command: Option<&str>,
        at: Attachment,
        stdin: &[u8],
    ) -> Exec {
        let path = std::env::join_paths(&self.cni_path).unwrap();
        let mut cmd = self.host.cmd(self.binary(plugin_type));
        cmd.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("CNI_PATH", path)
            .env("CNI_CONTAINERID", at.container_id)
            .env("CNI_IFNAME", at.ifname)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(command) = command {
            cmd.env("CNI_COMMAND", command);
        }
        if let Some(netns) = at.netns {
            cmd.env("CNI_NETNS", netns);
        }
        let mut child = cmd.spawn().expect("run the plugin");
        child.stdin.take().unwrap().write_all(stdin).unwrap();
        let out = child.wait_with_output().unwrap();
        Exec {
            success: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// A plugin's config as libcni builds it from the list.
    fn plugin_conf(&self, plugin: &Value, version: &str, prev: Option<&Value>) -> Value {
        let mut conf = plugin.clone();
        conf["cniVersion"] = json!(version);
        conf["name"] = self.conflist["name"].clone();
        if let Some(prev) = prev {
            conf["prevResult"] = prev.clone();
        }
        conf
    }

    fn exec(
        &self,
        plugin: &Value,
        command: &str,
        version: &str,
        at: Attachment,
        prev: Option<&Value>,
    ) -> Exec {
        let conf = self.plugin_conf(plugin, version, prev);
        let plugin_type = plugin["type"].as_str().expect("plugin type");
        self.exec_raw(
            plugin_type,
            Some(command),
            at,
            &serde_json::to_vec(&conf).unwrap(),
        )
    }

    /// ADD through every plugin, each getting the previous result.
    pub fn add(&self, version: &str, at: Attachment) -> Result<Value, Exec> {
        let mut prev: Option<Value> = None;
        for plugin in self.plugins() {
            let out = self.exec(&plugin, "ADD", version, at, prev.as_ref());
            if !out.success {
                return Err(out);
            }
            prev = Some(out.json().ok_or(out)?);
        }
        Ok(prev.unwrap_or_default())
    }

    /// CHECK through every plugin with the final ADD result.
    pub fn check(&self, version: &str, at: Attachment, result: &Value) -> Result<(), Exec> {
        for plugin in self.plugins() {
            let out = self.exec(&plugin, "CHECK", version, at, Some(result));
            if !out.success {
                return Err(out);
            }
        }
        Ok(())
    }

    /// DEL through every plugin, in reverse order.
    pub fn del(&self, version: &str, at: Attachment, result: Option<&Value>) -> Result<(), Exec> {
        for plugin in self.plugins().iter().rev() {
            let out = self.exec(plugin, "DEL", version, at, result);
            if !out.success {
                return Err(out);
            }
        }
        Ok(())
    }

    /// GC with the attachments still in use (1.1.0).
    pub fn gc(&self, valid: &[Attachment]) -> Result<(), Exec> {
        let valid: Vec<Value> = valid
            .iter()
            .map(|a| json!({ "containerID": a.container_id, "ifname": a.ifname }))
            .collect();
        let at = Attachment {
            container_id: "",
            netns: None,
            ifname: "",
        };
        for plugin in self.plugins() {
            let mut conf = self.plugin_conf(&plugin, "1.1.0", None);
            conf["cni.dev/valid-attachments"] = json!(valid);
            let out = self.exec_raw(
                plugin["type"].as_str().unwrap(),
                Some("GC"),
                at,
                &serde_json::to_vec(&conf).unwrap(),
            );
            if !out.success {
                return Err(out);
            }
        }
        Ok(())
    }

    /// Versions every plugin of the list says it supports (VERSION).
    pub fn common_versions(&self) -> Vec<String> {
        let at = Attachment {
            container_id: "",
            netns: None,
            ifname: "",
        };
        let mut common: Vec<String> = VERSIONS.iter().map(|v| v.to_string()).collect();
        for plugin in self.plugins() {
            let out = self.exec_raw(
                plugin["type"].as_str().unwrap(),
                Some("VERSION"),
                at,
                br#"{"cniVersion":"1.0.0"}"#,
            );
            let supported: Vec<String> = out
                .json()
                .and_then(|v| v["supportedVersions"].as_array().cloned())
                .unwrap_or_default()
                .iter()
                .filter_map(|v| v.as_str().map(String::from))
                .collect();
            common.retain(|v| supported.contains(v));
        }
        common
    }
}

/// One check of the suite.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub name: String,
    pub passed: bool,
    pub detail: String,
}

struct Recorder(Vec<Outcome>);

impl Recorder {
    fn record(&mut self, name: String, result: Result<(), String>) {
        let (passed, detail) = match result {
            Ok(()) => (true, String::new()),
            Err(d) => (false, d),
        };
        self.0.push(Outcome {
            name,
            passed,
            detail,
        });
    }
}

fn addresses_in(ns: &NetNs, ifname: &str) -> Vec<String> {
    let out = Command::new("ip")
        .args(["-n", &ns.name, "-j", "addr", "show", "dev", ifname])
        .output()
        .unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    v[0]["addr_info"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|a| a["local"].as_str().map(String::from))
        .collect()
}

/// The result's shape, per the spec's "Success" section for `version`.
fn check_result(result: &Value, version: &str, netns: &Path, ifname: &str) -> Result<(), String> {
    if result["cniVersion"] != version {
        return Err(format!(
            "cniVersion is {}, not {version}",
            result["cniVersion"]
        ));
    }
    let interfaces = result["interfaces"].as_array().ok_or("no interfaces")?;
    let sandbox = netns.display().to_string();
    interfaces
        .iter()
        .position(|i| i["name"] == ifname && i["sandbox"] == sandbox.as_str())
        .ok_or_else(|| format!("no interface {ifname} with sandbox {sandbox}"))?;
    let ips = result["ips"]
        .as_array()
        .filter(|a| !a.is_empty())
        .ok_or("no ips")?;
    for ip in ips {
        let address = ip["address"].as_str().ok_or("an ip without address")?;
        if !address.contains('/') {
            return Err(format!("address {address} is not in CIDR notation"));
        }
        if let Some(i) = ip["interface"].as_u64()
            && i as usize >= interfaces.len()
        {
            return Err(format!(
                "ip {address} points at interface {i} of {}",
                interfaces.len()
            ));
        }
        let has_version = ip.get("version").is_some();
        if version.starts_with("0.") && !has_version {
            return Err(format!("{version} results need ips[].version"));
        }
        if !version.starts_with("0.") && has_version {
            return Err(format!("{version} results must not have ips[].version"));
        }
    }
    Ok(())
}

/// Runs every check against the network; returns one outcome per check.
pub fn run(runtime: &Runtime) -> Vec<Outcome> {
    let mut r = Recorder(Vec::new());
    let versions = runtime.common_versions();
    r.record(
        "version: VERSION lists supported versions".into(),
        if versions.is_empty() {
            Err("no common supported version".into())
        } else {
            Ok(())
        },
    );
    for version in &versions {
        per_version(runtime, version, &mut r);
    }
    let first = runtime.plugins()[0].clone();
    let first_type = first["type"].as_str().unwrap().to_string();
    let pod = NetNs::new("blc");
    let at = Attachment {
        container_id: "conformance-errors",
        netns: Some(&pod.path()),
        ifname: "eth0",
    };
    let newest = versions.last().cloned().unwrap_or_else(|| "1.0.0".into());
    let mut conf = runtime.plugin_conf(&first, "9.9.9", None);
    let out = runtime.exec_raw(
        &first_type,
        Some("ADD"),
        at,
        &serde_json::to_vec(&conf).unwrap(),
    );
    r.record(
        "errors: an unsupported cniVersion is error code 1".into(),
        match out.error_code() {
            Some(1) => Ok(()),
            _ => Err(out.describe()),
        },
    );
    conf["cniVersion"] = json!(newest);
    let out = runtime.exec_raw(&first_type, None, at, &serde_json::to_vec(&conf).unwrap());
    r.record(
        "errors: a missing CNI_COMMAND is error code 4".into(),
        match out.error_code() {
            Some(4) => Ok(()),
            _ => Err(out.describe()),
        },
    );
    let out = runtime.exec_raw(
        &first_type,
        Some("ADD"),
        at,
        b"{\"cniVersion\": \"1.0.0\", \"name\": ",
    );
    r.record(
        "errors: truncated JSON gets an error object (code 6)".into(),
        match out.error_code() {
            Some(6) => Ok(()),
            _ => Err(out.describe()),
        },
    );
    r.record(
        "errors: failed calls leave no interface in the container".into(),
        if addresses_in(&pod, "eth0").is_empty() {
            Ok(())
        } else {
            Err("eth0 exists".into())
        },
    );
    if versions.iter().any(|v| v == "1.1.0") {
        let pod = NetNs::new("blc");
        let keep = Attachment {
            container_id: "conformance-gc-keep",
            netns: Some(&pod.path()),
            ifname: "eth0",
        };
        let added = runtime.add("1.1.0", keep);
        r.record(
            "gc: GC keeps valid attachments".into(),
            added.map_err(|e| e.describe()).and_then(|result| {
                runtime.gc(&[keep]).map_err(|e| e.describe())?;
                runtime
                    .check("1.1.0", keep, &result)
                    .map_err(|e| format!("after GC: {}", e.describe()))?;
                runtime.gc(&[]).map_err(|e| e.describe())?;
                runtime
                    .del("1.1.0", keep, Some(&result))
                    .map_err(|e| e.describe())
            }),
        );
        let out = runtime.exec_raw(
            &first_type,
            Some("STATUS"),
            at,
            &serde_json::to_vec(&runtime.plugin_conf(&first, "1.1.0", None)).unwrap(),
        );
        r.record(
            "status: STATUS succeeds when the plugin is ready".into(),
            if out.success {
                Ok(())
            } else {
                Err(out.describe())
            },
        );
    }
    r.0
}

fn per_version(runtime: &Runtime, version: &str, r: &mut Recorder) {
    let pod = NetNs::new("blc");
    let path = pod.path();
    let id = format!("conformance-{}", version.replace('.', "-"));
    let at = Attachment {
        container_id: &id,
        netns: Some(&path),
        ifname: "eth0",
    };
    let name = |check: &str| format!("{version}: {check}");
    let result = match runtime.add(version, at) {
        Ok(result) => {
            r.record(name("ADD succeeds"), Ok(()));
            result
        }
        Err(e) => {
            r.record(name("ADD succeeds"), Err(e.describe()));
            return;
        }
    };
    r.record(
        name("the result has the version's shape"),
        check_result(&result, version, &path, "eth0"),
    );
    let reported: Vec<String> = result["ips"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|ip| ip["address"].as_str()?.split('/').next().map(String::from))
        .collect();
    let present = addresses_in(&pod, "eth0");
    r.record(
        name("the interface holds the reported address"),
        if reported.iter().any(|a| present.contains(a)) {
            Ok(())
        } else {
            Err(format!("reported {reported:?}, eth0 has {present:?}"))
        },
    );
    if version != "0.3.0" && version != "0.3.1" {
        r.record(
            name("CHECK passes after ADD"),
            runtime
                .check(version, at, &result)
                .map_err(|e| e.describe()),
        );
    }
    let again = runtime.add(version, at);
    r.record(
        name("ADD of an existing interface fails with an error object"),
        match again {
            Ok(_) => Err("second ADD succeeded".into()),
            Err(e) if e.error_code().is_some() => Ok(()),
            Err(e) => Err(e.describe()),
        },
    );
    r.record(
        name("DEL succeeds"),
        runtime
            .del(version, at, Some(&result))
            .map_err(|e| e.describe()),
    );
    r.record(
        name("DEL removes the interface"),
        if addresses_in(&pod, "eth0").is_empty() {
            Ok(())
        } else {
            Err("eth0 still configured".into())
        },
    );
    r.record(
        name("DEL twice succeeds"),
        runtime
            .del(version, at, Some(&result))
            .map_err(|e| e.describe()),
    );
    let unknown = Attachment {
        container_id: "conformance-never-added",
        ..at
    };
    r.record(
        name("DEL of an unknown container succeeds"),
        runtime
            .del(version, unknown, None)
            .map_err(|e| e.describe()),
    );

    // DEL after the container's netns is gone.
    let gone = NetNs::new("blc");
    let gone_path = gone.path();
    let gone_id = format!("{id}-gone");
    let at = Attachment {
        container_id: &gone_id,
        netns: Some(&gone_path),
        ifname: "eth0",
    };
    match runtime.add(version, at) {
        Ok(result) => {
            drop(gone);
            r.record(
                name("DEL succeeds when the netns is gone"),
                runtime
                    .del(version, at, Some(&result))
                    .map_err(|e| e.describe()),
            );
            let no_netns = Attachment { netns: None, ..at };
            r.record(
                name("DEL succeeds without CNI_NETNS"),
                runtime
                    .del(version, no_netns, Some(&result))
                    .map_err(|e| e.describe()),
            );
        }
        Err(e) => r.record(
            name("DEL succeeds when the netns is gone"),
            Err(format!("ADD failed: {}", e.describe())),
        ),
    }
}

/// A Markdown table of outcomes.
pub fn report(title: &str, outcomes: &[Outcome]) -> String {
    let mut out = format!("### {title}\n\n| check | result |\n|---|---|\n");
    for o in outcomes {
        let result = if o.passed {
            "pass".to_string()
        } else {
            format!("FAIL: {}", o.detail.replace('|', "\\|"))
        };
        out.push_str(&format!("| {} | {result} |\n", o.name));
    }
    out
}
