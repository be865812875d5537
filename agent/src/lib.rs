//! The Beeline node agent as a library: the daemon (`main.rs`) and the
//! integration tests drive the same datapath and state code.
pub mod agent;
pub mod datapath;
pub mod inspect;
pub mod nodes;
pub mod server;
pub mod state;
pub mod uplink;
