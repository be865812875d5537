//! A real container runtime on a simulated node: Debian's containerd (1.6.x)
//! with its CRI plugin, started inside a node network namespace with its own
//! root, state dir, gRPC socket, CNI config dir and CNI bin dir, and driven
//! over the CRI gRPC API the way the kubelet drives it.
//!
//! ```no_run
//! # use beeline_tests::{NetNs, cri::Containerd};
//! # use std::path::Path;
//! let node = NetNs::new("bln");
//! let ctd = Containerd::start(&node.name, Path::new("/tmp/net.d"), Path::new("/usr/lib/cni"));
//! let cri = ctd.cri();
//! let pod = ctd.block_on(cri.run_pod_sandbox("web", "default", "uid-1", &[])).unwrap();
//! let ctr = ctd.block_on(cri.create_container(&pod, "app", &["sleep", "3600"])).unwrap();
//! ctd.block_on(cri.start_container(&ctr)).unwrap();
//! ```
//!
//! Everything it starts or makes is undone when the [`Containerd`] guard
//! drops: sandboxes stopped and removed through CRI (which runs CNI DEL and
//! deletes the pod netns), containerd killed by its pid, stray shims and
//! container processes killed by pid, cgroups and temp files removed.
//! [`Footprint`] lists whatever would be left.
//!
//! CI needs `containerd runc busybox-static containernetworking-plugins
//! iptables protobuf-compiler` (the last one to build `k8s-cri`).
use std::{
    collections::HashMap,
    ffi::CString,
    fs::File,
    future::Future,
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use k8s_cri::v1::{
    image_service_client::ImageServiceClient, runtime_service_client::RuntimeServiceClient,
    security_profile::ProfileType, *,
};
use serde_json::Value;
use tonic::{Status, transport::Channel};

/// The generated CRI v1 types, for calls this wrapper does not make.
pub use k8s_cri::v1 as api;
pub use k8s_cri::v1::{PodSandboxState, Protocol};

use crate::{require_root, run, unique};

/// The image every sandbox and container runs: busybox-static's binary and
/// all its applets, built and imported by [`Containerd::start`]. It doubles
/// as the sandbox ("pause") image: its default command sleeps forever.
pub const IMAGE: &str = "beeline.test/busybox:latest";

/// Per-request deadline on the gRPC channel: keep `exec_sync` timeouts below.
const RPC_TIMEOUT: Duration = Duration::from_secs(120);

/// A containerd (with CRI) running in a node's network namespace.
pub struct Containerd {
    child: Option<Child>,
    dir: Option<tempfile::TempDir>,
    path: PathBuf,
    cgroup_root: String,
    cri: Option<Cri>,
    // Dropped on a plain thread (a runtime must not be dropped, nor
    // `block_on` called, from inside another runtime).
    rt: Option<tokio::runtime::Runtime>,
}

impl Containerd {
    /// Writes a config into a temp dir, starts containerd in
    /// `/run/netns/<node_netns_name>` (in a private mount namespace), waits
    /// for the CRI `Status` RPC, and imports [`IMAGE`].
    ///
    /// containerd 1.6 and `cni_conf_dir`: it loads the first config (by
    /// name) at start and reports `NetworkReady` false ("cni plugin not
    /// initialized") while there is none; it watches the dir but ignores
    /// CREATE events, so a config renamed into place later is never seen:
    /// write it in place (the WRITE event reloads). Its libcni rejects
    /// results newer than CNI 1.0.0: use `"cniVersion": "1.0.0"`.
    ///
    /// `cni_bin_dir` is the only plugin dir containerd 1.6 searches, and it
    /// always runs the `loopback` plugin before the configured network: see
    /// [`cni_bin_dir`] to assemble one.
    pub fn start(node_netns_name: &str, cni_conf_dir: &Path, cni_bin_dir: &Path) -> Containerd {
        require_root();
        for (what, path) in [
            ("containerd", "/usr/bin/containerd"),
            ("ctr (containerd)", "/usr/bin/ctr"),
            ("runc", "/usr/sbin/runc"),
            ("busybox-static", "/bin/busybox"),
        ] {
            assert!(
                Path::new(path).exists(),
                "{what} is missing: apt-get install -y containerd runc busybox-static"
            );
        }
        let netns_path = PathBuf::from("/run/netns").join(node_netns_name);
        let netns = File::open(&netns_path)
            .unwrap_or_else(|e| panic!("open {}: {e}", netns_path.display()));
        let dir = tempfile::Builder::new()
            .prefix("beeline-cri-")
            .tempdir()
            .unwrap();
        let path = dir.path().to_path_buf();
        // A cgroup parent of our own, as the kubelet passes /kubepods/...:
        // without one containerd puts every container under /k8s.io/<id>
        // (with cgroupfs), and runc's delete leaves /k8s.io behind in every
        // hierarchy, shared with other runs.
        let cgroup_root = unique("beeline-cri-");
        std::fs::write(
            path.join("config.toml"),
            config_toml(&path, cni_conf_dir, cni_bin_dir),
        )
        .unwrap();
        std::fs::create_dir_all(path.join("pods")).unwrap();
        build_image(&path.join("image"));

        // Private tmpfs mounts, in containerd's own mount namespace, over
        // the two host-wide dirs it and libcni write to whatever the config
        // says, so nothing collides with another containerd or leaks:
        // - /run/containerd: shim sockets (s/, a hard-coded path in 1.6)
        //   and the shims' runc state (runc/);
        // - /var/lib/cni/results: libcni's result cache, which only CNI DEL
        //   clears (so never, when containerd dies), and host-local's
        //   default dataDir /var/lib/cni/networks.
        // The (empty) mount points stay: they are these packages' own dirs.
        // Never rmdir them: removing a directory detaches the mounts other
        // mount namespaces have on it.
        let private_dirs = ["/run/containerd", "/var/lib/cni"];
        for d in private_dirs {
            std::fs::create_dir_all(d).unwrap();
        }
        let private_dirs = private_dirs.map(|d| CString::new(d).unwrap());
        let log = File::create(path.join("containerd.log")).unwrap();
        let mut cmd = Command::new("/usr/bin/containerd");
        cmd.arg("--config")
            .arg(path.join("config.toml"))
            // Its own process group: a Ctrl-C meant for the test must not
            // kill it before the cleanup runs.
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        let (root, tmpfs, opts) = (
            CString::new("/").unwrap(),
            CString::new("tmpfs").unwrap(),
            CString::new("mode=0700").unwrap(),
        );
        // SAFETY: only async-signal-safe syscalls between fork and exec, on
        // values prepared before the fork.
        unsafe {
            cmd.pre_exec(move || {
                let check = |r: libc::c_int| {
                    if r == 0 {
                        Ok(())
                    } else {
                        Err(std::io::Error::last_os_error())
                    }
                };
                check(libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET))?;
                // Overlay rootfs mounts, netns bind mounts under
                // /run/netns/cni-* and sandbox /dev/shm mounts all stay in
                // this namespace and die with its last process.
                check(libc::unshare(libc::CLONE_NEWNS))?;
                check(libc::mount(
                    std::ptr::null(),
                    root.as_ptr(),
                    std::ptr::null(),
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null(),
                ))?;
                for dir in &private_dirs {
                    check(libc::mount(
                        tmpfs.as_ptr(),
                        dir.as_ptr(),
                        tmpfs.as_ptr(),
                        0,
                        opts.as_ptr().cast(),
                    ))?;
                }
                Ok(())
            });
        }
        let child = cmd.spawn().expect("start containerd");
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        // The guard exists from here on: a failure below still cleans up.
        let mut ctd = Containerd {
            child: Some(child),
            dir: Some(dir),
            path,
            cgroup_root,
            cri: None,
            rt: Some(rt),
        };
        ctd.wait_ready();
        ctd.import_image();
        ctd
    }

    fn wait_ready(&mut self) {
        let socket = self.socket();
        let deadline = Instant::now() + Duration::from_secs(30);
        while !socket.exists() {
            self.assert_running();
            assert!(
                Instant::now() < deadline,
                "containerd made no socket in 30 s:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let cri = self.block_on(async {
            Cri::connect(
                &socket,
                self.path.join("pods"),
                format!("/{}", self.cgroup_root),
            )
        });
        loop {
            self.assert_running();
            match self.block_on(cri.status()) {
                Ok(_) => break,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                Err(e) => panic!("CRI not serving after 30 s ({e}):\n{}", self.log_text()),
            }
        }
        self.cri = Some(cri);
    }

    fn import_image(&self) {
        run(Command::new("/usr/bin/ctr")
            .arg("--address")
            .arg(self.socket())
            .args(["--namespace", "k8s.io", "images", "import"])
            .arg(self.path.join("image/image.tar"))
            .stdout(Stdio::null()));
        // The CRI plugin learns about images from containerd's events, a
        // moment after the import returns: wait until it sees it.
        let cri = self.cri();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.block_on(cri.image_present(IMAGE)).unwrap_or(false) {
            assert!(
                Instant::now() < deadline,
                "CRI never saw the imported {IMAGE}:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn assert_running(&mut self) {
        let child = self.child.as_mut().unwrap();
        if let Some(status) = child.try_wait().unwrap() {
            panic!("containerd exited with {status}:\n{}", self.log_text());
        }
    }

    /// The CRI client (cheap to clone; usable from any tokio runtime, or
    /// from sync code through [`Containerd::block_on`]).
    pub fn cri(&self) -> Cri {
        self.cri.clone().expect("containerd is up")
    }

    /// Runs a future (a CRI call) to completion on the harness' runtime.
    /// For sync tests (async tests may just `.await` the calls); it also
    /// works inside another runtime, blocking that thread meanwhile.
    pub fn block_on<F>(&self, f: F) -> F::Output
    where
        F: Future + Send,
        F::Output: Send,
    {
        let rt = self.rt.as_ref().unwrap();
        if tokio::runtime::Handle::try_current().is_err() {
            return rt.block_on(f);
        }
        // `block_on` panics on a thread that already runs a runtime.
        std::thread::scope(|s| s.spawn(|| rt.block_on(f)).join())
            .unwrap_or_else(|e| std::panic::resume_unwind(e))
    }

    /// containerd's pid (it runs in the node netns, in its own mount ns).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// The temp dir holding config, root, state, socket, logs and image.
    pub fn dir(&self) -> &Path {
        &self.path
    }

    pub fn socket(&self) -> PathBuf {
        self.path.join("containerd.sock")
    }

    /// Pod log directories are `<this>/<namespace>_<name>_<uid>`.
    pub fn pod_log_root(&self) -> PathBuf {
        self.path.join("pods")
    }

    /// The cgroup parent every pod of this containerd is created under.
    pub fn cgroup_parent(&self) -> String {
        format!("/{}", self.cgroup_root)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.path.join("containerd.log")).unwrap_or_default()
    }

    /// What this containerd has out there right now, to check after the
    /// guard dropped that none of it is left.
    pub fn footprint(&self) -> Footprint {
        let mut netns = self
            .cri
            .as_ref()
            .map(|c| {
                c.known
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .netns
                    .clone()
            })
            .unwrap_or_default();
        for ns in self.netns_mounts() {
            if !netns.contains(&ns) {
                netns.push(ns);
            }
        }
        Footprint {
            dir: self.path.clone(),
            pid: self.child.as_ref().map(|c| c.id()),
            cgroup_root: self.cgroup_root.clone(),
            netns,
        }
    }

    /// The pod netns containerd has mounted (in its own mount namespace).
    fn netns_mounts(&self) -> Vec<PathBuf> {
        let Some(child) = &self.child else {
            return vec![];
        };
        let info =
            std::fs::read_to_string(format!("/proc/{}/mountinfo", child.id())).unwrap_or_default();
        info.lines()
            .filter_map(|l| l.split(' ').nth(4))
            .filter_map(|m| m.strip_prefix("/run/netns/cni-"))
            // Named as containerd names them (and as its status reports).
            .map(|m| PathBuf::from(format!("/var/run/netns/cni-{m}")))
            .collect()
    }

    fn cleanup(&mut self) {
        let footprint = self.footprint();
        // 1. Every sandbox, the way the kubelet tears pods down: stop (kills
        //    the containers, CNI DEL, netns removed), then remove.
        let mut tore_down = false;
        let alive = self
            .child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)));
        if let (true, Some(cri)) = (alive, self.cri.take()) {
            let teardown = async {
                let Ok(pods) = cri.list_pod_sandbox().await else {
                    return;
                };
                for pod in pods {
                    let _ = cri.stop_pod_sandbox(&pod.id).await;
                    let _ = cri.remove_pod_sandbox(&pod.id).await;
                }
            };
            tore_down = self
                .block_on(async { tokio::time::timeout(Duration::from_secs(60), teardown).await })
                .is_ok();
        }
        self.cri = None;
        // 2. containerd itself: SIGTERM, then SIGKILL.
        if let Some(mut child) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(5);
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        // 3. Shims (they outlive containerd by design) and container
        //    processes whose sandbox could not be stopped, by pid. Shims
        //    exit by themselves shortly after their last task is deleted;
        //    without a teardown they would wait for a containerd forever.
        let grace = if tore_down { 5 } else { 0 };
        let deadline = Instant::now() + Duration::from_secs(grace);
        while !footprint.processes().is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        for _ in 0..50 {
            let left = footprint.processes();
            if left.is_empty() {
                break;
            }
            for pid in left {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // 4. Our cgroups (rmdir, leaves first: their files cannot be unlinked).
        for dir in footprint.cgroup_dirs() {
            remove_cgroup(&dir);
        }
        // 5. Pod netns files a dead containerd could not remove: in this
        //    mount namespace they are plain files (the bind mounts were in
        //    containerd's, gone with its last process).
        for ns in &footprint.netns {
            let _ = std::fs::remove_file(ns);
        }
        // 6. The temp dir (root, state, socket, logs).
        if let Some(dir) = self.dir.take() {
            let _ = dir.close();
        }
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        // On a plain thread: dropping may happen inside an async test, where
        // neither `block_on` nor dropping the runtime is allowed.
        std::thread::scope(|s| {
            let _ = s
                .spawn(|| {
                    self.cleanup();
                    drop(self.rt.take());
                })
                .join();
        });
    }
}

