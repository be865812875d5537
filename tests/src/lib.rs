//! Test harness: real network namespaces as nodes and pods, the real agent
//! and CNI binaries, and guards that clean up on every path (including
//! panics), with unique names so tests run in parallel.

pub use serde_json::json;

mod cluster;
mod cni;
pub mod cni_spec;
pub mod conformance;
pub mod cri;
pub mod kube_proxy;
mod netns;
pub mod service_lb;
mod traffic;
mod util;

pub use cluster::*;
pub use cni::*;
pub use netns::*;
pub use traffic::*;
pub use util::*;
