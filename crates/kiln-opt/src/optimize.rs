//! The optimize driver: calibrate, quantize (int8 static/dynamic or f16), evaluate against
//! fp32, measure per-layer sensitivity and return layers to f32 until the accuracy budget
//! holds. Returns the optimized graph and a `kiln.optimize/1` report; writes nothing.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use kiln_graph::{LoadOptions, Model};
use kiln_io::{Batch, NamedTensors};
use serde::Serialize;
use tract_onnx::pb::ModelProto;
use tract_onnx::prelude::*;

use crate::calib::{self, Method};
use crate::quant::{self, Int8Mode, Layer};
use crate::{fold, onnx};

/// Target precision of `kiln optimize --quantize`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Precision {
    /// Half-precision weights and compute (tract's f32→f16 translation).
    F16,
    /// int8 weights, activations quantized at run time.
    Int8Dynamic,
    /// int8 weights and calibrated int8 activations.
    Int8Static,
}

impl Precision {
    /// Parses `f16`, `int8-dynamic` or `int8-static`.
    pub fn parse(s: &str) -> Result<Precision> {
        match s {
            "f16" => Ok(Precision::F16),
            "int8-dynamic" => Ok(Precision::Int8Dynamic),
            "int8-static" => Ok(Precision::Int8Static),
            _ => bail!("unknown precision `{s}`: use f16, int8-dynamic or int8-static"),
        }
    }
}

/// What `optimize` should do.
#[derive(Debug, Clone)]
pub struct Options {
    /// Target precision.
    pub precision: Precision,
    /// Calibration dataset (int8-static).
    pub calib: Option<PathBuf>,
    /// Calibration method.
    pub method: Method,
    /// Evaluation dataset (accuracy, sensitivity, budget).
    pub eval: Option<PathBuf>,
    /// Largest accepted accuracy drop, in points of the metric.
    pub max_drop: Option<f64>,
    /// Layers (node names) to keep in f32 whatever the budget says.
    pub keep_f32: Vec<String>,
    /// Fixed input shapes (symbolic dims).
    pub load: LoadOptions,
    /// Show progress bars.
    pub progress: bool,
    /// Quantize layers kiln would keep in f32 for speed (grouped, non-depthwise convs) too.
    pub int8_everywhere: bool,
    /// When the quantized model runs slower than fp32 on this host, return to f32 the
    /// layers that make it faster (measured; see `speed_search`). Off by default: its result
    /// depends on this host's timings, and kiln's outputs are otherwise reproducible.
    pub speed_search: bool,
}

/// Accuracy of the optimized model against fp32 on the eval set.
#[derive(Debug, Clone, Serialize)]
pub struct Accuracy {
    /// `top1` (with labels; percent) or `cosine` (without; 100 × cosine similarity).
    pub metric: String,
    /// fp32 value of the metric.
    pub reference: f64,
    /// Optimized model's value.
    pub optimized: f64,
    /// reference − optimized, in points.
    pub drop: f64,
    /// Top-1 agreement with fp32 (percent), for classifier-shaped outputs.
    pub top1_agreement: Option<f64>,
    /// Cosine similarity of the outputs with fp32.
    pub cosine: f64,
    /// Largest absolute difference from fp32.
    pub max_abs: f64,
    /// Samples evaluated.
    pub samples: usize,
    /// The eval file.
    pub data: String,
}

/// One quantizable layer in the report.
#[derive(Debug, Clone, Serialize)]
pub struct LayerReport {
    /// ONNX node name.
    pub name: String,
    /// ONNX op type.
    pub op: String,
    /// Weight parameters.
    pub params: usize,
    /// `int8`, `f16` or `f32`.
    pub precision: String,
    /// Accuracy drop (points) with only this layer quantized, when measured.
    pub sensitivity: Option<f64>,
    /// Why the layer is in f32, when it is.
    pub kept_reason: Option<String>,
    /// Weight scales of an int8 conv: `per-tensor` or `per-channel`.
    pub weights: Option<quant::Granularity>,
}

/// Host latency of one inference (median of a few runs, 1 thread), reference vs optimized.
#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    /// fp32 model, ms.
    pub reference_ms: f64,
    /// Optimized model, ms.
    pub optimized_ms: f64,
}

