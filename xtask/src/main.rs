//! Project tasks: `cargo xtask <command>`.
mod bench;
mod ebpf;
mod previous;
mod util;

use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Beeline project tasks")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Build the eBPF object (installs nightly, rust-src and bpf-linker if missing).
    BuildEbpf(ebpf::BuildOptions),
    /// Everything CI checks: eBPF build, fmt, clippy, unit and integration tests.
    Test(TestOptions),
    /// A 3-node cluster on this machine: pods, ping matrix, throughput, maps (root).
    Demo(DemoOptions),
    /// Build the container image (deploy/Containerfile) from release binaries.
    Image(ImageOptions),
    /// Benchmarks vs the bridge plugin and the physical limits (root): bench/results/.
    Bench(bench::BenchOptions),
    /// Build the previous release's agent and CNI binary (the upgrade test's).
    BuildPrevious,
}

#[derive(clap::Args)]
struct ImageOptions {
    /// Image name and tag.
    #[arg(long, default_value = "beeline:dev")]
    tag: String,
}

#[derive(clap::Args)]
struct DemoOptions {
    /// Leave the cluster running (remove it later with --down).
    #[arg(long)]
    keep: bool,
    /// Remove a cluster left by --keep.
    #[arg(long)]
    down: bool,
    /// How nodes reach each other: auto, direct or vxlan.
    #[arg(long, default_value = "auto")]
    mode: String,
}

#[derive(clap::Args)]
struct TestOptions {
    /// Extra arguments passed to `cargo test` (e.g. a test name filter).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    cargo_test_args: Vec<String>,
}

