//! Where the agent learns about Nodes. Both sources publish complete
//! snapshots into one `watch` channel, so the rest of the agent has a single
//! code path: the static NodeList file (reloaded on change) and the
//! Kubernetes API (kube-rs runtime watcher: relists, reconnects, deletes).
use std::{collections::BTreeMap, path::PathBuf, time::Duration};

use anyhow::Result;
use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::Node;
use kube::{
    Api, Client,
    runtime::{WatchStreamExt, watcher},
};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::nodes::{self, NodeRoute};

pub type Snapshot = Vec<NodeRoute>;

/// Static source: re-reads the file when its modification time changes.
/// The first read happens before this returns, so a bad file fails fast.
pub fn static_file(
    path: PathBuf,
) -> Result<(watch::Receiver<Snapshot>, tokio::task::JoinHandle<()>)> {
    let initial = nodes::read_node_list(&path)?;
    let (tx, rx) = watch::channel(initial);
    let task = tokio::spawn(async move {
        let mtime = |p: &PathBuf| std::fs::metadata(p).and_then(|m| m.modified()).ok();
        let mut last = mtime(&path);
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let now = mtime(&path);
            if now == last {
                continue;
            }
            last = now;
            match nodes::read_node_list(&path) {
                Ok(snapshot) => {
                    info!(nodes = snapshot.len(), "node list file changed");
                    if tx.send(snapshot).is_err() {
                        return;
                    }
                }
                Err(e) => warn!("ignoring unreadable node list: {e:#}"),
            }
        }
    });
    Ok((rx, task))
}

/// Kubernetes source: a kube-rs watcher on all Nodes.
pub fn kubernetes(client: Client) -> (watch::Receiver<Snapshot>, tokio::task::JoinHandle<()>) {
    let (tx, rx) = watch::channel(Vec::new());
    let api: Api<Node> = Api::all(client);
    let events = watcher(api, watcher::Config::default()).default_backoff();
    let task = tokio::spawn(follow(events, tx));
    (rx, task)
}

/// Folds watcher events into snapshots: published after the initial list
/// (and every relist) completes, and after each change.
pub async fn follow<S>(events: S, tx: watch::Sender<Snapshot>)
where
    S: Stream<Item = Result<watcher::Event<Node>, watcher::Error>>,
{
    let mut current: BTreeMap<String, NodeRoute> = BTreeMap::new();
    let mut relisting: Option<BTreeMap<String, NodeRoute>> = None;
    let mut events = std::pin::pin!(events);
    while let Some(event) = events.next().await {
        let changed = match event {
            Ok(watcher::Event::Init) => {
                relisting = Some(BTreeMap::new());
                false
            }
            Ok(watcher::Event::InitApply(node)) => {
                if let (Some(buf), Some(route)) = (relisting.as_mut(), NodeRoute::from_node(&node))
                {
                    buf.insert(route.name.clone(), route);
                }
                false
            }
            Ok(watcher::Event::InitDone) => {
                current = relisting.take().unwrap_or_default();
                info!(nodes = current.len(), "node list synced from the API");
                true
            }
            Ok(watcher::Event::Apply(node)) => match NodeRoute::from_node(&node) {
                Some(route) => current.insert(route.name.clone(), route.clone()) != Some(route),
                None => false,
            },
            Ok(watcher::Event::Delete(node)) => node
                .metadata
                .name
                .as_ref()
                .is_some_and(|name| current.remove(name).is_some()),
            Err(e) => {
                warn!("node watch: {e}; retrying");
                false
            }
        };
        if changed && tx.send(current.values().cloned().collect()).is_err() {
            return;
        }
    }
}
