//! The network configuration on stdin and the CNI_* environment.
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;

use crate::error::{CniError, Result, code};

/// Versions whose result format this plugin can produce.
pub const SUPPORTED_VERSIONS: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];
pub const DEFAULT_DATA_DIR: &str = "/var/lib/cni/beeline";
/// Bigger configs are refused before parsing.
pub const MAX_CONFIG_BYTES: usize = 1 << 20;
const MAX_ID_LEN: usize = 1024;
const IFNAMSIZ: usize = 16;

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetConf {
    pub cni_version: String,
    pub name: String,
    #[serde(rename = "type")]
    pub plugin_type: String,
    /// The agent's Unix socket.
    pub agent_socket: Option<PathBuf>,
    /// Pod interface MTU; the agent's value when absent.
    pub mtu: Option<u32>,
    pub log_file: Option<PathBuf>,
    pub log_level: Option<String>,
    /// Where the built-in IP allocator keeps its state.
    pub data_dir: Option<PathBuf>,
    /// An IPAM plugin to delegate to (`{"type": "host-local", ...}`); the
    /// built-in allocator when absent.
    pub ipam: Option<Value>,
    /// The previous plugin's result (chaining, CHECK).
    pub prev_result: Option<Value>,
    /// What the runtime passes for the capabilities the conflist declares
    /// (Beeline declares `bandwidth` when the bandwidth plugin is chained).
    pub runtime_config: Option<Value>,
    /// GC: the attachments the runtime still uses.
    #[serde(rename = "cni.dev/valid-attachments")]
    pub valid_attachments: Option<Vec<Attachment>>,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq, Hash)]
pub struct Attachment {
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
}

impl NetConf {
    /// Parses and validates the stdin bytes. JSON syntax errors are code 6,
    /// wrong types and bad values code 7, unknown versions code 1.
    pub fn parse(bytes: &[u8]) -> Result<NetConf> {
        if bytes.len() > MAX_CONFIG_BYTES {
            return Err(CniError::new(
                code::DECODE_FAILURE,
                format!("network configuration is larger than {MAX_CONFIG_BYTES} bytes"),
            ));
        }
        let value: Value = serde_json::from_slice(bytes).map_err(|e| {
            CniError::new(
                code::DECODE_FAILURE,
                "network configuration is not valid JSON",
            )
            .with_details(e)
        })?;
        if !value.is_object() {
            return Err(CniError::new(
                code::DECODE_FAILURE,
                "network configuration must be a JSON object",
            ));
        }
        let conf: NetConf = serde_json::from_value(value).map_err(|e| {
            CniError::new(code::INVALID_CONFIG, "invalid network configuration").with_details(e)
        })?;
        conf.validate()?;
        Ok(conf)
    }

    fn validate(&self) -> Result<()> {
        if !SUPPORTED_VERSIONS.contains(&self.cni_version.as_str()) {
            return Err(CniError::new(
                code::INCOMPATIBLE_VERSION,
                format!(
                    "cniVersion {:?} is not supported; supported versions: {}",
                    self.cni_version,
                    SUPPORTED_VERSIONS.join(", ")
                ),
            ));
        }
        if !is_valid_identifier(&self.name) {
            return Err(CniError::new(
                code::INVALID_CONFIG,
                format!(
                    "network name {:?} is invalid: it must start with a letter or digit and \
                     contain only letters, digits, '_', '.' and '-'",
                    self.name
                ),
            ));
        }
        if self.plugin_type.is_empty() {
            return Err(CniError::new(
                code::INVALID_CONFIG,
                "\"type\" must not be empty",
            ));
        }
        if let Some(mtu) = self.mtu
            && !(576..=65535).contains(&mtu)
        {
            return Err(CniError::new(
                code::INVALID_CONFIG,
                format!("mtu {mtu} is out of range (576..=65535)"),
            ));
        }
        if let Some(ipam) = &self.ipam
            && (ipam
                .get("type")
                .and_then(Value::as_str)
                .is_none_or(str::is_empty))
        {
            return Err(CniError::new(
                code::INVALID_CONFIG,
                "\"ipam\" must name a plugin in \"type\" (or be left out for the built-in allocator)",
            ));
        }
        if let Some(level) = &self.log_level
            && level.parse::<tracing::Level>().is_err()
        {
            return Err(CniError::new(
                code::INVALID_CONFIG,
                format!("logLevel {level:?} is not one of error, warn, info, debug, trace"),
            ));
        }
        Ok(())
    }