/// What a [`Containerd`] made, to check that none of it is left.
#[derive(Clone, Debug)]
pub struct Footprint {
    pub dir: PathBuf,
    pub pid: Option<u32>,
    pub cgroup_root: String,
    /// Pod netns paths (`/var/run/netns/cni-*`) it created.
    pub netns: Vec<PathBuf>,
}

impl Footprint {
    /// Live (non-zombie) processes of this containerd: itself (its command
    /// line names its config) and its shims (theirs name its socket), and
    /// any process in its cgroups.
    pub fn processes(&self) -> Vec<u32> {
        let needle = self.dir.to_string_lossy().into_owned();
        let mut pids: Vec<u32> = std::fs::read_dir("/proc")
            .map(|d| {
                d.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
                    .filter(|pid| {
                        std::fs::read(format!("/proc/{pid}/cmdline"))
                            .map(|c| String::from_utf8_lossy(&c).contains(&needle))
                            .unwrap_or(false)
                    })
                    .collect()
            })
            .unwrap_or_default();
        for dir in self.cgroup_dirs() {
            pids.extend(cgroup_pids(&dir));
        }
        pids.sort_unstable();
        pids.dedup();
        pids.retain(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| {
                    s.rsplit_once(')')
                        .map(|(_, rest)| rest.trim_start().starts_with(|c| c != 'Z' && c != 'X'))
                })
                .unwrap_or(false)
        });
        pids
    }

    /// Its cgroup directories, in every hierarchy (v1 controllers, the
    /// unified one, or a pure v2 mount).
    pub fn cgroup_dirs(&self) -> Vec<PathBuf> {
        let mut dirs = Vec::new();
        let root = Path::new("/sys/fs/cgroup");
        let mut candidates = vec![root.join(&self.cgroup_root)];
        if let Ok(entries) = std::fs::read_dir(root) {
            for e in entries.flatten() {
                candidates.push(e.path().join(&self.cgroup_root));
            }
        }
        for c in candidates {
            if c.is_dir() {
                dirs.push(c);
            }
        }
        dirs
    }

    /// Everything still there: processes, cgroups, netns, mounts, files.
    pub fn leftovers(&self) -> Vec<String> {
        let mut left = Vec::new();
        for pid in self.processes() {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
                .unwrap_or_default();
            left.push(format!("process {pid}: {cmdline}"));
        }
        for dir in self.cgroup_dirs() {
            left.push(format!("cgroup {}", dir.display()));
        }
        for ns in &self.netns {
            if ns.exists() {
                left.push(format!("netns {}", ns.display()));
            }
        }
        let dir = self.dir.to_string_lossy().into_owned();
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        for line in mountinfo.lines() {
            let point = line.split(' ').nth(4).unwrap_or("");
            if point.starts_with(&dir) || self.netns.iter().any(|n| Path::new(point) == n) {
                left.push(format!("mount {line}"));
            }
        }
        if self.dir.exists() {
            left.push(format!("dir {}", self.dir.display()));
        }
        left
    }
}

