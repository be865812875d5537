//! ADD, in four steps: prepare (what this node gives the pod), create the
//! attachment (address, veth, links, routes), register it with the agent,
//! answer. What the attachment made is recorded as it is made, and a
//! failure undoes exactly that, nothing another invocation made.
use std::{fs::File, net::Ipv4Addr, path::Path};

use beeline_proto::{Client, ClientError, Endpoint, NodeInfo};
use ipnet::Ipv4Net;
use rtnetlink::Handle;
use serde_json::Value;
use tracing::{info, warn};

use crate::{
    addressing::Addressing,
    config::{Env, NetConf},
    error::{CniError, Result, code, from_agent},
    link::{self, PodLink},
    netns,
    result::{AddResult, Interface},
};

pub async fn add(env: &Env, conf: &NetConf, stdin: &[u8]) -> Result<Value> {
    let ctx = prepare(env, conf, stdin).await?;
    let mut made = Made::default();
    match create_and_register(&ctx, &mut made).await {
        Ok((veth, ip, default_route)) => {
            info!(container = %env.container_id, %ip, host_ifname = %veth.host_ifname, "pod attached");
            Ok(answer(&ctx, veth, ip, default_route))
        }
        Err(e) => {
            warn!(container = %env.container_id, "ADD failed, undoing: {e}");
            made.undo(&ctx).await;
            Err(e)
        }
    }
}

/// Everything ADD needs before it changes anything.
struct Prepared<'a> {
    env: &'a Env,
    conf: &'a NetConf,
    netns_path: &'a Path,
    netns: File,
    agent: Client,
    host: Handle,
    pod: Handle,
    node: NodeInfo,
    pod_cidr: Ipv4Net,
    mtu: u32,
    host_ifname: String,
    addressing: Addressing<'a>,
    /// Where the pod lives, recorded with its address and endpoint so a pod
    /// that vanishes without a DEL releases them.
    pod_home: beeline_ipam::Pod,
}

/// Step 1: the pod's netns, what the agent says about this node, and the
/// names to use. Fails, changing nothing, when the attachment exists.
async fn prepare<'a>(env: &'a Env, conf: &'a NetConf, stdin: &'a [u8]) -> Result<Prepared<'a>> {
    let netns_path = env.netns.as_deref().expect("ADD requires CNI_NETNS");
    let netns = netns::open(netns_path)?;
    let agent = Client::new(conf.agent_socket());
    // Ask the agent while the netlink sockets are opened.
    let node = tokio::task::spawn_blocking({
        let agent = agent.clone();
        move || agent.node_info()
    });
    let host = netns::netlink_here()?;
    let pod = netns::netlink_in(&netns)?;
    let node = node
        .await
        .expect("the node_info task does not panic")
        .map_err(from_agent)?;
    let pod_cidr: Ipv4Net = node.pod_cidr.parse().map_err(|e| {
        CniError::new(
            code::AGENT_REFUSED,
            format!("the agent reported an invalid podCIDR {:?}", node.pod_cidr),
        )
        .with_details(e)
    })?;
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
    Ok(Prepared {
        env,
        conf,
        netns_path,
        agent,
        host,
        pod,
        mtu: conf.mtu.unwrap_or(node.mtu),
        node,
        pod_cidr,
        host_ifname,
        addressing: Addressing::new(env, conf, stdin)?,
        pod_home: beeline_ipam::Pod::of(netns_path, &netns),
        netns,
    })
}

/// What this invocation made, in the order it made it.
#[derive(Default)]
struct Made {
    address: bool,
    veth: bool,
    registration: bool,
}

impl Made {
    /// Undoes what was made, in reverse: the agent forgets the endpoint,
    /// the address is released while the interface still exists (dhcp sends
    /// its DHCPRELEASE through it), then the veth goes.
    async fn undo(self, ctx: &Prepared<'_>) {
        if self.registration
            && let Err(e) = ctx.agent.unregister(&ctx.env.container_id, &ctx.env.ifname)
            && !matches!(e, ClientError::Unreachable { .. })
        {
            warn!("undo: unregister failed: {e}");
        }
        if self.address
            && let Err(e) = ctx.addressing.release()
        {
            warn!("undo: releasing the address failed: {e}");
        }
        if self.veth
            && let Err(e) = link::delete_by_name(&ctx.host, &ctx.host_ifname).await
        {
            warn!("undo: deleting {} failed: {e}", ctx.host_ifname);
        }
    }
}

