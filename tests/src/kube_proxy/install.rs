//! Loading the rules into a network namespace, removing them, and dumping
//! what is there, with the same tools kube-proxy runs.
use std::{
    fmt::Write as _,
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use super::{
    iptables::{IPTABLES_CANARY_CHAIN, iptables_jump_rules, render_iptables_restore_batches},
    model::{NodeSettings, ProxyMode, Service},
    nftables::render_nftables_batches,
    plan::localhost_nodeports,
};

/// `/run/netns/<name>` for a bare name, or the path itself.
pub fn netns_path(name_or_path: &str) -> PathBuf {
    if name_or_path.contains('/') {
        PathBuf::from(name_or_path)
    } else {
        Path::new("/run/netns").join(name_or_path)
    }
}

fn in_netns(netns: &Path, program: &str) -> Command {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net={}", netns.display())).arg(program);
    cmd
}

fn run_checked(cmd: &mut Command, stdin: Option<&[u8]>) -> Result<Output> {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    });
    let mut child = cmd.spawn().with_context(|| format!("cannot run {cmd:?}"))?;
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().unwrap();
        // Write from a thread so a tool that fails early cannot deadlock us.
        let input = input.to_vec();
        let writer = std::thread::spawn(move || pipe.write_all(&input));
        let out = child.wait_with_output()?;
        let _ = writer.join();
        check(cmd, out)
    } else {
        check(cmd, child.wait_with_output()?)
    }
}

fn check(cmd: &Command, out: Output) -> Result<Output> {
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        // Keep the error readable when the input was huge.
        let stderr: String = stderr.chars().take(4000).collect();
        bail!("{cmd:?} failed ({}): {stderr}", out.status);
    }
    Ok(out)
}

fn shell_quote(arg: &str) -> String {
    format!("'{}'", arg.replace('\'', r"'\''"))
}

/// How `install_with` loads the rules.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InstallOptions {
    /// Services per `iptables-restore` call. kube-proxy loads a full sync
    /// in one call (`usize::MAX` here), but iptables-nft 1.8.9's `--noflush`
    /// restore looks chains up by name in a list, so one call is quadratic
    /// in its chains: 45 s for 10,000 Services, about 3 s in calls of 500.
    /// Cut at Service boundaries, the calls leave exactly the same rules.
    pub iptables_services_per_call: usize,
    /// Services per `nft -f` transaction. One transaction (`usize::MAX`,
    /// as kube-proxy does) is quadratic in the kernel, which walks the
    /// whole transaction for every anonymous verdict map it binds
    /// (`__nft_set_trans_bind`): 25 s for 10,000 Services, about 11 s in
    /// transactions of 1,000 (the rest is the kernel scanning every set of
    /// the table for each new anonymous set, whatever the split).
    pub nftables_services_per_call: usize,
}

impl Default for InstallOptions {
    fn default() -> Self {
        InstallOptions {
            iptables_services_per_call: 500,
            nftables_services_per_call: 1000,
        }
    }
}

/// What `install` wrote and how long the kernel took to take it.
#[derive(Clone, Debug)]
pub struct InstallReport {
    pub mode: ProxyMode,
    /// Bytes of rule text handed to `iptables-restore` / `nft -f -`.
    pub rule_bytes: usize,
    /// Number of `iptables-restore` / `nft -f -` calls.
    pub calls: usize,
    pub render_time: Duration,
    /// Time of the `iptables-restore` / `nft -f` calls alone.
    pub load_time: Duration,
    pub total_time: Duration,
}

/// Writes kube-proxy's rules for `services` into the network namespace
/// (a name under /run/netns or a path), as kube-proxy does at start-up,
/// after removing any kube-proxy rules already there (see [`remove`]):
///
/// - iptables: `route_localnet=1` (if localhost NodePorts), the canary
///   chains, `iptables -N`/`-C`/`-I` for each jump rule (one shell), then
///   `iptables-restore -w --noflush --counters`;
/// - nftables: `nft -f -` with the first-sync transaction.
///
/// The restore input / transaction is loaded in slices of Services (see
/// [`InstallOptions`]); the rules left behind are the same.
pub fn install(
    netns: &str,
    mode: ProxyMode,
    services: &[Service],
    node: &NodeSettings,
) -> Result<InstallReport> {
    install_with(netns, mode, services, node, &InstallOptions::default())
}

pub fn install_with(
    netns: &str,
    mode: ProxyMode,
    services: &[Service],
    node: &NodeSettings,
    options: &InstallOptions,
) -> Result<InstallReport> {
    let path = netns_path(netns);
    let start = Instant::now();
    remove(netns, mode)?;
    let (program, args): (&str, &[&str]) = match mode {
        ProxyMode::Iptables => {
            let mut script = String::from("set -e\n");
            if localhost_nodeports(node) {
                script.push_str("echo 1 > /proc/sys/net/ipv4/conf/all/route_localnet\n");
            }
            for table in ["mangle", "nat", "filter"] {
                let _ = writeln!(
                    script,
                    "iptables -w -t {table} -N {IPTABLES_CANARY_CHAIN} 2>/dev/null || true"
                );
            }
            for jump in iptables_jump_rules() {
                let args: Vec<String> = jump.args.iter().map(|a| shell_quote(a)).collect();
                let args = args.join(" ");
                let (t, src, dst) = (jump.table, jump.src_chain, jump.dst_chain);
                let _ = writeln!(
                    script,
                    "iptables -w -t {t} -N {dst} 2>/dev/null || true\n\
                     iptables -w -t {t} -C {src} {args} 2>/dev/null || iptables -w -t {t} -I {src} {args}"
                );
            }
            run_checked(in_netns(&path, "sh").arg("-c").arg(&script), None)
                .context("ensuring kube-proxy's jump rules")?;
            ("iptables-restore", &["-w", "--noflush", "--counters"])
        }
        ProxyMode::Nftables => ("nft", &["-f", "-"]),
    };
    let rendering = Instant::now();
    let batches = match mode {
        ProxyMode::Iptables => {
            render_iptables_restore_batches(services, node, options.iptables_services_per_call)
        }
        ProxyMode::Nftables => {
            render_nftables_batches(services, node, options.nftables_services_per_call)
        }
    };
    let render_time = rendering.elapsed();
    let load = Instant::now();
    for (i, batch) in batches.iter().enumerate() {
        run_checked(in_netns(&path, program).args(args), Some(batch.as_bytes()))
            .with_context(|| format!("{program} (call {} of {})", i + 1, batches.len()))?;
    }
    Ok(InstallReport {
        mode,
        rule_bytes: batches.iter().map(String::len).sum(),
        calls: batches.len(),
        render_time,
        load_time: load.elapsed(),
        total_time: start.elapsed(),
    })
}

