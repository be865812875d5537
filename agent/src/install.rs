//! Installing Beeline on the node (CNI binary + network config) and removing
//! it. The config is written last and atomically: its presence tells the
//! kubelet the node can network pods, so it only appears once that is true.
use std::{
    fs,
    io::Write,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
};

use std::process::{Command, Stdio};

use anyhow::{Context, Result};
use serde_json::{Value, json};

pub const CONFLIST_NAME: &str = "10-beeline.conflist";
pub const CNI_BINARY_NAME: &str = "beeline";

/// Writes `bytes` to `path` through a temp file in the same directory and a
/// rename, so readers see the old file or the new one, never half of one.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    let dir = path.parent().context("path has no parent")?;
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp = dir.join(format!(
        ".{}.tmp",
        path.file_name().unwrap().to_string_lossy()
    ));
    let mut f = fs::File::create(&tmp).with_context(|| format!("writing {}", tmp.display()))?;
    f.write_all(bytes)?;
    f.set_permissions(fs::Permissions::from_mode(mode))?;
    f.sync_all()?;
    fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))?;
    fs::File::open(dir)?.sync_all()?;
    Ok(())
}

/// The `beeline` binary shipped next to this agent.
pub fn default_cni_binary() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("locating beeline-agent")?;
    Ok(exe.with_file_name(CNI_BINARY_NAME))
}

/// Writes `bytes` to `path` unless it already holds exactly them; returns
/// the path when it wrote.
fn write_if_changed(path: &Path, bytes: &[u8], mode: u32) -> Result<Option<PathBuf>> {
    if fs::read(path).is_ok_and(|current| current == bytes) {
        return Ok(None);
    }
    write_atomic(path, bytes, mode)?;
    Ok(Some(path.to_path_buf()))
}

/// Installs the CNI binary unless the same one is there.
pub fn install_binary(source: &Path, bin_dir: &Path) -> Result<Option<PathBuf>> {
    let bytes =
        fs::read(source).with_context(|| format!("reading the CNI binary {}", source.display()))?;
    write_if_changed(&bin_dir.join(CNI_BINARY_NAME), &bytes, 0o755)
}

/// Plugins Beeline chains after itself when their binary is in the CNI bin
/// dir: hostPort (`portMappings`) and the bandwidth annotations
/// (`bandwidth`), which the kubelet only passes to plugins that declare them.
pub fn chained_plugin(name: &str) -> Option<Value> {
    match name {
        "portmap" => Some(json!({
            "type": "portmap",
            "capabilities": { "portMappings": true },
            "snat": true,
        })),
        "bandwidth" => Some(json!({
            "type": "bandwidth",
            "capabilities": { "bandwidth": true },
        })),
        _ => None,
    }
}

/// The newest version libcni before 1.2 (containerd 1.6 and 1.7, podman's
/// CNI backend) accepts in a result: the conflist's `cniVersion`.
const OLDEST_RUNTIMES_MAX: &str = "1.0.0";

/// The network config, and what it had to leave out.
#[derive(Debug, Clone, PartialEq)]
pub struct Conflist {
    pub json: Value,
    /// Chained plugins asked for but not in the CNI bin dir.
    pub missing: Vec<String>,
}

/// The conflist: Beeline, then each of `chain` found in `bin_dir`. Its
/// `cniVersions` are those every plugin of the chain speaks (each binary's
/// VERSION), so runtimes with libcni 1.2 or later pick the newest of them;
/// `cniVersion` is the newest of them that older runtimes accept.
pub fn conflist(
    socket: &Path,
    data_dir: Option<&Path>,
    beeline: &Path,
    bin_dir: Option<&Path>,
    chain: &[String],
) -> Result<Conflist> {
    let mut versions = supported_versions(beeline)?;
    let mut me = json!({ "type": "beeline", "agentSocket": socket });
    if let Some(dir) = data_dir {
        me["dataDir"] = json!(dir);
    }
    let mut plugins = Vec::new();
    let mut missing = Vec::new();
    for name in chain {
        let conf = chained_plugin(name).with_context(|| {
            format!("cannot chain {name:?}: Beeline chains portmap and bandwidth")
        })?;
        let binary = bin_dir.map(|d| d.join(name));
        match binary.filter(|b| b.is_file()) {
            Some(binary) => {
                let theirs = supported_versions(&binary)?;
                versions.retain(|v| theirs.contains(v));
                if name == "bandwidth" {
                    // Beeline sends a shaped pod's traffic through the host
                    // stack, where the bandwidth plugin's qdiscs are.
                    me["capabilities"] = json!({ "bandwidth": true });
                }
                plugins.push(conf);
            }
            None => missing.push(name.clone()),
        }
    }
    let newest_old = versions
        .iter()
        .filter(|v| version_key(v) <= version_key(OLDEST_RUNTIMES_MAX))
        .max_by_key(|v| version_key(v))
        .with_context(|| {
            format!(
                "the chained plugins share no CNI version up to {OLDEST_RUNTIMES_MAX}: {versions:?}"
            )
        })?
        .clone();
    plugins.insert(0, me);
    Ok(Conflist {
        json: json!({
            "cniVersion": newest_old,
            "cniVersions": versions,
            "name": "beeline",
            "plugins": plugins,
        }),
        missing,
    })
}

