//! Host inference: runs a sample or a whole dataset through tract.

use anyhow::{Context, Result};
use kiln_io::{Batch, NamedTensors};

use crate::load::Model;

/// Runs every sample of `batch` and returns the outputs named as the model's outputs,
/// stacked along a leading N axis for a dataset.
pub fn run_batch(model: &Model, batch: &Batch) -> Result<NamedTensors> {
    let ctx = || model.path.display().to_string();
    let plan = kiln_io::exec::prepare(&model.typed, &batch.symbols).with_context(ctx)?;
    kiln_io::exec::run_batch(&plan, batch, &model.output_names()?).with_context(ctx)
}
