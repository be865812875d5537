//! The results: the report the phases fill in, its Markdown and JSON
//! files, and the number and table formatting they share.
use std::{
    collections::BTreeMap,
    panic::AssertUnwindSafe,
    sync::atomic::Ordering,
    time::{SystemTime, UNIX_EPOCH},
};

use serde_json::{Value, json};

use crate::{Cfg, INTERRUPTED, R};

#[derive(Default)]
pub(crate) struct Report {
    pub(crate) json: serde_json::Map<String, Value>,
    /// Markdown sections by phase number.
    pub(crate) sections: BTreeMap<u8, String>,
    conditions: Vec<(String, Value)>,
    pub(crate) errors: Vec<String>,
    notes: Vec<String>,
}

/// What a phase block hands back.
#[derive(Default)]
pub(crate) struct Output {
    pub(crate) json: Vec<(String, Value)>,
    pub(crate) sections: Vec<(u8, String)>,
    pub(crate) conditions: Vec<(String, Value)>,
    pub(crate) notes: Vec<String>,
    pub(crate) errors: Vec<String>,
}

impl Output {
    /// A phase's output, or its error as a report entry.
    pub(crate) fn absorb_phase(&mut self, phase: &str, result: R<Output>) {
        match result {
            Ok(o) => self.absorb(o),
            Err(e) => self.errors.push(format!("phase {phase}: {e}")),
        }
    }

    fn absorb(&mut self, other: Output) {
        self.json.extend(other.json);
        self.sections.extend(other.sections);
        self.conditions.extend(other.conditions);
        self.notes.extend(other.notes);
        self.errors.extend(other.errors);
    }
}

/// Runs a phase block, turning errors and panics into report entries; its
/// guards are dropped (cleanup) before this returns either way.
pub(crate) fn guarded(report: &mut Report, name: &str, f: impl FnOnce() -> R<Output>) {
    if INTERRUPTED.load(Ordering::SeqCst) {
        report
            .errors
            .push(format!("phase {name}: skipped (interrupted)"));
        return;
    }
    let result = std::panic::catch_unwind(AssertUnwindSafe(f));
    let out = match result {
        Ok(Ok(out)) => out,
        Ok(Err(e)) => {
            eprintln!("phase {name} failed: {e}");
            Output {
                errors: vec![format!("phase {name}: {e}")],
                ..Default::default()
            }
        }
        Err(panic) => {
            let msg = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "panic".into());
            eprintln!("phase {name} panicked: {msg}");
            Output {
                errors: vec![format!("phase {name}: panicked: {msg}")],
                ..Default::default()
            }
        }
    };
    for (k, v) in out.json {
        report.json.insert(k, v);
    }
    for (n, s) in out.sections {
        report.sections.insert(n, s);
    }
    report.conditions.extend(out.conditions);
    report.notes.extend(out.notes);
    report.errors.extend(out.errors);
}

