//! The agent's persisted endpoints (`<state-dir>/endpoints.json`), written
//! atomically (temp file, exchanged into place) before a request is
//! answered, so an agent crash never loses or half-writes an endpoint. Not
//! fsynced: after a power loss the pods are gone too, and the agent drops
//! endpoints whose veth is gone when it starts.
use std::{
    collections::BTreeMap,
    fs::{self, File},
    io::Write,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail};
use beeline_proto::Endpoint;
use nix::{
    errno::Errno,
    fcntl::{AT_FDCWD, RenameFlags, renameat2},
};
use serde::{Deserialize, Serialize};
use tracing::error;

const FILE: &str = "endpoints.json";
/// 2 added the pod's identity; files of version 1 load as they are.
const FORMAT_VERSION: u32 = 2;

#[derive(Serialize, Deserialize)]
struct OnDisk {
    version: u32,
    endpoints: Vec<Endpoint>,
}

/// Key of an endpoint: the attachment (container id, interface name).
pub type AttachmentKey = (String, String);

pub fn key_of(ep: &Endpoint) -> AttachmentKey {
    (ep.container_id.clone(), ep.ifname.clone())
}

/// The persisted endpoints, read without taking the store (for the
/// inspection commands).
pub fn read(dir: &Path) -> Result<Vec<Endpoint>> {
    let path = dir.join(FILE);
    let bytes = fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    let disk: OnDisk =
        serde_json::from_slice(&bytes).with_context(|| format!("parsing {}", path.display()))?;
    Ok(disk.endpoints)
}

pub struct EndpointStore {
    path: PathBuf,
    endpoints: BTreeMap<AttachmentKey, Endpoint>,
}

