//! The committed baseline (`kiln.baseline/1`): a measurement, the budgets it is held to, and
//! optionally what to measure (`measure`), so `kiln check --baseline B` alone re-measures.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::budget::{Budgets, DEFAULT_NOISE_SIGMAS};
use crate::measure::Measurement;

/// Schema tag of a baseline document.
pub const BASELINE_SCHEMA: &str = "kiln.baseline/1";

/// What `kiln check` measures when given no models on the command line. Paths are relative
/// to the baseline file's folder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MeasureSpec {
    /// Target whose runner times the models (and whose runner is sized).
    #[serde(default = "default_target")]
    pub target: String,
    /// Latency rounds per model.
    #[serde(default = "default_runs")]
    pub runs: usize,
    /// Timed inferences per round.
    #[serde(default = "default_iters")]
    pub iters: usize,
    /// Untimed inferences per round.
    #[serde(default = "default_warmup")]
    pub warmup: usize,
    /// Reference model timed in every round; latency is gated as a ratio to it.
    #[serde(default)]
    pub reference: Option<String>,
    /// Skip latency (sizes and accuracy only).
    #[serde(default)]
    pub no_latency: bool,
    /// Models to measure.
    #[serde(default)]
    pub models: Vec<ModelSpec>,
    /// Files whose size alone is gated (`.kiln` artifacts), by name.
    #[serde(default)]
    pub artifacts: BTreeMap<String, String>,
}

/// One model of a [`MeasureSpec`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    /// Case name (metric prefix).
    pub name: String,
    /// ONNX (or NNEF) file.
    pub path: String,
    /// Labelled dataset `.npz`: top-1 accuracy is measured on it on the host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<String>,
    /// A `kiln.optimize/1` or `kiln.run/1` report whose accuracy is taken.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report: Option<String>,
}

fn default_target() -> String {
    "x86_64-linux".into()
}
fn default_runs() -> usize {
    5
}
fn default_iters() -> usize {
    20
}
fn default_warmup() -> usize {
    3
}
fn default_sigmas() -> f64 {
    DEFAULT_NOISE_SIGMAS
}

impl Default for MeasureSpec {
    fn default() -> Self {
        MeasureSpec {
            target: default_target(),
            runs: default_runs(),
            iters: default_iters(),
            warmup: default_warmup(),
            reference: None,
            no_latency: false,
            models: vec![],
            artifacts: BTreeMap::new(),
        }
    }
}

/// A `kiln.baseline/1` document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Baseline {
    /// Always `kiln.baseline/1`.
    pub schema: String,
    /// Budgets by key (see [`crate::budget`]); defaults fill the rest.
    #[serde(default)]
    pub budgets: BTreeMap<String, String>,
    /// Width of the noise band in standard deviations.
    #[serde(default = "default_sigmas")]
    pub noise_sigmas: f64,
    /// What to measure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub measure: Option<MeasureSpec>,
    /// The accepted measurement.
    pub measurement: Measurement,
}

impl Baseline {
    /// A new baseline holding `measurement`, default budgets.
    pub fn new(measurement: Measurement) -> Baseline {
        Baseline {
            schema: BASELINE_SCHEMA.into(),
            budgets: BTreeMap::new(),
            noise_sigmas: DEFAULT_NOISE_SIGMAS,
            measure: None,
            measurement,
        }
    }

    /// Parses a baseline; `origin` names it in errors. Budgets are checked too.
    pub fn from_json(text: &str, origin: &str) -> Result<Baseline> {
        let v: Value = serde_json::from_str(text)
            .with_context(|| format!("baseline {origin} is not valid JSON"))?;
        match v.get("schema").and_then(Value::as_str) {
            Some(BASELINE_SCHEMA) => {}
            Some(other) => {
                bail!("baseline {origin} has schema `{other}`, expected `{BASELINE_SCHEMA}`")
            }
            None => bail!("baseline {origin} has no `schema` field (expected `{BASELINE_SCHEMA}`)"),
        }
        let b: Baseline = serde_json::from_value(v).with_context(|| {
            format!("baseline {origin} is not a valid {BASELINE_SCHEMA} document")
        })?;
        b.measurement.validate(&format!("baseline {origin}"))?;
        Budgets::new(&b.budgets, b.noise_sigmas, &format!("baseline {origin}"))?;
        Ok(b)
    }

    /// Reads a baseline file.
    pub fn read(path: &Path) -> Result<Baseline> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read baseline {}", path.display()))?;
        Baseline::from_json(&text, &path.display().to_string())
    }

    /// The budgets in force: defaults, overlaid with this file's.
    pub fn budgets(&self) -> Result<Budgets> {
        Budgets::new(&self.budgets, self.noise_sigmas, "the baseline's budgets")
    }

    /// Writes the baseline atomically (pretty JSON, trailing newline).
    pub fn write(&self, path: &Path) -> Result<()> {
        let mut text = serde_json::to_string_pretty(self)?;
        text.push('\n');
        kiln_io::fsutil::write_atomic(path, text.as_bytes())
            .with_context(|| format!("cannot write baseline {}", path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::measure::{Kind, Metric};

    fn check(text: &str, expected: Result<(), &str>) {
        match (Baseline::from_json(text, "b.json"), expected) {
            (Ok(_), Ok(())) => {}
            (Err(e), Err(needle)) => {
                let msg = format!("{e:#}");
                assert!(msg.contains(needle) && msg.contains("b.json"), "{msg}");
            }
            (got, want) => panic!("{text}: got {got:?}, want {want:?}"),
        }
    }

    #[test]
    fn baseline_documents() {
        let mut m = Measurement::default();
        m.insert("a", "bytes", Metric::exact(Kind::Size, "bytes", 10.0));
        let mut b = Baseline::new(m);
        b.budgets.insert("size".into(), "+1%".into());
        b.measure = Some(MeasureSpec::default());
        let text = serde_json::to_string(&b).unwrap();
        assert_eq!(Baseline::from_json(&text, "b.json").unwrap(), b);
        check("{\"schema\":\"kiln.baseline/1\",", Err("not valid JSON"));
        check("{}", Err("no `schema`"));
        check(
            r#"{"schema":"kiln.measure/1"}"#,
            Err("expected `kiln.baseline/1`"),
        );
        check(
            r#"{"schema":"kiln.baseline/1"}"#,
            Err("not a valid kiln.baseline/1"),
        );
        check(
            r#"{"schema":"kiln.baseline/1","budgets":{"size":"2%"},"measurement":{"schema":"kiln.measure/1","metrics":{}}}"#,
            Err("`size`"),
        );
        check(
            r#"{"schema":"kiln.baseline/1","budget":{},"measurement":{"schema":"kiln.measure/1","metrics":{}}}"#,
            Err("unknown field `budget`"),
        );
    }

    #[test]
    fn writes_atomically_and_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("kiln-baseline.json");
        let b = Baseline::new(Measurement::default());
        b.write(&p).unwrap();
        assert_eq!(Baseline::read(&p).unwrap(), b);
        let e = format!(
            "{:#}",
            Baseline::read(&dir.path().join("nope.json")).unwrap_err()
        );
        assert!(
            e.contains("cannot read baseline") && e.contains("nope.json"),
            "{e}"
        );
    }
}
