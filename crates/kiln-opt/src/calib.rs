//! Calibration: streams samples through the fp32 model, observing chosen intermediate
//! tensors, and turns what it saw into activation ranges (MinMax, Percentile, Entropy).
//!
//! Memory is bounded by the number of observed tensors, not by the number of samples:
//! the first pass keeps a running min/max per tensor, the second (Percentile, Entropy) a
//! fixed-size histogram per tensor. No activation is kept after its sample.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use kiln_graph::LoadOptions;
use kiln_io::Batch;
use serde::Serialize;
use tract_onnx::pb::ModelProto;
use tract_onnx::prelude::TValue;

use crate::onnx;

/// Histogram resolution for Percentile and Entropy.
pub const BINS: usize = 2048;

/// How observed values become a quantization range.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(tag = "method", rename_all = "lowercase")]
pub enum Method {
    /// The observed min and max.
    MinMax,
    /// The given percentile of the observed distribution at each end (e.g. 99.99).
    Percentile {
        /// Percent of values kept inside the range.
        percentile: f64,
    },
    /// The clipping threshold minimizing the KL divergence between the histogram and its
    /// 8-bit quantization (TensorRT's entropy calibration).
    Entropy,
}

impl Method {
    /// Parses `minmax`, `percentile`, `percentile:99.9` or `entropy`.
    pub fn parse(s: &str) -> Result<Method> {
        let (name, arg) = s.split_once(':').unwrap_or((s, ""));
        match (name, arg) {
            ("minmax", "") => Ok(Method::MinMax),
            ("entropy", "") => Ok(Method::Entropy),
            ("percentile", "") => Ok(Method::Percentile { percentile: 99.99 }),
            ("percentile", p) => {
                let p: f64 = p
                    .parse()
                    .with_context(|| format!("`{p}` is not a percentile (use e.g. percentile:99.99)"))?;
                if !(50.0..=100.0).contains(&p) {
                    bail!("percentile {p} is outside [50, 100]");
                }
                Ok(Method::Percentile { percentile: p })
            }
            _ => bail!(
                "unknown calibration method `{s}`: use minmax, percentile[:P] (default 99.99) or entropy"
            ),
        }
    }
}

/// What calibration saw of one tensor.
#[derive(Debug, Clone)]
pub struct Stats {
    /// Smallest value seen.
    pub min: f32,
    /// Largest value seen.
    pub max: f32,
    /// Counts over [min, max] in [`BINS`] bins (second pass only).
    pub hist: Vec<u64>,
    /// Counts of |x| over [0, max(|min|, |max|)] in [`BINS`] bins (second pass only).
    pub abs_hist: Vec<u64>,
}

impl Stats {
    fn new() -> Stats {
        Stats {
            min: f32::INFINITY,
            max: f32::NEG_INFINITY,
            hist: vec![],
            abs_hist: vec![],
        }
    }

    fn amax(&self) -> f32 {
        self.min.abs().max(self.max.abs())
    }

    /// The range `method` keeps, always containing 0 (so zero is exact after quantization).
    pub fn range(&self, method: Method) -> (f32, f32) {
        let (lo, hi) = match method {
            Method::MinMax => (self.min, self.max),
            Method::Percentile { percentile } => self.percentile_range(percentile),
            Method::Entropy => {
                let t = entropy_threshold(&self.abs_hist, self.amax());
                (self.min.max(-t), self.max.min(t))
            }
        };
        (lo.min(0.0), hi.max(0.0))
    }

    fn percentile_range(&self, p: f64) -> (f32, f32) {
        let total: u64 = self.hist.iter().sum();
        if total == 0 || self.max <= self.min {
            return (self.min, self.max);
        }
        let tail = ((1.0 - p / 100.0) * total as f64).floor() as u64;
        let width = (self.max - self.min) / BINS as f32;
        let (mut acc, mut lo_bin) = (0u64, 0usize);
        for (i, &c) in self.hist.iter().enumerate() {
            acc += c;
            if acc > tail {
                lo_bin = i;
                break;
            }
        }
        let (mut acc, mut hi_bin) = (0u64, BINS - 1);
        for (i, &c) in self.hist.iter().enumerate().rev() {
            acc += c;
            if acc > tail {
                hi_bin = i;
                break;
            }
        }
        (
            self.min + lo_bin as f32 * width,
            self.min + (hi_bin + 1) as f32 * width,
        )
    }
}

