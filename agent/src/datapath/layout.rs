//! Pinned maps against the embedded object: a pin whose type, key size,
//! value size or capacity differs from what this build's programs declare
//! (in their BTF map definitions) is replaced at start. aya would reuse it
//! and the verifier, or worse the programs, would misread it.
use std::{io, path::Path};

use anyhow::{Context, Result};
use aya::{maps::MapInfo, sys::SyscallError};
use beeline_common::map_names;
use tracing::info;

/// What a map is, as far as its compatibility goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
}

/// The layout of every pinned map, read from the object's map definitions.
pub fn declared(object: &[u8]) -> Result<Vec<(&'static str, Layout)>> {
    let parsed = aya_obj::Object::parse(object).context("parsing the eBPF object")?;
    map_names::ALL
        .iter()
        .map(|name| {
            let map = parsed
                .maps
                .get(*name)
                .with_context(|| format!("map {name} missing from the eBPF object"))?;
            Ok((
                *name,
                Layout {
                    map_type: map.map_type(),
                    key_size: map.key_size(),
                    value_size: map.value_size(),
                    max_entries: map.max_entries(),
                },
            ))
        })
        .collect()
}

/// The layout of a pinned map; `None` when there is no pin.
pub fn pinned(pin: &Path) -> Result<Option<Layout>> {
    let info = match MapInfo::from_pin(pin) {
        Ok(info) => info,
        Err(aya::maps::MapError::SyscallError(SyscallError { io_error, .. }))
            if io_error.kind() == io::ErrorKind::NotFound =>
        {
            return Ok(None);
        }
        Err(e) => return Err(e).with_context(|| format!("reading pin {}", pin.display())),
    };
    Ok(Some(Layout {
        map_type: info.map_type()? as u32,
        key_size: info.key_size(),
        value_size: info.value_size(),
        max_entries: info.max_entries(),
    }))
}

/// Removes every pin whose layout differs from `declared`; returns the
/// names replaced. All map contents are derived state (endpoints from the
/// state dir, remote CIDRs from the Nodes), refilled before the new programs
/// are attached; until then the attached old programs keep their old maps.
pub fn unpin_outdated(
    bpffs: &Path,
    declared: &[(&'static str, Layout)],
) -> Result<Vec<&'static str>> {
    let mut replaced = Vec::new();
    for (name, wanted) in declared {
        let pin = bpffs.join(name);
        match pinned(&pin)? {
            Some(found) if found != *wanted => {
                info!(
                    map = name,
                    ?found,
                    ?wanted,
                    "a pinned map has another layout: replacing it"
                );
                std::fs::remove_file(&pin)
                    .with_context(|| format!("removing the outdated pin {}", pin.display()))?;
                replaced.push(*name);
            }
            _ => {}
        }
    }
    Ok(replaced)
}