/// The `kiln.optimize/1` report.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Always `kiln.optimize/1`.
    pub schema: &'static str,
    /// Source model path.
    pub model: String,
    /// Requested precision.
    pub precision: Precision,
    /// Calibration method and data, for int8-static.
    pub calibration: Option<serde_json::Value>,
    /// BatchNormalization nodes folded into convolutions.
    pub folded_batch_norms: Vec<String>,
    /// Every layer the pass could convert, with its final precision.
    pub layers: Vec<LayerReport>,
    /// Names of layers left in f32.
    pub kept_f32: Vec<String>,
    /// Op types of the optimized runnable graph (tract op names) with counts.
    pub ops: Vec<(String, usize)>,
    /// Accuracy against fp32, with an eval set.
    pub accuracy: Option<Accuracy>,
    /// The budget, when one was set.
    pub max_accuracy_drop: Option<f64>,
    /// Host latency comparison.
    pub latency: Option<Latency>,
    /// Sizes in bytes: `source_onnx`, and `output` once written.
    pub size: HashMap<String, u64>,
    /// Things the user should know (ops left in f32 and why, slow int8...).
    pub notes: Vec<String>,
    /// The pruning pass's `kiln.prune/1` report when `--prune` ran first.
    pub prune: Option<serde_json::Value>,
}

/// The result of [`optimize`].
pub struct Optimized {
    /// The optimized ONNX graph (int8 modes; the BN-folded source for f16).
    pub onnx: ModelProto,
    /// The optimized graph loaded in tract (f16 applied), ready to write as NNEF.
    pub model: Model,
    /// The report.
    pub report: Report,
}

struct Evaluator {
    batch: Batch,
    reference: NamedTensors,
    ref_metric: f64,
    metric: &'static str,
    data: String,
}

impl Evaluator {
    fn score(&self, outputs: &NamedTensors) -> Result<Accuracy> {
        let (_, out) = &outputs[0];
        let (_, reference) = &self.reference[0];
        let sample_rank = out.rank() - usize::from(self.batch.dataset_len.is_some());
        let cmp = kiln_io::compare::compare(out, reference, sample_rank)?;
        let optimized = match &self.batch.labels {
            Some(labels) => 100.0 * kiln_io::compare::top1_accuracy(out, labels)?,
            None => 100.0 * cmp.cosine,
        };
        Ok(Accuracy {
            metric: self.metric.into(),
            reference: self.ref_metric,
            optimized,
            drop: self.ref_metric - optimized,
            top1_agreement: cmp.top1_agreement.map(|a| 100.0 * a),
            cosine: cmp.cosine,
            max_abs: cmp.max_abs,
            samples: self.batch.len(),
            data: self.data.clone(),
        })
    }
}

fn load_data(model: &Model, path: &Path, what: &str) -> Result<Batch> {
    let arrays = kiln_io::npz::read_tensors(path)
        .with_context(|| format!("{what} data {}", path.display()))?;
    let batch = Batch::bind(&model.input_specs()?, arrays, &path.display().to_string())
        .with_context(|| {
            format!(
                "{what} data {} does not match the model's inputs",
                path.display()
            )
        })?;
    if batch.is_empty() {
        bail!(
            "{what} data {} holds no sample (its leading axis is 0)",
            path.display()
        );
    }
    if let Some(w) = batch
        .warnings
        .iter()
        .find(|w| w.contains("NaN") || w.contains("Inf") || w.contains("non-finite"))
    {
        bail!("{what} data {}: {w}; remove those samples", path.display());
    }
    Ok(batch)
}

fn run(model: &Model, batch: &Batch) -> Result<NamedTensors> {
    kiln_graph::run_batch(model, batch)
}

fn load_proto(proto: &ModelProto, origin: &Path, opts: &LoadOptions) -> Result<Model> {
    kiln_graph::load::load_onnx_proto(proto, origin, opts)
}

