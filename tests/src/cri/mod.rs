//! A real container runtime on a simulated node: Debian's containerd (1.6.x)
//! with its CRI plugin, started inside a node network namespace with its own
//! root, state dir, gRPC socket, CNI config dir and CNI bin dir, and driven
//! over the CRI gRPC API the way the kubelet drives it.
//!
//! ```no_run
//! # use beeline_tests::{NetNs, cri::Containerd};
//! # use std::path::Path;
//! let node = NetNs::new("bln");
//! let ctd = Containerd::start(&node.name, Path::new("/tmp/net.d"), Path::new("/usr/lib/cni"));
//! let cri = ctd.cri();
//! let pod = ctd.block_on(cri.run_pod_sandbox("web", "default", "uid-1", &[])).unwrap();
//! let ctr = ctd.block_on(cri.create_container(&pod, "app", &["sleep", "3600"])).unwrap();
//! ctd.block_on(cri.start_container(&ctr)).unwrap();
//! ```
//!
//! Everything it starts or makes is undone when the [`Containerd`] guard
//! drops: sandboxes stopped and removed through CRI (which runs CNI DEL and
//! deletes the pod netns), containerd killed by its pid, stray shims and
//! container processes killed by pid, cgroups and temp files removed.
//! [`Footprint`] lists whatever would be left.
//!
//! CI needs `containerd runc busybox-static containernetworking-plugins
//! iptables protobuf-compiler` (the last one to build `k8s-cri`).
mod cleanup;
mod client;
mod config;
mod containerd;
mod image;

/// The generated CRI v1 types, for calls this wrapper does not make.
pub use k8s_cri::v1 as api;
pub use k8s_cri::v1::{PodSandboxState, Protocol};

pub use cleanup::Footprint;
pub use client::{Cri, RuntimeStatus, SandboxStatus};
pub use config::cni_bin_dir;
pub use containerd::Containerd;

/// The image every sandbox and container runs: busybox-static's binary and
/// all its applets, built and imported by [`Containerd::start`]. It doubles
/// as the sandbox ("pause") image: its default command sleeps forever.
pub const IMAGE: &str = "beeline.test/busybox:latest";
