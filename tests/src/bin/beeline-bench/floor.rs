//! The redirect_peer floor: the least a `bpf_redirect_peer` datapath can
//! do, loaded with raw `bpf(2)` calls (no ELF object, no compiler).
use std::{net::Ipv4Addr, os::fd::OwnedFd, path::Path};

use beeline_tests::{BpffsDir, NetNs, hand_wired_pod};

use crate::{R, traffic::Path2};

/// The least any `bpf_redirect_peer` datapath can do, as a contender: two
/// hand-wired pods on a node whose host veths each carry a cls_bpf filter
/// (like Beeline's default `--pod-attach tc`) running only `return
/// bpf_redirect_peer(<the other host veth>, 0)`. No lookup, no header
/// rewrite, no counters: beeline / floor is what Beeline's own program costs,
/// floor / bare veth what the mechanism (tc hook + peer redirect) costs.
pub(crate) struct RedirectPeerFloor {
    // Pods first, then their node (field order is drop order).
    pods: Vec<(NetNs, Ipv4Addr)>,
    _node: NetNs,
}

pub(crate) const FLOOR: &str = "redirect_peer floor";

impl RedirectPeerFloor {
    pub(crate) fn new() -> R<RedirectPeerFloor> {
        let node = NetNs::new("bln");
        let hosts = ["floor0", "floor1"];
        let pods: Vec<(NetNs, Ipv4Addr)> = hosts
            .iter()
            .enumerate()
            .map(|(i, host)| {
                let ip = Ipv4Addr::new(10, 97, 0, 1 + i as u8);
                (hand_wired_pod(&node, host, ip, None), ip)
            })
            .collect();
        let pins = BpffsDir::new();
        std::fs::create_dir_all(&pins.path).map_err(|e| format!("{}: {e}", pins.path.display()))?;
        node.enter(|| -> R<()> {
            use aya::programs::{
                SchedClassifier, TcAttachType,
                tc::{NlOptions, TcAttachOptions, qdisc_add_clsact},
            };
            let index = |name: &str| {
                nix::net::if_::if_nametoindex(name).map_err(|e| format!("{name}: {e}"))
            };
            for (i, host) in hosts.iter().enumerate() {
                let prog = load_redirect_peer_program(index(hosts[1 - i])?)?;
                // aya takes an already loaded program only from a pin.
                let pin = pins.path.join(host);
                bpf_obj_pin(&prog, &pin)?;
                let classifier = SchedClassifier::from_pin(&pin);
                let _ = std::fs::remove_file(&pin);
                let mut classifier = classifier.map_err(|e| format!("from_pin: {e}"))?;
                qdisc_add_clsact(host).map_err(|e| format!("clsact on {host}: {e}"))?;
                let id = classifier
                    .attach_with_options(
                        host,
                        TcAttachType::Ingress,
                        TcAttachOptions::Netlink(NlOptions::default()),
                    )
                    .map_err(|e| format!("attach on {host}: {e}"))?;
                // The filter holds the program and goes with the veth when the
                // node netns is deleted; dropping the link would detach it from
                // whatever netns the dropping thread is in.
                std::mem::forget(classifier.take_link(id).map_err(|e| e.to_string())?);
            }
            Ok(())
        })?;
        Ok(RedirectPeerFloor { pods, _node: node })
    }

    pub(crate) fn path(&self) -> Path2<'_> {
        Path2 {
            name: FLOOR,
            server: &self.pods[1].0,
            ip: self.pods[1].1,
            client: &self.pods[0].0,
            via: None,
        }
    }
}

/// One `bpf_attr` for the raw syscalls below (the kernel takes zeroes for
/// every field it does not use).
#[repr(C, align(8))]
struct BpfAttr([u8; 128]);

impl BpfAttr {
    fn put_u32(&mut self, off: usize, v: u32) {
        self.0[off..off + 4].copy_from_slice(&v.to_ne_bytes());
    }
    fn put_u64(&mut self, off: usize, v: u64) {
        self.0[off..off + 8].copy_from_slice(&v.to_ne_bytes());
    }
    fn call(&mut self, cmd: u32, what: &str) -> R<i64> {
        // SAFETY: `self` is a bpf_attr-sized buffer; the pointers in it point
        // to data the caller keeps alive across this call.
        let rc =
            unsafe { libc::syscall(libc::SYS_bpf, cmd, self.0.as_mut_ptr(), self.0.len() as u32) };
        if rc < 0 {
            return Err(format!("{what}: {}", std::io::Error::last_os_error()));
        }
        Ok(rc)
    }
}

/// A `BPF_PROG_TYPE_SCHED_CLS` program of four instructions:
/// `r1 = ifindex; r2 = 0; call bpf_redirect_peer; exit`. aya loads programs
/// only from ELF objects, and this one needs no compiler.
fn load_redirect_peer_program(ifindex: u32) -> R<OwnedFd> {
    const BPF_PROG_LOAD: u32 = 5;
    const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;
    const BPF_FUNC_REDIRECT_PEER: i32 = 155;
    let insn = |code: u8, dst: u8, imm: i32| -> u64 {
        code as u64 | (dst as u64) << 8 | (imm as u32 as u64) << 32
    };
    let insns = [
        insn(0xb7, 1, ifindex as i32), // BPF_ALU64 | BPF_MOV | BPF_K: r1 = ifindex
        insn(0xb7, 2, 0),              // r2 = 0 (flags)
        insn(0x85, 0, BPF_FUNC_REDIRECT_PEER), // BPF_JMP | BPF_CALL
        insn(0x95, 0, 0),              // BPF_JMP | BPF_EXIT: return r0
    ];
    let license = c"GPL";
    let mut attr = BpfAttr([0; 128]);
    attr.put_u32(0, BPF_PROG_TYPE_SCHED_CLS);
    attr.put_u32(4, insns.len() as u32);
    attr.put_u64(8, insns.as_ptr() as u64);
    attr.put_u64(16, license.as_ptr() as u64);
    attr.0[48..53].copy_from_slice(b"floor"); // prog_name
    let fd = attr.call(BPF_PROG_LOAD, "BPF_PROG_LOAD (redirect_peer floor)")?;
    // SAFETY: the kernel just returned this descriptor to us alone.
    Ok(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as i32) })
}

fn bpf_obj_pin(prog: &OwnedFd, path: &Path) -> R<()> {
    use std::os::{fd::AsRawFd, unix::ffi::OsStrExt};
    const BPF_OBJ_PIN: u32 = 6;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(|e| e.to_string())?;
    let mut attr = BpfAttr([0; 128]);
    attr.put_u64(0, c_path.as_ptr() as u64);
    attr.put_u32(8, prog.as_raw_fd() as u32);
    attr.call(BPF_OBJ_PIN, &format!("BPF_OBJ_PIN {}", path.display()))?;
    Ok(())
}