fn main() -> ExitCode {
    let result = match Cli::parse().command {
        Command::BuildEbpf(opts) => ebpf::build(&opts).map(|_| ()),
        Command::Test(opts) => test(&opts),
        Command::Demo(opts) => demo(&opts),
        Command::Image(opts) => image(&opts),
        Command::Bench(opts) => bench::run(opts.quick),
        Command::BuildPrevious => previous::build(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Host tools, the eBPF object, then release builds of the agent, the CNI
/// binary and the given binaries of the test harness crate.
pub fn build_release(harness_bins: &[&str]) -> Result<()> {
    util::ensure_host_tools()?;
    ebpf::build(&ebpf::BuildOptions::default())?;
    build_release_binaries(harness_bins)
}

fn build_release_binaries(harness_bins: &[&str]) -> Result<()> {
    util::step("building the agent (release)");
    let root = util::workspace_root();
    let mut cmd = util::cargo(&root);
    cmd.args(["build", "--release", "-p", "beeline-agent"])
        .args(["--bin", "beeline-agent"]);
    if !harness_bins.is_empty() {
        cmd.args(["-p", "beeline-tests"]);
        for bin in harness_bins {
            cmd.args(["--bin", bin]);
        }
    }
    util::run(&mut cmd)?;
    build_cni_binary(&root)
}

/// The CNI binary is linked statically: it starts about 0.7 ms faster per
/// exec (no dynamic loader; every ADD and DEL is an exec), and it runs on any
/// host whatever its glibc. Built for the explicit host triple so the flag
/// stays off build scripts and proc-macros; copied to `target/release`.
fn build_cni_binary(root: &std::path::Path) -> Result<()> {
    util::step("building the CNI binary (release, static)");
    let rustc = util::output(std::process::Command::new("rustc").arg("-vV"))?;
    let host = rustc
        .lines()
        .find_map(|l| l.strip_prefix("host: "))
        .context("rustc -vV printed no host triple")?
        .to_string();
    let mut cmd = util::cargo(root);
    cmd.args([
        "build",
        "--release",
        "-p",
        "beeline-cni",
        "--bin",
        "beeline",
    ])
    .args(["--target", &host]);
    if host.ends_with("-linux-gnu") {
        cmd.env("RUSTFLAGS", "-C target-feature=+crt-static");
    }
    util::run(&mut cmd)?;
    let built = root.join("target").join(&host).join("release/beeline");
    let dest = root.join("target/release/beeline");
    // Replace, never write through: a running plugin keeps its old inode.
    let tmp = root.join("target/release/.beeline.tmp");
    std::fs::copy(&built, &tmp).with_context(|| format!("copying {}", built.display()))?;
    std::fs::rename(&tmp, &dest).with_context(|| format!("installing {}", dest.display()))?;
    Ok(())
}

fn demo(opts: &DemoOptions) -> Result<()> {
    let root = util::workspace_root();
    build_release(&["beeline-demo"])?;
    let mut cmd = std::process::Command::new(root.join("target/release/beeline-demo"));
    cmd.args(["--mode", &opts.mode]);
    if opts.keep {
        cmd.arg("--keep");
    }
    if opts.down {
        cmd.arg("--down");
    }
    util::run(&mut cmd)
}

fn image(opts: &ImageOptions) -> Result<()> {
    let root = util::workspace_root();
    // Say what is missing before minutes of compiling.
    let builder = ["podman", "buildah"]
        .into_iter()
        .find(|b| util::on_path(b))
        .context("no image builder: install podman (apt-get install podman) or buildah")?;
    build_release(&[])?;
    stage_libraries(&root)?;
    util::step(&format!(
        "{builder} build -f deploy/Containerfile -t {} .",
        opts.tag
    ));
    util::run(
        std::process::Command::new(builder)
            .current_dir(&root)
            .args(["build", "-f", "deploy/Containerfile", "-t", &opts.tag, "."]),
    )
}

/// Stages the image's files under target/image/: the binaries without
/// debug info (bin/), and the shared libraries the agent links (per `ldd`)
/// at their paths (lib/), for the FROM-scratch image.
fn stage_libraries(root: &std::path::Path) -> Result<()> {
    let image = root.join("target/image");
    if image.exists() {
        std::fs::remove_dir_all(&image)?;
    }
    std::fs::create_dir_all(image.join("bin"))?;
    for binary in ["beeline-agent", "beeline"] {
        util::run(
            std::process::Command::new("strip")
                .arg("--strip-debug")
                .arg("-o")
                .arg(image.join("bin").join(binary))
                .arg(root.join("target/release").join(binary)),
        )?;
    }
    let stage = image.join("lib");
    let agent = root.join("target/release/beeline-agent");
    let ldd = util::output(std::process::Command::new("ldd").arg(&agent))?;
    let libraries: Vec<&str> = ldd
        .lines()
        .filter_map(|line| {
            // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or
            // "/lib64/ld-linux-x86-64.so.2 (0x...)"
            let path = line.split("=>").last()?.split_whitespace().next()?;
            path.starts_with('/').then_some(path)
        })
        .collect();
    anyhow::ensure!(
        !libraries.is_empty(),
        "ldd found no libraries for {}",
        agent.display()
    );
    for library in libraries {
        let dest = stage.join(library.trim_start_matches('/'));
        std::fs::create_dir_all(dest.parent().unwrap())?;
        // Copy the file behind any symlink, under the name the loader asks for.
        std::fs::copy(library, &dest).with_context(|| format!("staging {library}"))?;
    }
    Ok(())
}

/// What the kernel tests drive besides `ensure_host_tools`.
const TEST_TOOLS: &[(&str, &str, &str)] = &[
    ("bpftool", "bpftool", "the bpftool field-name test fails"),
    ("nft", "nftables", "the uninstall test cannot list tables"),
    ("iptables", "iptables", "portmap chaining fails"),
    (
        "/usr/lib/cni/bridge",
        "containernetworking-plugins",
        "delegation, chaining and reference tests fail",
    ),
    ("dnsmasq", "dnsmasq-base", "the dhcp IPAM test fails"),
    (
        "ethtool",
        "ethtool",
        "the VXLAN test without tunnel offload fails",
    ),
    ("podman", "podman", "the podman test fails"),
    (
        "containerd",
        "containerd",
        "the containerd (CRI) tests fail",
    ),
    (
        "protoc",
        "protobuf-compiler",
        "the test crate (CRI client) does not build",
    ),
    ("runc", "runc", "the podman test fails"),
    ("/bin/busybox", "busybox-static", "the podman test fails"),
];

fn test(opts: &TestOptions) -> Result<()> {
    util::ensure_host_tools()?;
    util::ensure_tools(TEST_TOOLS);
    let root = util::workspace_root();
    ebpf::build(&ebpf::BuildOptions::default())?;
    util::step("cargo fmt --check");
    util::run(util::cargo(&root).args(["fmt", "--all", "--check"]))?;
    util::run(
        util::cargo(&root)
            .current_dir(root.join("ebpf/beeline-ebpf"))
            .args(["fmt", "--check"]),
    )?;
    util::step("cargo clippy -D warnings");
    util::run(util::cargo(&root).args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    // The release binaries the integration tests execute, and the previous
    // release's for the upgrade test.
    build_release_binaries(&[])?;
    previous::build()?;
    util::step("cargo test");
    let mut cmd = util::cargo(&root);
    cmd.args(["test", "--workspace", "--release"]);
    // Every test binary runs even after one fails: one run shows every failure.
    if !opts.cargo_test_args.iter().any(|a| a == "--no-fail-fast") {
        cmd.arg("--no-fail-fast");
    }
    cmd.args(&opts.cargo_test_args);
    run_tests_with_summary(&mut cmd)
}

/// Runs `cargo test`, echoing its output, and ends with one line adding up
/// every test binary's `test result:` (cargo's own last line is usually an
/// empty doctest run).
fn run_tests_with_summary(cmd: &mut std::process::Command) -> Result<()> {
    use std::io::BufRead;
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("cannot start cargo test")?;
    let (mut passed, mut failed, mut ignored) = (0u64, 0u64, 0u64);
    for line in std::io::BufReader::new(child.stdout.take().expect("piped")).lines() {
        let line = line?;
        println!("{line}");
        if let Some(counts) = line.strip_prefix("test result: ") {
            for part in counts.split(';') {
                let mut words = part
                    .split_whitespace()
                    .filter(|w| *w != "ok." && *w != "FAILED.");
                if let (Some(n), Some(what)) = (words.next(), words.next()) {
                    let n: u64 = n.parse().unwrap_or(0);
                    match what {
                        "passed" => passed += n,
                        "failed" => failed += n,
                        "ignored" => ignored += n,
                        _ => {}
                    }
                }
            }
        }
    }
    let status = child.wait()?;
    println!("tests: {passed} passed, {failed} failed, {ignored} skipped");
    anyhow::ensure!(status.success(), "cargo test failed with {status}");
    Ok(())
}
