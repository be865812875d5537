//! The Service maps: `BEELINE_SERVICES` (frontends and their backend
//! slots), `BEELINE_BACKENDS`, and the translation state the programs keep
//! (`BEELINE_LB_NAT`, `BEELINE_AFFINITY`, `BEELINE_SOCK_REV_NAT`).
use std::{collections::BTreeMap, net::Ipv4Addr, path::Path};

use anyhow::{Context, Result};
use aya::maps::{HashMap, Map, MapData};
use beeline_common::{
    Affinity, AffinityKey, Backend, FlowKey, LbNat, ServiceEntry, ServiceKey, SockRevKey,
    SockRevNat, map_names,
};

use super::key_not_found;

/// What the frontend and backend maps hold, as plain data.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tables {
    /// Every `BEELINE_SERVICES` entry: frontends (slot 0) and backend slots.
    pub services: BTreeMap<ServiceKey, ServiceEntry>,
    pub backends: BTreeMap<u32, Backend>,
}

impl Tables {
    /// The frontends (slot 0 entries).
    pub fn frontends(&self) -> impl Iterator<Item = (&ServiceKey, &ServiceEntry)> {
        self.services.iter().filter(|(k, _)| k.slot == 0)
    }

    /// The backends (address, port) of every socket-scope UDP frontend
    /// (address, port).
    pub fn udp_socket_backends(
        &self,
    ) -> std::collections::HashSet<((Ipv4Addr, u16), (Ipv4Addr, u16))> {
        self.frontends()
            .filter(|(k, _)| k.protocol == 17 && k.scope == beeline_common::scope::SOCKET)
            .flat_map(|(k, e)| {
                let frontend = (Ipv4Addr::from(k.addr), u16::from_be_bytes(k.port));
                self.slots(k, e.count)
                    .into_iter()
                    .filter_map(|id| self.backends.get(&id))
                    .map(move |b| {
                        (
                            frontend,
                            (Ipv4Addr::from(b.addr), u16::from_be_bytes(b.port)),
                        )
                    })
            })
            .collect()
    }

    /// The backend ids in the slots of `frontend`, in slot order.
    pub fn slots(&self, frontend: &ServiceKey, count: u16) -> Vec<u32> {
        (1..=count)
            .filter_map(|slot| {
                self.services
                    .get(&ServiceKey { slot, ..*frontend })
                    .map(|e| e.id)
            })
            .collect()
    }
}

/// What one [`ServicesMaps::apply`] changed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Changes {
    pub written: usize,
    pub removed: usize,
    /// Entries of the programs' translation state dropped with their backend.
    pub flushed: usize,
}

pub struct ServicesMaps {
    services: HashMap<MapData, ServiceKey, ServiceEntry>,
    backends: HashMap<MapData, u32, Backend>,
    lb_nat: HashMap<MapData, FlowKey, LbNat>,
    affinity: HashMap<MapData, AffinityKey, Affinity>,
    sock_rev_nat: HashMap<MapData, SockRevKey, SockRevNat>,
}

/// The maps, as loaded or opened from their pins.
pub struct Loaded {
    pub services: Map,
    pub backends: Map,
    pub lb_nat: Map,
    pub affinity: Map,
    pub sock_rev_nat: Map,
}

impl ServicesMaps {
    pub fn new(maps: Loaded) -> Result<ServicesMaps> {
        Ok(ServicesMaps {
            services: HashMap::try_from(maps.services)?,
            backends: HashMap::try_from(maps.backends)?,
            lb_nat: HashMap::try_from(maps.lb_nat)?,
            affinity: HashMap::try_from(maps.affinity)?,
            sock_rev_nat: HashMap::try_from(maps.sock_rev_nat)?,
        })
    }

    /// The Service address the socket programs translated to `addr:port`
    /// for the socket `cookie`, if they did.
    pub fn translated_from(
        &self,
        cookie: u64,
        addr: Ipv4Addr,
        port: u16,
    ) -> Option<(Ipv4Addr, u16)> {
        let key = SockRevKey {
            cookie,
            addr: addr.octets(),
            port: port.to_be_bytes(),
            pad: [0; 2],
        };
        let service = self.sock_rev_nat.get(&key, 0).ok()?;
        Some((
            Ipv4Addr::from(service.addr),
            u16::from_be_bytes(service.port),
        ))
    }

    pub fn open(bpffs: &Path) -> Result<ServicesMaps> {
        let pinned = |name| -> Result<Map> {
            let data = super::pinned(bpffs, name)?;
            Ok(match name {
                map_names::SERVICES | map_names::BACKENDS => Map::HashMap(data),
                _ => Map::LruHashMap(data),
            })
        };
        ServicesMaps::new(Loaded {
            services: pinned(map_names::SERVICES)?,
            backends: pinned(map_names::BACKENDS)?,
            lb_nat: pinned(map_names::LB_NAT)?,
            affinity: pinned(map_names::AFFINITY)?,
            sock_rev_nat: pinned(map_names::SOCK_REV_NAT)?,
        })
    }

