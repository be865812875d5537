//! Small helpers: root check, unique names, the binaries under test,
//! running commands, background processes and polling.
use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "these tests create network namespaces and load eBPF: run them as root \
         (`sudo cargo xtask test`)"
    );
}

/// A name unique to this process and call, short enough for interface names.
pub fn unique(prefix: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}{:x}{:x}",
        std::process::id() & 0xffff,
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Where the `beeline` and `beeline-agent` binaries are.
pub fn bin(name: &str) -> PathBuf {
    let dir = std::env::var_os("BEELINE_BIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target/release"));
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo xtask test` (it builds the binaries) or set BEELINE_BIN_DIR",
        path.display()
    );
    path
}

/// The previous release's binaries (`cargo xtask build-previous`, which
/// `cargo xtask test` runs), for the upgrade test.
pub fn previous_bin_dir() -> PathBuf {
    let dir = workspace_root().join("target/previous/bin");
    assert!(
        dir.join("beeline-agent").exists() && dir.join("beeline").exists(),
        "the previous release's binaries are missing from {}: run `cargo xtask build-previous`",
        dir.display()
    );
    dir
}

pub fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A helper process the test started (a DHCP server, say); killed on drop.
pub struct Background(pub Child);

impl Background {
    pub fn spawn(cmd: &mut Command) -> Background {
        Background(
            cmd.stdin(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}")),
        )
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Polls `f` every 100 ms until it returns true or `timeout` passes.
pub fn eventually(timeout: Duration, f: impl FnMut() -> bool) -> bool {
    eventually_every(timeout, Duration::from_millis(100), f)
}

/// Polls `f` every `interval` until it returns true or `timeout` passes.
pub fn eventually_every(
    timeout: Duration,
    interval: Duration,
    mut f: impl FnMut() -> bool,
) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(interval);
    }
}
