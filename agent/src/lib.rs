//! The Beeline node agent as a library: the daemon (`main.rs`) and the
//! integration tests drive the same code.
//!
//! - [`owners`]: the tasks that own the node's state (endpoint registry,
//!   node sync, stack NAT, Services, CNI installer), each reconciling with
//!   a period and backoff;
//! - [`sources`]: where their inputs come from (Kubernetes watchers, files);
//! - [`datapath`] and [`maps`]: the eBPF object, its programs and one module
//!   per pinned map;
//! - [`api`], [`health`], [`metrics`], [`status`]: what the agent serves
//!   and publishes;
//! - [`daemon`], [`uninstall`], [`inspect`]: the commands.
pub mod api;
pub mod cli;
pub mod conntrack;
pub mod daemon;
pub mod datapath;
pub mod health;
pub mod inspect;
pub mod install;
pub mod maps;
pub mod metrics;
pub mod netfilter;
pub mod owners;
pub mod remote;
pub mod retire;
pub mod routes;
pub mod sockets;
pub mod sources;
pub mod state;
pub mod status;
pub mod uninstall;
pub mod uplink;