/// KL-divergence threshold search over a histogram of |x| in [0, amax] (TensorRT's method,
/// 128 target levels as for one side of int8).
pub fn entropy_threshold(hist: &[u64], amax: f32) -> f32 {
    let n = hist.len();
    if n == 0 || amax <= 0.0 || hist.iter().sum::<u64>() == 0 {
        return amax;
    }
    const LEVELS: usize = 128;
    let mut best = (f64::INFINITY, n);
    for i in (LEVELS..=n).step_by(16).chain(std::iter::once(n)) {
        let mut p: Vec<f64> = hist[..i].iter().map(|&c| c as f64).collect();
        p[i - 1] += hist[i..].iter().map(|&c| c as f64).sum::<f64>();
        let mut q = vec![0f64; i];
        let per = i as f64 / LEVELS as f64;
        for l in 0..LEVELS {
            let start = (l as f64 * per).floor() as usize;
            let end = (((l + 1) as f64 * per).floor() as usize)
                .min(i)
                .max(start + 1);
            let src = &hist[start..end];
            let sum: f64 = src.iter().map(|&c| c as f64).sum();
            let nonzero = src.iter().filter(|&&c| c > 0).count();
            if nonzero > 0 {
                for (k, &c) in src.iter().enumerate() {
                    if c > 0 {
                        q[start + k] = sum / nonzero as f64;
                    }
                }
            }
        }
        let psum: f64 = p.iter().sum();
        let qsum: f64 = q.iter().sum();
        if psum == 0.0 || qsum == 0.0 {
            continue;
        }
        let mut kl = 0.0;
        for (pv, qv) in p.iter().zip(&q) {
            if *pv > 0.0 {
                let pn = pv / psum;
                let qn = (qv / qsum).max(1e-12);
                kl += pn * (pn / qn).ln();
            }
        }
        if kl < best.0 {
            best = (kl, i);
        }
    }
    amax * best.1 as f32 / n as f32
}

