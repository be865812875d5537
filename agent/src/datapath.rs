//! The eBPF datapath: loads the embedded object, pins its maps under the
//! bpffs dir (reusing them across restarts) and attaches programs: pinned
//! TCX links on the node's uplink and VXLAN device, a cls_bpf filter on each
//! pod's host veth. Both outlive the agent, and a newer agent swaps its
//! program in atomically.
use std::{
    collections::BTreeMap,
    io,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{
        Array, HashMap, MapData,
        lpm_trie::{Key, LpmTrie},
    },
    programs::{
        LinkOrder, ProgramError, SchedClassifier, TcAttachType,
        links::{FdLink, LinkError, PinnedLink},
        tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions, TcError, TcHandle},
    },
    sys::SyscallError,
};
use beeline_common::{Endpoint, EndpointKey, NodeConfig, RemoteNode, map_names, program_names};

use crate::cli::PodAttach;
use ipnet::Ipv4Net;
use tracing::{debug, info};

/// The object built by `cargo xtask build-ebpf`, embedded by build.rs.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/beeline.bpf.o"));

const LINKS_DIR: &str = "links";

/// Where a pod veth's filter sits in its clsact ingress hook.
const POD_FILTER_PRIORITY: u16 = 1;
const POD_FILTER_HANDLE: TcHandle = TcHandle::new(0, 1);

pub struct Datapath {
    ebpf: Ebpf,
    /// Reader of the programs' aya-log records, until someone takes it.
    logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
    bpffs: PathBuf,
    endpoints: HashMap<MapData, EndpointKey, Endpoint>,
    remote_cidrs: LpmTrie<MapData, [u8; 4], RemoteNode>,
    node_config: Array<MapData, NodeConfig>,
    pod_attach: PodAttach,
}

impl Datapath {
    /// `debug_logs` turns on the programs' debug-level aya-log records
    /// (they only log on failure paths); off, each costs one compare.
    pub fn load(bpffs: &Path, debug_logs: bool) -> Result<Datapath> {
        ensure_bpffs(bpffs)?;
        std::fs::create_dir_all(bpffs.join(LINKS_DIR))?;
        unpin_outdated_maps(bpffs)?;
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
        for name in [
            program_names::FROM_POD,
            program_names::FROM_UPLINK,
            program_names::FROM_OVERLAY,
        ] {
            let program: &mut SchedClassifier = ebpf
                .program_mut(name)
                .with_context(|| format!("program {name} missing from the object"))?
                .try_into()?;
            program
                .load()
                .with_context(|| format!("the verifier rejected {name}"))?;
        }
        let endpoints = HashMap::try_from(
            ebpf.take_map(map_names::ENDPOINTS)
                .context("endpoints map missing")?,
        )?;
        let remote_cidrs = LpmTrie::try_from(
            ebpf.take_map(map_names::REMOTE_CIDRS)
                .context("remote CIDR map missing")?,
        )?;
        let node_config = Array::try_from(
            ebpf.take_map(map_names::NODE_CONFIG)
                .context("node config map missing")?,
        )?;
        info!(bpffs = %bpffs.display(), "datapath loaded, maps pinned");
        Ok(Datapath {
            ebpf,
            logger,
            bpffs: bpffs.to_path_buf(),
            endpoints,
            remote_cidrs,
            node_config,
            pod_attach: PodAttach::default(),
        })
    }

    pub fn with_pod_attach(mut self, mode: PodAttach) -> Datapath {
        self.pod_attach = mode;
        self
    }

