//! The CNI installer: once the node can network pods, the CNI binary and
//! then, last and atomically, the conflist, whose presence tells the kubelet
//! the node is ready. Every resync puts back a config or binary that was
//! removed or changed.
use std::{collections::BTreeMap, path::PathBuf, sync::Arc, time::Duration};

use anyhow::Result;
use tokio::sync::watch;
use tracing::{info, warn};

use super::{Pace, Pass};
use crate::{
    install,
    metrics::Metrics,
    status::{Conditions, NodeState},
};

const OWNER: &str = "cni_install";

/// Where to install the CNI binary and config, and what to chain.
#[derive(Debug, Clone, Default)]
pub struct CniInstall {
    pub bin_dir: Option<PathBuf>,
    pub binary: Option<PathBuf>,
    pub conf_dir: Option<PathBuf>,
    pub socket: PathBuf,
    /// The CNI binary's IP store, when not its default.
    pub data_dir: Option<PathBuf>,
    /// Plugins to chain after Beeline (portmap, bandwidth) when present.
    pub chain: Vec<String>,
    /// Where a chained plugin that is missing is noted (`/readyz` detail).
    pub notices: Conditions,
}

impl CniInstall {
    /// Runs until the node state channel closes.
    pub async fn run(
        self,
        mut node: watch::Receiver<NodeState>,
        metrics: Arc<Metrics>,
        period: Duration,
    ) {
        if self.bin_dir.is_none() && self.conf_dir.is_none() {
            return;
        }
        let mut pace = Pace::new(OWNER, period);
        let mut installed = false;
        loop {
            let ready = node.borrow_and_update().not_ready.is_none();
            let result = if ready {
                self.reconcile(installed, &metrics).map(|()| {
                    installed = true;
                    Pass::Done
                })
            } else {
                Ok(Pass::Done)
            };
            pace.after(&result, &metrics);
            tokio::select! {
                changed = node.changed() => if changed.is_err() { return },
                _ = pace.due() => {}
            }
        }
    }

    /// Writes what is missing or differs; after the first install, anything
    /// written again is a repair.
    fn reconcile(&self, installed: bool, metrics: &Metrics) -> Result<()> {
        let source = match &self.binary {
            Some(path) => path.clone(),
            None => install::default_cni_binary()?,
        };
        if let Some(bin_dir) = &self.bin_dir
            && let Some(dest) = install::install_binary(&source, bin_dir)?
        {
            info!(path = %dest.display(), "installed the CNI binary");
            if installed {
                metrics.count_repair("cni_binary");
            }
        }
        let Some(conf_dir) = &self.conf_dir else {
            return Ok(());
        };
        let conflist = install::conflist(
            &self.socket,
            self.data_dir.as_deref(),
            &source,
            self.bin_dir.as_deref(),
            &self.chain,
        )?;
        let mut notices = BTreeMap::new();
        for plugin in &self.chain {
            let present = !conflist.missing.contains(plugin);
            metrics.set_chained_plugin(plugin, present);
            if !present {
                notices.insert(
                    format!("{plugin}_missing"),
                    format!(
                        "{plugin} is not in the CNI bin dir, so the network config does not \
                         chain it: {}",
                        match plugin.as_str() {
                            "portmap" => "hostPort mappings are ignored",
                            _ => "bandwidth annotations are ignored",
                        }
                    ),
                );
            }
        }
        self.notices.publish(OWNER, &notices);
        if let Some(dest) = install::write_conflist(conf_dir, &conflist.json)? {
            if !conflist.missing.is_empty() {
                warn!(missing = ?conflist.missing, "chained plugins missing from the CNI bin dir");
            }
            info!(path = %dest.display(), versions = %conflist.json["cniVersions"], "wrote the CNI network config: this node can network pods");
            if installed {
                metrics.count_repair("cni_config");
            }
        }
        Ok(())
    }
}
