//! Measurements (`kiln.measure/1`): metrics named `<case>/<metric>` with their per-run
//! samples, and the functions that take them: file and ELF section sizes, runner latency
//! (N interleaved rounds with a reference model), accuracy from `kiln.optimize/1` or
//! `kiln.run/1` reports.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::stats;

/// Schema tag of a measurement document.
pub const MEASURE_SCHEMA: &str = "kiln.measure/1";

/// What a metric measures; picks its default budget and its direction of "worse".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Bytes (bigger is worse).
    Size,
    /// Time per inference, or its ratio to the reference model (bigger is worse).
    Latency,
    /// Top-1 accuracy in percent or cosine similarity (smaller is worse).
    Accuracy,
}

impl Kind {
    /// `size`, `latency` or `accuracy`.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Size => "size",
            Kind::Latency => "latency",
            Kind::Accuracy => "accuracy",
        }
    }
}

/// One measured quantity.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Metric {
    /// What it measures.
    pub kind: Kind,
    /// `bytes`, `ms`, `x ref` (ratio to the reference model), `%` or `cosine`.
    pub unit: String,
    /// The value compared: the median of `samples` when there are several.
    pub value: f64,
    /// One value per run (latency), empty for exact quantities.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub samples: Vec<f64>,
    /// Relative noise of `samples` (see [`stats::relative_noise`]); 0 for exact quantities.
    #[serde(default)]
    pub noise: f64,
}

impl Metric {
    /// An exact quantity (a size, an accuracy from a report).
    pub fn exact(kind: Kind, unit: &str, value: f64) -> Metric {
        Metric {
            kind,
            unit: unit.into(),
            value,
            samples: vec![],
            noise: 0.0,
        }
    }

    /// A series of runs: value = median, noise = relative robust spread.
    pub fn series(kind: Kind, unit: &str, samples: Vec<f64>) -> Metric {
        Metric {
            kind,
            unit: unit.into(),
            value: stats::median(&samples),
            noise: stats::relative_noise(&samples),
            samples,
        }
    }
}

/// A set of metrics taken together (`kiln.measure/1`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Measurement {
    /// Always `kiln.measure/1`.
    pub schema: String,
    /// Target whose runner was measured, if any.
    #[serde(default)]
    pub target: Option<String>,
    /// Latency rounds per case.
    #[serde(default)]
    pub runs: usize,
    /// The reference model latency is divided by (`None`: absolute milliseconds).
    #[serde(default)]
    pub reference: Option<String>,
    /// Timings came from qemu-user (only their ratios mean anything, and little).
    #[serde(default)]
    pub emulated: bool,
    /// Absolute latency of the reference per round (ms), for the record.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reference_ms: Vec<f64>,
    /// Metrics by `<case>/<metric>` name.
    pub metrics: BTreeMap<String, Metric>,
}

impl Default for Measurement {
    fn default() -> Self {
        Measurement {
            schema: MEASURE_SCHEMA.into(),
            target: None,
            runs: 0,
            reference: None,
            emulated: false,
            reference_ms: vec![],
            metrics: BTreeMap::new(),
        }
    }
}

impl Measurement {
    /// Parses a `kiln.measure/1` document; `origin` names it in errors.
    pub fn from_json(text: &str, origin: &str) -> Result<Measurement> {
        let v: Value =
            serde_json::from_str(text).with_context(|| format!("{origin} is not valid JSON"))?;
        match v.get("schema").and_then(Value::as_str) {
            Some(MEASURE_SCHEMA) => {}
            Some(other) => bail!("{origin} has schema `{other}`, expected `{MEASURE_SCHEMA}`"),
            None => bail!("{origin} has no `schema` field (expected `{MEASURE_SCHEMA}`)"),
        }
        let m: Measurement = serde_json::from_value(v)
            .with_context(|| format!("{origin} is not a valid {MEASURE_SCHEMA} document"))?;
        m.validate(origin)?;
        Ok(m)
    }

