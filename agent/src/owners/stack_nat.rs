//! Stack NAT: keeps `BEELINE_STACK_NAT` equal to the connections conntrack
//! holds that the host stack destination-NATed. The egress programs add an
//! entry before the connection's first reply exists; this owner removes it
//! when conntrack reports the connection's end, and every period compares
//! the map with a conntrack dump (events lost to an overflow, entries a
//! replaced map lacks, entries an older agent left).
use std::{sync::Arc, time::Duration};

use anyhow::{Context, Result};
use tokio::sync::mpsc;
use tracing::{info, warn};

use super::{Pace, Pass};
use crate::{
    conntrack::{self, Event},
    maps::StackNatMap,
    metrics::Metrics,
};

const OWNER: &str = "stack_nat";

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
        loop {
            tokio::select! {
                event = events.recv() => match event {
                    Some(Event::Ended(key)) => {
                        if let Err(e) = self.map.remove(&key) {
                            warn!("{e:#}");
                        }
                    }
                    Some(Event::Lost) => {
                        let result = self.resync().await;
                        pace.after(&result, &self.metrics);
                    }
                    None => return,
                },
                _ = pace.due() => {
                    let result = self.resync().await;
                    pace.after(&result, &self.metrics);
                }
            }
        }
    }

    /// The map read first, then conntrack: an entry recorded in between is
    /// in neither snapshot's difference and stays.
    async fn resync(&mut self) -> Result<Pass> {
        let in_map = self.map.keys()?;
        let live = tokio::task::spawn_blocking(conntrack::dnat_replies)
            .await
            .context("the conntrack dump task")?
            .context("dumping conntrack")?;
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
