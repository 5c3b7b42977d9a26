//! What the collector accepts: a JSON object whose `schema` is `kiln.bench/1` or
//! `kiln.install/1` with the fields the store indexes. Anything else is refused with a
//! reason naming the field (HTTP 400).

use serde_json::Value;

/// Report schemas the collector stores.
pub const ACCEPTED_SCHEMAS: &[&str] = &["kiln.bench/1", "kiln.install/1"];

/// The indexed facts of one report (the whole body is stored beside them).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct Summary {
    /// `kiln.bench/1` or `kiln.install/1`.
    pub schema: String,
    /// Model (bench: as the runner named it; install: the artifact's name).
    pub model: Option<String>,
    /// Device: the report's `device`, else its CPU model, else its target.
    pub device: Option<String>,
    /// The runner's build target.
    pub target: Option<String>,
    /// CPU architecture.
    pub arch: Option<String>,
    /// Model precision (`f32`, `f16`, `int8`) when the report says.
    pub precision: Option<String>,
    /// Ran under emulation (timings meaningless).
    pub emulated: Option<bool>,
    /// Latency percentiles and mean of one inference, ms.
    pub p50_ms: Option<f64>,
    /// 90th percentile, ms.
    pub p90_ms: Option<f64>,
    /// 99th percentile, ms.
    pub p99_ms: Option<f64>,
    /// Mean, ms.
    pub mean_ms: Option<f64>,
    /// Inferences per second.
    pub throughput_per_s: Option<f64>,
    /// Process start to first result, ms.
    pub cold_start_ms: Option<f64>,
    /// Peak resident memory.
    pub peak_rss_bytes: Option<i64>,
    /// Install outcome (`installed`, `rejected`, ...), install reports only.
    pub outcome: Option<String>,
}

/// Parses and checks a report body; the error is the reason sent back with HTTP 400.
pub fn check(body: &[u8]) -> Result<(Value, Summary), String> {
    let v: Value = serde_json::from_slice(body).map_err(|e| format!("malformed JSON: {e}"))?;
    let obj = v.as_object().ok_or("the report is not a JSON object")?;
    let schema = obj
        .get("schema")
        .and_then(Value::as_str)
        .ok_or("field `schema` is missing or not a string")?;
    let text = |k: &str| obj.get(k).and_then(Value::as_str).map(str::to_string);
    let need_text =
        |k: &str| text(k).ok_or(format!("{schema}: field `{k}` is missing or not a string"));
    let s = match schema {
        "kiln.bench/1" => {
            let lat = obj
                .get("latency_ms")
                .and_then(Value::as_object)
                .ok_or("kiln.bench/1: field `latency_ms` is missing or not an object")?;
            let num = |k: &str| -> Result<f64, String> {
                lat.get(k)
                    .and_then(Value::as_f64)
                    .filter(|x| x.is_finite() && *x >= 0.0)
                    .ok_or(format!(
                        "kiln.bench/1: `latency_ms.{k}` is missing or not a non-negative number"
                    ))
            };
            let cpu_model = obj
                .get("cpu")
                .and_then(|c| c.get("model"))
                .and_then(Value::as_str)
                .map(str::to_string);
            let target = need_text("target")?;
            Summary {
                schema: schema.into(),
                model: Some(model_name(&need_text("model")?)),
                device: text("device").or(cpu_model).or(Some(target.clone())),
                target: Some(target),
                arch: text("arch"),
                precision: text("precision"),
                emulated: obj.get("emulated").and_then(Value::as_bool),
                p50_ms: Some(num("p50")?),
                p90_ms: Some(num("p90")?),
                p99_ms: Some(num("p99")?),
                mean_ms: Some(num("mean")?),
                throughput_per_s: obj.get("throughput_per_s").and_then(Value::as_f64),
                cold_start_ms: obj
                    .get("cold_start_ms")
                    .and_then(|c| c.get("total"))
                    .and_then(Value::as_f64),
                peak_rss_bytes: obj.get("peak_rss_bytes").and_then(Value::as_i64),
                outcome: None,
            }
        }
        "kiln.install/1" => Summary {
            schema: schema.into(),
            model: text("name"),
            device: text("device"),
            target: text("target"),
            outcome: Some(need_text("outcome")?),
            ..Summary::default()
        },
        other => {
            return Err(format!(
                "unsupported schema `{other}` (accepted: {})",
                ACCEPTED_SCHEMAS.join(", ")
            ))
        }
    };
    Ok((v, s))
}

/// A model path as the runner gave it (`/data/cnn.nnef.tar`) becomes its name (`cnn`), so
/// the same model groups across devices; other names (`mobilenet v2 (installed)`) stay.
pub fn model_name(given: &str) -> String {
    let file = given.rsplit('/').next().unwrap_or(given);
    let stem = [".nnef.tar", ".nnef.tgz", ".nnef"]
        .iter()
        .find_map(|ext| file.strip_suffix(ext))
        .unwrap_or(file);
    if stem.is_empty() {
        given.to_string()
    } else {
        stem.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_a_bench_report() {
        let (_, s) = check(
            br#"{"schema":"kiln.bench/1","model":"m","target":"t","cpu":{"model":"C"},
            "latency_ms":{"p50":1,"p90":2,"p99":3,"mean":1.5},"peak_rss_bytes":5}"#,
        )
        .unwrap();
        assert_eq!(s.device.as_deref(), Some("C"));
        assert_eq!((s.p99_ms, s.peak_rss_bytes), (Some(3.0), Some(5)));
    }

    #[test]
    fn model_paths_become_names() {
        assert_eq!(model_name("/tmp/b/cnn.nnef.tar"), "cnn");
        assert_eq!(
            model_name("mobilenet v2 (installed)"),
            "mobilenet v2 (installed)"
        );
        assert_eq!(model_name("embedded model"), "embedded model");
    }

    #[test]
    fn refuses_with_a_reason() {
        for (body, reason) in [
            (&b"{nope"[..], "malformed JSON"),
            (b"[1]", "not a JSON object"),
            (b"{}", "`schema`"),
            (
                br#"{"schema":"kiln.run/1"}"#,
                "unsupported schema `kiln.run/1`",
            ),
            (
                br#"{"schema":"kiln.bench/1","model":"m","target":"t"}"#,
                "`latency_ms`",
            ),
            (
                br#"{"schema":"kiln.bench/1","model":"m","target":"t","latency_ms":{"p50":-1}}"#,
                "`latency_ms.p50`",
            ),
            (br#"{"schema":"kiln.install/1"}"#, "`outcome`"),
        ] {
            let e = check(body).unwrap_err();
            assert!(e.contains(reason), "{e} lacks {reason}");
        }
    }
}