/// Applies tract's f32→f16 translation to every node but the inputs and `keep`.
fn to_f16(mut model: Model, keep: &HashSet<String>) -> Result<Model> {
    use tract_onnx::tract_core::floats::FloatPrecisionTranslator;
    use tract_onnx::tract_core::model::translator::Translate;
    use tract_onnx::tract_core::ops::source::TypedSource;
    let keep = keep.clone();
    let tr =
        FloatPrecisionTranslator::with_filter(f32::datum_type(), f16::datum_type(), move |n| {
            // MaxPool stays f32: tract 0.23 writes an f16 MaxPool's NNEF with two outputs
            // and cannot read it back.
            !n.op_is::<TypedSource>()
                && !n.op.name().contains("MaxPool")
                && !keep
                    .iter()
                    .any(|k| n.name == *k || n.name.starts_with(&format!("{k}.")))
        });
    let mut typed = tr
        .translate_model(&model.typed)
        .context("converting the graph to f16")?;
    // The translator turns f32 inputs into f16 ones; keep the model's interface f32 (what
    // devices feed it) and cast to f16 inside instead.
    use tract_onnx::tract_core::ops::cast::cast;
    for o in typed.input_outlets()?.to_vec() {
        let mut fact = typed.outlet_fact(o)?.clone();
        if fact.datum_type != f16::datum_type() {
            continue;
        }
        fact.datum_type = f32::datum_type();
        let succs = typed.outlet_successors(o).to_vec();
        let name = format!("{}.to_f16", typed.node(o.node).name);
        typed.node_mut(o.node).op = Box::new(TypedSource::new(fact.clone()));
        typed.set_outlet_fact(o, fact)?;
        let casted = typed.wire_node(name, cast(f16::datum_type()), &[o])?[0];
        for inlet in succs {
            typed.add_edge(casted, inlet)?;
        }
    }
    // Outputs too: devices read the same f32 tensors as from the fp32 model.
    let names = kiln_io::exec::output_names(&typed)?;
    let mut outputs = vec![];
    for (o, name) in typed.output_outlets()?.to_vec().into_iter().zip(names) {
        if typed.outlet_fact(o)?.datum_type == f16::datum_type() {
            let casted =
                typed.wire_node(format!("{name}.to_f32"), cast(f32::datum_type()), &[o])?[0];
            typed.set_outlet_label(casted, name)?;
            outputs.push(casted);
        } else {
            outputs.push(o);
        }
    }
    typed.select_output_outlets(&outputs)?;
    model.typed = typed
        .into_decluttered()
        .context("converting the graph to f16")?;
    Ok(model)
}

