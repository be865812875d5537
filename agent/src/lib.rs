//! The Beeline node agent as a library: the daemon (`main.rs`) and the
//! integration tests drive the same datapath and state code.
pub mod agent;
pub mod cli;
pub mod datapath;
pub mod health;
pub mod inspect;
pub mod install;
pub mod masquerade;
pub mod node_source;
pub mod nodes;
pub mod remote;
pub mod retire;
pub mod server;
pub mod state;
pub mod uplink;