    /// Everything the frontend and backend maps hold now.
    pub fn read(&self) -> Result<Tables> {
        Ok(Tables {
            services: self
                .services
                .iter()
                .collect::<Result<_, _>>()
                .context("reading the Service map")?,
            backends: self
                .backends
                .iter()
                .collect::<Result<_, _>>()
                .context("reading the backend map")?,
        })
    }

    /// Turns `current` into `desired` in an order the programs can read at
    /// any point: backends before the slots naming them, slots before the
    /// frontend count that reaches them, and the reverse for removals. A
    /// connection never sees a slot past its frontend's count, nor a slot
    /// naming a missing backend.
    pub fn apply(&mut self, current: &Tables, desired: &Tables) -> Result<Changes> {
        let mut changes = Changes::default();
        for (id, backend) in &desired.backends {
            if current.backends.get(id) != Some(backend) {
                self.backends
                    .insert(id, backend, 0)
                    .context("writing the backend map")?;
                changes.written += 1;
            }
        }
        // Slots, then frontends: first those whose count shrinks (slot 0
        // before the slots it no longer reaches go), then the rest.
        let mut ordered: Vec<(&ServiceKey, &ServiceEntry)> = desired
            .services
            .iter()
            .filter(|(k, _)| k.slot != 0)
            .collect();
        ordered.extend(desired.frontends());
        for (key, entry) in ordered {
            if current.services.get(key) != Some(entry) {
                self.services
                    .insert(key, entry, 0)
                    .context("writing the Service map")?;
                changes.written += 1;
            }
        }
        let stale: Vec<&ServiceKey> = current
            .services
            .keys()
            .filter(|k| !desired.services.contains_key(k))
            .collect();
        // Frontends go first, then the slots nobody reaches any more.
        for key in stale
            .iter()
            .filter(|k| k.slot == 0)
            .chain(stale.iter().filter(|k| k.slot != 0))
        {
            self.remove_service(key)?;
            changes.removed += 1;
        }
        let gone: Vec<u32> = current
            .backends
            .keys()
            .filter(|id| !desired.backends.contains_key(id))
            .copied()
            .collect();
        for id in &gone {
            match self.backends.remove(id) {
                Err(e) if !key_not_found(&e) => {
                    return Err(e).context("removing from the backend map");
                }
                _ => changes.removed += 1,
            }
        }
        if !gone.is_empty() {
            changes.flushed = self.flush_backends(&gone)?;
        }
        Ok(changes)
    }

    fn remove_service(&mut self, key: &ServiceKey) -> Result<()> {
        match self.services.remove(key) {
            Err(e) if !key_not_found(&e) => Err(e).context("removing from the Service map"),
            _ => Ok(()),
        }
    }

    /// Drops the translated connections and affinities that name a removed
    /// backend: a client reusing such a tuple then gets a live backend.
    fn flush_backends(&mut self, gone: &[u32]) -> Result<usize> {
        let nat: Vec<FlowKey> = self
            .lb_nat
            .iter()
            .filter_map(|e| e.ok())
            .filter(|(_, v)| gone.contains(&v.backend))
            .map(|(k, _)| k)
            .collect();
        let affinity: Vec<AffinityKey> = self
            .affinity
            .iter()
            .filter_map(|e| e.ok())
            .filter(|(_, v)| gone.contains(&v.backend))
            .map(|(k, _)| k)
            .collect();
        let n = nat.len() + affinity.len();
        for k in nat {
            let _ = self.lb_nat.remove(&k);
        }
        for k in affinity {
            let _ = self.affinity.remove(&k);
        }
        Ok(n)
    }

    /// Drops translated connections idle for longer than `idle_ns` (by
    /// protocol); returns how many.
    pub fn expire_nat(&mut self, now_ns: u64, idle_ns: impl Fn(u8) -> u64) -> usize {
        let old: Vec<FlowKey> = self
            .lb_nat
            .iter()
            .filter_map(|e| e.ok())
            .filter(|(k, v)| now_ns.saturating_sub(v.last_seen_ns) > idle_ns(k.protocol))
            .map(|(k, _)| k)
            .collect();
        let n = old.len();
        for k in old {
            let _ = self.lb_nat.remove(&k);
        }
        n
    }

    /// Entries of the translated-connection map.
    pub fn nat_entries(&self) -> usize {
        self.lb_nat.keys().filter(|k| k.is_ok()).count()
    }
}
