//! One module per pinned map: its handle and every read and write user
//! space makes to it. The datapath owns the loaded maps; readers that work
//! with the agent down (`beeline-agent endpoints|nodes|stats`, `/metrics`)
//! open the pins.
use std::{io, path::Path};

use anyhow::{Context, Result};
use aya::{
    maps::{Map, MapData, MapError},
    sys::SyscallError,
};

pub mod endpoints;
pub mod node_config;
pub mod remote_cidrs;
pub mod services;
pub mod stack_nat;
pub mod stats;

pub use endpoints::EndpointsMap;
pub use node_config::NodeConfigMap;
pub use remote_cidrs::RemoteCidrsMap;
pub use services::ServicesMaps;
pub use stack_nat::StackNatMap;
pub use stats::StatsMap;

/// The pinned map `name` under `bpffs`.
pub fn pinned(bpffs: &Path, name: &str) -> Result<MapData> {
    let path = bpffs.join(name);
    MapData::from_pin(&path).with_context(|| {
        format!(
            "cannot open the pinned map {} (is the agent installed on this node, \
             and is --bpffs-dir right?)",
            path.display()
        )
    })
}

/// A map taken out of the loaded object.
pub fn take(ebpf: &mut aya::Ebpf, name: &str) -> Result<Map> {
    ebpf.take_map(name)
        .with_context(|| format!("map {name} missing from the eBPF object"))
}

/// Whether a map operation failed because the key is not there.
pub fn key_not_found(e: &MapError) -> bool {
    match e {
        MapError::KeyNotFound => true,
        MapError::SyscallError(SyscallError { io_error, .. }) => {
            io_error.kind() == io::ErrorKind::NotFound
        }
        _ => false,
    }
}