/// Runs `data` through `model` observing `tensors`; `histograms` adds the second pass that
/// Percentile and Entropy need.
pub fn observe(
    model: &ModelProto,
    origin: &Path,
    opts: &LoadOptions,
    tensors: &[String],
    data: &Batch,
    histograms: bool,
    progress: bool,
) -> Result<HashMap<String, Stats>> {
    if data.is_empty() {
        bail!("the calibration set holds no sample");
    }
    let mut probe = model.clone();
    let g = onnx::graph_mut(&mut probe)?;
    let n_outputs = g.output.len();
    // Graph inputs are observed from the data itself (declaring them as outputs too would
    // erase their shape facts in tract).
    let input_names: Vec<String> = g.input.iter().map(|i| i.name.clone()).collect();
    let inner: Vec<String> = tensors
        .iter()
        .filter(|t| !input_names.contains(t))
        .cloned()
        .collect();
    onnx::expose_outputs(&mut probe, &inner)?;
    let loaded = kiln_graph::load::load_onnx_proto(&probe, origin, opts)?;
    let plan = kiln_io::exec::prepare(&loaded.typed, &data.symbols)
        .with_context(|| format!("{}: preparing calibration", origin.display()))?;
    let names = loaded.output_names()?;
    let mut stats: HashMap<String, Stats> =
        tensors.iter().map(|t| (t.clone(), Stats::new())).collect();
    let passes = if histograms { 2 } else { 1 };
    let bar = if progress {
        let b = ProgressBar::new((data.len() * passes) as u64);
        b.set_style(
            ProgressStyle::with_template("calibrating {bar:30} {pos}/{len} samples {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        b
    } else {
        ProgressBar::hidden()
    };
    for pass in 0..passes {
        let mut state = plan.spawn()?;
        for i in 0..data.len() {
            let sample = data.sample(i)?;
            let inputs: Vec<(String, TValue)> = input_names
                .iter()
                .cloned()
                .zip(sample.iter().cloned())
                .collect();
            let outputs = state
                .run(sample)
                .with_context(|| format!("calibration failed on sample {i}"))?;
            let observed = names
                .iter()
                .cloned()
                .zip(outputs)
                .skip(n_outputs)
                .chain(inputs);
            for (name, value) in observed {
                let name = &name;
                let Some(s) = stats.get_mut(name) else {
                    continue;
                };
                let t = value.cast_to::<f32>()?;
                let v = t.try_as_plain_ram()?.as_slice::<f32>()?;
                if let Some(bad) = v.iter().find(|x| !x.is_finite()) {
                    bail!("calibration sample {i}: tensor `{name}` holds {bad}; the calibration data or the model produces non-finite values");
                }
                if pass == 0 {
                    for &x in v {
                        s.min = s.min.min(x);
                        s.max = s.max.max(x);
                    }
                } else {
                    accumulate(s, v);
                }
            }
            bar.inc(1);
        }
    }
    bar.finish_and_clear();
    Ok(stats)
}

fn accumulate(s: &mut Stats, v: &[f32]) {
    if s.hist.is_empty() {
        s.hist = vec![0; BINS];
        s.abs_hist = vec![0; BINS];
    }
    let width = (s.max - s.min).max(f32::MIN_POSITIVE);
    let amax = s.amax().max(f32::MIN_POSITIVE);
    for &x in v {
        let b = (((x - s.min) / width) * BINS as f32) as usize;
        s.hist[b.min(BINS - 1)] += 1;
        let a = ((x.abs() / amax) * BINS as f32) as usize;
        s.abs_hist[a.min(BINS - 1)] += 1;
    }
}

/// 8-bit activation parameters for a range, always with zero point 0: uint8 over [0, hi]
/// for non-negative tensors (post-ReLU), else symmetric int8 over [-amax, amax].
///
/// A zero point of 0 matters for speed: with a non-zero activation zero point tract widens
/// the input to i32 and subtracts it before the int8 kernel, which cost more than the
/// matmul itself on MobileNet-shaped models here.
pub fn act_params(lo: f32, hi: f32) -> ActParams {
    let (lo, hi) = (lo.min(0.0), hi.max(0.0));
    let (signed, scale) = if lo >= 0.0 {
        (false, hi / 255.0)
    } else {
        (true, (-lo).max(hi) / 127.0)
    };
    let scale = if scale > 0.0 && scale.is_finite() {
        scale
    } else {
        1.0
    };
    ActParams { scale, signed }
}

/// Quantization parameters of one activation tensor (zero point 0).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ActParams {
    /// Real value of one step.
    pub scale: f32,
    /// int8 (symmetric) rather than uint8 (non-negative).
    pub signed: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats_of(values: &[f32]) -> Stats {
        let mut s = Stats::new();
        for &x in values {
            s.min = s.min.min(x);
            s.max = s.max.max(x);
        }
        accumulate(&mut s, values);
        s
    }

    fn check(values: &[f32], method: Method, expected: (f32, f32), tol: f32) {
        let (lo, hi) = stats_of(values).range(method);
        assert!(
            (lo - expected.0).abs() <= tol && (hi - expected.1).abs() <= tol,
            "{method:?}: got ({lo}, {hi}), expected {expected:?} ± {tol}"
        );
    }

    #[test]
    fn ranges() {
        // 10 000 values in [0, 1) plus one outlier at 100.
        let mut v: Vec<f32> = (0..10_000).map(|i| i as f32 / 10_000.0).collect();
        v.push(100.0);
        check(&v, Method::MinMax, (0.0, 100.0), 1e-6);
        // 99.9% keeps [0, ~1): the outlier is clipped.
        check(&v, Method::Percentile { percentile: 99.9 }, (0.0, 1.0), 0.1);
        // Entropy clips the outlier too.
        let (_, hi) = stats_of(&v).range(Method::Entropy);
        assert!(hi < 10.0, "entropy kept the outlier: {hi}");
        // Negative-only data still contains 0.
        check(&[-3.0, -1.0], Method::MinMax, (-3.0, 0.0), 1e-6);
    }

    #[test]
    fn parse_methods() {
        assert_eq!(Method::parse("minmax").unwrap(), Method::MinMax);
        assert_eq!(
            Method::parse("percentile:99.9").unwrap(),
            Method::Percentile { percentile: 99.9 }
        );
        assert!(Method::parse("percentile:120").is_err());
        assert!(Method::parse("kl").is_err());
    }

    #[test]
    fn activation_params() {
        assert_eq!(
            act_params(0.0, 255.0),
            ActParams {
                scale: 1.0,
                signed: false
            }
        );
        assert_eq!(
            act_params(-127.0, 2.0),
            ActParams {
                scale: 1.0,
                signed: true
            }
        );
        assert_eq!(
            act_params(-1.0, 127.0),
            ActParams {
                scale: 1.0,
                signed: true
            }
        );
        assert_eq!(
            act_params(0.0, 0.0),
            ActParams {
                scale: 1.0,
                signed: false
            }
        );
    }
}
