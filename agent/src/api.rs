//! The Unix socket the CNI binary talks to: root only (0600), one JSON
//! request line in, one JSON answer line out, per connection. It survives
//! misbehaving clients: connections are bounded (over the bound a client is
//! told to try again), each has a read deadline, every malformed request
//! gets an error line, and accept failures (out of file descriptors) back
//! off with rate-limited logs instead of spinning.
use std::{
    os::unix::fs::PermissionsExt,
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use beeline_proto::{ApiError, MAX_MESSAGE_BYTES, NodeInfo, POD_GATEWAY, Request};
use serde_json::Value;
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
    sync::{Semaphore, watch},
};
use tracing::{debug, warn};

use crate::{metrics::Metrics, owners::endpoints::RegistryHandle, status::NodeState};

/// Connections served at once; more are answered "busy, try again".
pub const MAX_CONNECTIONS: usize = 128;
/// How long a client may take to send its request line.
pub const READ_DEADLINE: Duration = Duration::from_secs(5);
const WRITE_DEADLINE: Duration = Duration::from_secs(5);
const MAX_ACCEPT_BACKOFF: Duration = Duration::from_secs(1);
const LOG_EVERY: Duration = Duration::from_secs(10);

pub fn bind(path: &Path) -> Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    // A socket left by a previous agent would make bind fail.
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing stale {}", path.display())),
    }
    // Create it 0600 from the start: no window where others could connect.
    let old_umask = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let listener = UnixListener::bind(path);
    nix::sys::stat::umask(old_umask);
    let listener = listener.with_context(|| format!("cannot listen on {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// What a connection needs to answer.
#[derive(Clone)]
pub struct Api {
    pub node_name: String,
    pub node: watch::Receiver<NodeState>,
    pub registry: RegistryHandle,
    pub metrics: Arc<Metrics>,
}

pub async fn serve(listener: UnixListener, api: Api) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut backoff = Duration::ZERO;
    let (mut failures, mut last_log): (u64, Option<Instant>) = (0, None);
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                backoff = Duration::ZERO;
                let api = api.clone();
                match slots.clone().try_acquire_owned() {
                    Ok(slot) => {
                        tokio::spawn(async move {
                            api.connection(stream).await;
                            drop(slot);
                        });
                    }
                    Err(_) => {
                        tokio::spawn(answer(
                            stream,
                            error(ApiError::not_ready(format!(
                                "the agent is serving {MAX_CONNECTIONS} connections; try again"
                            ))),
                        ));
                    }
                }
            }
            Err(e) => {
                // EMFILE and the like: the connection stays queued; wait
                // for descriptors instead of spinning on it.
                failures += 1;
                let now = Instant::now();
                if last_log.is_none_or(|t| now - t >= LOG_EVERY) {
                    warn!(failures, "accept on the API socket: {e}; backing off");
                    last_log = Some(now);
                }
                backoff = (backoff * 2).clamp(Duration::from_millis(10), MAX_ACCEPT_BACKOFF);
                tokio::time::sleep(backoff).await;
            }
        }
    }
}

impl Api {
    async fn connection(&self, stream: UnixStream) {
        let (read, write) = stream.into_split();
        let mut reader = BufReader::new(read.take(MAX_MESSAGE_BYTES as u64));
        let mut line = Vec::new();
        let response =
            match tokio::time::timeout(READ_DEADLINE, reader.read_until(b'\n', &mut line)).await {
                Err(_) => error(ApiError::new(format!(
                    "no request line within {READ_DEADLINE:?}"
                ))),
                Ok(Err(e)) => error(ApiError::new(format!("reading the request: {e}"))),
                Ok(Ok(_)) => self.respond(&line).await,
            };
        answer(write, response).await;
    }

    async fn respond(&self, line: &[u8]) -> Value {
        let request = match serde_json::from_slice::<Request>(line) {
            Ok(request) => request,
            Err(e) => return error(ApiError::new(format!("malformed request: {e}"))),
        };
        debug!(?request, "API request");
        if let Request::NodeInfo = request {
            let response = serde_json::to_value(self.node_info()).expect("responses serialize");
            self.metrics
                .count_request("node_info", response.get("Ok").is_some());
            return response;
        }
        match self.registry.call(request).await {
            Some(response) => response,
            None => error(ApiError::not_ready("the agent is shutting down")),
        }
    }

    /// Answered from the published node state: never queued behind a
    /// registration.
    fn node_info(&self) -> Result<NodeInfo, ApiError> {
        let node = self.node.borrow();
        if let Some(reason) = &node.not_ready {
            return Err(ApiError::not_ready(reason.clone()));
        }
        Ok(NodeInfo {
            node_name: self.node_name.clone(),
            pod_cidr: node
                .pod_cidr
                .expect("a ready node has a podCIDR")
                .to_string(),
            mtu: node.pod_mtu,
            gateway: POD_GATEWAY,
        })
    }
}

fn error(e: ApiError) -> Value {
    serde_json::to_value(Err::<(), _>(e)).expect("errors serialize")
}

async fn answer(mut write: impl AsyncWriteExt + Unpin, response: Value) {
    let mut out = serde_json::to_vec(&response).expect("responses serialize");
    out.push(b'\n');
    let _ = tokio::time::timeout(WRITE_DEADLINE, write.write_all(&out)).await;
}
