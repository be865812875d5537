//! `cargo xtask bench [--quick]`: builds everything like `demo` does and runs
//! the benchmarks (`tests/src/bin/beeline-bench/`): Beeline against
//! Debian's bridge plugin and the physical limits, on simulated nodes in
//! network namespaces. They write `bench/results/<date>.{json,md}`
//! (`<date>-quick.*` with `--quick`) and print the Markdown.
use std::process::Command;

use anyhow::{Result, bail};

use crate::util;

#[derive(clap::Args)]
pub struct BenchOptions {
    /// One repetition and short runs: about 3 minutes instead of 10-15.
    #[arg(long)]
    pub quick: bool,
}

/// What the benchmarks drive besides `ensure_host_tools`: (program or file,
/// Debian package, what happens without it).
const BENCH_TOOLS: &[(&str, &str, &str)] = &[
    (
        "iperf3",
        "iperf3",
        "throughput falls back to an in-process TCP stream",
    ),
    (
        "sockperf",
        "sockperf",
        "latency falls back to an in-process TCP ping-pong",
    ),
    (
        "iptables-restore",
        "iptables",
        "phase 3 (10,000 iptables rules) fails",
    ),
    (
        "/usr/lib/cni/bridge",
        "containernetworking-plugins",
        "the bridge plugin is not measured",
    ),
];

pub fn run(quick: bool) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!(
            "the benchmarks create network namespaces and load eBPF: run them as root \
             (`sudo cargo xtask bench`)"
        );
    }
    util::ensure_tools(BENCH_TOOLS);
    // Host tools, the eBPF object, release agent, CNI binary and the bench.
    crate::build_release(&["beeline-bench"])?;
    let root = util::workspace_root();
    let mut cmd = Command::new(root.join("target/release/beeline-bench"));
    if quick {
        cmd.arg("--quick");
    }
    cmd.arg("--out").arg(root.join("bench/results"));
    util::run(&mut cmd)
}
