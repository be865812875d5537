//! The containerd process guard: started in a node netns, in a mount
//! namespace of its own, and served over CRI once ready.
use std::{
    ffi::CString,
    fs::File,
    future::Future,
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use super::{IMAGE, client::Cri, config::config_toml, image::build_image};
use crate::{require_root, run, unique};

/// A containerd (with CRI) running in a node's network namespace.
pub struct Containerd {
    pub(super) child: Option<Child>,
    pub(super) dir: Option<tempfile::TempDir>,
    pub(super) path: PathBuf,
    pub(super) cgroup_root: String,
    pub(super) cri: Option<Cri>,
    // Dropped on a plain thread (a runtime must not be dropped, nor
    // `block_on` called, from inside another runtime).
    pub(super) rt: Option<tokio::runtime::Runtime>,
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
    /// [`cni_bin_dir`](super::cni_bin_dir) to assemble one.
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
}
