//! `beeline-agent`: one per node. `run` is the daemon; the other commands
//! inspect the pinned maps and work while the daemon is down.
use std::{path::PathBuf, sync::Arc, time::Duration};

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use tokio::sync::Mutex;
use tracing::{info, warn};

use beeline_agent::{
    agent::Agent, datapath::Datapath, inspect, nodes, nodes::NodeRoute, server,
    state::EndpointStore, uplink,
};

/// VXLAN adds 50 bytes (outer Ethernet 14 + IPv4 20 + UDP 8 + VXLAN 8).
const VXLAN_OVERHEAD: u32 = 50;
const DEFAULT_UPLINK_MTU: u32 = 1500;

#[derive(Parser)]
#[command(name = "beeline-agent", version, about = "Beeline node agent")]
struct Cli {
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the node daemon.
    Run(RunArgs),
    /// List the endpoints in the pinned endpoint map.
    Endpoints(InspectArgs),
    /// Show the per-program packet counters.
    Stats(InspectArgs),
}

#[derive(Args)]
struct RunArgs {
    /// This node's name (its Node object).
    #[arg(long, env = "NODE_NAME")]
    node_name: String,
    /// The API socket for the CNI binary.
    #[arg(long, default_value = beeline_proto::DEFAULT_SOCKET)]
    socket: PathBuf,
    #[arg(long, default_value = "/sys/fs/bpf/beeline")]
    bpffs_dir: PathBuf,
    #[arg(long, default_value = "/var/lib/beeline")]
    state_dir: PathBuf,
    /// A NodeList (JSON or YAML, as `kubectl get nodes -o yaml` prints it),
    /// reloaded when it changes.
    #[arg(long)]
    nodes_file: PathBuf,
    /// Pod interface MTU (default: the uplink's MTU minus VXLAN overhead).
    #[arg(long)]
    pod_mtu: Option<u32>,
}

#[derive(Args)]
struct InspectArgs {
    #[arg(long, default_value = "/sys/fs/bpf/beeline")]
    bpffs_dir: PathBuf,
    /// Machine-readable output.
    #[arg(long)]
    json: bool,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let result = match cli.command {
        Command::Run(args) => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .context("starting the runtime")
            .and_then(|rt| rt.block_on(run(args))),
        Command::Endpoints(args) => inspect::endpoints(&args.bpffs_dir).map(|rows| {
            if args.json {
                println!("{}", serde_json::to_string_pretty(&rows).unwrap());
            } else {
                inspect::print_endpoints(&rows);
            }
        }),
        Command::Stats(args) => inspect::stats(&args.bpffs_dir).map(|stats| {
            if args.json {
                println!("{}", serde_json::to_string_pretty(&stats).unwrap());
            } else {
                inspect::print_stats(&stats);
            }
        }),
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

async fn run(args: RunArgs) -> Result<()> {
    let nodes = nodes::read_node_list(&args.nodes_file)?;
    let me = nodes.iter().find(|n| n.name == args.node_name);
    let pod_cidr = local_pod_cidr(me, &args.node_name);
    let pod_mtu = match args.pod_mtu {
        Some(mtu) => mtu,
        None => {
            let uplink_mtu = match me.and_then(|n| n.internal_ip) {
                Some(ip) => uplink::mtu_of_address(ip).await?,
                None => None,
            };
            uplink_mtu.unwrap_or(DEFAULT_UPLINK_MTU) - VXLAN_OVERHEAD
        }
    };
    let datapath = Datapath::load(&args.bpffs_dir)?;
    let store = EndpointStore::load(&args.state_dir)?;
    let mut agent = Agent {
        node_name: args.node_name.clone(),
        pod_cidr,
        pod_mtu,
        datapath,
        store,
    };
    let report = agent.reconcile()?;
    info!(?report, "reconciled persisted endpoints with the kernel");
    let agent = Arc::new(Mutex::new(agent));

    let listener = server::bind(&args.socket)?;
    info!(
        socket = %args.socket.display(),
        node = %args.node_name,
        pod_cidr = ?pod_cidr.map(|c| c.to_string()),
        pod_mtu,
        "agent ready"
    );
    let server = tokio::spawn(server::serve(listener, agent.clone()));
    let watcher = tokio::spawn(watch_nodes_file(
        args.nodes_file.clone(),
        args.node_name.clone(),
        agent.clone(),
    ));
    let reconciler = tokio::spawn(reconcile_periodically(agent.clone()));

    shutdown_signal().await;
    info!("shutting down; pinned maps and links keep pod traffic flowing");
    server.abort();
    watcher.abort();
    reconciler.abort();
    let _ = std::fs::remove_file(&args.socket);
    Ok(())
}

fn local_pod_cidr(me: Option<&NodeRoute>, node_name: &str) -> Option<ipnet::Ipv4Net> {
    match me {
        None => {
            warn!("node {node_name} is not in the node list yet; waiting for it");
            None
        }
        Some(n) if n.pod_cidrs.is_empty() => {
            warn!("node {node_name} has no IPv4 podCIDR yet; waiting for it");
            None
        }
        Some(n) => Some(n.pod_cidrs[0]),
    }
}

/// Static node source: re-reads the file when its modification time changes.
async fn watch_nodes_file(path: PathBuf, node_name: String, agent: Arc<Mutex<Agent>>) {
    let mtime = |p: &PathBuf| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let mut last = mtime(&path);
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = mtime(&path);
        if now == last {
            continue;
        }
        last = now;
        match nodes::read_node_list(&path) {
            Ok(nodes) => {
                let cidr = local_pod_cidr(nodes.iter().find(|n| n.name == node_name), &node_name);
                let mut agent = agent.lock().await;
                if agent.pod_cidr != cidr {
                    info!(from = ?agent.pod_cidr, to = ?cidr, "local podCIDR changed");
                    agent.pod_cidr = cidr;
                }
            }
            Err(e) => warn!("ignoring unreadable node list: {e:#}"),
        }
    }
}

/// Drops endpoints whose host veth vanished without a DEL.
async fn reconcile_periodically(agent: Arc<Mutex<Agent>>) {
    loop {
        tokio::time::sleep(Duration::from_secs(10)).await;
        match agent.lock().await.reconcile() {
            Ok(r)
                if r.removed_stale.is_empty()
                    && r.removed_orphan_entries.is_empty()
                    && r.removed_orphan_links.is_empty() => {}
            Ok(r) => info!(report = ?r, "reconcile removed stale state"),
            Err(e) => warn!("reconcile: {e:#}"),
        }
    }
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("install SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
