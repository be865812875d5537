//! Prometheus metrics. Owners update their own series as they work (every
//! metric is atomic); a scrape only adds the packet counters, read from the
//! pinned stats map, so it never waits on an owner.
use std::{collections::HashMap, path::Path, sync::Mutex};

use beeline_common::{Program, Verdict};
use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use tracing::warn;

use crate::maps::StatsMap;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    verb: String,
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ActionLabels {
    action: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RepairLabels {
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OwnerLabels {
    owner: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PluginLabels {
    plugin: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MapLabels {
    map: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PacketLabels {
    program: String,
    verdict: String,
}

pub struct Metrics {
    registry: Registry,
    cni_requests: Family<RequestLabels, Counter>,
    reconcile_actions: Family<ActionLabels, Counter>,
    repairs: Family<RepairLabels, Counter>,
    reconcile_errors: Family<OwnerLabels, Counter>,
    pub endpoints: Gauge,
    pub nodes: Gauge,
    services: Gauge,
    service_frontends: Gauge,
    service_backends: Gauge,
    service_connections: Gauge,
    chained_plugins: Family<PluginLabels, Gauge>,
    map_entries: Family<MapLabels, Gauge>,
    map_capacity: Family<MapLabels, Gauge>,
    packets: Family<PacketLabels, Counter>,
    bytes: Family<PacketLabels, Counter>,
    /// Last per-CPU sums seen, to turn map values into counter increments.
    seen: Mutex<HashMap<(Program, Verdict), beeline_common::Counter>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("beeline");
        let m = Metrics {
            registry: Registry::default(),
            cni_requests: Family::default(),
            reconcile_actions: Family::default(),
            repairs: Family::default(),
            reconcile_errors: Family::default(),
            endpoints: Gauge::default(),
            nodes: Gauge::default(),
            services: Gauge::default(),
            service_frontends: Gauge::default(),
            service_backends: Gauge::default(),
            service_connections: Gauge::default(),
            chained_plugins: Family::default(),
            map_entries: Family::default(),
            map_capacity: Family::default(),
            packets: Family::default(),
            bytes: Family::default(),
            seen: Default::default(),
        };
        registry.register(
            "cni_requests",
            "Agent API requests from the CNI binary, by verb and result",
            m.cni_requests.clone(),
        );
        registry.register(
            "reconcile_actions",
            "Changes made by reconcile passes (restores, stale state removed)",
            m.reconcile_actions.clone(),
        );
        registry.register(
            "repairs",
            "Drift found by a resync and repaired, by kind",
            m.repairs.clone(),
        );
        registry.register(
            "reconcile_errors",
            "Failed reconcile passes, by owner (each is retried with backoff)",
            m.reconcile_errors.clone(),
        );
        registry.register(
            "endpoints",
            "Pod endpoints on this node",
            m.endpoints.clone(),
        );
        registry.register("nodes", "Nodes in the cluster", m.nodes.clone());
        registry.register(
            "services",
            "Services this node translates (--kube-proxy-replacement)",
            m.services.clone(),
        );
        registry.register(
            "service_frontends",
            "Service frontends in the maps: address, port, protocol and scope (sockets, or packets from outside)",
            m.service_frontends.clone(),
        );
        registry.register(
            "service_backends",
            "Distinct Service backends in the maps",
            m.service_backends.clone(),
        );
        registry.register(
            "service_connections",
            "Connections from outside the cluster translated per packet (both directions count)",
            m.service_connections.clone(),
        );
        registry.register(
            "cni_chained_plugins",
            "Plugins asked to be chained after Beeline: 1 when the network config chains them, 0 when missing",
            m.chained_plugins.clone(),
        );
        registry.register(
            "map_entries",
            "Entries in each BPF map",
            m.map_entries.clone(),
        );
        registry.register(
            "map_capacity",
            "Maximum entries of each BPF map",
            m.map_capacity.clone(),
        );
        registry.register(
            "datapath_packets",
            "Packets handled by each tc program, by verdict",
            m.packets.clone(),
        );
        registry.register(
            "datapath_bytes",
            "Bytes handled by each tc program, by verdict",
            m.bytes.clone(),
        );
        Metrics { registry, ..m }
    }

    pub fn count_request(&self, verb: &str, ok: bool) {
        let result = if ok { "ok" } else { "error" };
        self.cni_requests
            .get_or_create(&RequestLabels {
                verb: verb.into(),
                result: result.into(),
            })
            .inc();
    }

    pub fn count_action(&self, action: &str, n: usize) {
        if n > 0 {
            self.reconcile_actions
                .get_or_create(&ActionLabels {
                    action: action.into(),
                })
                .inc_by(n as u64);
        }
    }

    pub fn count_repair(&self, kind: &str) {
        self.repairs
            .get_or_create(&RepairLabels { kind: kind.into() })
            .inc();
    }

    pub fn count_reconcile_error(&self, owner: &str) {
        self.reconcile_errors
            .get_or_create(&OwnerLabels {
                owner: owner.into(),
            })
            .inc();
    }

    pub fn set_chained_plugin(&self, plugin: &str, present: bool) {
        self.chained_plugins
            .get_or_create(&PluginLabels {
                plugin: plugin.into(),
            })
            .set(present as i64);
    }

    pub fn set_services(&self, services: usize, frontends: usize, backends: usize, nat: usize) {
        self.services.set(services as i64);
        self.service_frontends.set(frontends as i64);
        self.service_backends.set(backends as i64);
        self.service_connections.set(nat as i64);
    }

    pub fn set_map_fill(&self, map: &str, entries: usize, capacity: u32) {
        let labels = MapLabels { map: map.into() };
        self.map_entries.get_or_create(&labels).set(entries as i64);
        self.map_capacity
            .get_or_create(&labels)
            .set(capacity as i64);
    }

    /// Refreshes the packet counters from the pinned stats map, then renders
    /// the text exposition format.
    pub fn render(&self, bpffs: &Path) -> String {
        match StatsMap::open(bpffs).and_then(|m| m.read()) {
            Ok(counters) => {
                let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
                for (&(program, verdict), value) in &counters.0 {
                    let labels = PacketLabels {
                        program: program.name().into(),
                        verdict: verdict.name().into(),
                    };
                    // A map replaced by an upgrade starts from zero again.
                    let last = seen.entry((program, verdict)).or_default();
                    if value.packets < last.packets {
                        *last = Default::default();
                    }
                    self.packets
                        .get_or_create(&labels)
                        .inc_by(value.packets - last.packets);
                    self.bytes
                        .get_or_create(&labels)
                        .inc_by(value.bytes.saturating_sub(last.bytes));
                    *last = *value;
                }
            }
            Err(e) => warn!("reading the stats map for /metrics: {e:#}"),
        }
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("encoding metrics into a String");
        out
    }
}
