//! Tearing a [`Containerd`] down, and the [`Footprint`] that tells whether
//! anything it made is left.
use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use super::containerd::Containerd;

impl Containerd {
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
