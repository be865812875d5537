//! Pod-to-pod traffic: throughput (iperf3) and TCP request/response
//! latency (sockperf) between a client and a server namespace, the paths of
//! a measurement taking turns round by round, and their tables.
use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use beeline_tests::{NetNs, eventually, service_lb::Cgroup, tcp_throughput};
use serde_json::{Value, json};

use crate::{
    Cfg, R,
    machine::{check_interrupted, measured},
    process::{ChildGuard, next_port, run_timeout, wait_listening},
    report::{f1, f2, plural, ratio, table},
    stats::{median, paired, pct, ratio_row, rel_spread, round3, sorted},
};

/// A client/server pair to measure between.
pub(crate) struct Path2<'a> {
    pub(crate) name: &'static str,
    pub(crate) server: &'a NetNs,
    pub(crate) ip: Ipv4Addr,
    pub(crate) client: &'a NetNs,
    /// The client connects to a Service instead of `ip`.
    pub(crate) via: Option<Via<'a>>,
}

/// A Service in front of a path's server: the address the client connects
/// to, the server ports it maps one to one (iperf3, sockperf), and the
/// cgroup the client runs in (Beeline's socket hooks are attached there).
pub(crate) struct Via<'a> {
    pub(crate) addr: Ipv4Addr,
    pub(crate) ports: [u16; 2],
    pub(crate) cgroup: Option<&'a Cgroup>,
}

impl Path2<'_> {
    /// Where the client connects.
    fn dst(&self) -> Ipv4Addr {
        self.via.as_ref().map_or(self.ip, |v| v.addr)
    }
    /// A command run in the client's namespace (and cgroup).
    fn client_cmd(&self, program: &str) -> Command {
        match self.via.as_ref().and_then(|v| v.cgroup) {
            Some(cg) => cg.cmd(self.client, program),
            None => self.client.cmd(program),
        }
    }
}

#[derive(Clone, Debug, Default)]
pub(crate) struct Lat {
    p50: f64,
    p99: f64,
    avg: f64,
    max: f64,
    n: u64,
}

/// One path's 1-second runs. Run i of every path of a measurement was made
/// in the same round, so per-round ratios compare like with like.
#[derive(Clone, Default)]
pub(crate) struct PathSamples {
    name: String,
    gbps: Vec<f64>,
    lat: Vec<Lat>,
}

impl PathSamples {
    fn tput(&self) -> f64 {
        median(&self.gbps)
    }
    fn p50s(&self) -> Vec<f64> {
        self.lat.iter().map(|l| l.p50).collect()
    }
    fn p50(&self) -> f64 {
        median(&self.p50s())
    }
    fn p99(&self) -> f64 {
        median(&self.lat.iter().map(|l| l.p99).collect::<Vec<_>>())
    }
    /// Median of the per-round throughput ratios to `base`.
    fn tput_ratio(&self, base: &PathSamples) -> f64 {
        median(&self.tput_ratios(base))
    }
    /// Median of the per-round RTT p50 ratios to `base`.
    fn p50_ratio(&self, base: &PathSamples) -> f64 {
        median(&self.p50_ratios(base))
    }
    pub(crate) fn tput_ratios(&self, base: &PathSamples) -> Vec<f64> {
        paired(&self.gbps, &base.gbps)
    }
    pub(crate) fn p50_ratios(&self, base: &PathSamples) -> Vec<f64> {
        paired(&self.p50s(), &base.p50s())
    }
    fn json(&self, base: Option<&PathSamples>) -> Value {
        json!({
            "throughput_gbps_per_run": round3(&self.gbps),
            "throughput_median_gbps": self.tput(),
            "rtt_us_per_run": self.lat.iter().map(|l| json!({
                "p50": l.p50, "p99": l.p99, "avg": l.avg, "max": l.max, "observations": l.n,
            })).collect::<Vec<_>>(),
            "rtt_p50_median_us": self.p50(),
            "rtt_p99_median_us": self.p99(),
            "vs_baseline": base.map(|b| json!({
                "baseline": b.name,
                "throughput_ratio_per_round": round3(&paired(&self.gbps, &b.gbps)),
                "throughput_ratio_median": self.tput_ratio(b),
                "rtt_p50_ratio_per_round": round3(&paired(&self.p50s(), &b.p50s())),
                "rtt_p50_ratio_median": self.p50_ratio(b),
            })),
        })
    }
}

pub(crate) fn paths_json(v: &[PathSamples], baseline: &str) -> Value {
    let base = path_named(v, baseline);
    Value::Object(v.iter().map(|p| (p.name.clone(), p.json(base))).collect())
}

