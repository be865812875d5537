//! `BEELINE_STATS`: per-CPU packet counters by (program, verdict), summed
//! over CPUs here. Which programs and verdicts exist is `beeline_common`'s.
use std::{collections::BTreeMap, path::Path};

use anyhow::Result;
use aya::maps::{Map, MapData, PerCpuArray};
use beeline_common::{Counter, Program, Verdict, map_names, stats_slot};

pub struct StatsMap(PerCpuArray<MapData, Counter>);

/// Packets and bytes per (program, verdict), summed over CPUs.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Counters(pub BTreeMap<(Program, Verdict), Counter>);

impl Counters {
    /// Packets of `program` with `verdict`.
    pub fn get(&self, program: Program, verdict: Verdict) -> u64 {
        self.0.get(&(program, verdict)).map_or(0, |c| c.packets)
    }
}

impl StatsMap {
    pub fn open(bpffs: &Path) -> Result<StatsMap> {
        let map = Map::PerCpuArray(super::pinned(bpffs, map_names::STATS)?);
        Ok(StatsMap(PerCpuArray::try_from(map)?))
    }

    /// Every declared (program, verdict) pair, zeros included.
    pub fn read(&self) -> Result<Counters> {
        let mut out = BTreeMap::new();
        for &program in Program::ALL {
            for &verdict in Verdict::ALL {
                let per_cpu = self.0.get(&stats_slot(program, verdict), 0)?;
                let sum = per_cpu.iter().fold(Counter::default(), |a, c| Counter {
                    packets: a.packets + c.packets,
                    bytes: a.bytes + c.bytes,
                });
                out.insert((program, verdict), sum);
            }
        }
        Ok(Counters(out))
    }
}
