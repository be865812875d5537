use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one level below the workspace root")
        .to_path_buf()
}

/// Prints a progress line for a long step.
pub fn step(msg: &str) {
    eprintln!("\x1b[1;34m==>\x1b[0m {msg}");
}

/// The cargo that runs this xtask (stable), rooted at the workspace.
pub fn cargo(root: &Path) -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(root);
    cmd
}

pub fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

/// What building and running Beeline needs from the host: the C libraries
/// behind nftnl (masquerade rules over netlink) and the tools the demo and
/// tests drive (`ip`, `ping`, `nsenter`). Installs them on Debian when
/// missing, or says what to install.
pub fn ensure_host_tools() -> Result<()> {
    let mut missing: Vec<(&str, &str)> = [
        ("ip", "iproute2"),
        ("ping", "iputils-ping"),
        ("nsenter", "util-linux"),
        ("pkg-config", "pkg-config"),
    ]
    .into_iter()
    .filter(|(tool, _)| !on_path(tool))
    .collect();
    for (lib, package) in [("libnftnl", "libnftnl-dev"), ("libmnl", "libmnl-dev")] {
        let found = Command::new("pkg-config")
            .args(["--exists", lib])
            .status()
            .is_ok_and(|s| s.success());
        if !found {
            missing.push((lib, package));
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    let packages: Vec<&str> = missing.iter().map(|(_, p)| *p).collect();
    if on_path("apt-get") && is_root() {
        return apt_install(&packages);
    }
    bail!(
        "missing tools {:?}: install the packages {} and retry",
        missing.iter().map(|(t, _)| *t).collect::<Vec<_>>(),
        packages.join(" ")
    )
}

/// Installs missing tools with apt-get when we can; what is still missing is
/// reported with what happens without it. Entries: (program or absolute
/// file, Debian package, consequence).
pub fn ensure_tools(tools: &[(&str, &str, &str)]) {
    let present = |tool: &str| {
        if tool.starts_with('/') {
            Path::new(tool).exists()
        } else {
            on_path(tool)
        }
    };
    let mut packages: Vec<&str> = tools
        .iter()
        .filter(|(tool, _, _)| !present(tool))
        .map(|(_, package, _)| *package)
        .collect();
    packages.dedup();
    if packages.is_empty() {
        return;
    }
    if on_path("apt-get")
        && is_root()
        && let Err(e) = apt_install(&packages)
    {
        eprintln!("warning: {e:#}");
    }
    for (tool, package, without) in tools {
        if !present(tool) {
            eprintln!("warning: {tool} is missing (Debian package {package}): {without}");
        }
    }
}

fn apt_install(packages: &[&str]) -> Result<()> {
    step(&format!("installing {}", packages.join(" ")));
    run(Command::new("apt-get").args(["update", "-qq"]))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(packages)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

pub fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

pub fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed with {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