fn cgroup_pids(dir: &Path) -> Vec<u32> {
    let mut pids = Vec::new();
    let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
    pids.extend(procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                pids.extend(cgroup_pids(&e.path()));
            }
        }
    }
    pids
}

fn remove_cgroup(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup(&e.path());
            }
        }
    }
    // A cgroup whose last task just exited may be busy for a moment.
    for _ in 0..50 {
        if std::fs::remove_dir(dir).is_ok() || !dir.exists() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Makes `dir` a CNI bin dir holding `binaries` (symlinked) plus the
/// reference `loopback` plugin from /usr/lib/cni, which containerd 1.6 runs
/// for every sandbox and looks for in its one `bin_dir`.
pub fn cni_bin_dir(dir: &Path, binaries: &[&Path]) {
    std::fs::create_dir_all(dir).unwrap();
    let loopback = Path::new("/usr/lib/cni/loopback");
    for bin in binaries.iter().copied().chain([loopback]) {
        let link = dir.join(bin.file_name().unwrap());
        if !link.exists() {
            std::os::unix::fs::symlink(bin, &link)
                .unwrap_or_else(|e| panic!("link {}: {e}", link.display()));
        }
    }
}

fn config_toml(dir: &Path, cni_conf_dir: &Path, cni_bin_dir: &Path) -> String {
    let d = dir.display();
    format!(
        r#"version = 2
root = "{d}/root"
state = "{d}/state"
# Snapshotters that probe for filesystems or devices this machine lacks.
disabled_plugins = [
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper",
]

[grpc]
  address = "{d}/containerd.sock"

[ttrpc]
  address = "{d}/containerd.sock.ttrpc"

[debug]
  level = "info"

[plugins."io.containerd.internal.v1.opt"]
  # Defaults to /opt/containerd.
  path = "{d}/opt"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{IMAGE}"
  # Without CAP_SYS_RESOURCE the sandbox's oom_score_adj of -998 cannot be
  # set and runc fails with "can't get final child's PID from pipe".
  restrict_oom_score_adj = true
  # Would load a profile with apparmor_parser where AppArmor is enabled.
  disable_apparmor = true
  # Its streaming server (exec/attach/port-forward URLs, unused by
  # ExecSync) listens on the node netns' loopback, on a random port.
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"

  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"

    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"

      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        BinaryName = "/usr/sbin/runc"
        SystemdCgroup = false

  [plugins."io.containerd.grpc.v1.cri".cni]
    conf_dir = "{conf}"
    bin_dir = "{bin}"
    max_conf_num = 1
"#,
        conf = cni_conf_dir.display(),
        bin = cni_bin_dir.display(),
    )
}

/// A docker-archive of a one-layer image: /bin/busybox, a symlink for every
/// applet, /tmp and a root passwd entry. Its default command sleeps forever,
/// so it also serves as the sandbox image.
fn build_image(dir: &Path) {
    let rootfs = dir.join("rootfs");
    let bin = rootfs.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::copy("/bin/busybox", bin.join("busybox")).expect("busybox-static is installed");
    let list = run(Command::new("/bin/busybox").arg("--list"));
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        if applet != "busybox" && !applet.is_empty() {
            std::os::unix::fs::symlink("busybox", bin.join(applet)).unwrap();
        }
    }
    std::fs::create_dir_all(rootfs.join("etc")).unwrap();
    std::fs::write(rootfs.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
    std::fs::write(rootfs.join("etc/group"), "root:x:0:\n").unwrap();
    for d in ["tmp", "root", "www"] {
        std::fs::create_dir_all(rootfs.join(d)).unwrap();
    }
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(rootfs.join("tmp"), std::fs::Permissions::from_mode(0o1777)).unwrap();
    let layer = dir.join("layer.tar");
    run(Command::new("tar")
        .args(["--owner=0", "--group=0", "--numeric-owner", "-C"])
        .arg(&rootfs)
        .arg("-cf")
        .arg(&layer)
        .arg("."));
    // The config's diff_ids must be the uncompressed layer's digest, or the
    // unpack fails ("wrong diff id calculated on extraction").
    let sum = run(Command::new("sha256sum").arg(&layer));
    let digest = String::from_utf8_lossy(&sum.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Env": ["PATH=/bin"],
            // busybox sleep takes no "infinity" everywhere: 68 years will do.
            "Cmd": ["/bin/sleep", "2147483647"],
        },
        "rootfs": { "type": "layers", "diff_ids": [format!("sha256:{digest}")] },
        "history": [{ "created_by": "beeline-tests cri::build_image" }],
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let manifest = serde_json::json!([{
        "Config": "config.json",
        "RepoTags": [IMAGE],
        "Layers": ["layer.tar"],
    }]);
    std::fs::write(dir.join("manifest.json"), manifest.to_string()).unwrap();
    run(Command::new("tar")
        .arg("-C")
        .arg(dir)
        .arg("-cf")
        .arg(dir.join("image.tar"))
        .args(["manifest.json", "config.json", "layer.tar"]));
    let _ = std::fs::remove_dir_all(&rootfs);
    let _ = std::fs::remove_file(&layer);
}

/// The runtime's conditions, as the kubelet reads them from `Status`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuntimeStatus {
    pub runtime_ready: bool,
    /// The `NetworkReady` condition: false until a CNI config loads.
    pub network_ready: bool,
    pub network_reason: String,
    pub network_message: String,
}