/// The iperf3 and sockperf servers of one path, kept for a whole measurement
/// (killed on drop).
pub(crate) struct Servers {
    iperf3: Option<(ChildGuard, u16)>,
    sockperf: Option<(ChildGuard, u16)>,
}

impl Servers {
    pub(crate) fn start(cfg: &Cfg, p: &Path2) -> R<Servers> {
        let ip = p.ip.to_string();
        if p.via.is_some() && !(cfg.tools.iperf3 && cfg.tools.sockperf) {
            return Err(format!(
                "{}: a Service path needs iperf3 and sockperf",
                p.name
            ));
        }
        let spawn = |mut cmd: Command, which: usize| -> R<(ChildGuard, u16)> {
            let port = p.via.as_ref().map_or_else(next_port, |v| v.ports[which]);
            let server = ChildGuard::spawn(
                cmd.args(["-p", &port.to_string()])
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null()),
            )?;
            wait_listening(server.pid(), port, Duration::from_secs(5))
                .map_err(|e| format!("{}: {e}", p.name))?;
            Ok((server, port))
        };
        let iperf3 = if cfg.tools.iperf3 {
            let mut cmd = p.server.cmd("iperf3");
            cmd.args(["-s", "-B", &ip]);
            Some(spawn(cmd, 0)?)
        } else {
            None
        };
        let sockperf = if cfg.tools.sockperf {
            let mut cmd = pinned(p.server.cmd("sockperf"), LATENCY_CPU);
            cmd.args(["sr", "--tcp", "-i", &ip]);
            Some(spawn(cmd, 1)?)
        } else {
            None
        };
        Ok(Servers { iperf3, sockperf })
    }
}

pub(crate) fn throughput(p: &Path2, srv: &Servers, seconds: u64) -> R<f64> {
    let secs = Duration::from_secs(seconds);
    let Some((_, port)) = &srv.iperf3 else {
        return tcp_throughput(p.server, p.ip, p.client, secs);
    };
    let ip = p.dst().to_string();
    let out = run_timeout(
        p.client_cmd("iperf3").args([
            "-c",
            &ip,
            "-p",
            &port.to_string(),
            "-t",
            &seconds.to_string(),
            "-J",
            "--connect-timeout",
            "3000",
        ]),
        secs + Duration::from_secs(20),
    )?;
    let v: Value = serde_json::from_str(&out).map_err(|e| format!("iperf3 -J output: {e}"))?;
    let bps = v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .ok_or_else(|| format!("iperf3: no sum_received in {}", v["end"]))?;
    Ok(bps / 1e9)
}

pub(crate) fn latency(p: &Path2, srv: &Servers, seconds: u64) -> R<Lat> {
    match &srv.sockperf {
        Some((_, port)) => sockperf(p, *port, seconds),
        None => pingpong(p, Duration::from_secs(seconds)),
    }
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// CPU both ends of a latency test run on.
const LATENCY_CPU: usize = 0;

/// Pins the calling thread (and what it execs) to `cpu`.
fn pin_to(cpu: usize) {
    let mut set = nix::sched::CpuSet::new();
    if set.set(cpu).is_ok() {
        let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set);
    }
}

/// A command whose process is pinned to `cpu` (set between fork and exec).
fn pinned(mut cmd: Command, cpu: usize) -> Command {
    use std::os::unix::process::CommandExt;
    // SAFETY: sched_setaffinity is a plain syscall, async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            pin_to(cpu);
            Ok(())
        });
    }
    cmd
}

/// `sockperf ping-pong --tcp --full-rtt` (14-byte messages, as fast as it
/// goes), both ends on the same CPU.
fn sockperf(p: &Path2, port: u16, seconds: u64) -> R<Lat> {
    let port = port.to_string();
    let ip = p.dst().to_string();
    let out = run_timeout(
        pinned(p.client_cmd("sockperf"), LATENCY_CPU).args([
            "pp",
            "--tcp",
            "-i",
            &ip,
            "-p",
            &port,
            "-t",
            &seconds.to_string(),
            "--full-rtt",
            "--dontwarmup",
        ]),
        Duration::from_secs(seconds + 20),
    )?;
    let out = strip_ansi(&out);
    let find = |key: &str| -> Option<f64> {
        out.lines().find_map(|l| {
            let i = l.find(key)?;
            l[i + key.len()..]
                .trim_start_matches([' ', '='])
                .split(|c: char| !(c.is_ascii_digit() || c == '.'))
                .next()?
                .parse()
                .ok()
        })
    };
    let n = out
        .lines()
        .find_map(|l| {
            let i = l.find("Total ")?;
            l[i + 6..].split_whitespace().next()?.parse().ok()
        })
        .unwrap_or(0);
    Ok(Lat {
        p50: find("percentile 50.000").ok_or_else(|| format!("sockperf output: {out}"))?,
        p99: find("percentile 99.000").ok_or_else(|| format!("sockperf output: {out}"))?,
        avg: find("avg-rtt=").unwrap_or(f64::NAN),
        max: find("<MAX> observation").unwrap_or(f64::NAN),
        n,
    })
}