    /// Reads a `kiln.measure/1` file.
    pub fn read(path: &Path) -> Result<Measurement> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read measurement {}", path.display()))?;
        Measurement::from_json(&text, &path.display().to_string())
    }

    /// Refuses non-finite values, naming the metric.
    pub fn validate(&self, origin: &str) -> Result<()> {
        for (name, m) in &self.metrics {
            if !m.value.is_finite() || !m.noise.is_finite() || m.noise < 0.0 {
                bail!(
                    "{origin}: metric `{name}` has a non-finite or negative value/noise ({}, {})",
                    m.value,
                    m.noise
                );
            }
        }
        Ok(())
    }

    /// Adds a metric `<case>/<metric>`.
    pub fn insert(&mut self, case: &str, metric: &str, m: Metric) {
        self.metrics.insert(format!("{case}/{metric}"), m);
    }
}

/// Adds `<case>/bytes` for any file (a `.kiln` artifact, a model).
pub fn file_size(out: &mut Measurement, case: &str, metric: &str, path: &Path) -> Result<()> {
    let len = std::fs::metadata(path)
        .with_context(|| format!("cannot measure {} (`{case}`)", path.display()))?
        .len();
    out.insert(case, metric, Metric::exact(Kind::Size, "bytes", len as f64));
    Ok(())
}

/// Adds `<case>/bytes` and `<case>/<section>` (.text, .rodata, .data, .bss, other) of an
/// ELF executable.
pub fn elf_sizes(out: &mut Measurement, case: &str, path: &Path) -> Result<()> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let report = kiln_target::elf::inspect(&bytes)
        .with_context(|| format!("cannot measure {} (`{case}`)", path.display()))?;
    out.insert(
        case,
        "bytes",
        Metric::exact(Kind::Size, "bytes", report.file_size as f64),
    );
    for (section, size) in &report.sections {
        out.insert(
            case,
            section,
            Metric::exact(Kind::Size, "bytes", *size as f64),
        );
    }
    Ok(())
}

/// Adds the accuracy a report states as `<case>/accuracy` (top-1, in percent) or
/// `<case>/cosine`: the `optimized` value of a `kiln.optimize/1` report, or `accuracy`
/// (a fraction) of a `kiln.run/1` report.
pub fn accuracy_from_report(out: &mut Measurement, case: &str, path: &Path) -> Result<()> {
    let origin = path.display().to_string();
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read report {origin}"))?;
    let (metric, m) = accuracy_from_json(&text, &origin)?;
    out.insert(case, metric, m);
    Ok(())
}

/// [`accuracy_from_report`] on a report's text: the metric name and value.
pub fn accuracy_from_json(text: &str, origin: &str) -> Result<(&'static str, Metric)> {
    let v: Value =
        serde_json::from_str(text).with_context(|| format!("{origin} is not valid JSON"))?;
    let number = |v: &Value, field: &str| -> Result<f64> {
        v.as_f64()
            .filter(|x| x.is_finite())
            .with_context(|| format!("{origin}: `{field}` is missing or not a number"))
    };
    match v.get("schema").and_then(Value::as_str) {
        Some("kiln.optimize/1") => {
            let acc = &v["accuracy"];
            let value = number(&acc["optimized"], "accuracy.optimized")?;
            match acc["metric"].as_str() {
                Some("top1") => Ok(("accuracy", Metric::exact(Kind::Accuracy, "%", value))),
                Some("cosine") => Ok(("cosine", Metric::exact(Kind::Accuracy, "cosine", value))),
                Some(other) => bail!("{origin}: unknown accuracy metric `{other}` (top1, cosine)"),
                None => bail!("{origin}: `accuracy.metric` is missing"),
            }
        }
        Some("kiln.run/1") => {
            if v["accuracy"].is_null() {
                bail!("{origin}: the run report has no accuracy (run on a dataset with `labels`)");
            }
            let fraction = number(&v["accuracy"], "accuracy")?;
            Ok((
                "accuracy",
                Metric::exact(Kind::Accuracy, "%", fraction * 100.0),
            ))
        }
        Some(other) => {
            bail!("{origin}: schema `{other}` carries no accuracy (kiln.optimize/1, kiln.run/1)")
        }
        None => bail!("{origin}: no `schema` field (expected kiln.optimize/1 or kiln.run/1)"),
    }
}

