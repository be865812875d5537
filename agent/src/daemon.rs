//! `beeline-agent run`: loads the datapath, restores what the previous
//! agent left, then runs the owners, the CNI socket and the health server
//! until SIGTERM. Pinned maps and links keep pod traffic flowing while no
//! agent runs.
use std::sync::Arc;

use anyhow::{Context, Result};
use tracing::{info, warn};

use crate::{
    api::{self, Api},
    cli::RunArgs,
    datapath::{self, Datapath},
    health::{self, Published},
    metrics::Metrics,
    owners::{
        cni_install::CniInstall,
        endpoints::Registry,
        nodes::{NetworkConfig, NodeSync},
        services::Services,
        stack_nat::StackNat,
    },
    retire::{self, Retirer},
    sources,
    state::EndpointStore,
    status::Conditions,
    uplink,
};

pub async fn run(args: RunArgs) -> Result<()> {
    let (nodes, node_source) = match &args.nodes_file {
        Some(path) => sources::nodes::from_file(path.clone())?,
        None => sources::nodes::from_kubernetes(kube_client(args.kubeconfig.as_deref()).await?),
    };
    let services_input = match (&args.services_file, args.kube_proxy_replacement) {
        (_, false) => None,
        (Some(path), true) => Some(sources::services::from_file(path.clone())?),
        (None, true) => Some(sources::services::from_kubernetes(
            kube_client(args.kubeconfig.as_deref()).await?,
        )),
    };
    let cgroup = match &args.cgroup_root {
        Some(dir) => dir.clone(),
        None if args.kube_proxy_replacement => datapath::cgroup2_root()?,
        None => Default::default(),
    };
    let mut datapath = Datapath::load(&args.bpffs_dir, args.ebpf_debug_logs, args.pod_attach)?;
    let ebpf_logs = datapath
        .logger
        .take()
        .map(|l| tokio::spawn(datapath::forward_logs(l)));
    let metrics = Arc::new(Metrics::new());
    let conditions = Conditions::default();
    let notices = Conditions::default();
    // One netlink socket per owner: the kernel runs one dump at a time on a
    // socket and answers a second with EBUSY, and the owners' passes overlap.
    let netlink = uplink::netlink()?;

    let (mut node_sync, node_state) = NodeSync::new(
        args.node_name.clone(),
        NetworkConfig {
            mode: args.mode,
            vni: args.vni,
            vxlan_port: args.vxlan_port,
            vxlan_encap: args.vxlan_encap.into(),
            pod_mtu: args.pod_mtu,
            no_masquerade: args.no_masquerade_cidrs.clone(),
            masquerade: !args.no_masquerade,
            services: args.kube_proxy_replacement,
        },
        uplink::netlink()?,
        datapath.programs.clone(),
        datapath.remote_cidrs,
        datapath.node_config,
        metrics.clone(),
        conditions.clone(),
    );
    let mut registry = Registry {
        store: EndpointStore::load(&args.state_dir)?,
        map: datapath.endpoints,
        programs: datapath.programs.clone(),
        netlink: netlink.clone(),
        retirer: Retirer::start().context("starting the veth retirer")?,
        node: node_state.clone(),
        metrics: metrics.clone(),
        conditions: conditions.clone(),
    };
    // Every map is filled before any program of this agent is attached (a
    // restarted or upgraded agent swaps its programs in without a packet
    // seeing an empty map): endpoints, then the node's maps and programs,
    // then the pods' programs. Node sync failures are retried by its loop.
    let (live, mut report) = registry.restore_maps().await?;
    let initial = nodes.borrow().clone();
    if let Err(e) = node_sync.reconcile(&initial).await {
        warn!("first node sync: {e:#}");
    }
    registry.restore_programs(&live, &mut report).await?;
    info!(?report, replaced_maps = ?datapath.replaced_maps, "restored persisted endpoints");
    for ifname in retire::leftovers(&netlink).await {
        info!(ifname, "deleting a retired veth left by the previous agent");
        registry.retirer.retire(ifname);
    }

    let mut services = datapath.services;
    if !args.kube_proxy_replacement {
        // Turned off (or never on): no socket translation, empty maps.
        if datapath.programs.detach_cgroup()? {
            info!("Service translation turned off: socket programs detached");
        }
        let current = services.read()?;
        services.apply(&current, &Default::default())?;
    }

    let listener = api::bind(&args.socket)?;
    info!(
        socket = %args.socket.display(),
        node = %args.node_name,
        state = ?*node_state.borrow(),
        "agent serving"
    );
    let (registry, registry_task) = registry.start(args.resync_period);
    let mut tasks = vec![
        node_source,
        registry_task,
        tokio::spawn(node_sync.run(nodes, args.resync_period)),
        tokio::spawn(
            StackNat {
                map: datapath.stack_nat,
                capacity: datapath::stack_nat_entries(),
                metrics: metrics.clone(),
            }
            .run(args.resync_period),
        ),
        tokio::spawn(
            CniInstall {
                bin_dir: args.cni_bin_dir.clone(),
                binary: args.cni_binary.clone(),
                conf_dir: args.cni_conf_dir.clone(),
                socket: args.socket.clone(),
                data_dir: args.ipam_data_dir.clone(),
                chain: args.chain_plugins.clone(),
                notices: notices.clone(),
            }
            .run(node_state.clone(), metrics.clone(), args.resync_period),
        ),
        tokio::spawn(api::serve(
            listener,
            Api {
                node_name: args.node_name.clone(),
                node: node_state.clone(),
                registry,
                metrics: metrics.clone(),
            },
        )),
    ];
    if let Some((input, source)) = services_input {
        tasks.push(source);
        tasks.push(tokio::spawn(
            Services::new(
                args.node_name.clone(),
                services,
                datapath.programs.clone(),
                cgroup,
                args.state_dir.clone(),
                metrics.clone(),
                conditions.clone(),
            )
            .run(input, node_state.clone(), args.resync_period),
        ));
    }
    let published = Published {
        node: node_state,
        conditions,
        notices,
        metrics,
        bpffs: args.bpffs_dir.clone(),
    };
    let health_addr = args.health_addr;
    tasks.push(tokio::spawn(async move {
        if let Err(e) = health::serve(health_addr, published).await {
            tracing::error!("health and metrics server: {e:#}");
        }
    }));
    tasks.extend(ebpf_logs);

    shutdown_signal().await;
    info!("shutting down; pinned maps and links keep pod traffic flowing");
    for task in tasks {
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

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("install SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
