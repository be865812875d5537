//! Attaching programs: pinned TCX links on the node's uplink and VXLAN
//! device, a cls_bpf filter (or, with `--pod-attach tcx`, a pinned TCX link)
//! on each pod's host veth. All outlive the agent, and a newer agent swaps
//! its program in atomically.
use std::{
    io,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, MutexGuard},
};

use anyhow::{Context, Result};
use aya::{
    Ebpf,
    programs::{
        CgroupAttachMode, CgroupSockAddr, LinkOrder, ProgramError, SchedClassifier, TcAttachType,
        links::{FdLink, LinkError, PinnedLink},
        tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions, TcError, TcHandle},
    },
    sys::SyscallError,
};
use beeline_common::Program;
use tracing::debug;

use super::LINKS_DIR;
use crate::cli::PodAttach;

/// Where a pod veth's filter sits in its clsact ingress hook.
const POD_FILTER_PRIORITY: u16 = 1;
const POD_FILTER_HANDLE: TcHandle = TcHandle::new(0, 1);

/// The loaded programs, shared by the owners that attach them (the endpoint
/// registry: pod veths; node sync: uplink and VXLAN device). Every call
/// holds the lock only for its own netlink or bpf syscalls.
#[derive(Clone)]
pub struct Programs(Arc<Mutex<Inner>>);

struct Inner {
    ebpf: Ebpf,
    bpffs: PathBuf,
    pod_attach: PodAttach,
}

fn link_pin(bpffs: &Path, ifname: &str, program: Program) -> PathBuf {
    bpffs
        .join(LINKS_DIR)
        .join(format!("{}-{ifname}", program.function()))
}

impl Inner {
    fn program(&mut self, program: Program) -> Result<&mut SchedClassifier> {
        let name = program.function();
        Ok(self
            .ebpf
            .program_mut(name)
            .with_context(|| format!("program {name} missing"))?
            .try_into()?)
    }
}

impl Programs {
    pub fn new(ebpf: Ebpf, bpffs: &Path, pod_attach: PodAttach) -> Programs {
        Programs(Arc::new(Mutex::new(Inner {
            ebpf,
            bpffs: bpffs.to_path_buf(),
            pod_attach,
        })))
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn pod_attach(&self) -> PodAttach {
        self.lock().pod_attach
    }

    /// Whether a pinned link of `program` on `ifname` exists.
    pub fn has_link(&self, ifname: &str, program: Program) -> bool {
        link_pin(&self.lock().bpffs, ifname, program).exists()
    }

    /// Attaches `program` at tc ingress of `ifname` through a pinned link, or
    /// atomically swaps the program of an existing pinned link.
    pub fn attach_link(&self, ifname: &str, program: Program) -> Result<()> {
        let mut inner = self.lock();
        let pin = link_pin(&inner.bpffs, ifname, program);
        let prog = inner.program(program)?;
        let existing = match PinnedLink::from_pin(&pin) {
            Ok(old) => Some(SchedClassifierLink::try_from(FdLink::from(old))?),
            Err(LinkError::SyscallError(SyscallError { io_error, .. }))
                if io_error.kind() == io::ErrorKind::NotFound =>
            {
                None
            }
            Err(e) => return Err(e).with_context(|| format!("reading pin {}", pin.display())),
        };
        // Swap the program in place; a link whose device is gone (recreated
        // behind our back) cannot be updated and is replaced.
        let swapped = existing.and_then(|link| match prog.attach_to_link(link) {
            Ok(id) => Some(id),
            Err(e) => {
                debug!(
                    ifname,
                    ?program,
                    "replacing a pinned link that cannot be updated: {e}"
                );
                None
            }
        });
        let link_id = match swapped {
            Some(id) => id,
            None => prog
                .attach_with_options(
                    ifname,
                    attach_type(program),
                    TcAttachOptions::TcxOrder(LinkOrder::default()),
                )
                .with_context(|| format!("attaching {} to {ifname}", program.function()))?,
        };
        let link: FdLink = prog.take_link(link_id)?.try_into()?;
        // Re-pinning an updated link: drop the old pin first.
        let _ = std::fs::remove_file(&pin);
        link.pin(&pin)
            .with_context(|| format!("pinning the link at {}", pin.display()))?;
        Ok(())
    }

    /// Removes the pinned link, which detaches the program (gone already is fine).
    pub fn detach_link(&self, ifname: &str, program: Program) -> Result<()> {
        match std::fs::remove_file(link_pin(&self.lock().bpffs, ifname, program)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e.into()),
            _ => Ok(()),
        }
    }

