//! `BEELINE_REMOTE_CIDRS`: other nodes' podCIDRs (an LPM trie), each with
//! the node that owns it and how to reach it.
use std::{collections::BTreeMap, net::Ipv4Addr, path::Path};

use anyhow::{Context, Result};
use aya::maps::{
    Map, MapData,
    lpm_trie::{Key, LpmTrie},
};
use beeline_common::{RemoteNode, map_names};
use ipnet::Ipv4Net;

pub struct RemoteCidrsMap(LpmTrie<MapData, [u8; 4], RemoteNode>);

fn key(net: &Ipv4Net) -> Key<[u8; 4]> {
    Key::new(net.prefix_len().into(), net.network().octets())
}

impl RemoteCidrsMap {
    pub fn new(map: Map) -> Result<RemoteCidrsMap> {
        Ok(RemoteCidrsMap(LpmTrie::try_from(map)?))
    }

    pub fn open(bpffs: &Path) -> Result<RemoteCidrsMap> {
        RemoteCidrsMap::new(Map::LpmTrie(super::pinned(bpffs, map_names::REMOTE_CIDRS)?))
    }

    pub fn entries(&self) -> Result<BTreeMap<Ipv4Net, RemoteNode>> {
        let mut out = BTreeMap::new();
        for entry in self.0.iter() {
            let (key, value) = entry?;
            let net = Ipv4Net::new(Ipv4Addr::from(key.data()), key.prefix_len() as u8)?;
            out.insert(net, value);
        }
        Ok(out)
    }

    /// Makes the trie equal to `desired`; returns (upserted, removed).
    pub fn sync(&mut self, desired: &BTreeMap<Ipv4Net, RemoteNode>) -> Result<(usize, usize)> {
        let current = self.entries()?;
        let mut upserted = 0;
        for (net, value) in desired {
            if current.get(net) != Some(value) {
                self.0
                    .insert(&key(net), value, 0)
                    .with_context(|| format!("writing remote CIDR {net}"))?;
                upserted += 1;
            }
        }
        let mut removed = 0;
        for net in current.keys().filter(|n| !desired.contains_key(n)) {
            self.0
                .remove(&key(net))
                .with_context(|| format!("removing remote CIDR {net}"))?;
            removed += 1;
        }
        Ok((upserted, removed))
    }
}