fn version_key(v: &str) -> Vec<u32> {
    v.split('.').map(|p| p.parse().unwrap_or(0)).collect()
}

/// A CNI plugin's `supportedVersions`, from its VERSION command.
pub fn supported_versions(binary: &Path) -> Result<Vec<String>> {
    let mut child = Command::new(binary)
        .env_clear()
        .env("CNI_COMMAND", "VERSION")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("running {} VERSION", binary.display()))?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(br#"{"cniVersion":"1.0.0"}"#)?;
    let out = child.wait_with_output()?;
    let answer: Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("{} VERSION printed no JSON", binary.display()))?;
    let versions: Vec<String> = answer["supportedVersions"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v.as_str().map(str::to_string))
        .collect();
    anyhow::ensure!(
        !versions.is_empty(),
        "{} VERSION listed no versions: {answer}",
        binary.display()
    );
    Ok(versions)
}

/// Writes the conflist unless the same one is there.
pub fn write_conflist(conf_dir: &Path, conflist: &Value) -> Result<Option<PathBuf>> {
    let bytes = serde_json::to_vec_pretty(conflist)?;
    write_if_changed(&conf_dir.join(CONFLIST_NAME), &bytes, 0o644)
}

/// Removes a file; true if it existed.
pub fn remove(path: &Path) -> Result<bool> {
    match fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e).with_context(|| format!("removing {}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stand-in plugin whose VERSION lists `versions`.
    fn plugin(dir: &Path, name: &str, versions: &[&str]) -> PathBuf {
        let path = dir.join(name);
        let answer = json!({ "cniVersion": "1.0.0", "supportedVersions": versions });
        fs::write(
            &path,
            format!("#!/bin/sh\ncat >/dev/null\necho '{answer}'\n"),
        )
        .unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    const ALL: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];
    const DEBIAN_1_1_1: &[&str] = &["0.1.0", "0.2.0", "0.3.0", "0.3.1", "0.4.0", "1.0.0"];

    #[test]
    fn older_runtimes_get_a_version_they_know_newer_ones_the_newest_all_plugins_speak() {
        let dir = tempfile::tempdir().unwrap();
        let beeline = plugin(dir.path(), "beeline", ALL);
        let socket = Path::new("/run/beeline/agent.sock");
        let chain = ["portmap".to_string(), "bandwidth".to_string()];

        // Alone, or with plugins that speak 1.1.0: newer runtimes get it.
        let alone = conflist(socket, None, &beeline, Some(dir.path()), &chain).unwrap();
        assert_eq!(alone.json["cniVersion"], "1.0.0");
        assert_eq!(alone.json["cniVersions"], json!(ALL));
        assert_eq!(alone.missing, chain);
        assert_eq!(alone.json["plugins"].as_array().unwrap().len(), 1);
        assert!(alone.json["plugins"][0].get("capabilities").is_none());

        plugin(dir.path(), "portmap", ALL);
        plugin(dir.path(), "bandwidth", ALL);
        let all = conflist(socket, None, &beeline, Some(dir.path()), &chain).unwrap();
        assert_eq!(all.json["cniVersions"], json!(ALL));
        assert!(all.missing.is_empty());
        let types: Vec<&str> = all.json["plugins"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["type"].as_str().unwrap())
            .collect();
        assert_eq!(types, ["beeline", "portmap", "bandwidth"]);
        assert_eq!(all.json["plugins"][0]["capabilities"]["bandwidth"], true);
        assert_eq!(all.json["plugins"][1]["capabilities"]["portMappings"], true);

        // Debian's 1.1.1 plugins stop at 1.0.0: so does the chain.
        plugin(dir.path(), "portmap", DEBIAN_1_1_1);
        let debian = conflist(socket, None, &beeline, Some(dir.path()), &chain).unwrap();
        assert_eq!(debian.json["cniVersion"], "1.0.0");
        assert_eq!(
            debian.json["cniVersions"],
            json!(["0.3.0", "0.3.1", "0.4.0", "1.0.0"])
        );
    }

    #[test]
    fn conflist_is_written_atomically_and_only_when_it_changes() {
        let dir = tempfile::tempdir().unwrap();
        let conf = json!({ "cniVersion": "1.0.0", "name": "beeline", "plugins": [] });
        let path = write_conflist(dir.path(), &conf).unwrap().unwrap();
        assert_eq!(
            write_conflist(dir.path(), &conf).unwrap(),
            None,
            "rewritten unchanged"
        );
        let v: Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
        assert_eq!(v, conf);
        let leftovers: Vec<_> = fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "temp files left behind");
        assert!(remove(&path).unwrap());
        assert!(!remove(&path).unwrap());
    }
}
