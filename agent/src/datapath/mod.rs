//! The eBPF datapath: loads the embedded object (replacing pinned maps of
//! another layout), pins its maps under the bpffs dir (reusing them across
//! restarts), and hands the maps and programs to their owners.
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use aya::{
    EbpfLoader,
    programs::{CgroupSockAddr, SchedClassifier},
};
use beeline_common::{Hook, Program, map_names};
use tracing::info;

use crate::{
    cli::PodAttach,
    maps::{self, EndpointsMap, NodeConfigMap, RemoteCidrsMap, ServicesMaps, StackNatMap},
};

mod attach;
pub mod layout;

pub use attach::{Programs, detach_from_pod_veth, pod_program_id};

/// The object built by `cargo xtask build-ebpf`, embedded by build.rs.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/beeline.bpf.o"));

/// Pinned TCX links live here, one per (program, interface).
pub const LINKS_DIR: &str = "links";

pub type EbpfLogger = aya_log::EbpfLogger<&'static dyn log::Log>;

/// The loaded datapath, split by owner.
pub struct Datapath {
    pub programs: Programs,
    pub endpoints: EndpointsMap,
    pub remote_cidrs: RemoteCidrsMap,
    pub node_config: NodeConfigMap,
    pub stack_nat: StackNatMap,
    pub services: ServicesMaps,
    /// Reader of the programs' aya-log records (see [`forward_logs`]).
    pub logger: Option<EbpfLogger>,
    /// Maps whose old pins had another layout (an older agent's).
    pub replaced_maps: Vec<&'static str>,
}

impl Datapath {
    /// `debug_logs` turns on the programs' debug-level aya-log records
    /// (they only log on failure paths); off, each costs one compare.
    pub fn load(bpffs: &Path, debug_logs: bool, pod_attach: PodAttach) -> Result<Datapath> {
        ensure_bpffs(bpffs)?;
        std::fs::create_dir_all(bpffs.join(LINKS_DIR))?;
        let declared = declared_layouts()?;
        let replaced_maps = layout::unpin_outdated(bpffs, &declared)?;
        let pins: Vec<(&str, PathBuf)> = map_names::ALL
            .iter()
            .map(|name| (*name, bpffs.join(name)))
            .collect();
        let mut loader = EbpfLoader::new();
        let log_level: u8 = if debug_logs {
            aya_log::Level::Debug as u8
        } else {
            0
        };
        loader.override_global(aya_log::LEVEL, &log_level, true);
        loader.map_max_entries(map_names::STACK_NAT, stack_nat_entries());
        for (name, path) in &pins {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader
            .load(OBJECT)
            .context("loading the eBPF object into the kernel")?;
        let logger = match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(logger) => Some(logger),
            Err(e) => {
                tracing::warn!("eBPF logs unavailable: {e}");
                None
            }
        };
        for program in Program::ALL {
            let name = program.function();
            if program.hook() == Hook::None {
                continue;
            }
            let found = ebpf
                .program_mut(name)
                .with_context(|| format!("program {name} missing from the object"))?;
            let loaded = match program.hook() {
                Hook::SockAddr => <&mut CgroupSockAddr>::try_from(found)?.load(),
                _ => <&mut SchedClassifier>::try_from(found)?.load(),
            };
            loaded.with_context(|| format!("the verifier rejected {name}"))?;
        }
        let endpoints = EndpointsMap::new(maps::take(&mut ebpf, map_names::ENDPOINTS)?)?;
        let remote_cidrs = RemoteCidrsMap::new(maps::take(&mut ebpf, map_names::REMOTE_CIDRS)?)?;
        let node_config = NodeConfigMap::new(maps::take(&mut ebpf, map_names::NODE_CONFIG)?)?;
        let stack_nat = StackNatMap::new(
            maps::take(&mut ebpf, map_names::STACK_NAT)?,
            maps::take(&mut ebpf, map_names::STACK_NAT_ON)?,
        )?;
        let services = ServicesMaps::new(maps::services::Loaded {
            services: maps::take(&mut ebpf, map_names::SERVICES)?,
            backends: maps::take(&mut ebpf, map_names::BACKENDS)?,
            lb_nat: maps::take(&mut ebpf, map_names::LB_NAT)?,
            affinity: maps::take(&mut ebpf, map_names::AFFINITY)?,
            sock_rev_nat: maps::take(&mut ebpf, map_names::SOCK_REV_NAT)?,
        })?;
        info!(bpffs = %bpffs.display(), "datapath loaded, maps pinned");
        Ok(Datapath {
            programs: Programs::new(ebpf, bpffs, pod_attach),
            endpoints,
            remote_cidrs,
            node_config,
            stack_nat,
            services,
            logger,
            replaced_maps,
        })
    }
}

