//! Embeds the eBPF object built by `cargo xtask build-ebpf`, so the agent
//! never guesses a path at run time.
use std::{env, fs, path::PathBuf};

fn main() {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let object = env::var_os("BEELINE_EBPF_OBJECT")
        .map(PathBuf::from)
        .unwrap_or_else(|| manifest.join("../target/ebpf/beeline.bpf.o"));
    println!("cargo:rerun-if-env-changed=BEELINE_EBPF_OBJECT");
    println!("cargo:rerun-if-changed={}", object.display());
    if !object.exists() {
        panic!(
            "\n\nThe eBPF object {} is missing.\nRun `cargo xtask build-ebpf` first \
             (it installs what it needs), or point BEELINE_EBPF_OBJECT at a built object.\n\n",
            object.display()
        );
    }
    let out = PathBuf::from(env::var("OUT_DIR").unwrap()).join("beeline.bpf.o");
    fs::copy(&object, &out).expect("copy the eBPF object into OUT_DIR");
}
