//! The gate: each metric of the current measurement against the baseline's, under its
//! budget and the noise rule. A metric regresses only when it got worse by more than its
//! budget *and* by more than the noise band, `noise_sigmas x sqrt(noise_base² + noise_cur²)`
//! of the baseline value (the measured relative noise of both series).

use serde::Serialize;

use crate::budget::Budgets;
use crate::measure::{Kind, Measurement};

/// Verdict on one metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Status {
    /// Within budget.
    Ok,
    /// Better than the baseline by more than the budget and the noise.
    Improved,
    /// Worse by more than the budget but not by more than the measured noise: passes.
    WithinNoise,
    /// Worse by more than the budget and the noise: fails the gate.
    Regressed,
    /// Budget `off`: reported only.
    Ungated,
}

impl Status {
    /// Short label for tables.
    pub fn label(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Improved => "improved",
            Status::WithinNoise => "within noise",
            Status::Regressed => "REGRESSED",
            Status::Ungated => "not gated",
        }
    }
}

/// One metric compared.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Row {
    /// `case/metric`.
    pub metric: String,
    /// Its kind.
    pub kind: Kind,
    /// Its unit.
    pub unit: String,
    /// Baseline value.
    pub baseline: f64,
    /// Current value.
    pub current: f64,
    /// `current - baseline`.
    pub change: f64,
    /// The change in percent of the baseline (`None` for a zero baseline).
    pub change_pct: Option<f64>,
    /// Budget as written (`+2%`).
    pub budget: String,
    /// Which key set it (`size`, `net/latency_p50`, ...).
    pub budget_key: String,
    /// Allowed worsening in the metric's unit (`None` when not gated).
    pub allowed: Option<f64>,
    /// Noise band in the metric's unit (0 for exact quantities).
    pub noise: f64,
    /// Noise band in percent of the baseline.
    pub noise_pct: f64,
    /// Verdict.
    pub status: Status,
}

/// All metrics compared, plus what could not be.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Comparison {
    /// Metrics on both sides, in name order.
    pub rows: Vec<Row>,
    /// Metrics only the baseline has.
    pub only_baseline: Vec<String>,
    /// Metrics only the current measurement has.
    pub only_current: Vec<String>,
    /// Metrics whose unit or kind differ between the sides (`name: baseline vs current`).
    pub mismatched: Vec<String>,
    /// Noise band width in standard deviations.
    pub noise_sigmas: f64,
}

impl Comparison {
    /// Number of regressed metrics.
    pub fn regressions(&self) -> usize {
        self.rows
            .iter()
            .filter(|r| r.status == Status::Regressed)
            .count()
    }

    /// Why the two sides cannot be compared (metrics on one side only, changed units), if
    /// they cannot: an input error, not a regression.
    pub fn input_problems(&self) -> Option<String> {
        let mut parts = vec![];
        if !self.only_baseline.is_empty() {
            parts.push(format!(
                "metrics in the baseline but not measured now: {}",
                self.only_baseline.join(", ")
            ));
        }
        if !self.only_current.is_empty() {
            parts.push(format!(
                "metrics measured now but not in the baseline: {}",
                self.only_current.join(", ")
            ));
        }
        if !self.mismatched.is_empty() {
            parts.push(format!(
                "metrics measured differently (unit or kind): {}",
                self.mismatched.join(", ")
            ));
        }
        (!parts.is_empty()).then(|| {
            format!(
                "{}; measure the same cases as the baseline, or accept the change with `kiln baseline update`",
                parts.join("; ")
            )
        })
    }
}