/// Room for every connection conntrack can hold: no more NATed connections
/// can exist (a pin of another size is replaced, and refilled from
/// conntrack, at the next start).
pub fn stack_nat_entries() -> u32 {
    std::fs::read_to_string("/proc/sys/net/netfilter/nf_conntrack_max")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .filter(|n| *n > 0)
        .unwrap_or(beeline_common::DEFAULT_STACK_NAT_ENTRIES)
}

/// Every pinned map's layout as this build loads it: the object's map
/// definitions, with the sizes the agent sets at load time.
pub fn declared_layouts() -> Result<Vec<(&'static str, layout::Layout)>> {
    let mut declared = layout::declared(OBJECT)?;
    for (name, layout) in &mut declared {
        if *name == map_names::STACK_NAT {
            layout.max_entries = stack_nat_entries();
        }
    }
    Ok(declared)
}

/// Forwards the programs' aya-log records into this process's logs.
pub async fn forward_logs(logger: EbpfLogger) {
    let mut logger =
        // SAFETY: the ring buffer's fd is owned by `logger`, which the
        // AsyncFd owns: it stays open and the same for the AsyncFd's life.
        match unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)
        } {
            Ok(fd) => fd,
            Err(e) => {
                tracing::warn!("eBPF logs unavailable: {e}");
                return;
            }
        };
    loop {
        match logger.readable_mut().await {
            Ok(mut guard) => {
                guard.get_inner_mut().flush();
                guard.clear_ready();
            }
            Err(e) => {
                tracing::warn!("eBPF log reader: {e}");
                return;
            }
        }
    }
}

/// The host's cgroup2 mount (`/sys/fs/cgroup`, or `/sys/fs/cgroup/unified`
/// on a hybrid layout), from this process's mount table.
pub fn cgroup2_root() -> Result<PathBuf> {
    let table = std::fs::read_to_string("/proc/self/mountinfo")?;
    table
        .lines()
        .find_map(|line| {
            // `... mount-point options - fstype source options`
            let (before, after) = line.split_once(" - ")?;
            (after.split_whitespace().next()? == "cgroup2")
                .then(|| before.split_whitespace().nth(4).map(PathBuf::from))
                .flatten()
        })
        .context("no cgroup2 filesystem is mounted: pass --cgroup-root")
}

/// Makes sure `dir` can hold pins: mounts bpffs on /sys/fs/bpf when the
/// host has not (as on a fresh VM), and refuses any other filesystem.
pub fn ensure_bpffs(dir: &Path) -> Result<()> {
    const DEFAULT_MOUNT: &str = "/sys/fs/bpf";
    if dir.starts_with(DEFAULT_MOUNT) && !is_bpffs(Path::new(DEFAULT_MOUNT)) {
        info!("mounting bpffs on {DEFAULT_MOUNT}");
        nix::mount::mount(
            Some("bpf"),
            DEFAULT_MOUNT,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            Some("mode=0700"),
        )
        .context("cannot mount bpffs on /sys/fs/bpf")?;
    }
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create the bpffs dir {}", dir.display()))?;
    if !is_bpffs(dir) {
        bail!(
            "{} is not on a bpf filesystem; mount one (mount -t bpf bpf /sys/fs/bpf) or pick \
             a --bpffs-dir under a bpffs mount",
            dir.display()
        );
    }
    Ok(())
}

fn is_bpffs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path)
        .is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::BPF_FS_MAGIC)
}
