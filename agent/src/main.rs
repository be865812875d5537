//! `beeline-agent`: one per node. `run` is the daemon; the other commands
//! inspect the pinned maps and work while the daemon is down.
use anyhow::Context;
use beeline_agent::{
    cli::{Cli, Command, LogFormat},
    daemon, inspect, uninstall,
};
use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let result = match cli.command {
        Command::Run(args) => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .context("starting the runtime")
            .and_then(|rt| rt.block_on(daemon::run(*args))),
        Command::Endpoints(args) => inspect::endpoints(&args.inspect.bpffs_dir, &args.state_dir)
            .map(|rows| print(args.inspect.json, &rows[..], inspect::print_endpoints)),
        Command::Nodes(args) => inspect::remote_cidrs(&args.bpffs_dir)
            .map(|rows| print(args.json, &rows[..], inspect::print_remote_cidrs)),
        Command::Stats(args) => inspect::stats(&args.bpffs_dir)
            .map(|stats| print(args.json, &stats, inspect::print_stats)),
        Command::Services(args) => inspect::services(&args.inspect.bpffs_dir, &args.state_dir)
            .map(|rows| print(args.inspect.json, &rows[..], inspect::print_services)),
        Command::Uninstall(args) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the runtime")
            .and_then(|rt| rt.block_on(uninstall::uninstall(args))),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// JSON with `--json`, else the command's table.
fn print<T: serde::Serialize + ?Sized>(json: bool, value: &T, table: fn(&T)) {
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(value).expect("serializes")
        );
    } else {
        table(value);
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("BEELINE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
