//! `beeline-agent uninstall`: removes everything Beeline installed on the
//! node. Each step runs even if an earlier one failed; the first error is
//! reported at the end.
use anyhow::Result;
use tracing::{info, warn};

use crate::{cli::UninstallArgs, datapath, install, netfilter, state::EndpointStore, uplink};

pub async fn uninstall(args: UninstallArgs) -> Result<()> {
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
        netfilter::table::remove()
            .map(|()| true)
            .map_err(Into::into),
    );
    note(
        "the FORWARD accept rules",
        netfilter::forward::remove().map_err(Into::into),
    );
    let netlink = uplink::netlink()?;
    note(
        "the routes to other nodes' pods",
        crate::routes::remove_all(&netlink).await.map(|n| n > 0),
    );
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
