//! The agent's owners. Each holds its own state, runs in its own task and
//! brings the kernel in line with what its inputs ask for:
//!
//! - [`endpoints`]: the endpoint registry behind the CNI socket (map
//!   entries, pod programs, the persisted endpoints);
//! - [`nodes`]: Nodes into this node's podCIDR and uplink, the remote CIDR
//!   map and the masquerade table; publishes [`crate::status::NodeState`];
//! - [`cni_install`]: the CNI binary and config, once the node is ready;
//! - [`stack_nat`]: the connections the host stack NATed, from conntrack.
//!
//! Each reconciles when its input changes, every period (which repairs what
//! was changed behind its back), and after a failure sooner, with backoff.
//! New inputs (Services, NetworkPolicies) get an owner of their own.
use std::time::{Duration, Instant};

use std::collections::BTreeMap;

use tracing::{info, warn};

use crate::metrics::Metrics;

pub mod cni_install;
pub mod endpoints;
pub mod nodes;
pub mod services;
pub mod stack_nat;

const FIRST_RETRY: Duration = Duration::from_millis(200);
/// Failures are logged at most this often per owner (with a count).
const LOG_EVERY: Duration = Duration::from_secs(30);

/// What a reconcile pass found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pass {
    /// In line with the inputs: next pass at the period.
    Done,
    /// Waiting for something outside the agent (an address, a podCIDR):
    /// look again soon, without calling it a failure.
    Waiting,
    /// Damage was found and repaired: verify in a second (the damage stays
    /// listed in the conditions until a pass finds none).
    Repaired,
}

/// How soon a repair is verified.
const VERIFY_AFTER: Duration = Duration::from_secs(1);

/// When an owner reconciles next: at its period after a good pass, sooner
/// (doubling up to the period) while it fails or waits.
pub struct Pace {
    owner: &'static str,
    period: Duration,
    retry: Duration,
    next: Instant,
    failures: u64,
    last_log: Option<Instant>,
}

impl Pace {
    pub fn new(owner: &'static str, period: Duration) -> Pace {
        Pace {
            owner,
            period,
            retry: FIRST_RETRY,
            next: Instant::now() + period,
            failures: 0,
            last_log: None,
        }
    }

    /// Resolves when the next pass is due.
    pub async fn due(&self) {
        tokio::time::sleep_until(self.next.into()).await
    }

    /// Schedules the next pass after `result`, logging failures at a
    /// bounded rate and counting each in `beeline_reconcile_errors_total`.
    pub fn after(&mut self, result: &anyhow::Result<Pass>, metrics: &Metrics) {
        let now = Instant::now();
        match result {
            Ok(Pass::Done) => {
                self.failures = 0;
                self.retry = FIRST_RETRY;
                self.next = now + self.period;
            }
            Ok(Pass::Waiting) => self.sooner(now),
            Ok(Pass::Repaired) => {
                self.failures = 0;
                self.retry = FIRST_RETRY;
                self.next = now + VERIFY_AFTER.min(self.period);
            }
            Err(e) => {
                self.failures += 1;
                metrics.count_reconcile_error(self.owner);
                if self.last_log.is_none_or(|t| now - t >= LOG_EVERY) {
                    self.last_log = Some(now);
                    warn!(
                        owner = self.owner,
                        failures = self.failures,
                        retry_in = ?self.retry,
                        "reconcile failed: {e:#}"
                    );
                }
                self.sooner(now);
            }
        }
    }

    fn sooner(&mut self, now: Instant) {
        self.next = now + self.retry;
        self.retry = (self.retry * 2).min(self.period);
    }
}

/// Counts a repair of `kind` and lists `what` under it.
pub fn repaired(metrics: &Metrics, found: &mut BTreeMap<String, String>, kind: &str, what: &str) {
    info!(kind, what, "repaired drift");
    metrics.count_repair(kind);
    listed(found, kind, what);
}

/// Lists `what` under `kind` in a pass's findings.
pub fn listed(found: &mut BTreeMap<String, String>, kind: &str, what: &str) {
    let detail = found.entry(kind.to_string()).or_default();
    if !detail.is_empty() {
        detail.push_str(", ");
    }
    detail.push_str(what);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backs_off_to_the_period_and_resets_after_a_good_pass() {
        let metrics = Metrics::new();
        let mut pace = Pace::new("test", Duration::from_secs(10));
        let fail = || Err(anyhow::anyhow!("boom"));
        let mut gaps = Vec::new();
        for _ in 0..8 {
            let before = Instant::now();
            pace.after(&fail(), &metrics);
            gaps.push((pace.next - before).as_millis() / 100);
        }
        assert_eq!(gaps, [2, 4, 8, 16, 32, 64, 100, 100]);
        let before = Instant::now();
        pace.after(&Ok(Pass::Done), &metrics);
        assert!(pace.next - before >= Duration::from_secs(9));
        pace.after(&Ok(Pass::Waiting), &metrics);
        assert!(pace.next - Instant::now() <= FIRST_RETRY);
        pace.after(&Ok(Pass::Repaired), &metrics);
        assert!(pace.next - Instant::now() <= VERIFY_AFTER);
    }
}