impl EndpointStore {
    /// Loads the store; an unreadable file is moved aside (and logged) so the
    /// agent can start and rebuild from the kernel state.
    pub fn load(dir: &Path) -> Result<EndpointStore> {
        fs::create_dir_all(dir)
            .with_context(|| format!("cannot create the state dir {}", dir.display()))?;
        let path = dir.join(FILE);
        let endpoints = match fs::read(&path) {
            Ok(bytes) => match serde_json::from_slice::<OnDisk>(&bytes) {
                Ok(disk) if disk.version > FORMAT_VERSION => bail!(
                    "{} has format version {}, newer than this agent's {FORMAT_VERSION}: \
                     run the newer agent (a downgrade would lose what it recorded)",
                    path.display(),
                    disk.version
                ),
                Ok(disk) => disk
                    .endpoints
                    .into_iter()
                    .map(|e| (key_of(&e), e))
                    .collect(),
                Err(e) => {
                    let aside = path.with_extension("json.corrupt");
                    error!(
                        "{} is unreadable ({e}); moved to {} and starting empty",
                        path.display(),
                        aside.display()
                    );
                    fs::rename(&path, &aside)?;
                    BTreeMap::new()
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        Ok(EndpointStore { path, endpoints })
    }

    pub fn get(&self, key: &AttachmentKey) -> Option<&Endpoint> {
        self.endpoints.get(key)
    }

    pub fn by_ip(&self, ip: Ipv4Addr) -> Option<&Endpoint> {
        self.endpoints.values().find(|e| e.ip == ip)
    }

    pub fn list(&self) -> impl Iterator<Item = &Endpoint> {
        self.endpoints.values()
    }

    pub fn len(&self) -> usize {
        self.endpoints.len()
    }

    pub fn is_empty(&self) -> bool {
        self.endpoints.is_empty()
    }

    /// Inserts and persists; on a write failure the change is rolled back.
    pub fn insert(&mut self, ep: Endpoint) -> Result<Option<Endpoint>> {
        let key = key_of(&ep);
        let previous = self.endpoints.insert(key.clone(), ep);
        if let Err(e) = self.save() {
            match &previous {
                Some(p) => self.endpoints.insert(key, p.clone()),
                None => self.endpoints.remove(&key),
            };
            return Err(e);
        }
        Ok(previous)
    }

    /// Removes and persists; on a write failure the change is rolled back.
    pub fn remove(&mut self, key: &AttachmentKey) -> Result<Option<Endpoint>> {
        let Some(previous) = self.endpoints.remove(key) else {
            return Ok(None);
        };
        if let Err(e) = self.save() {
            self.endpoints.insert(key.clone(), previous);
            return Err(e);
        }
        Ok(Some(previous))
    }

    fn save(&self) -> Result<()> {
        let disk = OnDisk {
            version: FORMAT_VERSION,
            endpoints: self.endpoints.values().cloned().collect(),
        };
        let bytes = serde_json::to_vec_pretty(&disk)?;
        let tmp = self.path.with_extension("json.tmp");
        let mut f = File::create(&tmp).with_context(|| format!("writing {}", tmp.display()))?;
        f.write_all(&bytes)?;
        replace(&tmp, &self.path).with_context(|| format!("replacing {}", self.path.display()))
    }
}

/// Puts `tmp` in place of `path` atomically, then drops the old content (now
/// at `tmp`). An exchange rather than a rename over `path`: ext4
/// (`auto_da_alloc`) starts writeback of a file renamed over another, which
/// every ADD and DEL would wait for (0.3 ms, several ms at the tail).
fn replace(tmp: &Path, path: &Path) -> std::io::Result<()> {
    match renameat2(AT_FDCWD, tmp, AT_FDCWD, path, RenameFlags::RENAME_EXCHANGE) {
        Ok(()) => fs::remove_file(tmp),
        // No file to exchange with yet, or a filesystem that cannot.
        Err(Errno::ENOENT | Errno::EINVAL) => fs::rename(tmp, path),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use beeline_proto::MacAddr;

    fn ep(id: &str, ip: [u8; 4]) -> Endpoint {
        Endpoint {
            container_id: id.into(),
            ifname: "eth0".into(),
            netns: format!("/run/netns/{id}"),
            ip: ip.into(),
            host_ifname: format!("bl{id}"),
            host_ifindex: 7,
            host_mac: MacAddr([2, 0, 0, 0, 0, 1]),
            pod_mac: MacAddr([2, 0, 0, 0, 0, 2]),
            pod: None,
            netns_inode: 0,
            boot_id: String::new(),
            ipam_dir: None,
            shaped: false,
        }
    }

    #[test]
    fn survives_a_reload() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = EndpointStore::load(dir.path()).unwrap();
        store.insert(ep("a", [10, 0, 0, 2])).unwrap();
        store.insert(ep("b", [10, 0, 0, 3])).unwrap();
        store.remove(&("a".into(), "eth0".into())).unwrap();
        // Exchanged into place: the previous content is not left behind.
        let files: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(files, [FILE]);
        let reloaded = EndpointStore::load(dir.path()).unwrap();
        assert_eq!(reloaded.len(), 1);
        assert_eq!(
            reloaded.by_ip([10, 0, 0, 3].into()).unwrap().container_id,
            "b"
        );
    }

    #[test]
    fn loads_the_previous_format_and_refuses_a_newer_one() {
        let dir = tempfile::tempdir().unwrap();
        // As the previous release wrote it: version 1, no pod identity.
        fs::write(
            dir.path().join(FILE),
            r#"{"version":1,"endpoints":[{"container_id":"c1","ifname":"eth0",
               "netns":"/run/netns/p1","ip":"10.0.0.2","host_ifname":"bl1",
               "host_ifindex":9,"host_mac":"02:00:00:00:00:01",
               "pod_mac":"02:00:00:00:00:02"}]}"#,
        )
        .unwrap();
        let mut store = EndpointStore::load(dir.path()).unwrap();
        assert_eq!(store.by_ip([10, 0, 0, 2].into()).unwrap().pod, None);
        store.insert(ep("c2", [10, 0, 0, 3])).unwrap();
        let written: serde_json::Value =
            serde_json::from_slice(&fs::read(dir.path().join(FILE)).unwrap()).unwrap();
        assert_eq!(written["version"], FORMAT_VERSION);
        assert_eq!(written["endpoints"].as_array().unwrap().len(), 2);

        fs::write(dir.path().join(FILE), br#"{"version":99,"endpoints":[]}"#).unwrap();
        let err = EndpointStore::load(dir.path()).err().unwrap();
        assert!(format!("{err:#}").contains("newer"), "{err:#}");
        assert!(dir.path().join(FILE).exists(), "a newer file must be kept");
    }

    #[test]
    fn a_corrupt_file_is_moved_aside() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(FILE), b"{\"version\":1,\"endp").unwrap();
        let store = EndpointStore::load(dir.path()).unwrap();
        assert_eq!(store.len(), 0);
        assert!(dir.path().join("endpoints.json.corrupt").exists());
    }
}
