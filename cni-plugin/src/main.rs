//! `beeline`: the CNI plugin binary. The runtime executes it with CNI_*
//! variables and the network configuration on stdin; the result (or the
//! spec's error object) goes to stdout.
mod add;
mod addressing;
mod check;
mod commands;
mod config;
mod delegate;
mod error;
#[cfg(test)]
mod fuzz;
mod link;
mod lock;
mod netns;
mod result;

use std::{
    io::{Read, Write},
    process::ExitCode,
};

use serde_json::{Value, json};

use crate::{
    config::{Command, Env, MAX_CONFIG_BYTES, NetConf, SUPPORTED_VERSIONS},
    error::{CniError, Result, code},
    lock::AttachmentLock,
};

/// Version used for error objects when the config did not say.
const FALLBACK_VERSION: &str = "1.1.0";

fn main() -> ExitCode {
    let get = |k: &str| std::env::var(k).ok();
    let mut stdin = Vec::new();
    let read = std::io::stdin()
        .take(MAX_CONFIG_BYTES as u64 + 1)
        .read_to_end(&mut stdin);
    let version = requested_version(&stdin);
    let outcome = match read {
        Ok(_) => run(&get, &stdin),
        Err(e) => Err(CniError::new(code::IO_FAILURE, "cannot read stdin").with_details(e)),
    };
    let mut stdout = std::io::stdout().lock();
    match outcome {
        Ok(Some(out)) => {
            let _ = writeln!(stdout, "{out}");
            ExitCode::SUCCESS
        }
        Ok(None) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            let _ = writeln!(stdout, "{}", e.to_json(&version));
            ExitCode::FAILURE
        }
    }
}

/// The cniVersion the caller asked for, for error objects.
fn requested_version(stdin: &[u8]) -> String {
    serde_json::from_slice::<Value>(stdin)
        .ok()
        .and_then(|v| v.get("cniVersion")?.as_str().map(str::to_string))
        .filter(|v| SUPPORTED_VERSIONS.contains(&v.as_str()))
        .unwrap_or_else(|| FALLBACK_VERSION.to_string())
}

fn run(get: &impl Fn(&str) -> Option<String>, stdin: &[u8]) -> Result<Option<Value>> {
    let command = Env::command_from(get)?;
    if command == Command::Version {
        return Ok(Some(json!({
            "cniVersion": requested_version(stdin),
            "supportedVersions": SUPPORTED_VERSIONS,
        })));
    }
    let conf = NetConf::parse(stdin)?;
    init_logging(&conf);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CniError::new(code::IO_FAILURE, "cannot start the runtime").with_details(e))?;
    match command {
        Command::Add => {
            let env = Env::for_attachment(command, get)?;
            let lock = AttachmentLock::take(&conf, &env)?;
            let added = runtime.block_on(add::add(&env, &conf, stdin));
            if added.is_err() {
                // Undone, or never this invocation's: nothing to guard.
                lock.remove();
            }
            added.map(Some)
        }
        Command::Del => {
            let env = Env::for_attachment(command, get)?;
            let lock = AttachmentLock::take(&conf, &env)?;
            let done = runtime.block_on(commands::del(&env, &conf, stdin));
            if done.is_ok() {
                lock.remove();
            }
            done.map(|()| None)
        }
        Command::Check => {
            require_version(&conf, "0.4.0", "CHECK")?;
            let env = Env::for_attachment(command, get)?;
            let _lock = AttachmentLock::take(&conf, &env)?;
            runtime
                .block_on(check::check(&env, &conf, stdin))
                .map(|()| None)
        }
        Command::Gc => {
            require_version(&conf, "1.1.0", "GC")?;
            let env = Env::for_gc(get);
            runtime
                .block_on(commands::gc(&env, &conf, stdin))
                .map(|()| None)
        }
        Command::Status => {
            require_version(&conf, "1.1.0", "STATUS")?;
            commands::status(&conf).map(|()| None)
        }
        Command::Version => unreachable!("handled above"),
    }
}

/// CHECK came with 0.4.0, GC and STATUS with 1.1.0.
fn require_version(conf: &NetConf, min: &str, verb: &str) -> Result<()> {
    let order = |v: &str| SUPPORTED_VERSIONS.iter().position(|s| *s == v);
    if order(&conf.cni_version) < order(min) {
        return Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!(
                "{verb} needs cniVersion {min} or later, the config says {}",
                conf.cni_version
            ),
        ));
    }
    Ok(())
}

fn init_logging(conf: &NetConf) {
    let level: tracing::Level = conf
        .log_level
        .as_deref()
        .and_then(|l| l.parse().ok())
        .unwrap_or(tracing::Level::WARN);
    let builder = tracing_subscriber::fmt()
        .with_max_level(level)
        .with_ansi(false);
    // stdout carries the result: logs go to logFile, else stderr.
    let file = conf.log_file.as_ref().and_then(|path| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .ok()
    });
    let _ = match file {
        Some(file) => builder.with_writer(std::sync::Mutex::new(file)).try_init(),
        None => builder.with_writer(std::io::stderr).try_init(),
    };
}
