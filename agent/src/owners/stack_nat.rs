//! Stack NAT: keeps `BEELINE_STACK_NAT` equal to the connections conntrack
//! holds that the host stack destination-NATed. The egress programs add an
//! entry before the connection's first reply exists; this owner removes it
//! when conntrack reports the connection's end, and every period compares
//! the map with a conntrack dump (events lost to an overflow, entries a
//! replaced map lacks, entries an older agent left).
//!
//! A client reopening a connection on the same port (a closed or reset one,
//! or a port reused while conntrack still holds the old connection in
//! TIME_WAIT) makes conntrack end the old connection as the new one starts:
//! both have the same key. So an ended key is removed only after a grace
//! period, and only when conntrack holds no connection with it by then.
use std::{
    collections::VecDeque,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use beeline_common::FlowKey;
use tokio::sync::mpsc;
use tracing::{info, warn};

use super::{Pace, Pass};
use crate::{
    conntrack::{self, Event},
    maps::StackNatMap,
    metrics::Metrics,
};

const OWNER: &str = "stack_nat";
/// Long enough for a reopened connection to be in conntrack.
const GRACE: Duration = Duration::from_secs(1);
/// More ended keys than this at once: one dump is cheaper than a lookup each.
const LOOKUPS_MAX: usize = 2_000;

pub struct StackNat {
    pub map: StackNatMap,
    pub capacity: u32,
    pub metrics: Arc<Metrics>,
}

impl StackNat {
    pub async fn run(mut self, period: Duration) {
        let (tx, mut events) = mpsc::unbounded_channel();
        let _listener = match conntrack::listen(tx) {
            Ok(thread) => Some(thread),
            Err(e) => {
                warn!(
                    "conntrack events unavailable ({e}): ended connections are found by the periodic resync"
                );
                None
            }
        };
        let mut pace = Pace::new(OWNER, period);
        let result = self.resync().await;
        pace.after(&result, &self.metrics);
        let mut ended: VecDeque<(FlowKey, Instant)> = VecDeque::new();
        loop {
            let next_due = ended.front().map(|(_, at)| *at + GRACE);
            tokio::select! {
                event = events.recv() => match event {
                    Some(Event::Ended(key)) => ended.push_back((key, Instant::now())),
                    Some(Event::Lost) => {
                        ended.clear();
                        let result = self.resync().await;
                        pace.after(&result, &self.metrics);
                    }
                    None => return,
                },
                _ = tokio::time::sleep_until(next_due.unwrap_or_else(Instant::now).into()), if next_due.is_some() => {
                    let now = Instant::now();
                    let due = ended.iter().take_while(|(_, at)| *at + GRACE <= now).count();
                    let keys: Vec<FlowKey> = ended.drain(..due).map(|(k, _)| k).collect();
                    if keys.len() > LOOKUPS_MAX {
                        let result = self.resync().await;
                        pace.after(&result, &self.metrics);
                    } else if let Err(e) = self.remove_ended(keys).await {
                        warn!("{e:#}");
                    }
                }
                _ = pace.due() => {
                    let result = self.resync().await;
                    pace.after(&result, &self.metrics);
                }
            }
        }
    }

    /// Removes the entries of `keys` no connection in conntrack has.
    async fn remove_ended(&mut self, keys: Vec<FlowKey>) -> Result<()> {
        let gone = tokio::task::spawn_blocking(move || {
            keys.into_iter()
                .filter_map(|k| match conntrack::dnat_reply_exists(&k) {
                    Ok(true) => None,
                    Ok(false) => Some(Ok(k)),
                    Err(e) => Some(Err(e)),
                })
                .collect::<std::io::Result<Vec<_>>>()
        })
        .await
        .context("the conntrack lookup task")?
        .context("looking up conntrack")?;
        for key in &gone {
            self.map.remove(key)?;
        }
        Ok(())
    }

    /// The map read first, then conntrack: an entry recorded in between is
    /// in neither snapshot's difference and stays.
    async fn resync(&mut self) -> Result<Pass> {
        let in_map = self.map.keys()?;
        let live = tokio::task::spawn_blocking(conntrack::dnat_replies)
            .await
            .context("the conntrack dump task")?
            .context("dumping conntrack")?;
        // Entries an older agent's programs recorded without the switch.
        if !in_map.is_empty() {
            self.map.switch_on()?;
        }
        let stale: Vec<_> = in_map.difference(&live).copied().collect();
        for key in &stale {
            self.map.remove(key)?;
        }
        let mut added = 0;
        for key in live.difference(&in_map) {
            self.map.insert(*key)?;
            added += 1;
        }
        if !stale.is_empty() || added > 0 {
            info!(
                removed = stale.len(),
                added, "stack-NAT map resynced with conntrack"
            );
        }
        self.metrics
            .count_action("removed_stack_nat_entry", stale.len());
        self.metrics.count_action("added_stack_nat_entry", added);
        self.metrics
            .set_map_fill("stack_nat", live.len(), self.capacity);
        Ok(Pass::Done)
    }
}
