//! `beeline-agent`: one per node. `run` is the daemon; the other commands
//! inspect the pinned maps and work while the daemon is down.
use std::{sync::Arc, time::Duration};

use anyhow::{Context, Result};
use beeline_agent::{
    agent::{Agent, CniInstall, NetworkConfig},
    cli::{Cli, Command, LogFormat, RunArgs, UninstallArgs},
    datapath::{self, Datapath},
    health::{self, Metrics},
    inspect, install, masquerade, node_source,
    retire::{self, Retirer},
    server,
    state::EndpointStore,
    uplink,
};
use clap::Parser;
use tokio::sync::Mutex;
use tracing::{info, warn};

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
        Command::Uninstall(args) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the runtime")
            .and_then(|rt| rt.block_on(uninstall(args))),
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
    let mut datapath =
        Datapath::load(&args.bpffs_dir, args.ebpf_debug_logs)?.with_pod_attach(args.pod_attach);
    let ebpf_logs = datapath
        .take_logger()
        .map(|l| tokio::spawn(datapath::forward_logs(l)));
    let store = EndpointStore::load(&args.state_dir)?;
    let mut agent = Agent {
        node_name: args.node_name.clone(),
        network: NetworkConfig {
            mode: args.mode,
            vni: args.vni,
            vxlan_port: args.vxlan_port,
            vxlan_encap: args.vxlan_encap.into(),
            pod_mtu: args.pod_mtu,
            no_masquerade: args.no_masquerade_cidrs.clone(),
            masquerade: !args.no_masquerade,
        },
        datapath,
        store,
        netlink: uplink::netlink()?,
        retirer: Retirer::start().context("starting the veth retirer")?,
        pod_cidr: None,
        uplink: None,
        vxlan_ifindex: 0,
        nodes: Vec::new(),
        metrics: Metrics::new(),
        cni_install: CniInstall {
            bin_dir: args.cni_bin_dir.clone(),
            binary: args.cni_binary.clone(),
            conf_dir: args.cni_conf_dir.clone(),
            socket: args.socket.clone(),
        },
        cni_installed: false,
    };
    let report = agent.reconcile(true)?;
    info!(?report, "reconciled persisted endpoints with the kernel");
    for ifname in retire::leftovers(&agent.netlink).await {
        info!(ifname, "deleting a retired veth left by the previous agent");
        agent.retirer.retire(ifname);
    }
    let initial = nodes_rx.borrow_and_update().clone();
    agent.sync_nodes(initial).await?;
    release_freed_memory();
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
    let health = {
        let (addr, agent, bpffs) = (args.health_addr, agent.clone(), args.bpffs_dir.clone());
        tokio::spawn(async move {
            if let Err(e) = health::serve(addr, agent, bpffs).await {
                tracing::error!("health and metrics server: {e:#}");
            }
        })
    };

    shutdown_signal().await;
    info!("shutting down; pinned maps and links keep pod traffic flowing");
    for task in [server, syncer, reconciler, source] {
        task.abort();
    }
    health.abort();
    if let Some(task) = ebpf_logs {
        task.abort();
    }
    let _ = std::fs::remove_file(&args.socket);
    Ok(())
}

/// Removes everything Beeline installed on this node. Each step runs even if
/// an earlier one failed; the first error is reported at the end.
async fn uninstall(args: UninstallArgs) -> Result<()> {
    let mut first_error: Option<anyhow::Error> = None;
    let mut note = |what: &str, r: Result<bool>| match r {
        Ok(true) => info!("removed {what}"),
        Ok(false) => info!("{what}: already gone"),
        Err(e) => {
            warn!("{what}: {e:#}");
            first_error.get_or_insert(e.context(what.to_string()));
        }
    };
    // The config first: the kubelet stops sending pods here.
    if let Some(dir) = &args.cni_conf_dir {
        note(
            "the CNI config",
            install::remove(&dir.join(install::CONFLIST_NAME)),
        );
    }
    if let Some(dir) = &args.cni_bin_dir {
        note(
            "the CNI binary",
            install::remove(&dir.join(install::CNI_BINARY_NAME)),
        );
    }
    note(
        "the masquerade rules",
        masquerade::remove().map(|()| true).map_err(Into::into),
    );
    let netlink = uplink::netlink()?;
    note("the VXLAN device", uplink::delete_vxlan(&netlink).await);
    // Pods still running keep their veths (their DEL removes those), but
    // lose Beeline's program: their traffic falls back to kernel routing.
    match EndpointStore::load(&args.state_dir) {
        Ok(store) => {
            for ep in store.list() {
                note(
                    &format!("the filter on {}", ep.host_ifname),
                    datapath::detach_from_pod_veth(&ep.host_ifname).map(|()| true),
                );
            }
        }
        Err(e) => note("the endpoint list", Err(e)),
    }
    // Unpinning the links detaches every program; unpinning the maps frees them.
    note(
        "the pinned maps and links",
        match std::fs::remove_dir_all(&args.bpffs_dir) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e.into()),
        },
    );
    note(
        "the endpoint state",
        install::remove(&args.state_dir.join("endpoints.json")),
    );
    match first_error {
        None => Ok(()),
        Some(e) => Err(e),
    }
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
        release_freed_memory();
    }
}

/// Parsing a large node list leaves megabytes of freed heap in glibc's
/// arenas; give them back so the agent's RSS reflects what it holds.
fn release_freed_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Drops endpoints whose host veth vanished without a DEL.
async fn reconcile_periodically(agent: Arc<Mutex<Agent>>) {
    loop {
        tokio::time::sleep(Duration::from_secs(10)).await;
        match agent.lock().await.reconcile(false) {
            Ok(r) if r.removed_stale.is_empty() && r.removed_orphan_entries.is_empty() => {}
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
