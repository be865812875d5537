//! `cargo xtask build-ebpf`: bootstraps the eBPF toolchain (nightly, rust-src,
//! bpf-linker built against the nightly's own LLVM) and builds the object.
use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

use crate::util::{output, run, step, workspace_root};

const NIGHTLY: &str = "nightly";
const BPF_LINKER_VERSION: &str = "0.13.0";
const BPF_TARGET: &str = "bpfel-unknown-none";
/// Variables that a parent cargo/rustup sets and that must not leak into the
/// nested nightly build (they would select stable or inject host flags).
const SCRUBBED_ENV: &[&str] = &[
    "RUSTUP_TOOLCHAIN",
    "RUSTC",
    "RUSTC_WRAPPER",
    "RUSTC_WORKSPACE_WRAPPER",
    "RUSTFLAGS",
    "CARGO_ENCODED_RUSTFLAGS",
    "CARGO_BUILD_RUSTFLAGS",
    "CARGO_TARGET_DIR",
    "CARGO_BUILD_TARGET",
];

#[derive(clap::Args, Default)]
pub struct BuildOptions {
    /// Build the object in debug profile (still optimized; eBPF needs it).
    #[arg(long)]
    pub debug: bool,
}

/// Where the agent's build script looks for the object (see agent/build.rs).
pub fn object_path(root: &Path) -> PathBuf {
    root.join("target/ebpf/beeline.bpf.o")
}

pub fn build(opts: &BuildOptions) -> Result<PathBuf> {
    let root = workspace_root();
    ensure_nightly()?;
    let linker = ensure_bpf_linker()?;

    step("building the eBPF object (beeline-ebpf)");
    let crate_dir = root.join("ebpf/beeline-ebpf");
    let target_dir = root.join("target/ebpf-build");
    let mut cmd = rustup_run_nightly("cargo");
    cmd.current_dir(&crate_dir)
        .args(["build", "-Z", "build-std=core", "--target", BPF_TARGET])
        .arg("--target-dir")
        .arg(&target_dir)
        .env("CARGO_TARGET_BPFEL_UNKNOWN_NONE_LINKER", &linker)
        // --btf keeps type info so aya can load BTF maps and bpftool can
        // print field names.
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            ["-Cdebuginfo=2", "-Clink-arg=--btf"].join("\x1f"),
        );
    if !opts.debug {
        cmd.arg("--release");
    }
    run(&mut cmd)?;

    let profile = if opts.debug { "debug" } else { "release" };
    let built = target_dir.join(BPF_TARGET).join(profile).join("beeline");
    let dest = object_path(&root);
    fs::create_dir_all(dest.parent().unwrap())?;
    // Copy through a temp file so a concurrent agent build never reads half an object.
    let tmp = dest.with_extension("o.tmp");
    fs::copy(&built, &tmp).with_context(|| format!("copying {}", built.display()))?;
    fs::rename(&tmp, &dest)?;
    step(&format!("eBPF object: {}", dest.display()));
    Ok(dest)
}

fn rustup_run_nightly(program: &str) -> Command {
    let mut cmd = Command::new("rustup");
    cmd.args(["run", NIGHTLY, program]);
    for var in SCRUBBED_ENV {
        cmd.env_remove(var);
    }
    cmd
}

fn ensure_nightly() -> Result<()> {
    if which("rustup").is_none() {
        bail!(
            "rustup is not installed: the eBPF build needs a nightly toolchain with rust-src.\n\
             Install rustup (https://rustup.rs) and run `cargo xtask build-ebpf` again."
        );
    }
    let toolchains = output(Command::new("rustup").args(["toolchain", "list"]))?;
    if !toolchains.lines().any(|l| l.starts_with("nightly")) {
        step("installing the nightly toolchain with rust-src (one-time, ~1 minute)");
        run(Command::new("rustup").args([
            "toolchain",
            "install",
            NIGHTLY,
            "--profile",
            "minimal",
            "--component",
            "rust-src",
        ]))
        .context("could not install the nightly toolchain; run `rustup toolchain install nightly --profile minimal -c rust-src` by hand and retry")?;
    }
    let components = output(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        NIGHTLY,
    ]))?;
    if !components.lines().any(|l| l.starts_with("rust-src")) {
        step("adding rust-src to the nightly toolchain (needed for -Z build-std)");
        run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", NIGHTLY]))
            .context("could not add rust-src; run `rustup component add rust-src --toolchain nightly` and retry")?;
    }
    Ok(())
}

