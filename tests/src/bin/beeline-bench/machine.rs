//! The machine under test: what it is, how busy it is, and measuring under
//! the quiet-machine rules; Ctrl-C checks, progress lines and the
//! leftovers check at the end.
use std::{
    collections::BTreeMap,
    path::Path,
    process::Command,
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use serde_json::{Value, json};

use crate::{Cfg, INTERRUPTED, R};

pub(crate) fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
}

pub(crate) fn check_interrupted() -> R<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        return Err("interrupted".into());
    }
    Ok(())
}

pub(crate) fn step(msg: &str) {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let t = START.get_or_init(Instant::now).elapsed().as_secs_f64();
    eprintln!("\x1b[1;34m==>\x1b[0m [{t:5.1} s] {msg}");
}

pub(crate) fn cmd_stdout(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program).args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

pub(crate) fn machine() -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_kib: u64 = meminfo
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let git = cmd_stdout(
        "git",
        &[
            "-C",
            &root.display().to_string(),
            "describe",
            "--always",
            "--dirty",
        ],
    )
    .unwrap_or_else(|| "unknown".into());
    let first_line = |s: Option<String>| s.and_then(|s| s.lines().next().map(String::from));
    let pkg = |p: &str| cmd_stdout("dpkg-query", &["-W", "-f", "${Version}", p]);
    json!({
        "kernel": cmd_stdout("uname", &["-r"]).unwrap_or_default(),
        "nproc": nproc,
        "cpu_model": cpu,
        "mem_total_mib": mem_kib / 1024,
        "git": git,
        "tools": {
            "iperf3": first_line(cmd_stdout("iperf3", &["--version"])),
            "sockperf": pkg("sockperf"),
            "iptables": cmd_stdout("iptables", &["--version"]),
            "containernetworking-plugins": pkg("containernetworking-plugins"),
        },
    })
}

pub(crate) fn loadavg() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(f64::NAN)
}

/// (busy, total) jiffies over all CPUs.
pub(crate) fn cpu_times() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = stat.lines().next() else {
        return (0, 0);
    };
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

pub(crate) fn busy_since(start: (u64, u64)) -> f64 {
    let now = cpu_times();
    let total = now.1.saturating_sub(start.1);
    if total == 0 {
        return f64::NAN;
    }
    now.0.saturating_sub(start.0) as f64 / total as f64
}

/// CPU ticks (utime + stime) of every user-space process outside this
/// process's tree, by pid. Kernel threads are left out: they also do our
/// packet processing (softirqs) and namespace cleanup.
pub(crate) fn foreign_ticks() -> BTreeMap<u32, u64> {
    let me = std::process::id();
    let mut procs: BTreeMap<u32, (u32, u64, bool)> = BTreeMap::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some(close) = stat.rfind(')') else {
            continue;
        };
        // After "pid (comm) ": state ppid pgrp session tty tpgid flags minflt
        // cminflt majflt cmajflt utime stime ...
        let f: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        let num = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        let kthread = num(6) & 0x0020_0000 != 0;
        procs.insert(pid, (num(1) as u32, num(11) + num(12), kthread));
    }
    let ours = |mut pid: u32| {
        for _ in 0..64 {
            if pid == me {
                return true;
            }
            match procs.get(&pid) {
                Some((ppid, _, _)) if *ppid > 1 => pid = *ppid,
                _ => return false,
            }
        }
        false
    };
    procs
        .iter()
        .filter(|(pid, (_, _, kthread))| !kthread && !ours(**pid))
        .map(|(pid, (_, ticks, _))| (*pid, *ticks))
        .collect()
}

/// CPUs' worth of time other processes used since `start` (processes that
/// exited in between are missed).
pub(crate) fn foreign_cpus(start: &BTreeMap<u32, u64>, wall: Duration) -> f64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let ticks: u64 = foreign_ticks()
        .iter()
        .map(|(pid, t)| t.saturating_sub(start.get(pid).copied().unwrap_or(0)))
        .sum();
    ticks as f64 / hz / wall.as_secs_f64().max(1e-3)
}

/// Waits (up to the configured time) for a quiet machine: the 1-minute load
/// below 1.0, or, since that average lags our own previous phase by a
/// minute, both CPUs mostly idle right now.
pub(crate) fn wait_quiet(cfg: &Cfg) -> Value {
    let start = Instant::now();
    loop {
        let load = loadavg();
        let t = cpu_times();
        std::thread::sleep(Duration::from_secs(1));
        let busy = busy_since(t);
        let waited = start.elapsed();
        if load < 1.0 || busy < 0.25 || waited >= cfg.quiet_wait || check_interrupted().is_err() {
            return json!({
                "load1_before": load, "busy_before": busy,
                "waited_s": waited.as_secs_f64(), "quiet": load < 1.0 || busy < 0.25,
            });
        }
    }
}

/// Runs one measurement under the quiet-machine rules: waits for quiet,
/// records the load, and repeats it once when it looks noisy (machine busy
/// before, or `noisy` says its repetitions disagree) if time allows.
pub(crate) fn measured<T>(
    cfg: &Cfg,
    name: &str,
    mut run: impl FnMut() -> R<T>,
    noisy: impl Fn(&T) -> Option<String>,
    to_json: impl Fn(&T) -> Value,
) -> R<(T, (String, Value))> {
    let mut attempts = Vec::new();
    let mut discarded = Vec::new();
    loop {
        check_interrupted()?;
        let mut env = wait_quiet(cfg);
        let t0 = Instant::now();
        let cpu0 = cpu_times();
        let others0 = foreign_ticks();
        let result = run()?;
        let took = t0.elapsed();
        let others = foreign_cpus(&others0, took);
        env["busy_during"] = json!(busy_since(cpu0));
        env["other_processes_cpus"] = json!(others);
        env["load1_after"] = json!(loadavg());
        env["seconds"] = json!(took.as_secs_f64());
        let reason = noisy(&result)
            .or_else(|| {
                (others > 0.25).then(|| {
                    format!(
                        "other processes used {:.0} % of a CPU during the run",
                        others * 100.0
                    )
                })
            })
            .or_else(|| {
                (env["busy_before"].as_f64().unwrap_or(0.0) > 0.5
                    && env["load1_before"].as_f64().unwrap_or(0.0) >= 1.0)
                    .then(|| "machine busy before the run".to_string())
            });
        env["noisy"] = json!(reason);
        attempts.push(env);
        let time_left = cfg.budget.saturating_sub(cfg.started.elapsed());
        if let Some(reason) = &reason
            && attempts.len() == 1
            && time_left > took * 2
        {
            eprintln!("    {name}: noisy ({reason}), repeating once");
            discarded.push(to_json(&result));
            continue;
        }
        let cond = json!({ "attempts": attempts, "discarded_results": discarded });
        return Ok((result, (name.to_string(), cond)));
    }
}

/// Namespaces, bpffs dirs and processes this run may have left.
pub(crate) fn leftovers() -> Vec<String> {
    let mut out = Vec::new();
    let tag = format!("{:x}", std::process::id() & 0xffff);
    if let Ok(d) = std::fs::read_dir("/run/netns") {
        for e in d.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if ["bln", "blp", "blf", "blb", "blv", "blm"]
                .iter()
                .any(|p| n.starts_with(&format!("{p}{tag}")))
            {
                out.push(format!("netns {n}"));
            }
        }
    }
    if let Ok(d) = std::fs::read_dir("/sys/fs/bpf") {
        for e in d.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if n.starts_with(&format!("beeline-test-{tag}")) {
                out.push(format!("bpffs {n}"));
            }
        }
    }
    out
}