    pub fn agent_socket(&self) -> &Path {
        self.agent_socket
            .as_deref()
            .unwrap_or(Path::new(beeline_proto::DEFAULT_SOCKET))
    }

    /// The allocator's directory for this network.
    /// The delegated IPAM plugin's type, if any.
    pub fn ipam_type(&self) -> Option<&str> {
        self.ipam.as_ref()?.get("type")?.as_str()
    }

    /// Whether the runtime asked for bandwidth limits on this pod (the
    /// bandwidth plugin chained after Beeline applies them on the host veth).
    pub fn shaped(&self) -> bool {
        let Some(bandwidth) = self
            .runtime_config
            .as_ref()
            .and_then(|r| r.get("bandwidth"))
        else {
            return false;
        };
        ["ingressRate", "egressRate"]
            .iter()
            .any(|k| bandwidth.get(*k).and_then(Value::as_u64).unwrap_or(0) > 0)
    }

    /// IPAM plugins that talk to a server over the pod's own interface.
    pub fn ipam_talks_on_link(&self) -> bool {
        self.ipam_type() == Some("dhcp")
    }

    pub fn ipam_dir(&self) -> PathBuf {
        self.data_dir
            .as_deref()
            .unwrap_or(Path::new(DEFAULT_DATA_DIR))
            .join(&self.name)
    }
}

/// Names the spec allows for networks and container ids.
pub fn is_valid_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Version,
    Gc,
    Status,
}

/// The CNI_* variables. Only those the command needs are required.
#[derive(Debug, Clone)]
pub struct Env {
    pub container_id: String,
    pub netns: Option<PathBuf>,
    pub ifname: String,
    /// Where delegated plugins are looked up.
    pub cni_path: Option<String>,
    pub cni_args: Option<String>,
}

impl Env {
    pub fn command_from(get: &impl Fn(&str) -> Option<String>) -> Result<Command> {
        let raw = get("CNI_COMMAND")
            .ok_or_else(|| CniError::new(code::INVALID_ENV, "CNI_COMMAND is not set"))?;
        Ok(match raw.as_str() {
            "ADD" => Command::Add,
            "DEL" => Command::Del,
            "CHECK" => Command::Check,
            "VERSION" => Command::Version,
            "GC" => Command::Gc,
            "STATUS" => Command::Status,
            other => {
                return Err(CniError::new(
                    code::INVALID_ENV,
                    format!(
                        "CNI_COMMAND {other:?} is not one of ADD, DEL, CHECK, VERSION, GC, STATUS"
                    ),
                ));
            }
        })
    }

    /// GC and STATUS concern the whole network, not one attachment.
    pub fn for_gc(get: &impl Fn(&str) -> Option<String>) -> Env {
        Env {
            container_id: String::new(),
            netns: None,
            ifname: String::new(),
            cni_path: get("CNI_PATH").filter(|s| !s.is_empty()),
            cni_args: None,
        }
    }

