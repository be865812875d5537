//! Running a delegated plugin (the `ipam` section's type) as the spec says:
//! found in CNI_PATH, same CNI_* environment, the same network config on
//! stdin, its result or error object on stdout.
use std::{
    io::Write,
    net::Ipv4Addr,
    path::PathBuf,
    process::{Command, Stdio},
};

use serde_json::Value;

use crate::{
    config::{Env, SUPPORTED_VERSIONS},
    error::{CniError, Result, code},
};

#[derive(Clone, Copy)]
pub struct Delegate<'a> {
    pub plugin: &'a str,
    pub env: &'a Env,
    /// The exact network config this plugin was given.
    pub stdin: &'a [u8],
}

impl Delegate<'_> {
    fn binary(&self) -> Result<PathBuf> {
        if self.plugin.contains('/') || self.plugin.starts_with('.') {
            return Err(CniError::new(
                code::INVALID_CONFIG,
                format!("ipam type {:?} is not a plugin name", self.plugin),
            ));
        }
        let path = self.env.cni_path.as_deref().unwrap_or_default();
        path.split(':')
            .filter(|d| !d.is_empty())
            .map(|d| PathBuf::from(d).join(self.plugin))
            .find(|p| p.is_file())
            .ok_or_else(|| {
                CniError::new(
                    code::INVALID_CONFIG,
                    format!(
                        "IPAM plugin {:?} not found in CNI_PATH {path:?}",
                        self.plugin
                    ),
                )
            })
    }

    /// Runs `command`; returns the plugin's JSON output (if it printed any).
    pub fn exec(&self, command: &str) -> Result<Option<Value>> {
        let binary = self.binary()?;
        let mut cmd = Command::new(&binary);
        cmd.env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", &self.env.container_id)
            .env("CNI_IFNAME", &self.env.ifname)
            .env("CNI_PATH", self.env.cni_path.as_deref().unwrap_or_default())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(netns) = &self.env.netns {
            cmd.env("CNI_NETNS", netns);
        }
        if let Some(args) = &self.env.cni_args {
            cmd.env("CNI_ARGS", args);
        }
        let failed = |e: &dyn std::fmt::Display| {
            CniError::new(
                code::IPAM_DELEGATE,
                format!("running IPAM plugin {} failed", binary.display()),
            )
            .with_details(e)
        };
        let mut child = cmd.spawn().map_err(|e| failed(&e))?;
        child
            .stdin
            .take()
            .expect("piped stdin")
            .write_all(self.stdin)
            .map_err(|e| failed(&e))?;
        let out = child.wait_with_output().map_err(|e| failed(&e))?;
        let parsed: Option<Value> = serde_json::from_slice(&out.stdout).ok();
        if !out.status.success() {
            // Pass the plugin's own error through, attributed to it.
            let (code, msg, details) = match &parsed {
                Some(v) => (
                    v["code"].as_u64().map_or(code::IPAM_DELEGATE, |c| c as u32),
                    v["msg"].as_str().unwrap_or("failed").to_string(),
                    v["details"].as_str().unwrap_or_default().to_string(),
                ),
                None => (
                    code::IPAM_DELEGATE,
                    "failed".to_string(),
                    String::from_utf8_lossy(&out.stderr).trim().to_string(),
                ),
            };
            return Err(CniError::new(
                code,
                format!("IPAM plugin {} {command}: {msg}", self.plugin),
            )
            .with_details(details));
        }
        Ok(parsed)
    }
}

impl Delegate<'_> {
    /// `stdin` at the newest version both sides speak: GC configs are 1.1.0,
    /// and plugins that predate it refuse DEL at that version.
    pub fn config_at_common_version(&self) -> Result<Vec<u8>> {
        let version = Delegate {
            stdin: br#"{"cniVersion":"1.0.0"}"#,
            ..*self
        }
        .exec("VERSION")?
        .unwrap_or_default();
        let theirs: Vec<&str> = version["supportedVersions"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        let common = SUPPORTED_VERSIONS
            .iter()
            .rev()
            .find(|v| theirs.contains(v))
            .ok_or_else(|| {
                CniError::new(
                    code::INCOMPATIBLE_VERSION,
                    format!("IPAM plugin {} supports none of our versions", self.plugin),
                )
                .with_details(version)
            })?;
        let mut conf: Value = serde_json::from_slice(self.stdin)
            .map_err(|e| CniError::new(code::DECODE_FAILURE, "bad config").with_details(e))?;
        conf["cniVersion"] = Value::from(*common);
        Ok(serde_json::to_vec(&conf).expect("a Value serializes"))
    }
}

/// The first IPv4 address of an IPAM result of any supported version.
pub fn first_ipv4(result: &Value) -> Result<Ipv4Addr> {
    result["ips"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|ip| ip["address"].as_str())
        .filter_map(|a| a.split('/').next()?.parse::<Ipv4Addr>().ok())
        .next()
        .ok_or_else(|| {
            CniError::new(
                code::IPAM_DELEGATE,
                "the IPAM plugin returned no IPv4 address",
            )
            .with_details(result)
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reads_the_first_ipv4_of_any_version() {
        let v030 = json!({"cniVersion":"0.3.1","ips":[{"version":"4","address":"10.1.2.3/24"}]});
        assert_eq!(first_ipv4(&v030).unwrap(), Ipv4Addr::new(10, 1, 2, 3));
        let v1 = json!({"ips":[{"address":"fd00::5/64"},{"address":"10.9.0.7/16"}]});
        assert_eq!(first_ipv4(&v1).unwrap(), Ipv4Addr::new(10, 9, 0, 7));
        assert_eq!(
            first_ipv4(&json!({"ips":[]})).unwrap_err().code,
            code::IPAM_DELEGATE
        );
    }

    #[test]
    fn a_missing_plugin_is_a_config_error() {
        let env = Env {
            container_id: "c".into(),
            netns: None,
            ifname: "eth0".into(),
            cni_path: Some("/nonexistent".into()),
            cni_args: None,
        };
        let d = Delegate {
            plugin: "host-local",
            env: &env,
            stdin: b"{}",
        };
        assert_eq!(d.exec("ADD").unwrap_err().code, code::INVALID_CONFIG);
        let d = Delegate {
            plugin: "../bin/sh",
            env: &env,
            stdin: b"{}",
        };
        assert_eq!(d.exec("ADD").unwrap_err().code, code::INVALID_CONFIG);
    }
}
