//! `BEELINE_STACK_NAT`: replies of connections the host stack NATed, which
//! the programs leave to the stack (see the eBPF `stack_nat` module), and
//! `BEELINE_STACK_NAT_ON`, which tells the programs to look there at all.
use std::{collections::HashSet, path::Path};

use anyhow::{Context, Result};
use aya::maps::{Array, HashMap, Map, MapData};
use beeline_common::{FlowKey, map_names};

use super::key_not_found;

pub struct StackNatMap(HashMap<MapData, FlowKey, u32>, Array<MapData, u32>);

impl StackNatMap {
    /// The maps; the programs look up replies from now on if the map holds
    /// any (pins an agent without the switch filled).
    pub fn new(map: Map, on: Map) -> Result<StackNatMap> {
        let mut maps = StackNatMap(HashMap::try_from(map)?, Array::try_from(on)?);
        if maps.0.keys().next().is_some() {
            maps.switch_on()?;
        }
        Ok(maps)
    }

    pub fn open(bpffs: &Path) -> Result<StackNatMap> {
        StackNatMap::new(
            Map::HashMap(super::pinned(bpffs, map_names::STACK_NAT)?),
            Map::Array(super::pinned(bpffs, map_names::STACK_NAT_ON)?),
        )
    }

    /// Whether the programs look up replies.
    pub fn is_on(&self) -> Result<bool> {
        Ok(self.1.get(&0, 0).context("reading the stack-NAT switch")? != 0)
    }

    /// From now on the programs look up replies (never switched off).
    pub fn switch_on(&mut self) -> Result<()> {
        self.1.set(0, 1, 0).context("writing the stack-NAT switch")
    }

    pub fn keys(&self) -> Result<HashSet<FlowKey>> {
        self.0
            .keys()
            .collect::<Result<_, _>>()
            .context("reading the stack-NAT map")
    }

    pub fn insert(&mut self, key: FlowKey) -> Result<()> {
        self.switch_on()?;
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
