//! Where the agent's inputs come from. Each kind has one source feeding a
//! `watch` channel of snapshots, so its owner has a single code path:
//!
//! - the Kubernetes API: a kube-rs watcher folded into a store that keeps,
//!   per object, only what the agent needs (a reflector of projections:
//!   5,000 full Nodes are tens of MB, their routes a few hundred KB);
//! - a file as `kubectl get -o yaml|json` prints it, reloaded on change.
use std::{collections::BTreeMap, path::PathBuf, time::Duration};

use anyhow::Result;
use futures::{Stream, StreamExt};
use kube::{Resource, ResourceExt, runtime::watcher};
use tokio::sync::watch;
use tracing::{info, warn};

pub mod nodes;
pub mod services;

/// Folds watcher events into snapshots of what `project` keeps of each
/// object, published once each (re)list is complete and after each change.
pub async fn reflect<K, T>(
    events: impl Stream<Item = Result<watcher::Event<K>, watcher::Error>>,
    project: impl Fn(&K) -> Option<T>,
    tx: watch::Sender<Vec<T>>,
) where
    K: Resource,
    K::DynamicType: Default,
    T: Clone + PartialEq,
{
    let key = |obj: &K| format!("{}/{}", obj.namespace().unwrap_or_default(), obj.name_any());
    let mut current: BTreeMap<String, T> = BTreeMap::new();
    let mut relisting: Option<BTreeMap<String, T>> = None;
    let mut events = std::pin::pin!(events);
    while let Some(event) = events.next().await {
        let changed = match event {
            Ok(watcher::Event::Init) => {
                relisting = Some(BTreeMap::new());
                false
            }
            Ok(watcher::Event::InitApply(obj)) => {
                if let (Some(buf), Some(item)) = (relisting.as_mut(), project(&obj)) {
                    buf.insert(key(&obj), item);
                }
                false
            }
            Ok(watcher::Event::InitDone) => {
                current = relisting.take().unwrap_or_default();
                info!(
                    kind = %K::kind(&Default::default()),
                    objects = current.len(),
                    "synced from the API"
                );
                true
            }
            Ok(watcher::Event::Apply(obj)) => match project(&obj) {
                Some(item) => current.insert(key(&obj), item.clone()) != Some(item),
                None => current.remove(&key(&obj)).is_some(),
            },
            Ok(watcher::Event::Delete(obj)) => current.remove(&key(&obj)).is_some(),
            Err(e) => {
                warn!(kind = %K::kind(&Default::default()), "watch: {e}; retrying");
                false
            }
        };
        if changed && tx.send(current.values().cloned().collect()).is_err() {
            return;
        }
    }
}

/// A file source: `parse` runs now (so a bad file fails the start), then
/// again whenever the file's modification time changes. A file that stops
/// parsing keeps the last good snapshot.
pub fn watch_file<T: Send + Sync + 'static>(
    path: PathBuf,
    parse: fn(&std::path::Path) -> Result<Vec<T>>,
) -> Result<(watch::Receiver<Vec<T>>, tokio::task::JoinHandle<()>)> {
    let initial = parse(&path)?;
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
            match parse(&path) {
                Ok(snapshot) => {
                    info!(file = %path.display(), objects = snapshot.len(), "input file changed");
                    if tx.send(snapshot).is_err() {
                        return;
                    }
                }
                Err(e) => warn!("ignoring an unreadable input file: {e:#}"),
            }
        }
    });
    Ok((rx, task))
}
