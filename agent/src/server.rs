//! The Unix socket the CNI binary talks to: root only (0600), one JSON line
//! in, one JSON line out.
use std::{os::unix::fs::PermissionsExt, path::Path, sync::Arc};

use anyhow::{Context, Result};
use beeline_proto::{ApiError, MAX_MESSAGE_BYTES, Request};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
    sync::Mutex,
};
use tracing::{debug, warn};

use crate::agent::Agent;

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

pub async fn serve(listener: UnixListener, agent: Arc<Mutex<Agent>>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let agent = agent.clone();
                tokio::spawn(async move {
                    if let Err(e) = handle(stream, agent).await {
                        warn!("API connection: {e:#}");
                    }
                });
            }
            Err(e) => warn!("accept on the API socket: {e}"),
        }
    }
}

async fn handle(stream: UnixStream, agent: Arc<Mutex<Agent>>) -> Result<()> {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read.take(MAX_MESSAGE_BYTES as u64));
    let mut line = String::new();
    reader.read_line(&mut line).await?;
    let response = match serde_json::from_str::<Request>(&line) {
        Ok(request) => {
            debug!(?request, "API request");
            agent.lock().await.handle(request).await
        }
        Err(e) => serde_json::to_value(Err::<(), _>(ApiError::new(format!(
            "malformed request: {e}"
        ))))?,
    };
    let mut out = serde_json::to_vec(&response)?;
    out.push(b'\n');
    write.write_all(&out).await?;
    Ok(())
}