    /// Reads and validates the variables for an ADD, DEL or CHECK.
    pub fn for_attachment(command: Command, get: &impl Fn(&str) -> Option<String>) -> Result<Env> {
        let container_id = get("CNI_CONTAINERID").unwrap_or_default();
        if container_id.is_empty() {
            return Err(CniError::new(
                code::INVALID_ENV,
                "CNI_CONTAINERID is not set",
            ));
        }
        if container_id.len() > MAX_ID_LEN || !is_valid_identifier(&container_id) {
            return Err(CniError::new(
                code::INVALID_ENV,
                format!(
                    "CNI_CONTAINERID {:?} is invalid: it must be at most {MAX_ID_LEN} letters, \
                     digits, '_', '.' or '-', starting with a letter or digit",
                    truncate(&container_id)
                ),
            ));
        }
        let ifname = get("CNI_IFNAME").unwrap_or_default();
        validate_ifname(&ifname)?;
        let netns = get("CNI_NETNS")
            .filter(|s| !s.is_empty())
            .map(PathBuf::from);
        // DEL must work without a netns (the container may be gone).
        if command != Command::Del && netns.is_none() {
            return Err(CniError::new(code::INVALID_ENV, "CNI_NETNS is not set"));
        }
        Ok(Env {
            container_id,
            netns,
            ifname,
            cni_path: get("CNI_PATH").filter(|s| !s.is_empty()),
            cni_args: get("CNI_ARGS").filter(|s| !s.is_empty()),
        })
    }
}

impl Env {
    /// The Kubernetes pod the kubelet names in CNI_ARGS
    /// (`K8S_POD_NAMESPACE=..;K8S_POD_NAME=..;K8S_POD_UID=..`).
    pub fn pod_ref(&self) -> Option<beeline_proto::PodRef> {
        let args = self.cni_args.as_deref()?;
        let value = |key: &str| {
            args.split(';')
                .filter_map(|kv| kv.split_once('='))
                .find(|(k, _)| *k == key)
                .map(|(_, v)| v.to_string())
        };
        Some(beeline_proto::PodRef {
            namespace: value("K8S_POD_NAMESPACE")?,
            name: value("K8S_POD_NAME")?,
            uid: value("K8S_POD_UID").unwrap_or_default(),
        })
    }
}

/// Linux interface-name rules (dev_valid_name), stated as errors a person can act on.
pub fn validate_ifname(name: &str) -> Result<()> {
    let bad = |why: &str| {
        Err(CniError::new(
            code::INVALID_ENV,
            format!("CNI_IFNAME {:?} is invalid: {why}", truncate(name)),
        ))
    };
    if name.is_empty() {
        return bad("it is empty or not set");
    }
    if name.len() >= IFNAMSIZ {
        return bad("it is longer than 15 bytes");
    }
    if name == "." || name == ".." {
        return bad("'.' and '..' are not interface names");
    }
    if name
        .chars()
        .any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control())
    {
        return bad("it contains '/', ':', whitespace or a control character");
    }
    Ok(())
}

