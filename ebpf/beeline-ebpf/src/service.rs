//! Service load balancing, shared by the socket hooks and the per-packet
//! path (Cilium's `lb.h`): a frontend (address, port, protocol, scope) and
//! its backend slots in `BEELINE_SERVICES`, backends by id in
//! `BEELINE_BACKENDS`, `sessionAffinity: ClientIP` in `BEELINE_AFFINITY`.
use aya_ebpf::helpers::{bpf_get_prandom_u32, bpf_ktime_get_ns};
use beeline_common::{Affinity, AffinityKey, Backend, ServiceEntry, ServiceKey, Verdict};

use crate::maps::{BEELINE_AFFINITY, BEELINE_BACKENDS, BEELINE_SERVICES};

/// A Service frontend, found.
pub struct Frontend {
    pub key: ServiceKey,
    pub entry: ServiceEntry,
}

#[inline(always)]
pub fn frontend(addr: [u8; 4], port: [u8; 2], protocol: u8, scope: u8) -> Option<Frontend> {
    let key = ServiceKey {
        addr,
        port,
        protocol,
        scope,
        slot: 0,
        pad: [0; 2],
    };
    // SAFETY: copied out at once.
    let entry = *unsafe { BEELINE_SERVICES.get(key) }?;
    Some(Frontend { key, entry })
}

/// The backend for a new connection of `client`: the one it used last
/// while its affinity lasts, else a random one. `Err(RefusedNoEndpoints)`
/// when the Service has none.
#[inline(always)]
pub fn select_backend(frontend: &Frontend, client: u64) -> Result<(u32, Backend), Verdict> {
    let count = frontend.entry.count as u32;
    if count == 0 {
        return Err(Verdict::RefusedNoEndpoints);
    }
    let affinity_key = AffinityKey {
        client,
        frontend: frontend.entry.id,
        scope: frontend.key.scope as u32,
    };
    let timeout_ns = frontend.entry.affinity_timeout as u64 * 1_000_000_000;
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    if timeout_ns != 0
        // SAFETY: copied out at once.
        && let Some(last) = unsafe { BEELINE_AFFINITY.get(affinity_key) }.copied()
        && now.saturating_sub(last.last_used_ns) < timeout_ns
        && last.slot >= 1
        && last.slot <= count
        && let Some(found) = backend_at(frontend, last.slot)
        && found.0 == last.backend
    {
        remember(&affinity_key, last.slot, found.0, now);
        return Ok(found);
    }
    // SAFETY: plain helper call.
    let slot = unsafe { bpf_get_prandom_u32() } % count + 1;
    let found = backend_at(frontend, slot).ok_or(Verdict::RefusedNoEndpoints)?;
    if timeout_ns != 0 {
        remember(&affinity_key, slot, found.0, now);
    }
    Ok(found)
}

#[inline(always)]
fn backend_at(frontend: &Frontend, slot: u32) -> Option<(u32, Backend)> {
    let key = ServiceKey {
        slot: slot as u16,
        ..frontend.key
    };
    // SAFETY: copied out at once.
    let id = unsafe { BEELINE_SERVICES.get(key) }?.id;
    // SAFETY: copied out at once.
    let backend = *unsafe { BEELINE_BACKENDS.get(id) }?;
    Some((id, backend))
}

#[inline(always)]
fn remember(key: &AffinityKey, slot: u32, backend: u32, now: u64) {
    let value = Affinity {
        backend,
        slot,
        last_used_ns: now,
    };
    let _ = BEELINE_AFFINITY.insert(key, &value, 0);
}
