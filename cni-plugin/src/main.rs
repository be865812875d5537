//! `beeline`: the CNI plugin binary. The runtime executes it with CNI_*
//! variables and the network configuration on stdin; the result (or the
//! spec's error object) goes to stdout.
mod config;
mod error;
mod ipam;
mod link;
mod netns;
mod result;

use std::{
    io::{Read, Write},
    process::ExitCode,
};

use beeline_proto::{Client, ClientError, Endpoint};
use ipnet::Ipv4Net;
use serde_json::{Value, json};
use tracing::{info, warn};

use crate::{
    config::{Command, Env, MAX_CONFIG_BYTES, NetConf, SUPPORTED_VERSIONS},
    error::{CniError, Result, code, from_agent},
    ipam::{IpStore, Owner},
    result::{AddResult, Interface},
};

/// Version used for error objects when the config did not say.
const FALLBACK_VERSION: &str = "1.1.0";

fn main() -> ExitCode {
    let get = |k: &str| std::env::var(k).ok();
    let mut stdin = Vec::new();
    let read = std::io::stdin()
        .take(MAX_CONFIG_BYTES as u64 + 1)
        .read_to_end(&mut stdin);
    let version = requested_version(&stdin);
    let outcome = match read {
        Ok(_) => run(&get, &stdin),
        Err(e) => Err(CniError::new(code::IO_FAILURE, "cannot read stdin").with_details(e)),
    };
    let mut stdout = std::io::stdout().lock();
    match outcome {
        Ok(Some(out)) => {
            let _ = writeln!(stdout, "{out}");
            ExitCode::SUCCESS
        }
        Ok(None) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            let _ = writeln!(stdout, "{}", e.to_json(&version));
            ExitCode::FAILURE
        }
    }
}

/// The cniVersion the caller asked for, for error objects.
fn requested_version(stdin: &[u8]) -> String {
    serde_json::from_slice::<Value>(stdin)
        .ok()
        .and_then(|v| v.get("cniVersion")?.as_str().map(str::to_string))
        .filter(|v| SUPPORTED_VERSIONS.contains(&v.as_str()))
        .unwrap_or_else(|| FALLBACK_VERSION.to_string())
}

fn run(get: &impl Fn(&str) -> Option<String>, stdin: &[u8]) -> Result<Option<Value>> {
    let command = Env::command_from(get)?;
    if command == Command::Version {
        return Ok(Some(json!({
            "cniVersion": requested_version(stdin),
            "supportedVersions": SUPPORTED_VERSIONS,
        })));
    }
    let conf = NetConf::parse(stdin)?;
    init_logging(&conf);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CniError::new(code::IO_FAILURE, "cannot start the runtime").with_details(e))?;
    match command {
        Command::Add => {
            let env = Env::for_attachment(command, get)?;
            runtime.block_on(add(&env, &conf)).map(Some)
        }
        Command::Del => {
            let env = Env::for_attachment(command, get)?;
            runtime.block_on(del(&env, &conf)).map(|()| None)
        }
        Command::Status => status(&conf).map(|()| None),
        Command::Check | Command::Gc => Err(CniError::new(
            code::INVALID_ENV,
            format!("CNI_COMMAND {command:?} is not supported by this version of beeline"),
        )),
        Command::Version => unreachable!("handled above"),
    }
}

fn init_logging(conf: &NetConf) {
    let level: tracing::Level = conf
        .log_level
        .as_deref()
        .and_then(|l| l.parse().ok())
        .unwrap_or(tracing::Level::WARN);
    let builder = tracing_subscriber::fmt()
        .with_max_level(level)
        .with_ansi(false);
    // stdout carries the result: logs go to logFile, else stderr.
    let file = conf.log_file.as_ref().and_then(|path| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .ok()
    });
    let _ = match file {
        Some(file) => builder.with_writer(std::sync::Mutex::new(file)).try_init(),
        None => builder.with_writer(std::io::stderr).try_init(),
    };
}

