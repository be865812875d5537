//! Phase 1: pod setup cost, the wall time of CNI ADD / DEL (one at a time
//! and several at once), Beeline against the bridge plugin.
use std::{
    collections::BTreeMap,
    sync::{
        Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Instant,
};

use beeline_tests::NetNs;
use serde_json::{Value, json};

use crate::{
    BRIDGE_PLUGIN_DIR, Cfg, R, TARGET_ADD_MS, TARGET_DEL_MS,
    cni::{Plugin, beeline_node, beeline_plugin, bridge_plugin},
    machine::{check_interrupted, measured, step},
    report::{Output, f1, f2, plural, ratio, table, yes_no},
    stats::{median, pct, round3, spread, summary},
};

#[derive(Default, Clone)]
struct SetupSamples {
    /// plugin -> mode -> op -> milliseconds.
    ms: BTreeMap<String, BTreeMap<String, BTreeMap<String, Vec<f64>>>>,
    /// plugin -> mode -> op -> per-repetition p50.
    rep_p50: BTreeMap<String, BTreeMap<String, BTreeMap<String, Vec<f64>>>>,
    /// plugin -> mode -> op -> batch wall seconds.
    batch_s: BTreeMap<String, BTreeMap<String, BTreeMap<String, Vec<f64>>>>,
}

impl SetupSamples {
    fn push(&mut self, plugin: &str, mode: &str, op: &str, ms: Vec<f64>, batch: f64) {
        self.rep_p50
            .entry(plugin.into())
            .or_default()
            .entry(mode.into())
            .or_default()
            .entry(op.into())
            .or_default()
            .push(median(&ms));
        self.batch_s
            .entry(plugin.into())
            .or_default()
            .entry(mode.into())
            .or_default()
            .entry(op.into())
            .or_default()
            .push(batch);
        self.ms
            .entry(plugin.into())
            .or_default()
            .entry(mode.into())
            .or_default()
            .entry(op.into())
            .or_default()
            .extend(ms);
    }
    fn get(&self, plugin: &str, mode: &str, op: &str) -> Vec<f64> {
        self.ms
            .get(plugin)
            .and_then(|m| m.get(mode))
            .and_then(|m| m.get(op))
            .cloned()
            .unwrap_or_default()
    }
    fn json(&self) -> Value {
        let mut out = serde_json::Map::new();
        for (plugin, modes) in &self.ms {
            let mut pm = serde_json::Map::new();
            for (mode, ops) in modes {
                let mut mm = serde_json::Map::new();
                for (op, v) in ops {
                    mm.insert(
                        op.clone(),
                        json!({
                            "summary_ms": summary(v),
                            "per_repetition_p50_ms": self.rep_p50[plugin][mode][op],
                            "batch_seconds": self.batch_s[plugin][mode][op],
                            "samples_ms": round3(v),
                        }),
                    );
                }
                pm.insert(mode.clone(), Value::Object(mm));
            }
            out.insert(plugin.clone(), Value::Object(pm));
        }
        Value::Object(out)
    }
}

pub(crate) fn phase_setup_cost(cfg: &Cfg) -> R<Output> {
    step("phase 1: pod setup cost (CNI ADD/DEL wall time): beeline vs bridge + host-local");
    let node = beeline_node(&[]);
    let br_host = NetNs::new("blb");
    let br_dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let mut plugins = vec![beeline_plugin(&node)];
    if cfg.tools.bridge {
        plugins.push(bridge_plugin(&br_host, br_dir.path()));
    }
    // One set of pod namespaces per plugin, reused by every batch.
    let pods: Vec<Vec<NetNs>> = plugins
        .iter()
        .map(|_| (0..cfg.pods).map(|_| NetNs::new("blp")).collect())
        .collect();
    let mut attempt = 0;
    let (samples, cond) = measured(
        cfg,
        "1 pod setup",
        || {
            attempt += 1;
            let mut s = SetupSamples::default();
            let n = plugins.len();
            let id = |rep: usize, mode: &str, pi: usize, i: usize| {
                format!("bench-{attempt}-{rep}-{mode}-{pi}-{i}")
            };
            for rep in 0..cfg.reps {
                // One at a time, the plugins taking turns pod by pod.
                // VERSION does no work: the cost of exec'ing the plugin.
                for op in ["VERSION", "ADD", "DEL"] {
                    let mut ms: Vec<Vec<f64>> = vec![Vec::new(); n];
                    // Pod i of every plugin, in turn.
                    #[allow(clippy::needless_range_loop)]
                    for i in 0..cfg.pods {
                        check_interrupted()?;
                        for k in 0..n {
                            let pi = (k + i + rep) % n;
                            let (t, _) = plugins[pi].exec(
                                op,
                                &id(rep, "seq", pi, i),
                                &pods[pi][i].path(),
                            )?;
                            ms[pi].push(t.as_secs_f64() * 1e3);
                        }
                    }
                    for (pi, v) in ms.into_iter().enumerate() {
                        let total = v.iter().sum::<f64>() / 1e3;
                        s.push(plugins[pi].name, "sequential", op, v, total);
                    }
                }
                // `parallel` at once: one batch per plugin, taking turns.
                for k in 0..n {
                    let pi = (k + rep) % n;
                    check_interrupted()?;
                    let ids: Vec<String> = (0..cfg.pods).map(|i| id(rep, "par", pi, i)).collect();
                    for op in ["ADD", "DEL"] {
                        let (ms, wall) =
                            cni_batch(&plugins[pi], op, &pods[pi], &ids, cfg.parallel)?;
                        s.push(plugins[pi].name, "parallel", op, ms, wall);
                    }
                }
            }
            Ok(s)
        },
        |s| {
            let spreads = ["ADD", "DEL"].map(|op| spread(&s.rep_p50["beeline"]["sequential"][op]));
            (spreads.iter().any(|x| *x > 0.3)).then(|| {
                format!(
                    "beeline per-repetition p50 spread {:.0} % / {:.0} %",
                    spreads[0] * 100.0,
                    spreads[1] * 100.0
                )
            })
        },
        SetupSamples::json,
    )?;
    drop(pods);
    let mut rows = Vec::new();
    for mode in ["sequential", "parallel"] {
        for p in &plugins {
            let add = samples.get(p.name, mode, "ADD");
            let del = samples.get(p.name, mode, "DEL");
            let version = samples.get(p.name, mode, "VERSION");
            let wall = |op: &str| median(&samples.batch_s[p.name][mode][op]);
            rows.push(vec![
                format!(
                    "{} ({})",
                    p.name,
                    if mode == "sequential" {
                        "one at a time".to_string()
                    } else {
                        format!("{} at once", cfg.parallel)
                    }
                ),
                f1(Some(median(&add))),
                f1(Some(pct(&add, 95.0))),
                f1(Some(pct(&add, 99.0))),
                f1(Some(median(&del))),
                f1(Some(pct(&del, 95.0))),
                f1(Some(pct(&del, 99.0))),
                f1(Some(median(&version))),
                f2(Some(wall("ADD"))),
                f2(Some(wall("DEL"))),
                add.len().to_string(),
            ]);
        }
    }
    let mut md = format!(
        "## 1. Pod setup cost (CNI ADD / DEL wall time of the plugin exec)\n\n\
         {} pods per batch, {}. One at a time: the plugins take turns pod by pod (VERSION \
         all, ADD all, then DEL all). {} at once: one batch per plugin, taking turns. Times in \
         ms from spawning `nsenter --net=<node netns> <plugin>` (as a runtime would, config on \
         stdin) to its exit. VERSION does no work: it is the cost of starting the plugin. Batch \
         = wall time for all {} pods in s (one at a time: the sum). Beeline: a node with a \
         running agent (default flags), its built-in IPAM; bridge: Debian's `bridge` + \
         `host-local` (`isGateway`, no `ipMasq`). The issue's reference for the bridge plugin \
         on this machine was ~38 ms ADD / ~83 ms DEL.\n\n",
        cfg.pods,
        plural(cfg.reps, "repetition"),
        cfg.parallel,
        cfg.pods
    );
    md.push_str(&table(
        &[
            "plugin",
            "ADD p50",
            "ADD p95",
            "ADD p99",
            "DEL p50",
            "DEL p95",
            "DEL p99",
            "VERSION p50",
            "batch ADD s",
            "batch DEL s",
            "samples",
        ],
        rows,
    ));
    let bl_add = median(&samples.get("beeline", "sequential", "ADD"));
    let bl_del = median(&samples.get("beeline", "sequential", "DEL"));
    let mut targets = vec![
        vec![
            "beeline ADD p50 (one at a time)".into(),
            format!("{bl_add:.1} ms"),
            format!("≤ {TARGET_ADD_MS} ms"),
            yes_no(bl_add <= TARGET_ADD_MS),
        ],
        vec![
            "beeline DEL p50 (one at a time)".into(),
            format!("{bl_del:.1} ms"),
            format!("≤ {TARGET_DEL_MS} ms"),
            yes_no(bl_del <= TARGET_DEL_MS),
        ],
    ];
    if cfg.tools.bridge {
        for op in ["ADD", "DEL"] {
            for mode in ["sequential", "parallel"] {
                let b = median(&samples.get("bridge", mode, op));
                let a = median(&samples.get("beeline", mode, op));
                targets.push(vec![
                    format!("beeline / bridge {op} p50 ({mode})"),
                    ratio(a / b),
                    "–".into(),
                    "–".into(),
                ]);
            }
        }
    }
    md.push('\n');
    md.push_str(&table(&["check", "measured", "target", "met"], targets));
    let mut out = Output {
        json: vec![(
            "phase1_setup_cost".into(),
            json!({
                "description": "CNI ADD/DEL wall time (spawn to exit, through nsenter into the node netns), ms",
                "plugins": samples.json(),
                "beeline_agent_args": [],
                "bridge_conf": plugins.get(1).map(|p| p.conf.clone()),
            }),
        )],
        sections: vec![(1, md)],
        conditions: vec![cond],
        ..Default::default()
    };
    if !cfg.tools.bridge {
        out.notes.push(format!(
            "{BRIDGE_PLUGIN_DIR}/bridge or host-local is missing (apt-get install \
             containernetworking-plugins): the bridge plugin was not measured"
        ));
    }
    Ok(out)
}

/// One batch of `op` over all pods with `width` execs at once; returns the
/// per-exec times (ms) and the batch wall time (s).
fn cni_batch(
    p: &Plugin,
    op: &str,
    pods: &[NetNs],
    ids: &[String],
    width: usize,
) -> R<(Vec<f64>, f64)> {
    let next = AtomicUsize::new(0);
    let times = Mutex::new(Vec::with_capacity(pods.len()));
    let errors = Mutex::new(Vec::new());
    let start = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..width {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= pods.len() {
                        return;
                    }
                    match p.exec(op, &ids[i], &pods[i].path()) {
                        Ok((t, _)) => times.lock().unwrap().push(t.as_secs_f64() * 1e3),
                        Err(e) => errors.lock().unwrap().push(e),
                    }
                }
            });
        }
    });
    let wall = start.elapsed().as_secs_f64();
    let errors = errors.into_inner().unwrap();
    if let Some(e) = errors.first() {
        return Err(format!(
            "{} of {} {op} failed, first: {e}",
            errors.len(),
            pods.len()
        ));
    }
    Ok((times.into_inner().unwrap(), wall))
}
