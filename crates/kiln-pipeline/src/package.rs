//! Building a signed `.kiln` artifact from a model in runner form: golden self-test data
//! (given or synthetic inputs, the host's outputs), precision label, tolerance, and
//! `kiln_artifact::write::package`. Shared by `kiln package` and `kiln build`, so both
//! give the same bytes for the same inputs.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result};
use kiln_artifact::manifest::{GOLDEN_INPUTS, GOLDEN_OUTPUTS, MODEL_FILE, RUNNER_FILE};
use kiln_artifact::write::{package, PackageInput};
use kiln_artifact::Manifest as ArtifactManifest;
use kiln_io::tract_core::prelude::*;
use kiln_io::Batch;

/// What goes into one artifact.
pub struct ArtifactJob<'a> {
    /// Model name in the manifest.
    pub name: String,
    /// Artifact version.
    pub version: u64,
    /// Target name.
    pub target: String,
    /// The model in runner form (NNEF tar) on disk (loaded to compute golden outputs).
    pub model_path: &'a Path,
    /// Its bytes.
    pub model_bytes: Vec<u8>,
    /// Self-test inputs (`.npz`); `None` for deterministic synthetic inputs.
    pub golden_inputs: Option<&'a Path>,
    /// The runner to ship inside, if any.
    pub runner: Option<Vec<u8>>,
    /// Expected top-1 accuracy to record.
    pub accuracy: Option<f64>,
}

/// Builds and signs the artifact: its bytes and manifest.
pub fn build_artifact(
    job: ArtifactJob<'_>,
    key: &kiln_artifact::SigningKey,
) -> Result<(Vec<u8>, ArtifactManifest)> {
    let model = kiln_graph::load(job.model_path, &Default::default())?;
    let specs = model.input_specs()?;
    let inputs = match job.golden_inputs {
        Some(p) => kiln_io::read_tensors(p)?,
        None => kiln_io::data::synthetic_inputs(&specs)?,
    };
    let batch = Batch::bind(&specs, inputs.clone(), "golden inputs")?;
    let outputs = kiln_graph::run_batch(&model, &batch)
        .with_context(|| format!("running {} on the golden inputs", job.model_path.display()))?;
    let peak = outputs
        .iter()
        .map(|(_, t)| max_abs(t))
        .fold(1.0f64, f64::max);
    let mut files = BTreeMap::new();
    files.insert(MODEL_FILE.to_string(), job.model_bytes);
    files.insert(GOLDEN_INPUTS.to_string(), kiln_io::npz::npz_bytes(&inputs)?);
    files.insert(
        GOLDEN_OUTPUTS.to_string(),
        kiln_io::npz::npz_bytes(&outputs)?,
    );
    if let Some(r) = job.runner {
        files.insert(RUNNER_FILE.into(), r);
    }
    let input = PackageInput {
        name: job.name,
        version: job.version,
        target: job.target,
        precision: precision(&model),
        tract_version: kiln_io::TRACT_VERSION.into(),
        // Cross-CPU f32 results differ in the last bits (FMA, kernel order): 1e-3 relative.
        golden_max_abs: 1e-3 * peak,
        expected_accuracy: job.accuracy,
        files,
    };
    package(&input, key)
}

fn max_abs(t: &Tensor) -> f64 {
    t.cast_to::<f64>()
        .ok()
        .and_then(|c| {
            kiln_io::slice_of::<f64>(&c)
                .ok()
                .map(|s| s.iter().fold(0.0f64, |m, v| m.max(v.abs())))
        })
        .unwrap_or(0.0)
}

/// Precision label from the stored parameters' dominant type.
pub fn precision(model: &kiln_graph::Model) -> String {
    let mut by: BTreeMap<String, u64> = BTreeMap::new();
    for p in &model.params {
        *by.entry(p.dtype.clone()).or_default() += p.bytes;
    }
    let top = by
        .into_iter()
        .max_by_key(|(_, b)| *b)
        .map(|(d, _)| d)
        .unwrap_or_default();
    match top.as_str() {
        "f16" => "f16",
        "i8" | "u8" | "qi8" | "qu8" => "int8",
        _ => "f32",
    }
    .into()
}
