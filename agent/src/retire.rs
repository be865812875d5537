//! Deleting retired pod veths off the request path. Tearing a veth pair
//! down waits for RCU callbacks in the kernel (10-30 ms); DEL only takes the
//! veth out of service (down, renamed, its routes gone) and hands it here.
use std::sync::mpsc;

use futures::TryStreamExt;
use rtnetlink::packet_route::link::LinkAttribute;
use tracing::{debug, warn};

/// One thread with its own netlink socket: a deletion blocks the sending
/// thread for its whole duration, which must not be a tokio worker.
#[derive(Clone)]
pub struct Retirer {
    tx: mpsc::Sender<String>,
}

impl Retirer {
    pub fn start() -> std::io::Result<Retirer> {
        let (tx, rx) = mpsc::channel::<String>();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        std::thread::Builder::new()
            .name("veth-retirer".into())
            .spawn(move || {
                runtime.block_on(async move {
                    let (connection, handle, _) = match rtnetlink::new_connection() {
                        Ok(c) => c,
                        Err(e) => {
                            warn!("veth retirer: no netlink socket: {e}");
                            return;
                        }
                    };
                    tokio::spawn(connection);
                    while let Ok(ifname) = rx.recv() {
                        delete(&handle, &ifname).await;
                    }
                })
            })?;
        Ok(Retirer { tx })
    }

    pub fn retire(&self, ifname: String) {
        if self.tx.send(ifname).is_err() {
            warn!("veth retirer is gone");
        }
    }
}

async fn delete(handle: &rtnetlink::Handle, ifname: &str) {
    let mut links = handle.link().get().match_name(ifname.to_string()).execute();
    let index = match links.try_next().await {
        Ok(Some(link)) => link.header.index,
        // Gone already (its netns was deleted, say).
        _ => return,
    };
    match handle.link().del(index).execute().await {
        Ok(()) => debug!(ifname, "retired veth deleted"),
        Err(e) => warn!(ifname, "deleting a retired veth: {e}"),
    }
}

/// Retired veths a previous agent did not get to (it died first).
pub async fn leftovers(handle: &rtnetlink::Handle) -> Vec<String> {
    let mut links = handle.link().get().execute();
    let mut found = Vec::new();
    while let Ok(Some(link)) = links.try_next().await {
        let (mut name, mut alias) = (None, None);
        for attr in link.attributes {
            match attr {
                LinkAttribute::IfName(n) => name = Some(n),
                LinkAttribute::IfAlias(a) => alias = Some(a),
                _ => {}
            }
        }
        if alias.as_deref() == Some(beeline_proto::RETIRED_ALIAS)
            && let Some(name) = name
        {
            found.push(name);
        }
    }
    found
}