/// `PodSandboxStatus`, with what the verbose info adds.
#[derive(Clone, Debug)]
pub struct SandboxStatus {
    pub state: PodSandboxState,
    /// The pod IP CNI returned ("" when it has none, or once stopped).
    pub ip: String,
    pub additional_ips: Vec<String>,
    /// The pod's netns, /var/run/netns/cni-*. Mounted in containerd's mount
    /// namespace only: elsewhere it is an empty file (there while the pod
    /// runs, removed on stop), not something `setns` or `ip netns exec`
    /// can enter; use [`SandboxStatus::netns_proc_path`] (or run commands
    /// in a container with `exec_sync`).
    pub netns: Option<PathBuf>,
    /// The sandbox (pause) process, while it runs.
    pub pid: Option<u32>,
}

impl SandboxStatus {
    /// `/proc/<pid>/ns/net` of the sandbox: the pod's netns, reachable from
    /// any mount namespace.
    pub fn netns_proc_path(&self) -> Option<PathBuf> {
        self.pid.map(|p| PathBuf::from(format!("/proc/{p}/ns/net")))
    }
}

#[derive(Default)]
struct Known {
    /// Configs of the sandboxes run through this client (CreateContainer
    /// needs the sandbox's config again, as the kubelet sends it).
    sandboxes: HashMap<String, PodSandboxConfig>,
    netns: Vec<PathBuf>,
}