async fn add(env: &Env, conf: &NetConf) -> Result<Value> {
    let netns_path = env.netns.as_ref().expect("ADD requires CNI_NETNS");
    let netns = netns::open(netns_path)?;
    let agent = Client::new(conf.agent_socket());
    let node = agent.node_info().map_err(from_agent)?;
    let pod_cidr: Ipv4Net = node.pod_cidr.parse().map_err(|e| {
        CniError::new(
            code::AGENT_REFUSED,
            format!("the agent reported an invalid podCIDR {:?}", node.pod_cidr),
        )
        .with_details(e)
    })?;
    let mtu = conf.mtu.unwrap_or(node.mtu);
    let host = netns::netlink_here()?;
    let pod = netns::netlink_in(&netns)?;
    let host_ifname = link::host_ifname(&env.container_id, &env.ifname);
    if link::link_by_name(&host, &host_ifname).await?.is_some() {
        return Err(CniError::new(
            code::INTERFACE_EXISTS,
            format!(
                "interface {} of container {} is already set up (host side {host_ifname}); \
                 DEL it first",
                env.ifname, env.container_id
            ),
        ));
    }

    let store = IpStore::open(conf.ipam_dir())?;
    let owner = Owner {
        container_id: env.container_id.clone(),
        ifname: env.ifname.clone(),
    };
    let ip = store.allocate(pod_cidr, &owner)?;
    let setup = async {
        let veth = link::create_veth(&host, &pod, &netns, &host_ifname, &env.ifname, mtu).await?;
        link::configure_pod(&pod, &veth, ip, node.gateway).await?;
        link::configure_host(&host, &veth, ip).await?;
        let endpoint = Endpoint {
            container_id: env.container_id.clone(),
            ifname: env.ifname.clone(),
            netns: netns_path.display().to_string(),
            ip,
            host_ifname: veth.host_ifname.clone(),
            host_ifindex: veth.host_ifindex,
            host_mac: veth.host_mac,
            pod_mac: veth.pod_mac,
        };
        agent.register(&endpoint).map_err(from_agent)?;
        Ok::<_, CniError>(veth)
    };
    match setup.await {
        Ok(veth) => {
            info!(container = %env.container_id, %ip, host_ifname, "pod attached");
            Ok(AddResult {
                interfaces: vec![
                    Interface {
                        name: veth.host_ifname,
                        mac: veth.host_mac.to_string(),
                        sandbox: None,
                    },
                    Interface {
                        name: env.ifname.clone(),
                        mac: veth.pod_mac.to_string(),
                        sandbox: Some(netns_path.display().to_string()),
                    },
                ],
                ip,
                ip_interface: 1,
                gateway: node.gateway,
            }
            .to_json(&conf.cni_version))
        }
        Err(e) => {
            warn!(container = %env.container_id, "ADD failed, undoing: {e}");
            undo_add(&agent, &host, &store, &owner, &host_ifname).await;
            Err(e)
        }
    }
}

/// Best-effort removal of everything an ADD may have created.
async fn undo_add(
    agent: &Client,
    host: &rtnetlink::Handle,
    store: &IpStore,
    owner: &Owner,
    host_ifname: &str,
) {
    if let Err(e) = agent.unregister(&owner.container_id, &owner.ifname)
        && !matches!(e, ClientError::Unreachable { .. })
    {
        warn!("undo: unregister failed: {e}");
    }
    if let Err(e) = link::delete_by_name(host, host_ifname).await {
        warn!("undo: deleting {host_ifname} failed: {e}");
    }
    if let Err(e) = store.release(owner) {
        warn!("undo: releasing the IP failed: {e}");
    }
}

/// DEL succeeds when things are already gone: each step is idempotent.
async fn del(env: &Env, conf: &NetConf) -> Result<()> {
    let owner = Owner {
        container_id: env.container_id.clone(),
        ifname: env.ifname.clone(),
    };
    let agent = Client::new(conf.agent_socket());
    match agent.unregister(&env.container_id, &env.ifname) {
        Ok(_) => {}
        // The agent drops entries whose host veth is gone when it (re)starts.
        Err(e @ ClientError::Unreachable { .. }) => {
            warn!("agent unreachable during DEL, it will reconcile on start: {e}")
        }
        Err(e) => return Err(from_agent(e)),
    }
    let host = netns::netlink_here()?;
    let host_ifname = link::host_ifname(&env.container_id, &env.ifname);
    link::delete_by_name(&host, &host_ifname).await?;
    let store = IpStore::open(conf.ipam_dir())?;
    let released = store.release(&owner)?;
    info!(container = %env.container_id, ?released, "pod detached");
    Ok(())
}

/// STATUS: ready when the agent answers with a podCIDR.
fn status(conf: &NetConf) -> Result<()> {
    Client::new(conf.agent_socket())
        .node_info()
        .map(|_| ())
        .map_err(|e| {
            let err = from_agent(e);
            CniError::new(code::NOT_AVAILABLE, err.msg).with_details(err.details)
        })
}
