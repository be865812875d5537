//! The previous release's agent and CNI binary, for the upgrade test: built
//! from the commit below, exported from git into `target/previous/` with its
//! own eBPF object and target dir (about 4 minutes the first time, cached
//! after). An agent of this version must start on that release's state dir
//! and pins without losing an endpoint or a packet.
use std::{path::PathBuf, process::Command};

use anyhow::{Context, Result, bail};

use crate::util;

/// `main` before the architecture rework: state format 1, three verdict
/// counters per program, the single `Agent` object.
pub const PREVIOUS_RELEASE: &str = "f39f51320243bb05ec94869140b482ddff2a591e";

/// Where the tests look for the binaries (`beeline_tests::previous_bin`).
pub fn bin_dir() -> PathBuf {
    util::workspace_root().join("target/previous/bin")
}

pub fn build() -> Result<()> {
    let root = util::workspace_root();
    let base = root.join("target/previous");
    let marker = bin_dir().join(".release");
    if std::fs::read_to_string(&marker).is_ok_and(|r| r.trim() == PREVIOUS_RELEASE) {
        return Ok(());
    }
    util::step(&format!(
        "building the previous release ({})",
        &PREVIOUS_RELEASE[..7]
    ));
    let have = Command::new("git")
        .current_dir(&root)
        .args(["cat-file", "-e", &format!("{PREVIOUS_RELEASE}^{{commit}}")])
        .status()
        .is_ok_and(|s| s.success());
    if !have {
        // A shallow clone: fetch just that commit.
        util::run(Command::new("git").current_dir(&root).args([
            "fetch",
            "--quiet",
            "origin",
            PREVIOUS_RELEASE,
        ]))
        .context(
            "the previous release is not in this clone; fetch its history (git fetch --unshallow)",
        )?;
    }
    let src = base.join("src");
    if src.exists() {
        std::fs::remove_dir_all(&src)?;
    }
    std::fs::create_dir_all(&src)?;
    let archive = Command::new("git")
        .current_dir(&root)
        .args(["archive", "--format=tar", PREVIOUS_RELEASE])
        .output()
        .context("git archive")?;
    if !archive.status.success() {
        bail!("git archive {PREVIOUS_RELEASE} failed");
    }
    let mut tar = Command::new("tar")
        .arg("-x")
        .arg("-C")
        .arg(&src)
        .stdin(std::process::Stdio::piped())
        .spawn()
        .context("tar")?;
    use std::io::Write;
    tar.stdin
        .take()
        .expect("piped")
        .write_all(&archive.stdout)?;
    if !tar.wait()?.success() {
        bail!("unpacking the previous release failed");
    }
    // Its own xtask builds its eBPF object (into src/target/ebpf).
    util::run(util::cargo(&src).args(["xtask", "build-ebpf"]))?;
    let target = base.join("target");
    util::run(
        util::cargo(&src)
            .args([
                "build",
                "--release",
                "-p",
                "beeline-agent",
                "-p",
                "beeline-cni",
            ])
            .env("CARGO_TARGET_DIR", &target),
    )?;
    let bin = bin_dir();
    std::fs::create_dir_all(&bin)?;
    for name in ["beeline-agent", "beeline"] {
        std::fs::copy(target.join("release").join(name), bin.join(name))
            .with_context(|| format!("copying the previous {name}"))?;
    }
    std::fs::write(&marker, PREVIOUS_RELEASE)?;
    std::fs::remove_dir_all(&src)?;
    Ok(())
}
