//! What the owners publish about the node, read by the CNI API, `/readyz`
//! and `/metrics` without waiting on any owner: the node's network state
//! (a `watch` channel written by node sync) and degraded conditions (set by
//! whichever owner finds damage, cleared once it is repaired).
use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    sync::{Arc, Mutex},
};

use ipnet::Ipv4Net;

use crate::uplink::Uplink;

/// This node as pods see it; published by node sync.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeState {
    /// From this node's Node object; `None` until it has one.
    pub pod_cidr: Option<Ipv4Net>,
    /// Set once the interface holding the node's InternalIP is found.
    pub uplink: Option<Uplink>,
    /// MTU for pod interfaces.
    pub pod_mtu: u32,
    /// Why pods cannot be networked yet, if they cannot.
    pub not_ready: Option<String>,
    /// Nodes in the cluster, this one included.
    pub nodes: usize,
}

impl NodeState {
    /// The node's own addresses that no pod may hold.
    pub fn node_addresses(&self) -> Vec<Ipv4Addr> {
        self.uplink.iter().map(|u| u.net.addr()).collect()
    }
}

/// Damage the owners' resyncs found, by owner and kind: `/readyz` reports
/// the datapath as degraded while any is listed. Each owner replaces its own
/// list after every pass, so damage stays listed until a pass finds none.
#[derive(Debug, Clone, Default)]
pub struct Conditions(Arc<Mutex<BTreeMap<(String, String), String>>>);

impl Conditions {
    /// Replaces `owner`'s list with `found` (kind, detail).
    pub fn publish(&self, owner: &str, found: &BTreeMap<String, String>) {
        let mut all = self.0.lock().unwrap_or_else(|p| p.into_inner());
        all.retain(|(o, _), _| o != owner);
        for (kind, detail) in found {
            all.insert((owner.to_string(), kind.clone()), detail.clone());
        }
    }

    /// Every listed condition as `owner/kind: detail`.
    pub fn snapshot(&self) -> Vec<String> {
        let all = self.0.lock().unwrap_or_else(|p| p.into_inner());
        all.iter()
            .map(|((owner, kind), detail)| format!("{owner}/{kind}: {detail}"))
            .collect()
    }
}
