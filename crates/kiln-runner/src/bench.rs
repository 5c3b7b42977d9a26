//! `kiln-runner bench`: cold start, latency percentiles, peak memory, per-op profile, and
//! what CPU it ran on, as a `kiln.bench/1` JSON report (schema in docs/json.md).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use kiln_io::{exec, Batch};
use serde_json::{json, Value};
use tract_nnef::prelude::*;

/// How long or how many times to measure.
pub struct BenchOptions {
    /// Untimed runs first.
    pub warmup: usize,
    /// Timed runs (at least this many)...
    pub iters: usize,
    /// Threads tract's matrix products use (`--threads`).
    pub threads: usize,
    /// ...or, when set, runs until this much time has passed (at least 3).
    pub seconds: Option<f64>,
}

/// Times from process start (`started`), through loading (`loaded`), to a full report.
pub fn bench(
    started: Instant,
    load_done: Instant,
    model: &TypedModel,
    name: &str,
    inputs: Option<kiln_io::NamedTensors>,
    opts: &BenchOptions,
) -> Result<Value> {
    let specs = exec::input_specs(model)?;
    let arrays = match inputs {
        Some(a) => a,
        None => kiln_io::data::synthetic_inputs(&specs)?,
    };
    let batch = Batch::bind(&specs, arrays, "bench inputs")?;
    let sample = batch.sample(0)?;
    let plan = exec::prepare(model, &batch.symbols)?;
    // One session reused across runs, as an application would: no per-run allocation of
    // the plan's state.
    let mut state = plan.spawn()?;
    let prepared = Instant::now();
    state
        .run(sample.clone())
        .context("first inference failed")?;
    let first = Instant::now();

    for _ in 0..opts.warmup {
        state.run(sample.clone())?;
    }
    let mut times = vec![];
    let budget = opts.seconds.map(Duration::from_secs_f64);
    let t_all = Instant::now();
    loop {
        let t0 = Instant::now();
        state.run(sample.clone())?;
        times.push(t0.elapsed().as_secs_f64() * 1e3);
        let done = match budget {
            Some(b) => t_all.elapsed() >= b && times.len() >= 3,
            None => times.len() >= opts.iters.max(1),
        };
        if done {
            break;
        }
    }
    let profile = profile(&plan, &sample)?;
    times.sort_by(|a, b| a.total_cmp(b));
    let n = times.len() as f64;
    let mean = times.iter().sum::<f64>() / n;
    let stddev = (times.iter().map(|t| (t - mean).powi(2)).sum::<f64>() / n).sqrt();
    let pct = |p: f64| times[(((n - 1.0) * p).round() as usize).min(times.len() - 1)];
    let ms = |a: Instant, b: Instant| (b - a).as_secs_f64() * 1e3;
    let (cpu_model, cpu_features, emulated) = cpu();
    Ok(json!({
        "schema": "kiln.bench/1",
        "model": name,
        "target": crate::TARGET,
        "arch": std::env::consts::ARCH,
        "tract_version": kiln_io::TRACT_VERSION,
        "runner_version": env!("CARGO_PKG_VERSION"),
        "emulated": emulated,
        "cpu": { "model": cpu_model, "features": cpu_features },
        "threads": opts.threads,
        "iterations": times.len(),
        "warmup": opts.warmup,
        "latency_ms": {
            "min": times[0], "p50": pct(0.5), "p90": pct(0.9), "p99": pct(0.99),
            "max": times[times.len() - 1], "mean": mean, "stddev": stddev,
        },
        "throughput_per_s": 1e3 / mean,
        "cold_start_ms": {
            "load": ms(started, load_done),
            "prepare": ms(load_done, prepared),
            "first_inference": ms(prepared, first),
            "total": ms(started, first),
        },
        "peak_rss_bytes": peak_rss(),
        "profile": profile,
        "device": device(),
        "precision": precision(model),
        "created_at_ms": std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0),
    }))
}

/// The device's name for reports: `$KILN_DEVICE`, else the host name.
fn device() -> Option<String> {
    std::env::var("KILN_DEVICE")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

/// The model's precision: the element type holding most constant (weight) bytes, as
/// `f32`, `f16`, `int8` (8-bit, quantized or not) or the tract type name.
fn precision(model: &TypedModel) -> Option<String> {
    let mut bytes: HashMap<String, usize> = HashMap::new();
    for node in model.nodes() {
        for out in &node.outputs {
            if let Some(k) = &out.fact.konst {
                let name = match k.datum_type().unquantized() {
                    DatumType::F32 => "f32".to_string(),
                    DatumType::F16 => "f16".to_string(),
                    DatumType::I8 | DatumType::U8 => "int8".to_string(),
                    other => format!("{other:?}").to_lowercase(),
                };
                *bytes.entry(name).or_default() += k.len() * k.datum_type().size_of();
            }
        }
    }
    bytes
        .into_iter()
        .max_by(|a, b| a.1.cmp(&b.1).then_with(|| b.0.cmp(&a.0)))
        .map(|(name, _)| name)
}

/// One profiled run: time per node, summed per op type, top 15 by time.
fn profile(plan: &Arc<TypedRunnableModel>, sample: &TVec<TValue>) -> Result<Value> {
    let mut state = plan.spawn()?;
    let mut by_op: HashMap<String, (f64, usize)> = HashMap::new();
    let mut total = 0f64;
    state.run_plan_with_eval(sample.clone(), |ctx, op_state, node, input| {
        let t0 = Instant::now();
        let r = tract_nnef::tract_core::plan::eval(ctx, op_state, node, input);
        let dt = t0.elapsed().as_secs_f64() * 1e3;
        total += dt;
        let e = by_op.entry(node.op().name().to_string()).or_default();
        e.0 += dt;
        e.1 += 1;
        r
    })?;
    let mut rows: Vec<(String, (f64, usize))> = by_op.into_iter().collect();
    rows.sort_by(|a, b| b.1 .0.total_cmp(&a.1 .0));
    Ok(Value::Array(
        rows.into_iter()
            .take(15)
            .map(|(op, (ms, nodes))| json!({ "op": op, "nodes": nodes, "ms": ms, "share": if total > 0.0 { ms / total } else { 0.0 } }))
            .collect(),
    ))
}

/// Peak resident set size (VmHWM) of this process.
fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// CPU model, features, and whether this looks emulated: under qemu-user /proc/cpuinfo
/// describes the host, whose architecture differs from this binary's (or kiln said so
/// through KILN_EMULATED).
fn cpu() -> (Option<String>, Vec<String>, bool) {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |keys: &[&str]| {
        info.lines()
            .find(|l| keys.iter().any(|k| l.starts_with(k)))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
    };
    let model = field(&["model name", "Model", "Hardware", "CPU part"]);
    let features: Vec<String> = field(&["Features", "flags"])
        .map(|f| f.split_whitespace().map(String::from).collect())
        .unwrap_or_default();
    let host_is_x86 = info.contains("\nflags")
        || info.starts_with("flags")
        || info.contains("GenuineIntel")
        || info.contains("AuthenticAMD");
    let arch_mismatch = std::env::consts::ARCH != "x86_64" && host_is_x86;
    let emulated = std::env::var_os("KILN_EMULATED").is_some() || arch_mismatch;
    (model, features, emulated)
}