/// Compares `current` with `baseline` under `budgets`.
pub fn compare(baseline: &Measurement, current: &Measurement, budgets: &Budgets) -> Comparison {
    let mut rows = vec![];
    let mut only_baseline = vec![];
    let mut mismatched = vec![];
    for (name, b) in &baseline.metrics {
        let Some(c) = current.metrics.get(name) else {
            only_baseline.push(name.clone());
            continue;
        };
        if b.unit != c.unit || b.kind != c.kind {
            mismatched.push(format!(
                "{name}: {} {} vs {} {}",
                b.kind.name(),
                b.unit,
                c.kind.name(),
                c.unit
            ));
            continue;
        }
        let (budget, budget_key) = budgets.for_metric(name, b.kind);
        let change = c.value - b.value;
        let scale = b.value.abs();
        let change_pct = (scale > 0.0).then(|| change / scale * 100.0);
        let noise_rel = budgets.noise_sigmas * (b.noise.powi(2) + c.noise.powi(2)).sqrt();
        let noise = noise_rel * scale;
        let (allowed, status) = match budget.limit {
            None => (None, Status::Ungated),
            Some(l) => {
                let allowed = if l.relative {
                    l.amount / 100.0 * scale
                } else {
                    l.amount
                };
                let worse = if l.worse_up { change } else { -change };
                // A hair of tolerance for values that went through decimal JSON.
                let eps = 1e-9 * scale.max(1.0);
                let status = if worse > allowed + eps && worse > noise {
                    Status::Regressed
                } else if worse > allowed + eps {
                    Status::WithinNoise
                } else if -worse > allowed + eps && -worse > noise {
                    Status::Improved
                } else {
                    Status::Ok
                };
                (Some(allowed), status)
            }
        };
        rows.push(Row {
            metric: name.clone(),
            kind: b.kind,
            unit: b.unit.clone(),
            baseline: b.value,
            current: c.value,
            change,
            change_pct,
            budget: budget.text,
            budget_key,
            allowed,
            noise,
            noise_pct: noise_rel * 100.0,
            status,
        });
    }
    let only_current = current
        .metrics
        .keys()
        .filter(|k| !baseline.metrics.contains_key(*k))
        .cloned()
        .collect();
    if baseline.reference.is_some()
        && current.reference.is_some()
        && baseline.reference != current.reference
    {
        mismatched.push(format!(
            "latency reference: `{}` vs `{}`",
            baseline.reference.as_deref().unwrap_or(""),
            current.reference.as_deref().unwrap_or("")
        ));
    }
    Comparison {
        rows,
        only_baseline,
        only_current,
        mismatched,
        noise_sigmas: budgets.noise_sigmas,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::measure::Metric;

    /// Compares one metric `base` → `cur` under `budget`; `expected` is the status.
    fn check(base: Metric, cur: Metric, budget: &str, expected: Status) {
        let mut b = Measurement::default();
        let mut c = Measurement::default();
        b.insert("m", "x", base.clone());
        c.insert("m", "x", cur.clone());
        let map: BTreeMap<String, String> = [("m/x".to_string(), budget.to_string())].into();
        let budgets = Budgets::new(&map, 3.0, "test").unwrap();
        let cmp = compare(&b, &c, &budgets);
        assert_eq!(cmp.input_problems(), None);
        assert_eq!(
            cmp.rows[0].status, expected,
            "{base:?} -> {cur:?} under {budget}: {:?}",
            cmp.rows[0]
        );
    }

    fn size(v: f64) -> Metric {
        Metric::exact(Kind::Size, "bytes", v)
    }
    fn acc(v: f64) -> Metric {
        Metric::exact(Kind::Accuracy, "%", v)
    }
    fn lat(xs: &[f64]) -> Metric {
        Metric::series(Kind::Latency, "x ref", xs.to_vec())
    }

    #[test]
    fn budgets_and_directions() {
        check(size(1000.0), size(1020.0), "+2%", Status::Ok);
        check(size(1000.0), size(1021.0), "+2%", Status::Regressed);
        check(size(1000.0), size(900.0), "+2%", Status::Improved);
        check(size(1000.0), size(5000.0), "off", Status::Ungated);
        check(size(1000.0), size(1100.0), "+100", Status::Ok);
        check(size(1000.0), size(1101.0), "+100", Status::Regressed);
        check(acc(96.94), acc(96.5), "-0.5", Status::Ok);
        check(acc(96.94), acc(96.4), "-0.5", Status::Regressed);
        check(acc(96.94), acc(99.0), "-0.5", Status::Improved);
        check(size(0.0), size(0.0), "+2%", Status::Ok);
    }

    #[test]
    fn noise_rule() {
        // Quiet series: a 20% slowdown is past a 10% budget and far past the noise.
        check(
            lat(&[1.0, 1.01, 0.99, 1.0, 1.0]),
            lat(&[1.2, 1.21, 1.19, 1.2, 1.2]),
            "+10%",
            Status::Regressed,
        );
        // The same medians with ±15% noise: past the budget, not past the noise band.
        check(
            lat(&[1.0, 1.15, 0.85, 1.0, 1.1]),
            lat(&[1.2, 1.38, 1.02, 1.2, 1.3]),
            "+10%",
            Status::WithinNoise,
        );
        // 9x slower is caught whatever the noise.
        check(
            lat(&[1.0, 1.15, 0.85, 1.0, 1.1]),
            lat(&[9.0, 10.0, 8.0, 9.5, 9.0]),
            "+10%",
            Status::Regressed,
        );
        check(
            lat(&[1.0, 1.01, 0.99]),
            lat(&[1.05, 1.04, 1.06]),
            "+10%",
            Status::Ok,
        );
    }

    #[test]
    fn one_sided_and_mismatched_metrics_are_listed() {
        let mut b = Measurement::default();
        let mut c = Measurement::default();
        b.insert("a", "bytes", size(1.0));
        b.insert("gone", "bytes", size(1.0));
        c.insert("a", "bytes", size(1.0));
        c.insert("new", "bytes", size(1.0));
        b.insert("a", "latency_p50", Metric::exact(Kind::Latency, "ms", 1.0));
        c.insert(
            "a",
            "latency_p50",
            Metric::exact(Kind::Latency, "x ref", 1.0),
        );
        let budgets = Budgets::new(&BTreeMap::new(), 3.0, "test").unwrap();
        let cmp = compare(&b, &c, &budgets);
        let p = cmp.input_problems().unwrap();
        assert!(p.contains("not measured now: gone/bytes"), "{p}");
        assert!(p.contains("not in the baseline: new/bytes"), "{p}");
        assert!(
            p.contains("a/latency_p50: latency ms vs latency x ref"),
            "{p}"
        );
        assert_eq!(cmp.rows.len(), 1);
    }
}
