//! Runs the conformance suite (src/conformance.rs) against any conflist.
use std::path::PathBuf;

use beeline_tests::{NetNs, conformance};
use clap::Parser;

#[derive(Parser)]
#[command(about = "CNI conformance checks through the exec protocol only")]
struct Args {
    /// A network configuration list (`{"name", "plugins": [...]}`).
    #[arg(long)]
    conflist: PathBuf,
    /// Directories holding the plugin binaries (colon-separated).
    #[arg(long, default_value = "/opt/cni/bin")]
    cni_path: String,
    /// Run the plugins in this existing netns instead of a fresh one.
    #[arg(long)]
    host_netns: Option<String>,
}

fn main() {
    // Exit only after run() dropped its namespaces.
    std::process::exit(run());
}

fn run() -> i32 {
    let args = Args::parse();
    beeline_tests::require_root();
    let conflist: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&args.conflist).expect("read the conflist"))
            .expect("the conflist is JSON");
    let fresh;
    let host = match &args.host_netns {
        Some(path) => NetNs::existing(path),
        None => {
            fresh = NetNs::new("blq");
            fresh.borrowed()
        }
    };
    let runtime = conformance::Runtime {
        host: &host,
        conflist,
        cni_path: std::env::split_paths(&args.cni_path).collect(),
    };
    let outcomes = conformance::run(&runtime);
    print!(
        "{}",
        conformance::report(&args.conflist.display().to_string(), &outcomes)
    );
    let failed = outcomes.iter().filter(|o| !o.passed).count();
    println!("\n{} passed, {failed} failed", outcomes.len() - failed);
    i32::from(failed != 0)
}