fn truncate(s: &str) -> String {
    const MAX: usize = 64;
    if s.chars().count() <= MAX {
        s.to_string()
    } else {
        format!("{}…", s.chars().take(MAX).collect::<String>())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env_of(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> + use<> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn parses_a_minimal_config_for_every_version() {
        for v in SUPPORTED_VERSIONS {
            let conf = NetConf::parse(
                format!(r#"{{"cniVersion":"{v}","name":"beeline","type":"beeline","mtu":1450}}"#)
                    .as_bytes(),
            )
            .unwrap();
            assert_eq!(conf.cni_version, v);
            assert_eq!(conf.mtu, Some(1450));
            assert_eq!(
                conf.agent_socket(),
                Path::new(beeline_proto::DEFAULT_SOCKET)
            );
        }
    }

    #[test]
    fn bad_configs_get_the_right_code() {
        let cases: &[(&str, u32)] = &[
            ("", code::DECODE_FAILURE),
            ("{", code::DECODE_FAILURE),
            ("[1,2]", code::DECODE_FAILURE),
            (
                r#"{"cniVersion":"1.0.0","type":"beeline"}"#,
                code::INVALID_CONFIG,
            ),
            (r#"{"cniVersion":"1.0.0","name":"n"}"#, code::INVALID_CONFIG),
            (
                r#"{"cniVersion":"9.9.9","name":"n","type":"beeline"}"#,
                code::INCOMPATIBLE_VERSION,
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"n","type":"beeline","mtu":"big"}"#,
                code::INVALID_CONFIG,
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"n","type":"beeline","mtu":70000}"#,
                code::INVALID_CONFIG,
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"../x","type":"beeline"}"#,
                code::INVALID_CONFIG,
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"n","type":"beeline","logLevel":"loud"}"#,
                code::INVALID_CONFIG,
            ),
        ];
        for (input, expected) in cases {
            let err = NetConf::parse(input.as_bytes()).unwrap_err();
            assert_eq!(err.code, *expected, "{input:?}: {err}");
        }
        let huge = vec![b' '; MAX_CONFIG_BYTES + 1];
        assert_eq!(
            NetConf::parse(&huge).unwrap_err().code,
            code::DECODE_FAILURE
        );
    }

    #[test]
    fn pod_identity_comes_from_cni_args() {
        let get = env_of(&[
            ("CNI_CONTAINERID", "c1"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_NETNS", "/run/netns/x"),
            (
                "CNI_ARGS",
                "IgnoreUnknown=1;K8S_POD_NAMESPACE=kube-system;K8S_POD_NAME=coredns-7db6d;\
                 K8S_POD_INFRA_CONTAINER_ID=c1;K8S_POD_UID=0f3c",
            ),
        ]);
        let pod = Env::for_attachment(Command::Add, &get)
            .unwrap()
            .pod_ref()
            .unwrap();
        assert_eq!(
            (pod.namespace.as_str(), pod.name.as_str(), pod.uid.as_str()),
            ("kube-system", "coredns-7db6d", "0f3c")
        );
        let get = env_of(&[
            ("CNI_CONTAINERID", "c1"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_NETNS", "/run/netns/x"),
            ("CNI_ARGS", "IgnoreUnknown=1"),
        ]);
        assert_eq!(
            Env::for_attachment(Command::Add, &get).unwrap().pod_ref(),
            None
        );
    }

    #[test]
    fn env_validation() {
        let ok = env_of(&[
            ("CNI_CONTAINERID", "abc-123"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_NETNS", "/run/netns/x"),
        ]);
        let env = Env::for_attachment(Command::Add, &ok).unwrap();
        assert_eq!(env.ifname, "eth0");

        for (id, ifname) in [
            ("", "eth0"),
            ("../etc", "eth0"),
            ("a/b", "eth0"),
            ("id\n", "eth0"),
            ("ok", ""),
            ("ok", "averyveryverylongname"),
            ("ok", ".."),
            ("ok", "a/b"),
            ("ok", "eth\u{1}"),
        ] {
            let get = env_of(&[
                ("CNI_CONTAINERID", id),
                ("CNI_IFNAME", ifname),
                ("CNI_NETNS", "/run/netns/x"),
            ]);
            let err = Env::for_attachment(Command::Add, &get).unwrap_err();
            assert_eq!(err.code, code::INVALID_ENV, "{id:?}/{ifname:?}");
        }
        let long_id = "a".repeat(MAX_ID_LEN + 1);
        let get = env_of(&[
            ("CNI_CONTAINERID", &long_id),
            ("CNI_IFNAME", "eth0"),
            ("CNI_NETNS", "/x"),
        ]);
        assert_eq!(
            Env::for_attachment(Command::Add, &get).unwrap_err().code,
            code::INVALID_ENV
        );

        // DEL tolerates a missing netns; ADD does not.
        let no_ns = env_of(&[("CNI_CONTAINERID", "c"), ("CNI_IFNAME", "eth0")]);
        assert!(Env::for_attachment(Command::Del, &no_ns).is_ok());
        assert_eq!(
            Env::for_attachment(Command::Add, &no_ns).unwrap_err().code,
            code::INVALID_ENV
        );
        assert_eq!(
            Env::command_from(&env_of(&[])).unwrap_err().code,
            code::INVALID_ENV
        );
        assert_eq!(
            Env::command_from(&env_of(&[("CNI_COMMAND", "FROB")]))
                .unwrap_err()
                .code,
            code::INVALID_ENV
        );
    }
}
