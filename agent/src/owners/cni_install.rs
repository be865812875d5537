//! The CNI installer: once the node can network pods, the CNI binary and
//! then, last and atomically, the conflist, whose presence tells the kubelet
//! the node is ready. Every resync puts back a config or binary that was
//! removed or changed.
use std::{path::PathBuf, sync::Arc, time::Duration};

use anyhow::Result;
use tokio::sync::watch;
use tracing::info;

use super::{Pace, Pass};
use crate::{install, metrics::Metrics, status::NodeState};

/// Where to install the CNI binary and config.
#[derive(Debug, Clone, Default)]
pub struct CniInstall {
    pub bin_dir: Option<PathBuf>,
    pub binary: Option<PathBuf>,
    pub conf_dir: Option<PathBuf>,
    pub socket: PathBuf,
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
        let mut pace = Pace::new("cni_install", period);
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
        if let Some(bin_dir) = &self.bin_dir {
            let source = match &self.binary {
                Some(path) => path.clone(),
                None => install::default_cni_binary()?,
            };
            if let Some(dest) = install::install_binary(&source, bin_dir)? {
                info!(path = %dest.display(), "installed the CNI binary");
                if installed {
                    metrics.count_repair("cni_binary");
                }
            }
        }
        if let Some(conf_dir) = &self.conf_dir
            && let Some(dest) = install::write_conflist(conf_dir, &self.socket)?
        {
            info!(path = %dest.display(), "wrote the CNI network config: this node can network pods");
            if installed {
                metrics.count_repair("cni_config");
            }
        }
        Ok(())
    }
}
