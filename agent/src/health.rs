//! `/healthz`, `/readyz` and Prometheus `/metrics` on one small HTTP server
//! (loopback by default). Every answer comes from published state: none
//! waits on an owner or a CNI request.
use std::{convert::Infallible, net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::{Context, Result};
use http_body_util::Full;
use hyper::{Request, Response, StatusCode, body::Bytes, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::sync::watch;
use tracing::warn;

use crate::{
    metrics::Metrics,
    status::{Conditions, NodeState},
};

/// What the health server reads.
#[derive(Clone)]
pub struct Published {
    pub node: watch::Receiver<NodeState>,
    pub conditions: Conditions,
    /// Things an operator should know that do not stop the node (a chained
    /// plugin missing): listed by `/readyz` after "ready".
    pub notices: Conditions,
    pub metrics: Arc<Metrics>,
    pub bpffs: PathBuf,
}

impl Published {
    /// `None` when ready; else why not, one reason per line.
    pub fn not_ready(&self) -> Option<String> {
        let mut reasons: Vec<String> = self.node.borrow().not_ready.iter().cloned().collect();
        for condition in self.conditions.snapshot() {
            reasons.push(format!("datapath degraded: {condition}"));
        }
        (!reasons.is_empty()).then(|| reasons.join("\n"))
    }
}

pub async fn serve(addr: SocketAddr, published: Published) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} for health and metrics"))?;
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                warn!("health server accept: {e}");
                // Out of file descriptors, say: do not spin.
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let published = published.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                let published = published.clone();
                async move { Ok::<_, Infallible>(route(req.uri().path(), &published)) }
            });
            let _ = tokio::time::timeout(
                Duration::from_secs(30),
                http1::Builder::new().serve_connection(TokioIo::new(stream), service),
            )
            .await;
        });
    }
}

fn route(path: &str, published: &Published) -> Response<Full<Bytes>> {
    let (status, body, content_type) = match path {
        "/healthz" => (StatusCode::OK, "ok\n".to_string(), "text/plain"),
        "/readyz" => match published.not_ready() {
            None => {
                let mut body = "ready\n".to_string();
                for notice in published.notices.snapshot() {
                    body.push_str(&format!("note: {notice}\n"));
                }
                (StatusCode::OK, body, "text/plain")
            }
            Some(reasons) => (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("{reasons}\n"),
                "text/plain",
            ),
        },
        "/metrics" => (
            StatusCode::OK,
            published.metrics.render(&published.bpffs),
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        ),
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
