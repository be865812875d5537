//! `/healthz`, `/readyz` and Prometheus `/metrics` on one small HTTP server
//! (loopback by default).
use std::{collections::HashMap, convert::Infallible, net::SocketAddr, path::PathBuf, sync::Arc};

use anyhow::{Context, Result};
use http_body_util::Full;
use hyper::{Request, Response, StatusCode, body::Bytes, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use tokio::sync::Mutex;
use tracing::warn;

use crate::{agent::Agent, inspect};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub verb: String,
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ActionLabels {
    pub action: String,
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
    /// Requests from the CNI binary, by verb and result.
    pub cni_requests: Family<RequestLabels, Counter>,
    /// What reconcile passes changed.
    pub reconcile_actions: Family<ActionLabels, Counter>,
    endpoints: Gauge,
    nodes: Gauge,
    map_entries: Family<MapLabels, Gauge>,
    map_capacity: Family<MapLabels, Gauge>,
    packets: Family<PacketLabels, Counter>,
    /// Last per-CPU sums seen, to turn map values into counter increments.
    packets_seen: std::sync::Mutex<HashMap<PacketLabels, u64>>,
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
            endpoints: Gauge::default(),
            nodes: Gauge::default(),
            map_entries: Family::default(),
            map_capacity: Family::default(),
            packets: Family::default(),
            packets_seen: Default::default(),
        };
        registry.register(
            "cni_requests",
            "Agent API requests from the CNI binary",
            m.cni_requests.clone(),
        );
        registry.register(
            "reconcile_actions",
            "Changes made by reconcile passes",
            m.reconcile_actions.clone(),
        );
        registry.register(
            "endpoints",
            "Pod endpoints on this node",
            m.endpoints.clone(),
        );
        registry.register("nodes", "Nodes in the cluster", m.nodes.clone());
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
        Metrics { registry, ..m }
    }

    pub fn count_request(&self, verb: &str, ok: bool) {
        self.cni_requests
            .get_or_create(&RequestLabels {
                verb: verb.into(),
                result: if ok { "ok" } else { "error" }.into(),
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

    /// Refreshes the gauges and packet counters from the agent and the maps,
    /// then renders the text exposition format.
    pub fn render(&self, agent: &Agent, bpffs: &std::path::Path) -> String {
        self.endpoints.set(agent.store.len() as i64);
        self.nodes.set(agent.nodes.len() as i64);
        let remote = agent
            .datapath
            .remote_entries()
            .map(|e| e.len())
            .unwrap_or(0);
        for (map, entries, capacity) in [
            (
                "endpoints",
                agent.store.len(),
                beeline_common::MAX_ENDPOINTS,
            ),
            ("remote_cidrs", remote, beeline_common::MAX_REMOTE_CIDRS),
        ] {
            let labels = MapLabels { map: map.into() };
            self.map_entries.get_or_create(&labels).set(entries as i64);
            self.map_capacity
                .get_or_create(&labels)
                .set(capacity as i64);
        }
        match inspect::stats(bpffs) {
            Ok(stats) => {
                let mut seen = self.packets_seen.lock().unwrap();
                for (program, s) in [
                    ("from_pod", stats.from_pod),
                    ("from_uplink", stats.from_uplink),
                    ("from_overlay", stats.from_overlay),
                ] {
                    for (verdict, value) in [
                        ("redirected_local", s.redirected_local),
                        ("forwarded_direct", s.forwarded_direct),
                        ("forwarded_tunnel", s.forwarded_tunnel),
                        ("passed_to_host", s.passed_to_host),
                        ("dropped_malformed", s.dropped_malformed),
                        ("dropped_helper_error", s.dropped_helper_error),
                    ] {
                        let labels = PacketLabels {
                            program: program.into(),
                            verdict: verdict.into(),
                        };
                        let last = seen.entry(labels.clone()).or_insert(0);
                        self.packets
                            .get_or_create(&labels)
                            .inc_by(value.saturating_sub(*last));
                        *last = value.max(*last);
                    }
                }
            }
            Err(e) => warn!("reading the stats map for /metrics: {e:#}"),
        }
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("encoding metrics into a String");
        out
    }
}

pub async fn serve(addr: SocketAddr, agent: Arc<Mutex<Agent>>, bpffs: PathBuf) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} for health and metrics"))?;
    let bpffs = Arc::new(bpffs);
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                warn!("health server accept: {e}");
                continue;
            }
        };
        let agent = agent.clone();
        let bpffs = bpffs.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                let agent = agent.clone();
                let bpffs = bpffs.clone();
                async move { Ok::<_, Infallible>(route(req.uri().path(), &agent, &bpffs).await) }
            });
            if let Err(e) = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                warn!("health connection: {e}");
            }
        });
    }
}

async fn route(path: &str, agent: &Mutex<Agent>, bpffs: &std::path::Path) -> Response<Full<Bytes>> {
    let (status, body, content_type) = match path {
        "/healthz" => (StatusCode::OK, "ok\n".to_string(), "text/plain"),
        "/readyz" => match agent.lock().await.not_ready_reason() {
            None => (StatusCode::OK, "ready\n".to_string(), "text/plain"),
            Some(reason) => (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("{reason}\n"),
                "text/plain",
            ),
        },
        "/metrics" => {
            let agent = agent.lock().await;
            (
                StatusCode::OK,
                agent.metrics.render(&agent, bpffs),
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )
        }
        _ => (
            StatusCode::NOT_FOUND,
            "not found\n".to_string(),
            "text/plain",
        ),
    };
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Full::new(Bytes::from(body)))
        .expect("valid response")
}
