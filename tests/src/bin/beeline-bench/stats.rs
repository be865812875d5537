//! Statistics over repeated runs: medians, percentiles, spreads, per-round
//! ratios and the ratio-table rows with their noise bands.
use serde_json::{Value, json};

use crate::report::{ratio, yes_no};

pub(crate) fn sorted(v: &[f64]) -> Vec<f64> {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    s.sort_by(|a, b| a.partial_cmp(b).unwrap());
    s
}

/// Nearest-rank percentile.
pub(crate) fn pct(v: &[f64], p: f64) -> f64 {
    let s = sorted(v);
    if s.is_empty() {
        return f64::NAN;
    }
    let rank = (p / 100.0 * s.len() as f64).ceil() as usize;
    s[rank.clamp(1, s.len()) - 1]
}

/// Median (mean of the middle two for an even count).
pub(crate) fn median(v: &[f64]) -> f64 {
    let s = sorted(v);
    match s.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => s[n / 2],
        n => (s[n / 2 - 1] + s[n / 2]) / 2.0,
    }
}

/// (max - min) / median.
pub(crate) fn spread(v: &[f64]) -> f64 {
    let s = sorted(v);
    if s.len() < 2 {
        return 0.0;
    }
    (s[s.len() - 1] - s[0]) / median(&s)
}

pub(crate) fn summary(v: &[f64]) -> Value {
    let s = sorted(v);
    json!({
        "n": s.len(),
        "p50": median(&s), "p95": pct(&s, 95.0), "p99": pct(&s, 99.0),
        "min": s.first(), "max": s.last(),
        "mean": if s.is_empty() { f64::NAN } else { s.iter().sum::<f64>() / s.len() as f64 },
    })
}

pub(crate) fn round3(v: &[f64]) -> Vec<f64> {
    v.iter().map(|x| (x * 1000.0).round() / 1000.0).collect()
}

pub(crate) fn paired(a: &[f64], b: &[f64]) -> Vec<f64> {
    a.iter().zip(b).map(|(x, y)| x / y).collect()
}

/// Spread of per-round values: interquartile range / median (range /
/// median with fewer than 4).
pub(crate) fn rel_spread(v: &[f64]) -> f64 {
    if v.len() >= 4 {
        (pct(v, 75.0) - pct(v, 25.0)) / median(v)
    } else {
        spread(v)
    }
}

/// Which way a ratio has to go to meet its target.
#[derive(Clone, Copy)]
pub(crate) enum Target {
    AtLeast(f64),
    AtMost(f64),
}

pub(crate) const RATIO_HEADERS: [&str; 5] = [
    "ratio",
    "measured",
    "middle half of rounds",
    "target",
    "met",
];

/// A row of a ratio table: the median of the per-round ratios, the middle
/// half of them (how much one round can be trusted: a target inside that band
/// is within this machine's noise), the target and whether the median meets it.
pub(crate) fn ratio_row(
    what: impl Into<String>,
    per_round: &[f64],
    target: Option<Target>,
) -> Vec<String> {
    let m = median(per_round);
    let (target, met) = match target {
        Some(Target::AtLeast(t)) => (format!("≥ {t:.2}x"), yes_no(m >= t)),
        Some(Target::AtMost(t)) => (format!("≤ {t:.2}x"), yes_no(m <= t)),
        None => ("–".into(), "–".into()),
    };
    let band = if per_round.len() >= 4 {
        format!(
            "{}–{}",
            ratio(pct(per_round, 25.0)),
            ratio(pct(per_round, 75.0))
        )
    } else {
        "–".into()
    };
    vec![what.into(), ratio(m), band, target, met]
}