/// Steps 2 and 3: the address, the veth, its links and routes, and the
/// registration, which the agent works on while the links are set up.
async fn create_and_register(
    ctx: &Prepared<'_>,
    made: &mut Made,
) -> Result<(PodLink, Ipv4Addr, bool)> {
    // A node-local DHCP server answers on the pod's host veth: that end
    // carries the pods' gateway address, and the address comes once the
    // link is up. Otherwise the address comes first: its record names the
    // attachment, so GC finds an ADD killed at any later point.
    let dhcp = ctx.conf.ipam_talks_on_link();
    let host_address = dhcp.then_some(ctx.node.gateway);
    let alias = link::attachment_alias(&ctx.conf.name, &ctx.env.container_id, &ctx.env.ifname);
    let mut ip = None;
    if !dhcp {
        made.address = true;
        ip = Some(ctx.addressing.acquire(ctx.pod_cidr, &ctx.pod_home)?);
    }
    made.veth = true;
    let veth = link::create_veth(
        &ctx.host,
        &ctx.pod,
        &ctx.netns,
        &ctx.host_ifname,
        &ctx.env.ifname,
        ctx.mtu,
    )
    .await
    .inspect_err(|e| {
        // Nothing of it exists when the host name was taken meanwhile.
        if e.code == code::INTERFACE_EXISTS {
            made.veth = false;
        }
    })?;
    let ip = match ip {
        Some(ip) => ip,
        None => {
            link::bring_up(&ctx.host, &ctx.pod, &veth, &alias, host_address).await?;
            made.address = true;
            ctx.addressing.acquire(ctx.pod_cidr, &ctx.pod_home)?
        }
    };
    if !ctx.pod_cidr.contains(&ip) {
        return Err(CniError::new(
            code::IPAM_DELEGATE,
            format!(
                "the IPAM plugin returned {ip}, outside this node's podCIDR {}: other nodes \
                 would not route it here",
                ctx.pod_cidr
            ),
        ));
    }
    let endpoint = Endpoint {
        container_id: ctx.env.container_id.clone(),
        ifname: ctx.env.ifname.clone(),
        netns: ctx.netns_path.display().to_string(),
        ip,
        host_ifname: veth.host_ifname.clone(),
        host_ifindex: veth.host_ifindex,
        host_mac: veth.host_mac,
        pod_mac: veth.pod_mac,
        pod: ctx.env.pod_ref(),
        netns_inode: ctx.pod_home.netns_inode,
        boot_id: ctx.pod_home.boot_id.clone(),
        ipam_dir: ctx.addressing.store().map(|s| s.dir().to_path_buf()),
        shaped: ctx.conf.shaped(),
    };
    made.registration = true;
    let registered = tokio::task::spawn_blocking({
        let agent = ctx.agent.clone();
        move || agent.register(&endpoint)
    });
    let configured = async {
        if !dhcp {
            link::bring_up(&ctx.host, &ctx.pod, &veth, &alias, host_address).await?;
        }
        let default_route = link::configure_pod(&ctx.pod, &veth, ip, ctx.node.gateway).await?;
        link::configure_host(&ctx.host, &veth, ip).await?;
        Ok::<_, CniError>(default_route)
    }
    .await;
    // Both finish before any undo, so an unregister cannot overtake them.
    let registered = registered.await.expect("the register task does not panic");
    let default_route = configured?;
    registered.map_err(from_agent)?;
    Ok((veth, ip, default_route))
}

/// Step 4: the result, after the previous plugins' when chained.
fn answer(ctx: &Prepared<'_>, veth: PodLink, ip: Ipv4Addr, default_route: bool) -> Value {
    AddResult {
        interfaces: vec![
            Interface {
                name: veth.host_ifname,
                mac: veth.host_mac.to_string(),
                sandbox: None,
            },
            Interface {
                name: ctx.env.ifname.clone(),
                mac: veth.pod_mac.to_string(),
                sandbox: Some(ctx.netns_path.display().to_string()),
            },
        ],
        ip,
        ip_interface: 1,
        gateway: ctx.node.gateway,
        default_route,
    }
    .to_json_after(&ctx.conf.cni_version, ctx.conf.prev_result.as_ref())
}