/// Fallback without sockperf: a TCP 1-byte ping-pong (TCP_NODELAY).
fn pingpong(p: &Path2, duration: Duration) -> R<Lat> {
    let listener = p
        .server
        .enter(|| TcpListener::bind(SocketAddr::from((p.ip, 0))))
        .map_err(|e| format!("bind {}: {e}", p.ip))?;
    let addr = listener.local_addr().unwrap();
    std::thread::scope(|s| {
        let server = s.spawn(move || -> std::io::Result<()> {
            pin_to(LATENCY_CPU);
            let (mut c, _) = listener.accept()?;
            c.set_nodelay(true)?;
            let mut b = [0u8; 1];
            loop {
                if c.read(&mut b)? == 0 {
                    return Ok(());
                }
                c.write_all(&b)?;
            }
        });
        let samples = p.client.enter(|| -> std::io::Result<Vec<f64>> {
            pin_to(LATENCY_CPU);
            let mut c = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
            c.set_nodelay(true)?;
            c.set_read_timeout(Some(Duration::from_secs(2)))?;
            let mut b = [0u8; 1];
            for _ in 0..1000 {
                c.write_all(b"x")?;
                c.read_exact(&mut b)?;
            }
            let mut v = Vec::with_capacity(200_000);
            let end = Instant::now() + duration;
            while Instant::now() < end {
                let t = Instant::now();
                c.write_all(b"x")?;
                c.read_exact(&mut b)?;
                v.push(t.elapsed().as_secs_f64() * 1e6);
            }
            Ok(v)
        });
        let samples = match samples {
            Ok(v) => v,
            Err(e) => {
                let _ = p
                    .server
                    .enter(|| TcpStream::connect_timeout(&addr, Duration::from_millis(500)));
                return Err(format!("ping-pong to {addr}: {e}"));
            }
        };
        let _ = server.join();
        Ok(Lat {
            p50: pct(&samples, 50.0),
            p99: pct(&samples, 99.0),
            avg: samples.iter().sum::<f64>() / samples.len().max(1) as f64,
            max: pct(&samples, 100.0),
            n: samples.len() as u64,
        })
    })
}

/// Checks every path answers pings before measuring it.
pub(crate) fn check_paths(paths: &[Path2]) -> R<()> {
    for p in paths {
        if !eventually(Duration::from_secs(10), || {
            p.client.ping_once(p.ip, Duration::from_secs(1))
        }) {
            return Err(format!("{}: {} does not answer pings", p.name, p.ip));
        }
    }
    Ok(())
}

/// Throughput then latency for every path in 1-second runs, round-robin
/// (A, B, C, A, B, C, ...), rotating who goes first; `reps` times.
fn traffic_reps(cfg: &Cfg, paths: &[Path2]) -> R<Vec<PathSamples>> {
    let n = paths.len();
    let mut out: Vec<PathSamples> = paths
        .iter()
        .map(|p| PathSamples {
            name: p.name.into(),
            ..Default::default()
        })
        .collect();
    let servers: Vec<Servers> = paths
        .iter()
        .map(|p| Servers::start(cfg, p))
        .collect::<R<_>>()?;
    for rep in 0..cfg.reps {
        for round in 0..cfg.tput_rounds {
            for k in 0..n {
                let i = (k + rep + round) % n;
                check_interrupted()?;
                let g = throughput(&paths[i], &servers[i], 1)
                    .map_err(|e| format!("{}: {e}", paths[i].name))?;
                out[i].gbps.push(g);
            }
        }
        for round in 0..cfg.lat_rounds {
            for k in 0..n {
                let i = (k + rep + round) % n;
                check_interrupted()?;
                let l = latency(&paths[i], &servers[i], cfg.lat_secs)
                    .map_err(|e| format!("{}: {e}", paths[i].name))?;
                out[i].lat.push(l);
            }
        }
        for p in &out {
            let g = &p.gbps[p.gbps.len() - cfg.tput_rounds..];
            let l: Vec<f64> = p.lat[p.lat.len() - cfg.lat_rounds..]
                .iter()
                .map(|l| l.p50)
                .collect();
            eprintln!(
                "    repetition {}: {:<16} {:6.2} Gbit/s   RTT p50 {:7.1} µs",
                rep + 1,
                p.name,
                median(g),
                median(&l)
            );
        }
    }
    Ok(out)
}