impl Report {
    pub(crate) fn markdown(&self, cfg: &Cfg, elapsed: f64) -> String {
        let m = &self.json["machine"];
        let mut md = String::new();
        md.push_str(&format!(
            "# Beeline benchmarks, {}{}\n\n",
            today(),
            if cfg.quick { " (--quick)" } else { "" }
        ));
        md.push_str(&format!(
            "Machine: Linux {}, {} CPUs ({}), {} MiB RAM. Commit {}. {} per measurement \
             (`--quick`: 1, full run: 3), contenders interleaved; took {:.0} s.\n\n",
            m["kernel"].as_str().unwrap_or("?"),
            m["nproc"],
            m["cpu_model"].as_str().unwrap_or("?"),
            m["mem_total_mib"],
            m["git"].as_str().unwrap_or("?"),
            plural(cfg.reps, "repetition"),
            elapsed
        ));
        md.push_str(&format!(
            "Tools: {}.\n\n",
            m["tools"]
                .as_object()
                .map(|o| o
                    .iter()
                    .map(|(k, v)| format!("{k} {}", v.as_str().unwrap_or("-")))
                    .collect::<Vec<_>>()
                    .join(", "))
                .unwrap_or_default()
        ));
        for s in self.sections.values() {
            md.push_str(s);
            md.push('\n');
        }
        if !self.conditions.is_empty() {
            md.push_str("## Machine load per measurement\n\n");
            let rows = self
                .conditions
                .iter()
                .map(|(name, c)| {
                    let attempts = c["attempts"].as_array().cloned().unwrap_or_default();
                    let last = attempts.last().cloned().unwrap_or_default();
                    vec![
                        name.clone(),
                        f2(last["load1_before"].as_f64()),
                        f1(last["waited_s"].as_f64()),
                        pctf(last["busy_before"].as_f64()),
                        f2(last["load1_after"].as_f64()),
                        pctf(last["busy_during"].as_f64()),
                        pctf(last["other_processes_cpus"].as_f64()),
                        match attempts.len() {
                            0 | 1 => "no".into(),
                            _ => format!(
                                "yes ({})",
                                attempts[0]["noisy"].as_str().unwrap_or("noisy")
                            ),
                        },
                    ]
                })
                .collect();
            md.push_str(&table(
                &[
                    "measurement",
                    "load1 before",
                    "waited s",
                    "CPU busy before",
                    "load1 after",
                    "CPU busy during",
                    "other processes",
                    "repeated",
                ],
                rows,
            ));
            md.push_str(
                "\nCPU busy = share of both CPUs not idle over 1 s before the run, and over the \
                 whole run (which includes the benchmark itself). Other processes = CPU time of \
                 user-space processes outside the benchmark's process tree during the run, in % \
                 of one CPU. A measurement is repeated once (the repeat is reported) when other \
                 processes used more than 25 % of a CPU during it, when the machine was busy \
                 before it, or when its per-round ratios vary by more than 15 % (setup cost: \
                 Beeline's per-repetition p50 by more than 30 %).\n\n",
            );
        }
        if !self.notes.is_empty() {
            md.push_str("## Notes\n\n");
            for n in &self.notes {
                md.push_str(&format!("- {n}\n"));
            }
            md.push('\n');
        }
        if !self.errors.is_empty() {
            md.push_str("## Errors\n\n");
            for e in &self.errors {
                md.push_str(&format!("- {e}\n"));
            }
            md.push('\n');
        }
        md
    }
}

pub(crate) fn write_results(cfg: &Cfg, report: &Report, md: &str) -> R<String> {
    std::fs::create_dir_all(&cfg.out_dir).map_err(|e| format!("{}: {e}", cfg.out_dir.display()))?;
    let stem = format!("{}{}", today(), if cfg.quick { "-quick" } else { "" });
    let mut json = report.json.clone();
    json.insert("date".into(), json!(today()));
    json.insert(
        "conditions".into(),
        Value::Object(report.conditions.iter().cloned().collect()),
    );
    json.insert("notes".into(), json!(report.notes));
    json.insert("errors".into(), json!(report.errors));
    let jpath = cfg.out_dir.join(format!("{stem}.json"));
    let mpath = cfg.out_dir.join(format!("{stem}.md"));
    std::fs::write(
        &jpath,
        serde_json::to_vec_pretty(&Value::Object(json)).unwrap(),
    )
    .map_err(|e| format!("{}: {e}", jpath.display()))?;
    std::fs::write(&mpath, md).map_err(|e| format!("{}: {e}", mpath.display()))?;
    Ok(format!("{} and {}", jpath.display(), mpath.display()))
}

pub(crate) fn table(headers: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut s = format!("| {} |\n|", headers.join(" | "));
    for (i, _) in headers.iter().enumerate() {
        s.push_str(if i == 0 { "---|" } else { "---:|" });
    }
    s.push('\n');
    for r in rows {
        s.push_str(&format!("| {} |\n", r.join(" | ")));
    }
    s
}

pub(crate) fn f1(v: Option<f64>) -> String {
    v.filter(|x| x.is_finite())
        .map_or("–".into(), |x| format!("{x:.1}"))
}
pub(crate) fn f2(v: Option<f64>) -> String {
    v.filter(|x| x.is_finite())
        .map_or("–".into(), |x| format!("{x:.2}"))
}
fn pctf(v: Option<f64>) -> String {
    v.filter(|x| x.is_finite())
        .map_or("–".into(), |x| format!("{:.0} %", x * 100.0))
}
pub(crate) fn plural(n: usize, word: &str) -> String {
    format!("{n} {word}{}", if n == 1 { "" } else { "s" })
}

pub(crate) fn ratio(v: f64) -> String {
    if v.is_finite() {
        format!("{v:.3}x")
    } else {
        "–".into()
    }
}
pub(crate) fn yes_no(met: bool) -> String {
    if met { "yes".into() } else { "**no**".into() }
}

/// Today's date (UTC), YYYY-MM-DD.
fn today() -> String {
    let days = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() / 86400) as i64;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}
