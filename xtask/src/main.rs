//! Project tasks: `cargo xtask <command>`.
mod ebpf;
mod util;

use std::process::ExitCode;

use anyhow::Result;
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
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn test(opts: &TestOptions) -> Result<()> {
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
    util::step("cargo build (release binaries used by the integration tests)");
    util::run(util::cargo(&root).args([
        "build",
        "--release",
        "-p",
        "beeline-agent",
        "-p",
        "beeline-cni",
    ]))?;
    util::step("cargo test");
    util::run(
        util::cargo(&root)
            .args(["test", "--workspace", "--release"])
            .args(&opts.cargo_test_args),
    )
}