/// The nightly's LLVM version, e.g. "22.1.4", and its sysroot lib dir.
fn nightly_llvm() -> Result<(String, PathBuf)> {
    let vv = output(rustup_run_nightly("rustc").arg("-vV"))?;
    let version = vv
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .context("`rustc +nightly -vV` printed no LLVM version")?
        .trim()
        .to_string();
    let sysroot = output(rustup_run_nightly("rustc").args(["--print", "sysroot"]))?;
    Ok((version, PathBuf::from(sysroot.trim()).join("lib")))
}

fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("BEELINE_CACHE_DIR") {
        return dir.into();
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| workspace_root().join("target"));
    base.join("beeline")
}

/// Returns the path of a bpf-linker linked against the nightly's libLLVM,
/// building it into the cache on first use or when the LLVM major changes.
fn ensure_bpf_linker() -> Result<PathBuf> {
    let (llvm_version, llvm_lib) = nightly_llvm()?;
    let major = llvm_version
        .split('.')
        .next()
        .context("malformed LLVM version")?;
    let prefix = cache_dir().join(format!("bpf-linker-llvm{major}"));
    let lib = prefix.join("lib");
    let bin = prefix.join("bin/bpf-linker");

    // The linker's RUNPATH points at `lib/`; refresh the links every time so a
    // nightly update with the same LLVM major keeps working.
    fs::create_dir_all(&lib)?;
    link_llvm(&llvm_lib, &lib, major)?;

    if bin.exists()
        && Command::new(&bin)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    {
        return Ok(bin);
    }
    step(&format!(
        "building bpf-linker {BPF_LINKER_VERSION} against the nightly's LLVM {llvm_version} \
         into {} (one-time, ~1 minute)",
        prefix.display()
    ));
    let mut cmd = Command::new("cargo");
    for var in SCRUBBED_ENV {
        cmd.env_remove(var);
    }
    cmd.args([
        "install",
        "bpf-linker",
        "--force",
        "--version",
        BPF_LINKER_VERSION,
    ])
    .args(["--no-default-features", "--features"])
    .arg(format!("llvm-{major}"))
    .arg("--root")
    .arg(&prefix)
    .env("LLVM_PREFIX", &prefix);
    run(&mut cmd).with_context(|| {
        format!(
            "building bpf-linker failed; it needs crates.io access and a C toolchain (gcc).\n\
             Check the output above, then retry `cargo xtask build-ebpf` (the cache is {})",
            prefix.display()
        )
    })?;
    Ok(bin)
}

fn link_llvm(sysroot_lib: &Path, lib: &Path, major: &str) -> Result<()> {
    let mut script = None;
    let mut library = None;
    for entry in fs::read_dir(sysroot_lib)? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        if name.starts_with(&format!("libLLVM-{major}-rust-")) && name.ends_with(".so") {
            script = Some(name);
        } else if name.starts_with(&format!("libLLVM.so.{major}.")) {
            library = Some(name);
        }
    }
    let (Some(script), Some(library)) = (script, library) else {
        bail!(
            "the nightly toolchain ships no libLLVM-{major} in {}; reinstall it with \
             `rustup toolchain install nightly --force`",
            sysroot_lib.display()
        );
    };
    symlink_force(&sysroot_lib.join(&script), &lib.join("libLLVM.so"))?;
    symlink_force(&sysroot_lib.join(&library), &lib.join(&library))?;
    Ok(())
}

fn symlink_force(target: &Path, link: &Path) -> Result<()> {
    match fs::remove_file(link) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e.into()),
    }
    std::os::unix::fs::symlink(target, link)
        .with_context(|| format!("linking {} -> {}", link.display(), target.display()))
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(program))
            .find(|p| p.is_file())
    })
}
