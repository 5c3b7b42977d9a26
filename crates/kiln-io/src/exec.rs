//! Running a typed model on a [`Batch`]: shared by host inference and the on-device runner,
//! so both bind data, optimize and stack outputs the same way.

use std::collections::HashMap;

use anyhow::{bail, Context, Result};
use tract_core::internal::DimLike;
use tract_core::prelude::*;

use crate::data::{stack_samples, Batch, InputSpec};
use crate::NamedTensors;

/// The inputs of a typed model as data must match them.
pub fn input_specs(model: &TypedModel) -> Result<Vec<InputSpec>> {
    model
        .input_outlets()?
        .iter()
        .map(|o| {
            let fact = model.outlet_fact(*o)?;
            Ok(InputSpec {
                name: model.node(o.node).name.clone(),
                datum_type: fact.datum_type,
                shape: fact.shape.iter().map(|d| d.to_usize().ok()).collect(),
                symbols: fact
                    .shape
                    .iter()
                    .map(|d| d.to_usize().is_err().then(|| d.to_string()))
                    .collect(),
            })
        })
        .collect()
}

/// Output names of a typed model: outlet labels (ONNX output names), else node names.
pub fn output_names(model: &TypedModel) -> Result<Vec<String>> {
    Ok(model
        .output_outlets()?
        .iter()
        .map(|o| {
            model
                .outlet_label(*o)
                .map(|s| s.to_string())
                .unwrap_or_else(|| model.node(o.node).name.clone())
        })
        .collect())
}

/// Binds symbolic dims (by symbol name), optimizes and makes the model runnable.
pub fn prepare(
    model: &TypedModel,
    symbols: &HashMap<String, usize>,
) -> Result<Arc<TypedRunnableModel>> {
    let mut model = model.clone();
    if !symbols.is_empty() {
        let subs = symbols
            .iter()
            .filter_map(|(name, v)| model.symbols.get(name).map(|s| (s, TDim::Val(*v as i64))))
            .collect();
        model = model.set_symbols(&subs)?;
    }
    optimize(model)?.into_runnable()
}

/// tract's declutter, kiln's passes (`crate::passes`), then tract's codegen: the graph host
/// and device run. The passes go after declutter so that tract's axis moves (which would
/// undo their reshapes) are done with, and before codegen, which fuses what they emit.
pub fn optimize(mut model: TypedModel) -> Result<TypedModel> {
    crate::configure_tract()?;
    model
        .declutter()
        .context("tract cannot simplify this model")?;
    crate::passes::run(&mut model)?;
    model
        .optimize()
        .context("tract cannot optimize this model")?;
    Ok(model)
}

/// Runs every sample of `batch` through `plan`; outputs are named `names` and stacked
/// along a leading N axis for a dataset.
pub fn run_batch(
    plan: &Arc<TypedRunnableModel>,
    batch: &Batch,
    names: &[String],
) -> Result<NamedTensors> {
    if batch.is_empty() {
        bail!("the dataset holds no sample (its leading axis is 0)");
    }
    let mut per_output: Vec<Vec<Tensor>> = vec![vec![]; names.len()];
    let mut state = plan.spawn()?;
    for i in 0..batch.len() {
        let outputs = state
            .run(batch.sample(i)?)
            .with_context(|| format!("inference failed on sample {i}"))?;
        for (slot, o) in per_output.iter_mut().zip(outputs) {
            slot.push(o.into_tensor());
        }
    }
    names
        .iter()
        .zip(per_output)
        .map(|(name, mut ts)| {
            let t = match batch.dataset_len {
                None => ts.remove(0),
                Some(_) => stack_samples(&ts)?,
            };
            Ok((name.clone(), t))
        })
        .collect()
}