/// Throughput and latency of `paths`, repeated while the machine is noisy
/// or the ratios to `baseline` vary too much.
pub(crate) fn measured_traffic(
    cfg: &Cfg,
    name: &str,
    paths: &[Path2],
    baseline: &str,
) -> R<(Vec<PathSamples>, (String, Value))> {
    measured(
        cfg,
        name,
        || traffic_reps(cfg, paths),
        |v: &Vec<PathSamples>| traffic_noisy(v, baseline),
        |v| paths_json(v, baseline),
    )
}

/// Noisy when a Beeline path's per-round throughput ratio to the baseline
/// varies by more than 15 %.
fn traffic_noisy(v: &[PathSamples], baseline: &str) -> Option<String> {
    let base = path_named(v, baseline)?;
    v.iter()
        .filter(|p| p.name.starts_with("beeline"))
        .map(|p| (p, rel_spread(&paired(&p.gbps, &base.gbps))))
        .find(|(_, s)| *s > 0.15)
        .map(|(p, s)| {
            format!(
                "{} / {baseline} throughput ratio varies {:.0} % between rounds",
                p.name,
                s * 100.0
            )
        })
}

/// The traffic table: one row per path, ratios against `baseline`.
pub(crate) fn traffic_table(v: &[PathSamples], baseline: &str) -> String {
    let base = v.iter().find(|p| p.name == baseline);
    let rows = v
        .iter()
        .map(|p| {
            let (tr, lr) = base.map_or((f64::NAN, f64::NAN), |b| (p.tput_ratio(b), p.p50_ratio(b)));
            vec![
                p.name.clone(),
                f2(Some(p.tput())),
                format!(
                    "{}–{}",
                    f2(sorted(&p.gbps).first().copied()),
                    f2(sorted(&p.gbps).last().copied())
                ),
                f1(Some(p.p50())),
                f1(Some(p.p99())),
                ratio(tr),
                ratio(lr),
            ]
        })
        .collect();
    table(
        &[
            "path",
            "Gbit/s (median)",
            "range",
            "RTT p50 µs",
            "RTT p99 µs",
            &format!("Gbit/s vs {baseline}"),
            &format!("RTT p50 vs {baseline}"),
        ],
        rows,
    )
}

/// Throughput and RTT p50 rows for `a / b`, with no target; none when either
/// path was not measured.
pub(crate) fn ratio_pair(
    label: &str,
    a: Option<&PathSamples>,
    b: Option<&PathSamples>,
) -> Vec<Vec<String>> {
    let (Some(a), Some(b)) = (a, b) else {
        return Vec::new();
    };
    vec![
        ratio_row(format!("{label} throughput"), &a.tput_ratios(b), None),
        ratio_row(format!("{label} RTT p50"), &a.p50_ratios(b), None),
    ]
}

pub(crate) fn path_named<'a>(v: &'a [PathSamples], name: &str) -> Option<&'a PathSamples> {
    v.iter().find(|p| p.name == name)
}

pub(crate) fn traffic_method(cfg: &Cfg) -> String {
    format!(
        "Throughput: {}, {} of 1 s per path; latency: {}, {} of {} s per path. Paths \
         take turns run by run (A, B, C, A, B, C, ...), so each round compares them within a \
         few seconds; the table gives the median over all runs, and each ratio is the median \
         of the per-round ratios, which cancels most of the drift of a shared machine. Latency \
         runs on one CPU because on this VM a cross-CPU wakeup (an IPI through the hypervisor) \
         costs 100-400 µs and would drown the datapath.",
        if cfg.tools.iperf3 {
            "`iperf3 -c` (one TCP stream)"
        } else {
            "one TCP stream (in-process; iperf3 missing)"
        },
        plural(cfg.tput_rounds * cfg.reps, "run"),
        if cfg.tools.sockperf {
            "`sockperf ping-pong --tcp --full-rtt --dontwarmup` (14-byte messages; sockperf \
             leaves the first 0.4 s of a run out of its statistics), client and server pinned \
             to CPU 0, p50 and p99 RTT of each run"
        } else {
            "a TCP 1-byte ping-pong (TCP_NODELAY; sockperf missing), client and server pinned \
             to CPU 0, p50 and p99 RTT of each run"
        },
        plural(cfg.lat_rounds * cfg.reps, "run"),
        cfg.lat_secs,
    )
}
