//! Pruning passes on ONNX models (ONNX in, ONNX out): unstructured magnitude pruning,
//! structured channel pruning with graph surgery, and per-layer sensitivity scans.

pub mod channels;
pub mod eval;
pub mod graph;
pub mod magnitude;
pub mod report;
pub mod scan;
pub mod spec;
pub mod tensor;
#[cfg(test)]
mod tests;

use anyhow::{bail, Result};
use kiln_io::NamedTensors;

pub use report::{AccuracyReport, LayerReport, PruneReport, Totals};
pub use scan::{scan, ScanReport};
pub use spec::{Method, Norm, PruneSpec, Scope};
pub use tract_onnx::pb::ModelProto;

/// Prunes `model` as `spec` says, checks the result loads and runs in tract with the same
/// output shapes, and reports sizes, parameters and MACs before and after.
pub fn prune(model: &ModelProto, spec: &PruneSpec) -> Result<(ModelProto, PruneReport)> {
    let (pruned, layers, notes) = apply(model, spec)?;
    let changed = layers
        .iter()
        .any(|l| l.sparsity > 0.0 || l.channels_removed.unwrap_or(0) > 0)
        || pruned != *model;
    if spec.method.amount() > 0.0 && !changed {
        bail!(
            "nothing was pruned: every prunable layer was skipped{}",
            if notes.is_empty() {
                String::new()
            } else {
                format!(" ({})", notes.join("; "))
            }
        );
    }
    let before = kiln_graph::proto::to_bytes(model);
    let after = kiln_graph::proto::to_bytes(&pruned);
    let m_before = eval::load(&before, "the original model")?;
    let m_after = eval::load(&after, "the pruned model")?;
    eval::check_same_shapes(&m_before, &m_after)?;
    let (params_before, nonzero_before) = param_counts(model);
    let (params_after, nonzero_after) = param_counts(&pruned);
    let zstd =
        |b: &[u8]| -> Result<u64> { Ok(zstd::bulk::compress(b, spec.zstd_level)?.len() as u64) };
    let totals = Totals {
        params_before,
        params_after,
        nonzero_before,
        nonzero_after,
        macs_before: eval::macs(&m_before)?,
        macs_after: eval::macs(&m_after)?,
        onnx_bytes_before: before.len() as u64,
        onnx_bytes_after: after.len() as u64,
        zstd_bytes_before: zstd(&before)?,
        zstd_bytes_after: zstd(&after)?,
        zstd_level: spec.zstd_level,
    };
    Ok((
        pruned,
        PruneReport {
            schema: report::SCHEMA,
            spec: spec.clone(),
            layers,
            notes,
            totals,
            accuracy: None,
            output: None,
        },
    ))
}

/// The pruning itself, without measurement: the pruned model, per-layer reports, notes.
pub fn apply(
    model: &ModelProto,
    spec: &PruneSpec,
) -> Result<(ModelProto, Vec<LayerReport>, Vec<String>)> {
    spec::check_amount(spec.method.amount())?;
    let graph = graph::graph_of(model)?;
    let ix = graph::Index::new(graph);
    let layers = graph::layers(&ix);
    if layers.is_empty() {
        bail!(
            "the model has nothing to prune: no Conv, Gemm or MatMul node with an f32 weight initializer"
        );
    }
    let skip = graph::skip_set(&ix, &layers, spec.skip.as_deref())?;
    if let Some(only) = &spec.only {
        graph::check_names(&ix, &layers, only, "layer")?;
    }
    let only = spec.only.clone();
    let skip_reason = move |l: &graph::Layer| -> Option<String> {
        match &only {
            Some(o) if !o.contains(&l.name) => Some("not selected".into()),
            Some(_) => None,
            None if skip.contains(&l.name) => Some("in the skip list".into()),
            None => None,
        }
    };
    let mut pruned = model.clone();
    let amount = spec.method.amount();
    let (layers, notes) = match spec.method {
        Method::Magnitude(_) => {
            magnitude::prune(&mut pruned, &layers, &skip_reason, amount, spec.scope)?
        }
        Method::Channels(_) => channels::prune(
            &mut pruned,
            &layers,
            &skip_reason,
            amount,
            spec.scope,
            spec.norm,
        )?,
    };
    Ok((pruned, layers, notes))
}

/// Stored f32 parameters and how many are non-zero.
pub fn param_counts(model: &ModelProto) -> (u64, u64) {
    let (mut all, mut nonzero) = (0u64, 0u64);
    for t in model.graph.iter().flat_map(|g| &g.initializer) {
        if let Ok(v) = tensor::read_f32(t) {
            all += v.len() as u64;
            nonzero += v.iter().filter(|x| **x != 0.0).count() as u64;
        } else {
            all += tensor::numel(&t.dims) as u64;
        }
    }
    (all, nonzero)
}

/// Evaluates the pruned model against the original on `data` (from `origin`): top-1
/// accuracy with labels, and agreement with the unpruned outputs.
pub fn evaluate(
    original: &ModelProto,
    pruned: &ModelProto,
    data: &NamedTensors,
    origin: &str,
) -> Result<AccuracyReport> {
    let before = eval::load(&kiln_graph::proto::to_bytes(original), "the original model")?;
    let after = eval::load(&kiln_graph::proto::to_bytes(pruned), "the pruned model")?;
    let (out_b, acc_b, n) = eval::run(&before, data, origin)?;
    let (out_a, acc_a, _) = eval::run(&after, data, origin)?;
    let dataset = out_b
        .first()
        .is_some_and(|(_, t)| t.rank() > before.typed.output_fact(0).map_or(0, |f| f.rank()));
    let (cosine, max_abs, top1) = eval::agreement(&out_b, &out_a, dataset)?;
    Ok(AccuracyReport {
        eval: origin.to_string(),
        samples: n,
        accuracy_before: acc_b,
        accuracy_after: acc_a,
        top1_agreement: top1,
        cosine,
        max_abs,
    })
}

/// Reads an ONNX file into its protobuf form.
pub fn read_model(path: &std::path::Path) -> Result<ModelProto> {
    let model = kiln_graph::proto::read_onnx_proto(path)?;
    if model.graph.as_ref().is_none_or(|g| g.output.is_empty()) {
        bail!(
            "{} is not an ONNX model: it holds no graph with outputs",
            path.display()
        );
    }
    Ok(model)
}