/// Wall times (ms) of `runs` inferences of the first sample after one warm-up, sorted.
fn timings_ms(model: &Model, batch: &Batch, runs: usize) -> Result<Vec<f64>> {
    let plan = kiln_io::exec::prepare(&model.typed, &batch.symbols)?;
    let mut state = plan.spawn()?;
    let input = batch.sample(0)?;
    state.run(input.clone())?;
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs.max(1) {
        let t = Instant::now();
        state.run(input.clone())?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(|a, b| a.total_cmp(b));
    Ok(times)
}

/// Median wall time of one inference over a few runs: the report's latency.
fn latency_ms(model: &Model, batch: &Batch) -> Result<f64> {
    let times = timings_ms(model, batch, 7)?;
    Ok(times[times.len() / 2])
}

/// Best of `SPEED_RUNS` inferences: the speed search compares models whose difference can
/// be a few percent, where the minimum is steadier than the median.
fn best_ms(model: &Model, batch: &Batch) -> Result<f64> {
    Ok(timings_ms(model, batch, SPEED_RUNS)?[0])
}

/// Timed runs per model in the speed search.
const SPEED_RUNS: usize = 15;

/// A layer change the speed search must beat to be kept: 3% faster, above timing noise.
const SPEED_GAIN: f64 = 0.97;

/// One layer the speed search returned to f32: model time before and after (ms).
#[derive(Debug, Clone, PartialEq)]
struct SpeedStep {
    layer: String,
    before_ms: f64,
    after_ms: f64,
}

/// When the quantized model (`start_ms`) runs slower than fp32 (`reference_ms`): returns
/// layers to f32 one at a time in graph order, keeping each change that makes the whole
/// model at least 3% faster (`measure` times a selection), until it is no slower than fp32
/// or every layer was tried. At least one layer stays quantized. Returns the selection and
/// the changes kept.
fn speed_search(
    selected: &[Layer],
    reference_ms: f64,
    start_ms: f64,
    measure: &mut dyn FnMut(&[Layer]) -> Result<f64>,
) -> Result<(Vec<Layer>, Vec<SpeedStep>)> {
    let mut current = selected.to_vec();
    let mut best = start_ms;
    let mut steps = vec![];
    for layer in selected {
        if best <= reference_ms || current.len() <= 1 {
            break;
        }
        let trial: Vec<Layer> = current
            .iter()
            .filter(|l| l.name != layer.name)
            .cloned()
            .collect();
        let t = measure(&trial)?;
        if t < best * SPEED_GAIN {
            steps.push(SpeedStep {
                layer: layer.name.clone(),
                before_ms: best,
                after_ms: t,
            });
            current = trial;
            best = t;
        }
    }
    Ok((current, steps))
}

fn op_histogram(model: &Model) -> Result<Vec<(String, usize)>> {
    let optimized = kiln_io::exec::optimize(model.typed.clone())?;
    let mut counts: HashMap<String, usize> = HashMap::new();
    for n in optimized.nodes() {
        *counts.entry(n.op.name().to_string()).or_default() += 1;
    }
    let mut v: Vec<_> = counts.into_iter().collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    Ok(v)
}

/// Builds the optimized graph for a chosen set of layers.
type Builder = Box<dyn Fn(&[Layer]) -> Result<(ModelProto, Model)>>;

/// Runs the whole pass: see the module doc.
pub fn optimize(path: &Path, opts: &Options) -> Result<Optimized> {
    optimize_from(path, None, opts)
}

/// Like [`optimize`], starting from `start` (e.g. the pruned graph) instead of the file at
/// `path`; accuracy is still measured against the fp32 model at `path`, so the budget
/// covers pruning and quantization together.
pub fn optimize_from(path: &Path, start: Option<ModelProto>, opts: &Options) -> Result<Optimized> {
    if let Some(d) = opts.max_drop {
        if d.is_nan() || d < 0.0 {
            bail!("--max-accuracy-drop must be ≥ 0 points (got {d})");
        }
        if opts.eval.is_none() {
            bail!("--max-accuracy-drop needs --eval DATA.npz to measure the drop");
        }
    }
    let pruned = start.is_some();
    // The source file is read once: it is the fp32 reference, and the graph to optimize
    // unless the caller starts from its own (pruned) graph.
    let original = kiln_graph::proto::read_onnx_proto(path)?;
    let source_size = std::fs::metadata(path)?.len();
    let fp32 = load_proto(&original, path, &opts.load)?;
    let mut proto = start.unwrap_or(original);
    onnx::constants_to_initializers(&mut proto)?;
    quant::name_nodes(&mut proto)?;
    let folded = fold::fold_batch_norms(&mut proto)?;
    let mut notes = vec![];

    let evaluator = match &opts.eval {
        Some(p) => {
            let batch = load_data(&fp32, p, "eval")?;
            let reference =
                run(&fp32, &batch).with_context(|| format!("running fp32 on {}", p.display()))?;
            let (metric, ref_metric) = match &batch.labels {
                Some(l) => (
                    "top1",
                    100.0 * kiln_io::compare::top1_accuracy(&reference[0].1, l)?,
                ),
                None => ("cosine", 100.0),
            };
            Some(Evaluator {
                batch,
                reference,
                ref_metric,
                metric,
                data: p.display().to_string(),
            })
        }
        None => None,
    };
    let eval_model = |m: &Model| -> Result<Option<Accuracy>> {
        match &evaluator {
            Some(e) => Ok(Some(e.score(&run(m, &e.batch)?)?)),
            None => Ok(None),
        }
    };

    if let (true, Some(budget), Some(_)) = (pruned, opts.max_drop, &evaluator) {
        let base = load_proto(&proto, path, &opts.load)?;
        if let Some(a) = eval_model(&base)? {
            if a.drop > budget {
                bail!(
                    "pruning alone drops {:.3} points ({} {:.2} → {:.2}), over the {budget}-point \
                     budget before any quantization. Nothing was written. Prune less (a lower \
                     fraction, or --prune-skip the sensitive layers: see kiln prune-scan).",
                    a.drop,
                    a.metric,
                    a.reference,
                    a.optimized
                );
            }
        }
    }
    let forced: HashSet<String> = opts.keep_f32.iter().cloned().collect();
    let mut calibration = None;
    let (candidates, build): (Vec<Layer>, Builder) = match opts.precision {
        Precision::F16 => {
            let names: Vec<Layer> = fp32
                .typed
                .nodes()
                .iter()
                .filter(|n| {
                    n.op.name().contains("Conv")
                        || n.op.name().contains("MatMul")
                        || n.op.name().contains("EinSum")
                        || n.op.name().contains("Gemm")
                })
                .map(|n| Layer {
                    name: n.name.clone(),
                    op: n.op.name().to_string(),
                    params: 0,
                    input: String::new(),
                    output: None,
                })
                .collect();
            let all: HashSet<String> = names.iter().map(|l| l.name.clone()).collect();
            let proto = proto.clone();
            let path = path.to_path_buf();
            let load = opts.load.clone();
            (
                names,
                Box::new(move |sel: &[Layer]| {
                    let selected: HashSet<&str> = sel.iter().map(|l| l.name.as_str()).collect();
                    let keep: HashSet<String> = all
                        .iter()
                        .filter(|n| !selected.contains(n.as_str()))
                        .cloned()
                        .collect();
                    let m = load_proto(&proto, &path, &load)?;
                    Ok((proto.clone(), to_f16(m, &keep)?))
                }),
            )
        }
        Precision::Int8Dynamic | Precision::Int8Static => {
            let mode = if opts.precision == Precision::Int8Static {
                Int8Mode::Static
            } else {
                Int8Mode::Dynamic
            };
            let layers = quant::candidates(&proto, mode)?;
            let mut ranges = HashMap::new();
            if mode == Int8Mode::Static {
                let Some(cpath) = &opts.calib else {
                    bail!("int8-static needs calibration data: --calib CALIB.npz (a dataset of representative inputs)");
                };
                let data = load_data(&fp32, cpath, "calibration")?;
                let mut tensors: Vec<String> = layers
                    .iter()
                    .filter(|l| l.op != "Gather")
                    .flat_map(|l| std::iter::once(l.input.clone()).chain(l.output.clone()))
                    .collect();
                tensors.sort();
                tensors.dedup();
                let hist = opts.method != Method::MinMax;
                let stats = calib::observe(
                    &proto,
                    path,
                    &opts.load,
                    &tensors,
                    &data,
                    hist,
                    opts.progress,
                )?;
                ranges = stats
                    .iter()
                    .map(|(k, s)| (k.clone(), s.range(opts.method)))
                    .collect();
                calibration = Some(serde_json::json!({
                    "method": opts.method, "data": cpath.display().to_string(), "samples": data.len(),
                    "tensors": tensors.len(),
                }));
            } else if layers.iter().any(|_| true) {
                let convs = fp32
                    .source_ops
                    .iter()
                    .filter(|(_, op)| op == "Conv")
                    .count();
                if convs > 0 {
                    notes.push(format!("int8-dynamic leaves the model's {convs} Conv layers in f32: tract has no int8 convolution with run-time activation scales; use int8-static with --calib for them"));
                }
            }
            let proto = proto.clone();
            let path = path.to_path_buf();
            let load = opts.load.clone();
            (
                layers,
                Box::new(move |sel: &[Layer]| {
                    let q = quant::quantize(&proto, mode, sel, &ranges)?;
                    let m = load_proto(&q, &path, &load)
                        .context("loading the quantized graph in tract")?;
                    Ok((q, m))
                }),
            )
        }
    };
    if candidates.is_empty() {
        bail!("{}: nothing to quantize for {:?}: no Conv/MatMul/Gemm/Gather with constant weights. The model is left unchanged and nothing was written.", path.display(), opts.precision);
    }
    for k in &forced {
        if !candidates.iter().any(|l| &l.name == k) {
            bail!(
                "--keep-f32 {k}: no quantizable layer has this name; quantizable layers are: {}",
                candidates
                    .iter()
                    .map(|l| l.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
    }
    let mut kept: Vec<(String, String)> = forced
        .iter()
        .map(|k| (k.clone(), "--keep-f32".to_string()))
        .collect();
    if opts.precision != Precision::F16 && !opts.int8_everywhere {
        for l in &candidates {
            if let Some(why) = quant::slow_in_int8(&proto, l)? {
                kept.push((l.name.clone(), why.to_string()));
            }
        }
    }
    let mut selected: Vec<Layer> = candidates
        .iter()
        .filter(|l| !kept.iter().any(|(k, _)| k == &l.name))
        .cloned()
        .collect();
    if selected.is_empty() {
        bail!(
            "{}: every quantizable layer is kept in f32 ({}); nothing to quantize, nothing written",
            path.display(),
            kept.iter()
                .map(|(n, _)| n.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let (mut q_proto, mut q_model) = build(&selected)?;
    let mut accuracy = eval_model(&q_model)?;
    let mut sensitivity: HashMap<String, f64> = HashMap::new();
    if evaluator.is_some() && candidates.len() > 1 {
        let bar = if opts.progress {
            indicatif::ProgressBar::new(selected.len() as u64)
        } else {
            indicatif::ProgressBar::hidden()
        };
        for l in &selected {
            let (_, m) = build(std::slice::from_ref(l))?;
            if let Some(a) = eval_model(&m)? {
                sensitivity.insert(l.name.clone(), a.drop);
            }
            bar.inc(1);
        }
        bar.finish_and_clear();
    }
    if let (Some(budget), Some(_)) = (opts.max_drop, &accuracy) {
        let mut order: Vec<Layer> = selected.clone();
        order.sort_by(|a, b| {
            sensitivity
                .get(&b.name)
                .unwrap_or(&0.0)
                .total_cmp(sensitivity.get(&a.name).unwrap_or(&0.0))
        });
        let mut order = order.into_iter();
        while accuracy.as_ref().is_some_and(|a| a.drop > budget) {
            let Some(worst) = order.next() else { break };
            selected.retain(|l| l.name != worst.name);
            kept.push((
                worst.name.clone(),
                format!("accuracy budget ({} points)", budget),
            ));
            if selected.is_empty() {
                break;
            }
            (q_proto, q_model) = build(&selected)?;
            accuracy = eval_model(&q_model)?;
        }
        let drop = accuracy.as_ref().map(|a| a.drop).unwrap_or(0.0);
        if selected.is_empty() || drop > budget {
            bail!(
                "the accuracy budget of {budget} points cannot be met with any layer in {:?}: \
                 quantizing only the least sensitive layer still drops {drop:.3} points. Nothing was written. \
                 Raise --max-accuracy-drop, use another calibration method, or try f16.",
                opts.precision
            );
        }
    }
    // int8 must not be slower than f32: when the whole model is, return to f32 the layers
    // that make it faster on this host (measured, see `speed_search`), within the budget.
    if let (Some(e), true) = (
        &evaluator,
        opts.speed_search
            && opts.precision != Precision::F16
            && !opts.int8_everywhere
            && selected.len() > 1,
    ) {
        let reference = best_ms(&fp32, &e.batch)?;
        let start = best_ms(&q_model, &e.batch)?;
        if start > reference {
            let mut measure = |sel: &[Layer]| -> Result<f64> {
                let (_, m) = build(sel)?;
                if let (Some(budget), Some(a)) = (opts.max_drop, eval_model(&m)?) {
                    if a.drop > budget {
                        return Ok(f64::INFINITY); // never trade the budget for speed
                    }
                }
                best_ms(&m, &e.batch)
            };
            let (sel, steps) = speed_search(&selected, reference, start, &mut measure)?;
            if !steps.is_empty() {
                selected = sel;
                (q_proto, q_model) = build(&selected)?;
                accuracy = eval_model(&q_model)?;
                for s in &steps {
                    kept.push((
                        s.layer.clone(),
                        format!(
                            "speed: the model ran faster with this layer in f32 on this host \
                             ({:.3} → {:.3} ms; fp32 {:.3} ms)",
                            s.before_ms, s.after_ms, reference
                        ),
                    ));
                }
            }
        }
    }
    let latency = match &evaluator {
        Some(e) => Some(Latency {
            reference_ms: latency_ms(&fp32, &e.batch)?,
            optimized_ms: latency_ms(&q_model, &e.batch)?,
        }),
        None => None,
    };
    if let Some(l) = &latency {
        if l.optimized_ms > l.reference_ms {
            notes.push(format!(
                "the optimized model ran slower than fp32 on this host ({:.3} ms vs {:.3} ms per inference){}",
                l.optimized_ms, l.reference_ms,
                if opts.speed_search || opts.precision == Precision::F16 {
                    ""
                } else {
                    "; --speed-search returns to f32 the layers that make it faster here"
                }
            ));
        }
    }
    let sel: HashSet<&str> = selected.iter().map(|l| l.name.as_str()).collect();
    let precision_name = if opts.precision == Precision::F16 {
        "f16"
    } else {
        "int8"
    };
    let layers = candidates
        .iter()
        .map(|l| LayerReport {
            name: l.name.clone(),
            op: l.op.clone(),
            params: l.params,
            precision: if sel.contains(l.name.as_str()) {
                precision_name.into()
            } else {
                "f32".into()
            },
            sensitivity: sensitivity.get(&l.name).copied(),
            kept_reason: kept
                .iter()
                .find(|(n, _)| n == &l.name)
                .map(|(_, r)| r.clone()),
            weights: None,
        })
        .collect::<Vec<LayerReport>>();
    let mut layers = layers;
    if opts.precision == Precision::Int8Static {
        for (lr, l) in layers.iter_mut().zip(&candidates) {
            if lr.precision == "int8" {
                lr.weights = quant::conv_granularity(&proto, l)?;
            }
        }
    }
    let report = Report {
        schema: "kiln.optimize/1",
        model: path.display().to_string(),
        precision: opts.precision,
        calibration,
        folded_batch_norms: folded,
        layers,
        kept_f32: kept.iter().map(|(n, _)| n.clone()).collect(),
        ops: op_histogram(&q_model)?,
        accuracy,
        max_accuracy_drop: opts.max_drop,
        latency,
        size: HashMap::from([("source_onnx".to_string(), source_size)]),
        notes,
        prune: None,
    };
    Ok(Optimized {
        onnx: q_proto,
        model: q_model,
        report,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(name: &str) -> Layer {
        Layer {
            name: name.into(),
            op: "Conv".into(),
            params: 0,
            input: String::new(),
            output: None,
        }
    }

    /// A host where each layer costs `int8[i]` ms quantized and `f32[i]` ms in f32, plus
    /// 1 ms for the rest of the model.
    fn check(int8: &[f64], f32: &[f64], expected_f32: &[&str]) {
        let layers: Vec<Layer> = (0..int8.len()).map(|i| layer(&format!("l{i}"))).collect();
        let cost = |sel: &[Layer]| -> f64 {
            1.0 + (0..int8.len())
                .map(|i| {
                    let q = sel.iter().any(|l| l.name == format!("l{i}"));
                    if q {
                        int8[i]
                    } else {
                        f32[i]
                    }
                })
                .sum::<f64>()
        };
        let reference = cost(&[]);
        let start = cost(&layers);
        let mut calls = 0;
        let mut measure = |sel: &[Layer]| -> Result<f64> {
            calls += 1;
            Ok(cost(sel))
        };
        let (sel, steps) = speed_search(&layers, reference, start, &mut measure).unwrap();
        let back: Vec<&str> = steps.iter().map(|s| s.layer.as_str()).collect();
        assert_eq!(back, expected_f32, "int8 {int8:?} f32 {f32:?}");
        assert_eq!(sel.len(), layers.len() - back.len());
        for s in &steps {
            assert!(s.after_ms < s.before_ms * SPEED_GAIN);
        }
        assert!(calls <= layers.len());
    }

    #[test]
    fn speed_search_returns_only_the_slow_layers() {
        // Already faster than f32: nothing is tried.
        check(&[1.0, 1.0], &[2.0, 2.0], &[]);
        // The first layer is slow in int8: back to f32; the second stays quantized.
        check(&[3.0, 1.0, 1.0], &[1.0, 2.0, 1.5], &["l0"]);
        // Both slow layers go back; the search stops once the model is no slower than f32.
        check(&[1.0, 4.0, 1.0, 4.0], &[1.5, 1.0, 1.5, 1.0], &["l1", "l3"]);
        // A gain below 3% is noise: kept quantized.
        check(&[1.0, 10.01], &[1.0, 10.0], &[]);
        // Every layer slower: one stays quantized (int8 was asked for).
        check(&[2.0, 2.0, 2.0], &[1.0, 1.0, 1.0], &["l0", "l1"]);
    }
}
