//! `BEELINE_NODE_CONFIG`: this node's uplink, VXLAN device and settings.
use anyhow::{Context, Result};
use aya::maps::{Array, Map, MapData};
use beeline_common::NodeConfig;

pub struct NodeConfigMap(Array<MapData, NodeConfig>);

impl NodeConfigMap {
    pub fn new(map: Map) -> Result<NodeConfigMap> {
        Ok(NodeConfigMap(Array::try_from(map)?))
    }

    pub fn get(&self) -> Result<NodeConfig> {
        self.0.get(&0, 0).context("reading the node config map")
    }

    pub fn set(&mut self, config: NodeConfig) -> Result<()> {
        self.0
            .set(0, config, 0)
            .context("writing the node config map")
    }
}