    /// Attaches the pod programs (from-pod at ingress, to-pod at egress)
    /// to a pod's host veth the configured way, or swaps this process's
    /// programs into existing attachments.
    pub fn attach_pod(&self, ifname: &str) -> Result<()> {
        for program in POD_PROGRAMS {
            match self.pod_attach() {
                PodAttach::Tc => self.attach_filter(ifname, program)?,
                PodAttach::Tcx => self.attach_link(ifname, program)?,
            }
        }
        Ok(())
    }

    /// Removes attachments of the other kind, left by an agent that ran
    /// with the other `--pod-attach` (only restored pods can have them).
    pub fn drop_other_pod_attach(&self, ifname: &str) -> Result<()> {
        match self.pod_attach() {
            PodAttach::Tc => POD_PROGRAMS
                .iter()
                .try_for_each(|p| self.detach_link(ifname, *p)),
            PodAttach::Tcx => detach_from_pod_veth(ifname),
        }
    }

    /// Removes the pod programs from a host veth, whichever way they were
    /// attached (gone already is fine).
    pub fn detach_pod(&self, ifname: &str) -> Result<()> {
        for program in POD_PROGRAMS {
            self.detach_link(ifname, program)?;
        }
        detach_from_pod_veth(ifname)
    }

    /// Whether a pod's host veth runs both pod programs.
    pub async fn pod_attached(
        &self,
        netlink: &rtnetlink::Handle,
        ifname: &str,
        ifindex: u32,
    ) -> Result<bool> {
        for program in POD_PROGRAMS {
            let attached = self.has_link(ifname, program)
                || pod_program_id(netlink, ifindex, program).await?.is_some();
            if !attached {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// A cls_bpf filter on the veth's clsact qdisc. A TCX attach waits out a
    /// full RCU grace period while holding the RTNL lock (about 9 ms on a
    /// 2-CPU VM, stalling every other netlink user on the node); a filter on
    /// a fresh clsact qdisc costs an expedited one. It lives as long as the
    /// veth.
    fn attach_filter(&self, ifname: &str, program: Program) -> Result<()> {
        match tc::qdisc_add_clsact(ifname) {
            Ok(()) => {}
            Err(TcError::NetlinkError(e)) if e.raw_os_error() == Some(libc::EEXIST) => {}
            Err(e) => return Err(e).with_context(|| format!("adding clsact to {ifname}")),
        }
        let mut inner = self.lock();
        let prog = inner.program(program)?;
        let options = NlOptions {
            priority: POD_FILTER_PRIORITY,
            handle: POD_FILTER_HANDLE,
            ..Default::default()
        };
        let id = match prog.attach_with_options(
            ifname,
            attach_type(program),
            TcAttachOptions::Netlink(options),
        ) {
            Ok(id) => id,
            Err(ProgramError::TcError(TcError::NetlinkError(e)))
                if e.raw_os_error() == Some(libc::EEXIST) =>
            {
                debug!(ifname, "replacing the program of a pod filter");
                let existing = SchedClassifierLink::attached(
                    ifname,
                    attach_type(program),
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
}

/// The programs on every pod's host veth.
const POD_PROGRAMS: [Program; 2] = [Program::FromPod, Program::ToPod];

/// The socket programs (Services), on the cgroup root.
pub const SOCK_PROGRAMS: [Program; 4] = [
    Program::SockConnect,
    Program::SockSendmsg,
    Program::SockRecvmsg,
    Program::SockGetpeername,
];

/// Where the socket programs' links are pinned.
const CGROUP_PIN: &str = "cgroup";

impl Programs {
    /// Attaches the socket programs to `cgroup` through pinned links. A
    /// link already pinned (an earlier agent's, or another cgroup's) is
    /// replaced after the new one is attached: a socket call never finds
    /// no program (one that meets both is translated once: the second sees
    /// a backend's address, not a Service's).
    pub fn attach_cgroup(&self, cgroup: &Path) -> Result<()> {
        let dir = std::fs::File::open(cgroup)
            .with_context(|| format!("opening the cgroup {}", cgroup.display()))?;
        let mut inner = self.lock();
        let bpffs = inner.bpffs.clone();
        for program in SOCK_PROGRAMS {
            let name = program.function();
            let prog: &mut CgroupSockAddr = inner
                .ebpf
                .program_mut(name)
                .with_context(|| format!("program {name} missing"))?
                .try_into()?;
            // A link: the kernel takes no flags for it (links on a cgroup
            // always coexist with others).
            let id = prog
                .attach(&dir, CgroupAttachMode::Single)
                .with_context(|| format!("attaching {name}"))?;
            let link: FdLink = prog.take_link(id)?.try_into()?;
            let pin = link_pin(&bpffs, CGROUP_PIN, program);
            // bpffs refuses names with a dot.
            let fresh = PathBuf::from(format!("{}-new", pin.display()));
            let _ = std::fs::remove_file(&fresh);
            link.pin(&fresh)
                .with_context(|| format!("pinning the link at {}", fresh.display()))?;
            std::fs::rename(&fresh, &pin)
                .with_context(|| format!("replacing the pin {}", pin.display()))?;
        }
        Ok(())
    }

    /// Whether every socket program's link is pinned.
    pub fn cgroup_attached(&self) -> bool {
        let bpffs = self.lock().bpffs.clone();
        SOCK_PROGRAMS
            .iter()
            .all(|p| link_pin(&bpffs, CGROUP_PIN, *p).exists())
    }

    /// Detaches the socket programs (unpinning their links).
    pub fn detach_cgroup(&self) -> Result<bool> {
        let bpffs = self.lock().bpffs.clone();
        let mut removed = false;
        for program in SOCK_PROGRAMS {
            match std::fs::remove_file(link_pin(&bpffs, CGROUP_PIN, program)) {
                Ok(()) => removed = true,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(removed)
    }
}

fn attach_type(program: Program) -> TcAttachType {
    if program.egress() {
        TcAttachType::Egress
    } else {
        TcAttachType::Ingress
    }
}

/// Removes the pod programs' cls_bpf filters from a host veth (gone already
/// is fine).
pub fn detach_from_pod_veth(ifname: &str) -> Result<()> {
    for program in POD_PROGRAMS {
        detach_filter(ifname, program)?;
    }
    Ok(())
}

fn detach_filter(ifname: &str, program: Program) -> Result<()> {
    match tc::qdisc_detach_program(ifname, attach_type(program), program.function()) {
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

/// The id of `program` filtering `ifindex` (at its hook), if any.
pub async fn pod_program_id(
    netlink: &rtnetlink::Handle,
    ifindex: u32,
    program: Program,
) -> Result<Option<u32>> {
    use futures::TryStreamExt;
    use rtnetlink::packet_route::tc::{TcAttribute, TcFilterBpfOption, TcOption};
    let request = netlink.traffic_filter(ifindex as i32).get();
    let mut filters = if program.egress() {
        request.egress()
    } else {
        request.ingress()
    }
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
        if name.is_some_and(|n| n.contains(program.function())) {
            return Ok(id);
        }
    }
    Ok(None)
}
