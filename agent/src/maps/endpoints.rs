//! `BEELINE_ENDPOINTS`: local pods by IPv4 address (see `beeline_common::Endpoint`).
use std::{net::Ipv4Addr, path::Path};

use anyhow::{Context, Result};
use aya::maps::{HashMap, Map, MapData};
use beeline_common::{Endpoint, EndpointKey, map_names};

use super::key_not_found;

pub struct EndpointsMap(HashMap<MapData, EndpointKey, Endpoint>);

impl EndpointsMap {
    pub fn new(map: Map) -> Result<EndpointsMap> {
        Ok(EndpointsMap(HashMap::try_from(map)?))
    }

    pub fn open(bpffs: &Path) -> Result<EndpointsMap> {
        EndpointsMap::new(Map::HashMap(super::pinned(bpffs, map_names::ENDPOINTS)?))
    }

    pub fn upsert(&mut self, ip: Ipv4Addr, endpoint: Endpoint) -> Result<()> {
        self.0
            .insert(EndpointKey { addr: ip.octets() }, endpoint, 0)
            .with_context(|| format!("writing endpoint {ip} into the map"))
    }

    pub fn get(&self, ip: Ipv4Addr) -> Result<Option<Endpoint>> {
        match self.0.get(&EndpointKey { addr: ip.octets() }, 0) {
            Ok(v) => Ok(Some(v)),
            Err(e) if key_not_found(&e) => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading endpoint {ip} from the map")),
        }
    }

    /// Removes the entry; gone already is fine.
    pub fn remove(&mut self, ip: Ipv4Addr) -> Result<()> {
        match self.0.remove(&EndpointKey { addr: ip.octets() }) {
            Err(e) if !key_not_found(&e) => {
                Err(e).with_context(|| format!("removing endpoint {ip} from the map"))
            }
            _ => Ok(()),
        }
    }

    pub fn entries(&self) -> Result<Vec<(Ipv4Addr, Endpoint)>> {
        self.0
            .iter()
            .map(|r| {
                r.map(|(k, v)| (Ipv4Addr::from(k.addr), v))
                    .map_err(Into::into)
            })
            .collect()
    }
}
