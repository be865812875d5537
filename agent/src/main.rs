//! `beeline-agent`: one per node. `run` is the daemon; the other commands
//! inspect the pinned maps and work while the daemon is down.
use std::{path::PathBuf, sync::Arc, time::Duration};

use anyhow::{Context, Result};
use beeline_agent::{
    agent::{Agent, NetworkConfig},
    datapath::Datapath,
    inspect, node_source,
    remote::Mode,
    server,
    state::EndpointStore,
    uplink,
};
use clap::{Args, Parser, Subcommand, ValueEnum};
use ipnet::Ipv4Net;
use tokio::sync::Mutex;
use tracing::{info, warn};

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
    /// List the remote podCIDRs and the node each one is forwarded to.
    Nodes(InspectArgs),
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
    /// Static node source: a NodeList (JSON or YAML, as `kubectl get nodes
    /// -o yaml` prints it), reloaded when it changes. Without it, Nodes are
    /// watched through the Kubernetes API.
    #[arg(long, conflicts_with = "kubeconfig")]
    nodes_file: Option<PathBuf>,
    /// Kubeconfig for the API (default: in-cluster config, then ~/.kube/config).
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// How to reach other nodes.
    #[arg(long, value_enum, default_value_t = Mode::Auto)]
    mode: Mode,
    /// VXLAN network identifier.
    #[arg(long, default_value_t = 1)]
    vni: u32,
    /// VXLAN UDP port.
    #[arg(long, default_value_t = 4789)]
    vxlan_port: u16,
    /// Pod interface MTU (default: uplink MTU, minus 50 when VXLAN may be used).
    #[arg(long)]
    pod_mtu: Option<u32>,
    /// Destinations pods reach with their own IP (every node's podCIDR is
    /// always included). Repeatable.
    #[arg(long = "no-masquerade-cidr", value_name = "CIDR")]
    no_masquerade_cidrs: Vec<Ipv4Net>,
    /// Do not install the egress masquerade rules.
    #[arg(long)]
    no_masquerade: bool,
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
        Command::Nodes(args) => inspect::remote_cidrs(&args.bpffs_dir).map(|rows| {
            if args.json {
                println!("{}", serde_json::to_string_pretty(&rows).unwrap());
            } else {
                inspect::print_remote_cidrs(&rows);
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
    let (mut nodes_rx, source) = match &args.nodes_file {
        Some(path) => node_source::static_file(path.clone())?,
        None => {
            let client = kube_client(args.kubeconfig.as_deref()).await?;
            node_source::kubernetes(client)
        }
    };
    let datapath = Datapath::load(&args.bpffs_dir)?;
    let store = EndpointStore::load(&args.state_dir)?;
    let mut agent = Agent {
        node_name: args.node_name.clone(),
        network: NetworkConfig {
            mode: args.mode,
            vni: args.vni,
            vxlan_port: args.vxlan_port,
            pod_mtu: args.pod_mtu,
            no_masquerade: args.no_masquerade_cidrs.clone(),
            masquerade: !args.no_masquerade,
        },
        datapath,
        store,
        netlink: uplink::netlink()?,
        pod_cidr: None,
        uplink: None,
        vxlan_ifindex: 0,
        nodes: Vec::new(),
    };
    let report = agent.reconcile()?;
    info!(?report, "reconciled persisted endpoints with the kernel");
    let initial = nodes_rx.borrow_and_update().clone();
    agent.sync_nodes(initial).await?;
    let agent = Arc::new(Mutex::new(agent));

    let listener = server::bind(&args.socket)?;
    {
        let a = agent.lock().await;
        info!(
            socket = %args.socket.display(),
            node = %args.node_name,
            pod_cidr = ?a.pod_cidr.map(|c| c.to_string()),
            pod_mtu = a.pod_mtu(),
            not_ready = ?a.not_ready_reason(),
            "agent serving"
        );
    }
    let server = tokio::spawn(server::serve(listener, agent.clone()));
    let syncer = tokio::spawn(sync_nodes_forever(nodes_rx, agent.clone()));
    let reconciler = tokio::spawn(reconcile_periodically(agent.clone()));

    shutdown_signal().await;
    info!("shutting down; pinned maps and links keep pod traffic flowing");
    for task in [server, syncer, reconciler, source] {
        task.abort();
    }
    let _ = std::fs::remove_file(&args.socket);
    Ok(())
}

async fn kube_client(kubeconfig: Option<&std::path::Path>) -> Result<kube::Client> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?
        }
        None => kube::Config::infer().await.context(
            "no node source: pass --nodes-file, or run in a cluster / with a kubeconfig",
        )?,
    };
    Ok(kube::Client::try_from(config)?)
}

/// Applies every node snapshot the source publishes.
async fn sync_nodes_forever(
    mut rx: tokio::sync::watch::Receiver<node_source::Snapshot>,
    agent: Arc<Mutex<Agent>>,
) {
    while rx.changed().await.is_ok() {
        let snapshot = rx.borrow_and_update().clone();
        if let Err(e) = agent.lock().await.sync_nodes(snapshot).await {
            warn!("applying the node list: {e:#}");
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