fn remove_nftables(path: &Path) -> Result<()> {
    let listed = run_checked(in_netns(path, "nft").args(["list", "tables"]), None)?;
    if String::from_utf8_lossy(&listed.stdout)
        .lines()
        .any(|l| l.trim() == "table ip kube-proxy")
    {
        run_checked(
            in_netns(path, "nft").args(["delete", "table", "ip", "kube-proxy"]),
            None,
        )?;
    }
    Ok(())
}

/// Removes what `install` wrote: nftables deletes table `ip kube-proxy`
/// (kube-proxy's own cleanup); iptables deletes every rule of a built-in
/// chain that jumps to a `KUBE-` chain and every `KUBE-` chain of the
/// filter, nat and mangle tables (kubelet's KUBE-FIREWALL included).
pub fn remove(netns: &str, mode: ProxyMode) -> Result<()> {
    let path = netns_path(netns);
    match mode {
        ProxyMode::Nftables => remove_nftables(&path),
        ProxyMode::Iptables => {
            // First unhook and flush every KUBE- chain, then delete them,
            // in slices: iptables-nft's --noflush restore is quadratic in
            // the chains of one call.
            let mut flush = String::new();
            let mut delete: Vec<String> = Vec::new();
            for table in ["filter", "nat", "mangle"] {
                let saved =
                    run_checked(in_netns(&path, "iptables-save").args(["-t", table]), None)?;
                let saved = String::from_utf8_lossy(&saved.stdout);
                let ours: Vec<&str> = saved
                    .lines()
                    .filter_map(|l| l.strip_prefix(':'))
                    .filter_map(|l| l.split_whitespace().next())
                    .filter(|c| c.starts_with("KUBE-"))
                    .collect();
                if ours.is_empty() {
                    continue;
                }
                let _ = writeln!(flush, "*{table}");
                for line in saved.lines() {
                    let Some(rule) = line.strip_prefix("-A ") else {
                        continue;
                    };
                    let chain = rule.split_whitespace().next().unwrap_or("");
                    let jumps_to_ours = rule
                        .rsplit_once(" -j ")
                        .is_some_and(|(_, target)| target.starts_with("KUBE-"));
                    if !chain.starts_with("KUBE-") && jumps_to_ours {
                        let _ = writeln!(flush, "-D {rule}");
                    }
                }
                for chain in &ours {
                    let _ = writeln!(flush, ":{chain} - [0:0]");
                }
                let _ = writeln!(flush, "COMMIT");
                for slice in ours.chunks(2000) {
                    let mut restore = format!("*{table}\n");
                    for chain in slice {
                        let _ = writeln!(restore, "-X {chain}");
                    }
                    restore.push_str("COMMIT\n");
                    delete.push(restore);
                }
            }
            for restore in std::iter::once(&flush).chain(&delete) {
                if restore.is_empty() {
                    continue;
                }
                run_checked(
                    in_netns(&path, "iptables-restore").args(["-w", "--noflush"]),
                    Some(restore.as_bytes()),
                )
                .context("removing kube-proxy's iptables rules")?;
            }
            Ok(())
        }
    }
}

/// Rules installed by `install_guarded`, removed on drop.
pub struct InstalledRules {
    pub netns: String,
    pub mode: ProxyMode,
    pub report: InstallReport,
}

impl Drop for InstalledRules {
    fn drop(&mut self) {
        if netns_path(&self.netns).exists() {
            let _ = remove(&self.netns, self.mode);
        }
    }
}

/// `install`, with a guard that removes the rules when dropped.
pub fn install_guarded(
    netns: &str,
    mode: ProxyMode,
    services: &[Service],
    node: &NodeSettings,
) -> Result<InstalledRules> {
    install_guarded_with(netns, mode, services, node, &InstallOptions::default())
}

/// `install_with`, with a guard that removes the rules when dropped.
pub fn install_guarded_with(
    netns: &str,
    mode: ProxyMode,
    services: &[Service],
    node: &NodeSettings,
    options: &InstallOptions,
) -> Result<InstalledRules> {
    let report = install_with(netns, mode, services, node, options)?;
    Ok(InstalledRules {
        netns: netns.to_string(),
        mode,
        report,
    })
}

/// `iptables-save` (all tables) or `nft list ruleset` inside the namespace.
pub fn dump(netns: &str, mode: ProxyMode) -> Result<String> {
    let path = netns_path(netns);
    let out = match mode {
        ProxyMode::Iptables => run_checked(&mut in_netns(&path, "iptables-save"), None)?,
        ProxyMode::Nftables => run_checked(in_netns(&path, "nft").args(["list", "ruleset"]), None)?,
    };
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