/// One model to time: its name and its runner form (NNEF tar).
#[derive(Debug, Clone)]
pub struct BenchCase {
    /// Case name (metric prefix).
    pub name: String,
    /// The model file the runner loads.
    pub model: PathBuf,
}

/// How to time: runs per case and the runner's own iteration counts.
#[derive(Debug, Clone)]
pub struct BenchPlan {
    /// Rounds; each round runs every case once, the reference first.
    pub runs: usize,
    /// `--iters` of one `kiln-runner bench`.
    pub iters: usize,
    /// `--warmup` of one `kiln-runner bench`.
    pub warmup: usize,
}

/// p50 and p90 (ms) of one `kiln-runner bench` of `model`; `runner` makes the command
/// (native, or under qemu-user).
fn bench_once(
    runner: &dyn Fn() -> Result<Command>,
    model: &Path,
    plan: &BenchPlan,
    scratch: &Path,
) -> Result<(f64, f64, bool)> {
    let report = scratch.join("bench.json");
    let _ = std::fs::remove_file(&report);
    let mut cmd = runner()?;
    cmd.arg("bench")
        .arg("--model")
        .arg(model)
        .args(["--iters", &plan.iters.to_string()])
        .args(["--warmup", &plan.warmup.to_string()])
        .arg("--json")
        .arg(&report);
    let out = cmd
        .output()
        .with_context(|| format!("cannot start the runner ({cmd:?})"))?;
    if !out.status.success() {
        bail!(
            "kiln-runner bench failed on {} ({}): {}",
            model.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let text = std::fs::read_to_string(&report)
        .with_context(|| format!("the runner wrote no report for {}", model.display()))?;
    let v: Value = serde_json::from_str(&text)
        .with_context(|| format!("bad kiln.bench/1 report for {}", model.display()))?;
    let get = |k: &str| {
        v["latency_ms"][k]
            .as_f64()
            .with_context(|| format!("kiln.bench/1 report lacks latency_ms.{k}"))
    };
    Ok((
        get("p50")?,
        get("p90")?,
        v["emulated"].as_bool() == Some(true),
    ))
}

/// Times every case `plan.runs` times, round-robin, each round starting with the reference
/// (when given) so slow drifts of the machine hit both alike. With a reference, adds
/// `<case>/latency_p50` and `latency_p90` as ratios to the reference's p50 of the same round
/// (unit `x ref`); without, in milliseconds.
pub fn latency(
    out: &mut Measurement,
    runner: &dyn Fn() -> Result<Command>,
    cases: &[BenchCase],
    reference: Option<&BenchCase>,
    plan: &BenchPlan,
) -> Result<()> {
    if plan.runs == 0 || plan.iters == 0 {
        bail!("latency needs at least one run and one iteration per run");
    }
    let scratch = std::env::temp_dir().join(format!("kiln-check-{}", std::process::id()));
    std::fs::create_dir_all(&scratch)
        .with_context(|| format!("cannot create {}", scratch.display()))?;
    let result = (|| {
        let mut p50: Vec<Vec<f64>> = vec![vec![]; cases.len()];
        let mut p90: Vec<Vec<f64>> = vec![vec![]; cases.len()];
        let mut ref_ms: Vec<f64> = vec![];
        for _ in 0..plan.runs {
            if let Some(r) = reference {
                let (a, _, emu) = bench_once(runner, &r.model, plan, &scratch)?;
                out.emulated |= emu;
                ref_ms.push(a);
            }
            for (i, c) in cases.iter().enumerate() {
                let (a, b, emu) = bench_once(runner, &c.model, plan, &scratch)
                    .with_context(|| format!("timing `{}`", c.name))?;
                out.emulated |= emu;
                // Both percentiles over the reference's median: its p50 is the machine's
                // speed in this round; its p90 would add the reference's own spikes.
                let speed = ref_ms.last().copied().unwrap_or(1.0);
                p50[i].push(a / speed);
                p90[i].push(b / speed);
            }
        }
        let unit = if reference.is_some() { "x ref" } else { "ms" };
        for (i, c) in cases.iter().enumerate() {
            out.insert(
                &c.name,
                "latency_p50",
                Metric::series(Kind::Latency, unit, std::mem::take(&mut p50[i])),
            );
            out.insert(
                &c.name,
                "latency_p90",
                Metric::series(Kind::Latency, unit, std::mem::take(&mut p90[i])),
            );
        }
        out.runs = plan.runs;
        out.reference = reference.map(|r| r.name.clone());
        out.reference_ms = ref_ms;
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&scratch);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(report: &str, expected: Result<(&str, &str, f64), &str>) {
        match (accuracy_from_json(report, "r.json"), expected) {
            (Ok((name, m)), Ok((en, unit, v))) => {
                assert_eq!((name, m.unit.as_str()), (en, unit));
                assert!((m.value - v).abs() < 1e-9, "{}", m.value);
                assert_eq!(m.kind, Kind::Accuracy);
            }
            (Err(e), Err(needle)) => {
                let msg = format!("{e:#}");
                assert!(msg.contains(needle), "{msg}");
                assert!(msg.contains("r.json"), "{msg}");
            }
            (got, want) => panic!("{report}: got {got:?}, want {want:?}"),
        }
    }

    #[test]
    fn accuracy_reports() {
        check(
            r#"{"schema":"kiln.optimize/1","accuracy":{"metric":"top1","reference":97.0,"optimized":96.5,"drop":0.5}}"#,
            Ok(("accuracy", "%", 96.5)),
        );
        check(
            r#"{"schema":"kiln.optimize/1","accuracy":{"metric":"cosine","reference":1.0,"optimized":0.998,"drop":0.002}}"#,
            Ok(("cosine", "cosine", 0.998)),
        );
        check(
            r#"{"schema":"kiln.run/1","accuracy":0.9694}"#,
            Ok(("accuracy", "%", 96.94)),
        );
        check(
            r#"{"schema":"kiln.run/1","accuracy":null}"#,
            Err("no accuracy"),
        );
        check(r#"{"schema":"kiln.bench/1"}"#, Err("carries no accuracy"));
        check(
            r#"{"schema":"kiln.optimize/1","accuracy":{"metric":"top5","optimized":1}}"#,
            Err("unknown accuracy metric `top5`"),
        );
        check(
            r#"{"schema":"kiln.optimize/1","accuracy":{"metric":"top1"}}"#,
            Err("accuracy.optimized"),
        );
        check("{", Err("not valid JSON"));
        check("{}", Err("no `schema`"));
    }

    #[test]
    fn measurement_documents() {
        let mut m = Measurement::default();
        m.insert("a", "bytes", Metric::exact(Kind::Size, "bytes", 10.0));
        m.insert(
            "a",
            "latency_p50",
            Metric::series(Kind::Latency, "ms", vec![1.0, 2.0, 3.0]),
        );
        let text = serde_json::to_string(&m).unwrap();
        assert_eq!(Measurement::from_json(&text, "m.json").unwrap(), m);
        let err = |t: &str| format!("{:#}", Measurement::from_json(t, "m.json").unwrap_err());
        assert!(err("[").contains("m.json is not valid JSON"));
        assert!(err(r#"{"schema":"kiln.run/1"}"#).contains("expected `kiln.measure/1`"));
        assert!(err(r#"{"schema":"kiln.measure/1"}"#).contains("not a valid kiln.measure/1"));
        assert!(err(
            r#"{"schema":"kiln.measure/1","metrics":{"a/x":{"kind":"size","unit":"bytes","value":-1,"noise":-1}}}"#
        )
        .contains("`a/x`"));
    }

    #[test]
    fn elf_sizes_of_this_test_binary() {
        let mut m = Measurement::default();
        elf_sizes(&mut m, "self", &std::env::current_exe().unwrap()).unwrap();
        assert!(m.metrics["self/bytes"].value > m.metrics["self/.text"].value);
        assert!(m.metrics["self/.text"].value > 0.0);
        let dir = tempfile::tempdir().unwrap();
        let bad = dir.path().join("x");
        std::fs::write(&bad, b"nope").unwrap();
        let e = format!("{:#}", elf_sizes(&mut m, "bad", &bad).unwrap_err());
        assert!(e.contains("`bad`") && e.contains("x"), "{e}");
    }
}
