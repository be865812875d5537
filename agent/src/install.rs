//! Installing Beeline on the node (CNI binary + network config) and removing
//! it. The config is written last and atomically: its presence tells the
//! kubelet the node can network pods, so it only appears once that is true.
use std::{
    fs,
    io::Write,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};
use serde_json::json;

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

pub fn conflist(socket: &Path) -> serde_json::Value {
    json!({
        "cniVersion": "1.1.0",
        "name": "beeline",
        "plugins": [{
            "type": "beeline",
            "agentSocket": socket,
        }],
    })
}

/// Writes the conflist unless the same one is there.
pub fn write_conflist(conf_dir: &Path, socket: &Path) -> Result<Option<PathBuf>> {
    let bytes = serde_json::to_vec_pretty(&conflist(socket))?;
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

    #[test]
    fn conflist_is_written_atomically_and_parses() {
        let dir = tempfile::tempdir().unwrap();
        let socket = Path::new("/run/beeline/agent.sock");
        let path = write_conflist(dir.path(), socket).unwrap().unwrap();
        assert_eq!(
            write_conflist(dir.path(), socket).unwrap(),
            None,
            "rewritten unchanged"
        );
        let v: serde_json::Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
        assert_eq!(v["plugins"][0]["type"], "beeline");
        assert_eq!(v["plugins"][0]["agentSocket"], "/run/beeline/agent.sock");
        let leftovers: Vec<_> = fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "temp files left behind");
        assert!(remove(&path).unwrap());
        assert!(!remove(&path).unwrap());
    }
}
