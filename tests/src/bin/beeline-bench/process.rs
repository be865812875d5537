//! Child processes: killed on drop, run with a timeout, waited for until
//! they listen; ports for the servers.
use std::{
    fs::File,
    io::Read,
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU16, Ordering},
    time::{Duration, Instant},
};

use beeline_tests::eventually_every;

use crate::R;

static NEXT_PORT: AtomicU16 = AtomicU16::new(21000);

/// A child process killed (by its pid) when dropped.
pub(crate) struct ChildGuard(Child);

impl ChildGuard {
    pub(crate) fn spawn(cmd: &mut Command) -> R<ChildGuard> {
        cmd.spawn()
            .map(ChildGuard)
            .map_err(|e| format!("cannot start {cmd:?}: {e}"))
    }
    pub(crate) fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs `cmd`, killing it after `timeout`; returns its stdout on success.
pub(crate) fn run_timeout(cmd: &mut Command, timeout: Duration) -> R<String> {
    let mut out = tempfile::tempfile().map_err(|e| e.to_string())?;
    let mut err = tempfile::tempfile().map_err(|e| e.to_string())?;
    cmd.stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(err.try_clone().unwrap());
    let mut child = ChildGuard::spawn(cmd)?;
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.0.try_wait().map_err(|e| e.to_string())? {
            break s;
        }
        if start.elapsed() > timeout {
            return Err(format!("{cmd:?} timed out after {timeout:?}"));
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let read = |f: &mut File| {
        use std::io::Seek;
        let mut s = String::new();
        let _ = f.seek(std::io::SeekFrom::Start(0));
        let _ = f.read_to_string(&mut s);
        s
    };
    let stdout = read(&mut out);
    if !status.success() {
        return Err(format!(
            "{cmd:?} failed ({status}): {} {}",
            stdout.chars().take(500).collect::<String>(),
            read(&mut err).chars().take(500).collect::<String>()
        ));
    }
    Ok(stdout)
}

/// Waits until process `pid` has a TCP socket listening on `port` (read
/// from /proc/<pid>/net/tcp, i.e. in the process's own namespace).
pub(crate) fn wait_listening(pid: u32, port: u16, timeout: Duration) -> R<()> {
    let needle = format!(":{port:04X} ");
    let ok = eventually_every(timeout, Duration::from_millis(5), || {
        ["tcp", "tcp6"].iter().any(|f| {
            std::fs::read_to_string(format!("/proc/{pid}/net/{f}"))
                .unwrap_or_default()
                .lines()
                .skip(1)
                .any(|l| {
                    let cols: Vec<&str> = l.split_whitespace().collect();
                    cols.len() > 3 && format!("{} ", cols[1]).ends_with(&needle) && cols[3] == "0A"
                })
        })
    });
    if ok {
        Ok(())
    } else {
        Err(format!("no listener on port {port} after {timeout:?}"))
    }
}

pub(crate) fn next_port() -> u16 {
    NEXT_PORT.fetch_add(1, Ordering::Relaxed)
}
