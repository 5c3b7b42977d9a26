//! The subcommands' bodies: parse nothing, print results, map outcomes to exit codes.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use kiln_graph::load::parse_input_shape;
use kiln_graph::{LoadOptions, Model};
use kiln_io::compare::{compare, top1_accuracy, Comparison};
use kiln_io::{read_tensors, write_tensors, Batch, NamedTensors};
use serde::Serialize;

/// Loads a model, fixing the given `NAME=DIMS` input shapes.
pub fn load_model(path: &Path, input_shapes: &[String]) -> Result<Model> {
    let input_shapes = input_shapes
        .iter()
        .map(|s| parse_input_shape(s))
        .collect::<Result<_>>()?;
    kiln_graph::load(path, &LoadOptions { input_shapes })
}

/// `kiln inspect`.
pub fn inspect(model: &Path, input_shapes: &[String], json: bool) -> Result<ExitCode> {
    let model = load_model(model, input_shapes)?;
    let report = kiln_graph::inspect(&model)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.to_text());
    }
    Ok(ExitCode::SUCCESS)
}

/// Arguments of `kiln run`.
#[derive(clap::Args)]
pub struct RunArgs {
    /// ONNX file, or kiln's NNEF output.
    pub model: PathBuf,
    /// Inputs: a sample .npz (one array per input) or a dataset (extra leading N axis).
    #[arg(long)]
    pub inputs: PathBuf,
    /// Write the outputs here (.npz), named as the model's outputs.
    #[arg(long)]
    pub output: Option<PathBuf>,
    /// Reference outputs to compare with: max-abs, cosine, top-1 agreement.
    #[arg(long)]
    pub compare: Option<PathBuf>,
    /// With --compare: fail (exit 1) when any output's max-abs error exceeds this.
    #[arg(long, value_name = "MAX_ABS")]
    pub tolerance: Option<f64>,
    /// Fix an input's shape (symbolic dims), e.g. input=1x3x224x224. Repeatable.
    #[arg(long = "input-shape", value_name = "NAME=DIMS")]
    pub input_shapes: Vec<String>,
    /// Print the versioned JSON document (schema kiln.run/1).
    #[arg(long)]
    pub json: bool,
}

/// The `kiln run --json` document (schema `kiln.run/1`).
#[derive(Serialize)]
pub struct RunReport {
    /// Always `kiln.run/1`.
    pub schema: &'static str,
    /// Model path.
    pub model: String,
    /// Inputs path.
    pub inputs: String,
    /// Number of samples run (1 for a single sample).
    pub samples: usize,
    /// Whether the inputs were a dataset.
    pub dataset: bool,
    /// Outputs: name, shape, and the comparison when `--compare` was given.
    pub outputs: Vec<OutputReport>,
    /// Top-1 accuracy against the dataset's `labels`, if it has them.
    pub accuracy: Option<f64>,
    /// Warnings about the inputs.
    pub warnings: Vec<String>,
    /// `false` when a comparison exceeded `--tolerance`.
    pub within_tolerance: bool,
}

/// One output in a [`RunReport`].
#[derive(Serialize)]
pub struct OutputReport {
    /// Output name.
    pub name: String,
    /// Output shape (with the leading N axis for a dataset).
    pub shape: Vec<usize>,
    /// Max-abs error vs the reference.
    pub max_abs: Option<f64>,
    /// Mean-abs error vs the reference.
    pub mean_abs: Option<f64>,
    /// Cosine similarity vs the reference.
    pub cosine: Option<f64>,
    /// Top-1 agreement vs the reference (classifier-shaped outputs).
    pub top1_agreement: Option<f64>,
}

/// Reads data for `model` from `path`, printing warnings.
pub fn read_batch(model: &Model, path: &Path) -> Result<Batch> {
    let arrays = read_tensors(path)?;
    let batch = Batch::bind(&model.input_specs()?, arrays, &path.display().to_string())?;
    for w in &batch.warnings {
        eprintln!("warning: {w}");
    }
    Ok(batch)
}

