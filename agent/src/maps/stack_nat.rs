//! `BEELINE_STACK_NAT`: replies of connections the host stack NATed, which
//! the programs leave to the stack (see the eBPF `stack_nat` module).
use std::{collections::HashSet, path::Path};

use anyhow::{Context, Result};
use aya::maps::{HashMap, Map, MapData};
use beeline_common::{FlowKey, map_names};

use super::key_not_found;

pub struct StackNatMap(HashMap<MapData, FlowKey, u32>);

impl StackNatMap {
    pub fn new(map: Map) -> Result<StackNatMap> {
        Ok(StackNatMap(HashMap::try_from(map)?))
    }

    pub fn open(bpffs: &Path) -> Result<StackNatMap> {
        StackNatMap::new(Map::HashMap(super::pinned(bpffs, map_names::STACK_NAT)?))
    }

    pub fn keys(&self) -> Result<HashSet<FlowKey>> {
        self.0
            .keys()
            .collect::<Result<_, _>>()
            .context("reading the stack-NAT map")
    }

    pub fn insert(&mut self, key: FlowKey) -> Result<()> {
        self.0
            .insert(key, 0, 0)
            .context("writing the stack-NAT map")
    }

    /// Removes the entry; gone already is fine.
    pub fn remove(&mut self, key: &FlowKey) -> Result<()> {
        match self.0.remove(key) {
            Err(e) if !key_not_found(&e) => Err(e).context("removing from the stack-NAT map"),
            _ => Ok(()),
        }
    }
}