    /// The reader of the programs' log records (see [`forward_logs`]).
    pub fn take_logger(&mut self) -> Option<aya_log::EbpfLogger<&'static dyn log::Log>> {
        self.logger.take()
    }

    fn link_pin(&self, ifname: &str, program: &str) -> PathBuf {
        self.bpffs
            .join(LINKS_DIR)
            .join(format!("{program}-{ifname}"))
    }

    /// Attaches `program` at tc ingress of `ifname` through a pinned link, or
    /// atomically swaps the program of an existing pinned link.
    pub fn attach(&mut self, ifname: &str, program: &str) -> Result<()> {
        let pin = self.link_pin(ifname, program);
        let prog: &mut SchedClassifier = self
            .ebpf
            .program_mut(program)
            .with_context(|| format!("program {program} missing"))?
            .try_into()?;
        let link_id = match PinnedLink::from_pin(&pin) {
            Ok(old) => {
                let link = SchedClassifierLink::try_from(FdLink::from(old))?;
                debug!(ifname, program, "replacing the program of a pinned link");
                prog.attach_to_link(link)?
            }
            Err(LinkError::SyscallError(SyscallError { io_error, .. }))
                if io_error.kind() == io::ErrorKind::NotFound =>
            {
                prog.attach_with_options(
                    ifname,
                    TcAttachType::Ingress,
                    TcAttachOptions::TcxOrder(LinkOrder::default()),
                )
                .with_context(|| format!("attaching {program} to {ifname}"))?
            }
            Err(e) => return Err(e).with_context(|| format!("reading pin {}", pin.display())),
        };
        let link: FdLink = prog.take_link(link_id)?.try_into()?;
        // Re-pinning an updated link: drop the old pin first.
        let _ = std::fs::remove_file(&pin);
        link.pin(&pin)
            .with_context(|| format!("pinning the link at {}", pin.display()))?;
        Ok(())
    }

    /// Attaches the from-pod program to a pod's host veth the configured
    /// way, or swaps this process's program into an existing attachment.
    pub fn attach_pod(&mut self, ifname: &str) -> Result<()> {
        match self.pod_attach {
            PodAttach::Tc => self.attach_filter(ifname),
            PodAttach::Tcx => self.attach(ifname, program_names::FROM_POD),
        }
    }

    /// Removes an attachment of the other kind, left by an agent that ran
    /// with the other `--pod-attach` (only restored pods can have one).
    pub fn drop_other_pod_attach(&self, ifname: &str) -> Result<()> {
        match self.pod_attach {
            PodAttach::Tc => self.detach(ifname, program_names::FROM_POD),
            PodAttach::Tcx => detach_from_pod_veth(ifname),
        }
    }

    /// A cls_bpf filter on the veth's clsact qdisc. A TCX attach waits out a
    /// full RCU grace period while holding the RTNL lock (about 9 ms on a
    /// 2-CPU VM, stalling every other netlink user on the node); a filter on
    /// a fresh clsact qdisc costs an expedited one. It lives as long as the
    /// veth.
    fn attach_filter(&mut self, ifname: &str) -> Result<()> {
        match tc::qdisc_add_clsact(ifname) {
            Ok(()) => {}
            Err(TcError::NetlinkError(e)) if e.raw_os_error() == Some(libc::EEXIST) => {}
            Err(e) => return Err(e).with_context(|| format!("adding clsact to {ifname}")),
        }
        let prog = self.program(program_names::FROM_POD)?;
        let options = NlOptions {
            priority: POD_FILTER_PRIORITY,
            handle: POD_FILTER_HANDLE,
            ..Default::default()
        };
        let id = match prog.attach_with_options(
            ifname,
            TcAttachType::Ingress,
            TcAttachOptions::Netlink(options),
        ) {
            Ok(id) => id,
            Err(ProgramError::TcError(TcError::NetlinkError(e)))
                if e.raw_os_error() == Some(libc::EEXIST) =>
            {
                debug!(ifname, "replacing the program of a pod filter");
                let existing = SchedClassifierLink::attached(
                    ifname,
                    TcAttachType::Ingress,
                    POD_FILTER_PRIORITY,
                    POD_FILTER_HANDLE,
                    None,
                )?;
                prog.attach_to_link(existing)?
            }
            Err(e) => return Err(e).with_context(|| format!("attaching to {ifname}")),
        };
        // Dropping the link would delete the filter: it must outlive us.
        std::mem::forget(prog.take_link(id)?);
        Ok(())
    }

    /// Removes the from-pod program from a host veth, whichever way it was
    /// attached (gone already is fine).
    pub fn detach_pod(&self, ifname: &str) -> Result<()> {
        self.detach(ifname, program_names::FROM_POD)?;
        detach_from_pod_veth(ifname)
    }

    /// Whether a pod's host veth runs the from-pod program.
    pub async fn pod_attached(
        &self,
        netlink: &rtnetlink::Handle,
        ifname: &str,
        ifindex: u32,
    ) -> Result<bool> {
        if self.link_pin(ifname, program_names::FROM_POD).exists() {
            return Ok(true);
        }
        Ok(pod_program_id(netlink, ifindex).await?.is_some())
    }

    fn program(&mut self, name: &str) -> Result<&mut SchedClassifier> {
        Ok(self
            .ebpf
            .program_mut(name)
            .with_context(|| format!("program {name} missing"))?
            .try_into()?)
    }

    /// Removes the pinned link, which detaches the program.
    pub fn detach(&self, ifname: &str, program: &str) -> Result<()> {
        match std::fs::remove_file(self.link_pin(ifname, program)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    pub fn upsert_endpoint(&mut self, ip: Ipv4Addr, endpoint: Endpoint) -> Result<()> {
        self.endpoints
            .insert(EndpointKey { addr: ip.octets() }, endpoint, 0)
            .with_context(|| format!("writing endpoint {ip} into the map"))
    }

    pub fn endpoint(&self, ip: Ipv4Addr) -> Result<Option<Endpoint>> {
        match self.endpoints.get(&EndpointKey { addr: ip.octets() }, 0) {
            Ok(v) => Ok(Some(v)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    pub fn remove_endpoint(&mut self, ip: Ipv4Addr) -> Result<()> {
        match self.endpoints.remove(&EndpointKey { addr: ip.octets() }) {
            Ok(()) => Ok(()),
            Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(aya::maps::MapError::SyscallError(SyscallError { io_error, .. }))
                if io_error.kind() == io::ErrorKind::NotFound =>
            {
                Ok(())
            }
            Err(e) => Err(e).with_context(|| format!("removing endpoint {ip} from the map")),
        }
    }

    pub fn set_node_config(&mut self, config: NodeConfig) -> Result<()> {
        self.node_config
            .set(0, config, 0)
            .context("writing the node config map")
    }

    pub fn remote_entries(&self) -> Result<BTreeMap<Ipv4Net, RemoteNode>> {
        let mut out = BTreeMap::new();
        for entry in self.remote_cidrs.iter() {
            let (key, value) = entry?;
            let net = Ipv4Net::new(Ipv4Addr::from(key.data()), key.prefix_len() as u8)?;
            out.insert(net, value);
        }
        Ok(out)
    }

    /// Makes the remote CIDR trie equal to `desired`; returns (upserted, removed).
    pub fn sync_remote(
        &mut self,
        desired: &BTreeMap<Ipv4Net, RemoteNode>,
    ) -> Result<(usize, usize)> {
        let current = self.remote_entries()?;
        let mut upserted = 0;
        for (net, value) in desired {
            if current.get(net) != Some(value) {
                let key = Key::new(net.prefix_len().into(), net.network().octets());
                self.remote_cidrs
                    .insert(&key, value, 0)
                    .with_context(|| format!("writing remote CIDR {net}"))?;
                upserted += 1;
            }
        }
        let mut removed = 0;
        for net in current.keys().filter(|n| !desired.contains_key(n)) {
            let key = Key::new(net.prefix_len().into(), net.network().octets());
            self.remote_cidrs
                .remove(&key)
                .with_context(|| format!("removing remote CIDR {net}"))?;
            removed += 1;
        }
        Ok((upserted, removed))
    }

    pub fn endpoint_entries(&self) -> Result<Vec<(Ipv4Addr, Endpoint)>> {
        self.endpoints
            .iter()
            .map(|r| {
                r.map(|(k, v)| (Ipv4Addr::from(k.addr), v))
                    .map_err(Into::into)
            })
            .collect()
    }
}

/// Removes the from-pod cls_bpf filter of a host veth (gone already is fine).
pub fn detach_from_pod_veth(ifname: &str) -> Result<()> {
    match tc::qdisc_detach_program(ifname, TcAttachType::Ingress, program_names::FROM_POD) {
        Ok(()) => Ok(()),
        Err(TcError::IoError(e))
            if e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ENODEV) =>
        {
            Ok(())
        }
        Err(TcError::NetlinkError(e))
            if matches!(
                e.raw_os_error(),
                Some(libc::ENODEV | libc::ENOENT | libc::EINVAL)
            ) =>
        {
            Ok(())
        }
        Err(e) => Err(e).with_context(|| format!("detaching from {ifname}")),
    }
}

/// The id of the from-pod program filtering ingress of `ifindex`, if any.
pub async fn pod_program_id(netlink: &rtnetlink::Handle, ifindex: u32) -> Result<Option<u32>> {
    use futures::TryStreamExt;
    use rtnetlink::packet_route::tc::{TcAttribute, TcFilterBpfOption, TcOption};
    let mut filters = netlink
        .traffic_filter(ifindex as i32)
        .get()
        .ingress()
        .execute();
    while let Some(filter) = filters.try_next().await? {
        let options = filter.attributes.iter().find_map(|a| match a {
            TcAttribute::Options(o) => Some(o),
            _ => None,
        });
        let (mut name, mut id) = (None, None);
        for option in options.into_iter().flatten() {
            match option {
                TcOption::Bpf(TcFilterBpfOption::ProgName(n)) => name = Some(n.as_str()),
                TcOption::Bpf(TcFilterBpfOption::ProgId(i)) => id = Some(*i),
                _ => {}
            }
        }
        // The kernel reports the program's name as "<name>" or "<section>:[<name>]".
        if name.is_some_and(|n| n.contains(program_names::FROM_POD)) {
            return Ok(id);
        }
    }
    Ok(None)
}

/// Forwards the programs' aya-log records into this process's logs.
pub async fn forward_logs(logger: aya_log::EbpfLogger<&'static dyn log::Log>) {
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

/// (key size, value size) of each map, as this build's programs use them.
fn map_layouts() -> [(&'static str, usize, usize); map_names::ALL.len()] {
    use beeline_common::Counters;
    use std::mem::size_of;
    [
        (
            map_names::ENDPOINTS,
            size_of::<EndpointKey>(),
            size_of::<Endpoint>(),
        ),
        (
            map_names::REMOTE_CIDRS,
            size_of::<Key<[u8; 4]>>(),
            size_of::<RemoteNode>(),
        ),
        (
            map_names::NODE_CONFIG,
            size_of::<u32>(),
            size_of::<NodeConfig>(),
        ),
        (map_names::STATS, size_of::<u32>(), size_of::<Counters>()),
    ]
}

/// Removes pins of maps whose layout differs from this build's (left by an
/// older agent): aya would reuse them and the verifier would reject the
/// programs. Every map is derived state (endpoints from the agent's state
/// dir, remote CIDRs from the Nodes, counters start over), refilled at start;
/// until then the attached old programs keep their old maps.
fn unpin_outdated_maps(bpffs: &Path) -> Result<()> {
    for (name, key_size, value_size) in map_layouts() {
        let pin = bpffs.join(name);
        let info = match aya::maps::MapInfo::from_pin(&pin) {
            Ok(info) => info,
            Err(aya::maps::MapError::SyscallError(SyscallError { io_error, .. }))
                if io_error.kind() == io::ErrorKind::NotFound =>
            {
                continue;
            }
            Err(e) => return Err(e).with_context(|| format!("reading pin {}", pin.display())),
        };
        let pinned = (info.key_size() as usize, info.value_size() as usize);
        if pinned != (key_size, value_size) {
            info!(
                map = name,
                ?pinned,
                wanted = ?(key_size, value_size),
                "a pinned map has an older layout: replacing it"
            );
            std::fs::remove_file(&pin)
                .with_context(|| format!("removing the outdated pin {}", pin.display()))?;
        }
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_pinned_map_has_a_layout_to_check() {
        let names = map_layouts().map(|(name, _, _)| name);
        assert_eq!(names, map_names::ALL);
    }
}