/// Runs `model` on `batch` and compares with the reference file, if any.
pub fn run_and_compare(
    model: &Model,
    batch: &Batch,
    reference: Option<&Path>,
) -> Result<(NamedTensors, Vec<Option<Comparison>>)> {
    let outputs = kiln_graph::run_batch(model, batch)?;
    let mut comparisons = vec![];
    let reference = reference.map(read_tensors).transpose()?;
    for (name, t) in &outputs {
        let cmp = match &reference {
            None => None,
            Some(r) => {
                let origin = reference_name(r, name);
                let (_, e) = r.iter().find(|(n, _)| n == origin).with_context(|| {
                    format!("the reference has no array `{name}` (the model's output)")
                })?;
                let sample_rank = t.rank() - batch.dataset_len.map_or(0, |_| 1);
                Some(compare(t, e, sample_rank).with_context(|| format!("output `{name}`"))?)
            }
        };
        comparisons.push(cmp);
    }
    Ok((outputs, comparisons))
}

/// The reference array for output `name`: by name, or the only array of a one-array file.
fn reference_name<'a>(reference: &'a NamedTensors, name: &'a str) -> &'a str {
    match reference.as_slice() {
        [(only, _)] => only,
        _ => name,
    }
}

/// `kiln run`.
pub fn run(args: RunArgs) -> Result<ExitCode> {
    let model = load_model(&args.model, &args.input_shapes)?;
    let batch = read_batch(&model, &args.inputs)?;
    let (outputs, comparisons) = run_and_compare(&model, &batch, args.compare.as_deref())?;
    if let Some(out) = &args.output {
        write_tensors(out, &outputs)?;
    }
    let accuracy = match (&batch.labels, outputs.first()) {
        (Some(labels), Some((_, o))) => Some(top1_accuracy(o, labels)?),
        _ => None,
    };
    let mut within = true;
    let mut reports = vec![];
    for ((name, t), cmp) in outputs.iter().zip(&comparisons) {
        if let (Some(c), Some(tol)) = (cmp, args.tolerance) {
            within &= c.max_abs <= tol && c.non_finite == 0;
        }
        reports.push(OutputReport {
            name: name.clone(),
            shape: t.shape().to_vec(),
            max_abs: cmp.as_ref().map(|c| c.max_abs),
            mean_abs: cmp.as_ref().map(|c| c.mean_abs),
            cosine: cmp.as_ref().map(|c| c.cosine),
            top1_agreement: cmp.as_ref().and_then(|c| c.top1_agreement),
        });
    }
    let report = RunReport {
        schema: "kiln.run/1",
        model: args.model.display().to_string(),
        inputs: args.inputs.display().to_string(),
        samples: batch.len(),
        dataset: batch.dataset_len.is_some(),
        outputs: reports,
        accuracy,
        warnings: batch.warnings.clone(),
        within_tolerance: within,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_run(&report, &outputs, args.output.as_deref());
    }
    if !within {
        eprintln!(
            "error: outputs differ from {} by more than the tolerance {}",
            args.compare.unwrap().display(),
            args.tolerance.unwrap()
        );
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

fn print_run(report: &RunReport, outputs: &NamedTensors, written: Option<&Path>) {
    println!(
        "ran {} on {} {}",
        report.model,
        report.samples,
        if report.dataset {
            "samples (dataset)"
        } else {
            "sample"
        }
    );
    for (o, (_, t)) in report.outputs.iter().zip(outputs) {
        let shape: Vec<String> = o.shape.iter().map(|d| d.to_string()).collect();
        print!("  {:<16} [{}]", o.name, shape.join("x"));
        match (o.max_abs, o.cosine) {
            (Some(m), Some(c)) => {
                print!("  max-abs {m:.3e}  cosine {c:.6}");
                if let Some(t) = o.top1_agreement {
                    print!("  top-1 agreement {:.2}%", t * 100.0);
                }
            }
            _ => print!("  {}", preview(t)),
        }
        println!();
    }
    if let Some(a) = report.accuracy {
        println!("  top-1 accuracy vs labels: {:.2}%", a * 100.0);
    }
    if let Some(p) = written {
        println!("wrote {}", p.display());
    }
}

fn preview(t: &kiln_io::tract_core::prelude::Tensor) -> String {
    match t.cast_to::<f32>() {
        Ok(f) => match kiln_io::slice_of::<f32>(&f) {
            Ok(s) => {
                let head: Vec<String> = s.iter().take(6).map(|v| format!("{v:.4}")).collect();
                format!(
                    "[{}{}]",
                    head.join(", "),
                    if s.len() > 6 { ", ..." } else { "" }
                )
            }
            Err(_) => String::new(),
        },
        Err(_) => String::new(),
    }
}