/// A CRI client speaking to one containerd, making the calls the kubelet
/// makes, with kubelet-like configs.
#[derive(Clone)]
pub struct Cri {
    pub runtime: RuntimeServiceClient<Channel>,
    pub images: ImageServiceClient<Channel>,
    known: Arc<Mutex<Known>>,
    log_root: PathBuf,
    cgroup_root: String,
}

impl Cri {
    /// A lazily connecting client over the Unix socket (call within a
    /// tokio runtime: the channel's worker is spawned on it).
    fn connect(socket: &Path, log_root: PathBuf, cgroup_root: String) -> Cri {
        let socket = socket.to_path_buf();
        let connector = tower::service_fn(move |_: tonic::transport::Uri| {
            let socket = socket.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(socket).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        });
        // The URI is required but unused: the connector dials the socket.
        let channel = tonic::transport::Endpoint::from_static("http://[::1]:50051")
            .connect_timeout(Duration::from_secs(5))
            .timeout(RPC_TIMEOUT)
            .connect_with_connector_lazy(connector);
        Cri {
            runtime: RuntimeServiceClient::new(channel.clone()),
            images: ImageServiceClient::new(channel),
            known: Arc::default(),
            log_root,
            cgroup_root,
        }
    }

    /// `Status`: whether the runtime and its network (CNI) are ready.
    pub async fn status(&self) -> Result<RuntimeStatus, Status> {
        let resp = self
            .runtime
            .clone()
            .status(StatusRequest { verbose: false })
            .await?
            .into_inner();
        let conditions = resp.status.map(|s| s.conditions).unwrap_or_default();
        let find = |t: &str| conditions.iter().find(|c| c.r#type == t);
        let network = find("NetworkReady");
        Ok(RuntimeStatus {
            runtime_ready: find("RuntimeReady").is_some_and(|c| c.status),
            network_ready: network.is_some_and(|c| c.status),
            network_reason: network.map(|c| c.reason.clone()).unwrap_or_default(),
            network_message: network.map(|c| c.message.clone()).unwrap_or_default(),
        })
    }

    /// Whether the image service has `image` (`ImageStatus`).
    pub async fn image_present(&self, image: &str) -> Result<bool, Status> {
        let resp = self
            .images
            .clone()
            .image_status(ImageStatusRequest {
                image: Some(ImageSpec {
                    image: image.to_string(),
                    ..Default::default()
                }),
                verbose: false,
            })
            .await?
            .into_inner();
        Ok(resp.image.is_some())
    }

    /// The sandbox config the kubelet would send for a pod with no special
    /// settings (BestEffort, default security context, pod networking).
    pub fn pod_sandbox_config(
        &self,
        name: &str,
        namespace: &str,
        uid: &str,
        port_mappings: &[(u16, u16, Protocol)],
    ) -> PodSandboxConfig {
        let labels = HashMap::from([
            ("io.kubernetes.pod.name".to_string(), name.to_string()),
            (
                "io.kubernetes.pod.namespace".to_string(),
                namespace.to_string(),
            ),
            ("io.kubernetes.pod.uid".to_string(), uid.to_string()),
        ]);
        let annotations = HashMap::from([
            ("kubernetes.io/config.source".to_string(), "api".to_string()),
            (
                "kubernetes.io/config.seen".to_string(),
                "2024-01-01T00:00:00Z".to_string(),
            ),
        ]);
        PodSandboxConfig {
            metadata: Some(PodSandboxMetadata {
                name: name.to_string(),
                uid: uid.to_string(),
                namespace: namespace.to_string(),
                attempt: 0,
            }),
            // The kubelet uses the pod name (cut to 63 characters).
            hostname: name.chars().take(63).collect(),
            // /var/log/pods/<namespace>_<name>_<uid> on a real node.
            log_directory: self
                .log_root
                .join(format!("{namespace}_{name}_{uid}"))
                .to_string_lossy()
                .into_owned(),
            dns_config: None,
            port_mappings: port_mappings
                .iter()
                .map(|&(container_port, host_port, protocol)| PortMapping {
                    protocol: protocol as i32,
                    container_port: container_port.into(),
                    host_port: host_port.into(),
                    host_ip: String::new(),
                })
                .collect(),
            labels,
            annotations,
            linux: Some(LinuxPodSandboxConfig {
                // cgroupfs driver: /kubepods/besteffort/pod<uid> on a node.
                cgroup_parent: format!("{}/pod{uid}", self.cgroup_root),
                security_context: Some(LinuxSandboxSecurityContext {
                    namespace_options: Some(pod_namespaces()),
                    // The kubelet's default without a seccomp profile.
                    seccomp: Some(unconfined()),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            windows: None,
        }
    }

    /// `RunPodSandbox` with [`Cri::pod_sandbox_config`]'s config: the pod's
    /// netns is made and CNI ADD run. `port_mappings` are
    /// (container port, host port, protocol), i.e. hostPorts.
    pub async fn run_pod_sandbox(
        &self,
        name: &str,
        namespace: &str,
        uid: &str,
        port_mappings: &[(u16, u16, Protocol)],
    ) -> Result<String, Status> {
        self.run_pod_sandbox_with(self.pod_sandbox_config(name, namespace, uid, port_mappings))
            .await
    }

    /// `RunPodSandbox` with a config of the caller's.
    pub async fn run_pod_sandbox_with(&self, config: PodSandboxConfig) -> Result<String, Status> {
        // The kubelet makes the pod's log directory before RunPodSandbox.
        std::fs::create_dir_all(&config.log_directory)
            .map_err(|e| Status::internal(format!("log dir: {e}")))?;
        let id = self
            .runtime
            .clone()
            .run_pod_sandbox(RunPodSandboxRequest {
                config: Some(config.clone()),
                runtime_handler: String::new(),
            })
            .await?
            .into_inner()
            .pod_sandbox_id;
        self.known
            .lock()
            .unwrap()
            .sandboxes
            .insert(id.clone(), config);
        // Remember its netns, to make sure it is gone at the end.
        if let Ok(status) = self.pod_sandbox_status(&id).await
            && let Some(ns) = status.netns
        {
            let mut known = self.known.lock().unwrap();
            if !known.netns.contains(&ns) {
                known.netns.push(ns);
            }
        }
        Ok(id)
    }

    /// `PodSandboxStatus` (verbose, for the netns and pid).
    pub async fn pod_sandbox_status(&self, id: &str) -> Result<SandboxStatus, Status> {
        let resp = self
            .runtime
            .clone()
            .pod_sandbox_status(PodSandboxStatusRequest {
                pod_sandbox_id: id.to_string(),
                verbose: true,
            })
            .await?
            .into_inner();
        let status = resp
            .status
            .ok_or_else(|| Status::internal("no status in PodSandboxStatus"))?;
        let network = status.network.unwrap_or_default();
        // containerd's verbose info: {"pid": …, "runtimeSpec": {"linux":
        // {"namespaces": [{"type": "network", "path": …}]}}, …}
        let info: Value = resp
            .info
            .get("info")
            .and_then(|i| serde_json::from_str(i).ok())
            .unwrap_or(Value::Null);
        let pid = info["pid"].as_u64().filter(|&p| p > 0).map(|p| p as u32);
        let netns = info["runtimeSpec"]["linux"]["namespaces"]
            .as_array()
            .and_then(|nss| {
                nss.iter()
                    .find(|n| n["type"] == "network")
                    .and_then(|n| n["path"].as_str())
                    .filter(|p| !p.is_empty())
                    .map(PathBuf::from)
            });
        Ok(SandboxStatus {
            state: PodSandboxState::try_from(status.state)
                .unwrap_or(PodSandboxState::SandboxNotready),
            ip: network.ip,
            additional_ips: network.additional_ips.into_iter().map(|i| i.ip).collect(),
            netns,
            pid,
        })
    }

    /// `ListPodSandbox` (all of them, any state).
    pub async fn list_pod_sandbox(&self) -> Result<Vec<PodSandbox>, Status> {
        Ok(self
            .runtime
            .clone()
            .list_pod_sandbox(ListPodSandboxRequest { filter: None })
            .await?
            .into_inner()
            .items)
    }

    /// `StopPodSandbox`: kills its containers (no grace period), runs CNI
    /// DEL and removes the netns. Idempotent, and the kubelet does call it
    /// again. containerd 1.6 runs CNI DEL every time: the first with
    /// CNI_NETNS, a second stop (and the remove) with an empty CNI_NETNS.
    pub async fn stop_pod_sandbox(&self, id: &str) -> Result<(), Status> {
        self.runtime
            .clone()
            .stop_pod_sandbox(StopPodSandboxRequest {
                pod_sandbox_id: id.to_string(),
            })
            .await?;
        Ok(())
    }

    /// `RemovePodSandbox` (containerd 1.6 runs CNI DEL once more, with no
    /// CNI_NETNS; the kubelet's GC removes sandboxes this way, and nothing
    /// ever runs CNI GC).
    pub async fn remove_pod_sandbox(&self, id: &str) -> Result<(), Status> {
        self.runtime
            .clone()
            .remove_pod_sandbox(RemovePodSandboxRequest {
                pod_sandbox_id: id.to_string(),
            })
            .await?;
        self.known.lock().unwrap().sandboxes.remove(id);
        Ok(())
    }

    /// `CreateContainer` in a sandbox run through this client, with the
    /// kubelet's config for a BestEffort container running `cmd` from
    /// [`IMAGE`] (as `command`, no `args`).
    pub async fn create_container(
        &self,
        sandbox_id: &str,
        name: &str,
        cmd: &[&str],
    ) -> Result<String, Status> {
        let sandbox = self
            .known
            .lock()
            .unwrap()
            .sandboxes
            .get(sandbox_id)
            .cloned()
            .ok_or_else(|| Status::not_found(format!("sandbox {sandbox_id} not run here")))?;
        let pod = sandbox.metadata.clone().unwrap_or_default();
        // The kubelet makes <log dir>/<container>/ and logs to
        // <container>/<restart count>.log in it.
        std::fs::create_dir_all(Path::new(&sandbox.log_directory).join(name))
            .map_err(|e| Status::internal(format!("log dir: {e}")))?;
        let labels = HashMap::from([
            ("io.kubernetes.container.name".to_string(), name.to_string()),
            ("io.kubernetes.pod.name".to_string(), pod.name.clone()),
            (
                "io.kubernetes.pod.namespace".to_string(),
                pod.namespace.clone(),
            ),
            ("io.kubernetes.pod.uid".to_string(), pod.uid.clone()),
        ]);
        let annotations = HashMap::from([
            (
                "io.kubernetes.container.restartCount".to_string(),
                "0".to_string(),
            ),
            (
                "io.kubernetes.container.terminationMessagePath".to_string(),
                "/dev/termination-log".to_string(),
            ),
            (
                "io.kubernetes.container.terminationMessagePolicy".to_string(),
                "File".to_string(),
            ),
            (
                "io.kubernetes.pod.terminationGracePeriod".to_string(),
                "30".to_string(),
            ),
        ]);
        let config = ContainerConfig {
            metadata: Some(ContainerMetadata {
                name: name.to_string(),
                attempt: 0,
            }),
            image: Some(ImageSpec {
                image: IMAGE.to_string(),
                user_specified_image: IMAGE.to_string(),
                ..Default::default()
            }),
            command: cmd.iter().map(|s| s.to_string()).collect(),
            labels,
            annotations,
            log_path: format!("{name}/0.log"),
            linux: Some(LinuxContainerConfig {
                // BestEffort: minimal shares, first to be OOM-killed.
                resources: Some(LinuxContainerResources {
                    cpu_period: 100_000,
                    cpu_shares: 2,
                    oom_score_adj: 1000,
                    ..Default::default()
                }),
                security_context: Some(LinuxContainerSecurityContext {
                    namespace_options: Some(pod_namespaces()),
                    seccomp: Some(unconfined()),
                    masked_paths: [
                        "/proc/asound",
                        "/proc/acpi",
                        "/proc/kcore",
                        "/proc/keys",
                        "/proc/latency_stats",
                        "/proc/timer_list",
                        "/proc/timer_stats",
                        "/proc/sched_debug",
                        "/proc/scsi",
                        "/sys/firmware",
                    ]
                    .map(String::from)
                    .to_vec(),
                    readonly_paths: [
                        "/proc/bus",
                        "/proc/fs",
                        "/proc/irq",
                        "/proc/sys",
                        "/proc/sysrq-trigger",
                    ]
                    .map(String::from)
                    .to_vec(),
                    ..Default::default()
                }),
            }),
            ..Default::default()
        };
        Ok(self
            .runtime
            .clone()
            .create_container(CreateContainerRequest {
                pod_sandbox_id: sandbox_id.to_string(),
                config: Some(config),
                sandbox_config: Some(sandbox),
            })
            .await?
            .into_inner()
            .container_id)
    }

    /// `StartContainer`.
    pub async fn start_container(&self, id: &str) -> Result<(), Status> {
        self.runtime
            .clone()
            .start_container(StartContainerRequest {
                container_id: id.to_string(),
            })
            .await?;
        Ok(())
    }

    /// `StopContainer`: SIGTERM, SIGKILL after `timeout`.
    pub async fn stop_container(&self, id: &str, timeout: Duration) -> Result<(), Status> {
        self.runtime
            .clone()
            .stop_container(StopContainerRequest {
                container_id: id.to_string(),
                timeout: timeout.as_secs() as i64,
            })
            .await?;
        Ok(())
    }

    /// `RemoveContainer`.
    pub async fn remove_container(&self, id: &str) -> Result<(), Status> {
        self.runtime
            .clone()
            .remove_container(RemoveContainerRequest {
                container_id: id.to_string(),
            })
            .await?;
        Ok(())
    }

    /// `ExecSync`: runs `cmd` in the container, killed after `timeout`
    /// (whole seconds, at least 1; keep it under two minutes). Returns
    /// (exit code, stdout, stderr). Debian's busybox `wget` crashes on
    /// `-T`: let this timeout bound it instead.
    pub async fn exec_sync(
        &self,
        container_id: &str,
        cmd: &[&str],
        timeout: Duration,
    ) -> Result<(i32, String, String), Status> {
        let resp = self
            .runtime
            .clone()
            .exec_sync(ExecSyncRequest {
                container_id: container_id.to_string(),
                cmd: cmd.iter().map(|s| s.to_string()).collect(),
                timeout: timeout.as_secs().max(1) as i64,
            })
            .await?
            .into_inner();
        Ok((
            resp.exit_code,
            String::from_utf8_lossy(&resp.stdout).into_owned(),
            String::from_utf8_lossy(&resp.stderr).into_owned(),
        ))
    }
}

/// Network and IPC shared by the pod, PID per container: the kubelet's
/// defaults (no hostNetwork, no shareProcessNamespace).
fn pod_namespaces() -> NamespaceOption {
    NamespaceOption {
        network: NamespaceMode::Pod as i32,
        pid: NamespaceMode::Container as i32,
        ipc: NamespaceMode::Pod as i32,
        ..Default::default()
    }
}

fn unconfined() -> SecurityProfile {
    SecurityProfile {
        profile_type: ProfileType::Unconfined as i32,
        localhost_ref: String::new(),
    }
}
