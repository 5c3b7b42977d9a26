//! Measuring a model through kiln-graph: load ONNX bytes, MACs, run on a dataset.

use std::path::Path;

use anyhow::{bail, Context, Result};
use kiln_graph::{LoadOptions, Model};
use kiln_io::compare::{compare, top1_accuracy};
use kiln_io::{Batch, NamedTensors};

/// Loads ONNX `bytes` with tract (`name` labels messages), symbolic input dims set to 1.
pub fn load(bytes: &[u8], name: &str) -> Result<Model> {
    let path = Path::new(name);
    let model = kiln_graph::load::load_onnx_bytes(bytes, path, &LoadOptions::default())?;
    let specs = model.input_specs()?;
    if specs.iter().all(|s| s.shape.iter().all(|d| d.is_some())) {
        return Ok(model);
    }
    let input_shapes = specs
        .iter()
        .map(|s| {
            (
                s.name.clone(),
                s.shape.iter().map(|d| d.unwrap_or(1)).collect(),
            )
        })
        .collect();
    kiln_graph::load::load_onnx_bytes(bytes, path, &LoadOptions { input_shapes })
}

/// MACs of one inference, from kiln-graph's inspection.
pub fn macs(model: &Model) -> Result<Option<u64>> {
    Ok(kiln_graph::inspect(model)?.macs.map(|m| m.total))
}

/// Runs one synthetic sample through both models and fails unless every output has the
/// same shape: the check that graph surgery kept the model valid.
pub fn check_same_shapes(before: &Model, after: &Model) -> Result<()> {
    let specs = before.input_specs()?;
    let inputs = kiln_io::data::synthetic_inputs(&specs)?;
    let run = |m: &Model| -> Result<NamedTensors> {
        let batch = Batch::bind(&m.input_specs()?, inputs.clone(), "synthetic inputs")?;
        kiln_graph::run_batch(m, &batch)
    };
    let a = run(before)?;
    let b = run(after).context("the pruned model does not run")?;
    for ((name, x), (_, y)) in a.iter().zip(&b) {
        if x.shape() != y.shape() {
            bail!(
                "pruning changed output `{name}` from {:?} to {:?}",
                x.shape(),
                y.shape()
            );
        }
    }
    Ok(())
}

/// The outputs of `model` on `data` (a dataset or a sample), and its top-1 accuracy when
/// the data has `labels`.
pub fn run(
    model: &Model,
    data: &NamedTensors,
    origin: &str,
) -> Result<(NamedTensors, Option<f64>, usize)> {
    let batch = Batch::bind(&model.input_specs()?, data.clone(), origin)?;
    let out = kiln_graph::run_batch(model, &batch)?;
    let acc = match (&batch.labels, out.first()) {
        (Some(l), Some((_, o))) => Some(top1_accuracy(o, l)?),
        _ => None,
    };
    Ok((out, acc, batch.len()))
}

/// Compares the first output of `after` with `before`: (cosine, max-abs, top-1 agreement).
pub fn agreement(
    before: &NamedTensors,
    after: &NamedTensors,
    dataset: bool,
) -> Result<(f64, f64, Option<f64>)> {
    let (Some((name, b)), Some((_, a))) = (before.first(), after.first()) else {
        bail!("the model has no output");
    };
    let rank = b.rank() - usize::from(dataset);
    let c = compare(a, b, rank).with_context(|| format!("output `{name}`"))?;
    Ok((c.cosine, c.max_abs, c.top1_agreement))
}
