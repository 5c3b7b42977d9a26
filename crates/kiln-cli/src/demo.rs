//! `kiln demo`: the README's first command, a tour of kiln on the bundled fixtures.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Result};
use kiln_graph::inspect::human_bytes;

use crate::commands::{load_model, read_batch, run_and_compare};

/// The committed fixtures the demo walks through, with the max-abs error each must meet
/// against onnxruntime's reference outputs (see fixtures/README.md).
const FIXTURES: &[(&str, f64)] = &[
    ("digits", 1e-4),
    ("cnn", 1e-4),
    ("mobilenet", 1e-4),
    ("transformer", 1e-4),
];

/// Finds the fixtures folder: the given one, ./fixtures, or the source tree's.
fn fixtures_dir(given: Option<PathBuf>) -> Result<PathBuf> {
    let candidates = match given {
        Some(p) => vec![p],
        None => vec![
            PathBuf::from("fixtures"),
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures"),
        ],
    };
    for c in &candidates {
        if c.join("digits/model.onnx").exists() {
            return Ok(c.clone());
        }
    }
    bail!(
        "no kiln fixtures found in {}; run the demo from the kiln checkout or pass --fixtures DIR",
        candidates[0].display()
    )
}

/// Runs the demo; exit 1 if any fixture disagrees with its reference.
pub fn demo(fixtures: Option<PathBuf>) -> Result<ExitCode> {
    let dir = fixtures_dir(fixtures)?;
    println!("kiln demo on {}\n", dir.display());
    println!(
        "1. inspect and run every fixture on the host (tract), compare with onnxruntime's outputs"
    );
    println!(
        "   {:<12} {:>9} {:>10} {:>11} {:>8} {:>11} {:>9} {:>9}",
        "model", "params", "size", "MACs", "samples", "max-abs", "cosine", "time"
    );
    let mut ok = true;
    for (name, tol) in FIXTURES {
        let model_path = dir.join(name).join("model.onnx");
        let model = load_model(&model_path, &[])?;
        let info = kiln_graph::inspect(&model)?;
        let batch = read_batch(&model, &dir.join(name).join("data.npz"))?;
        let t0 = Instant::now();
        let (outputs, cmps) =
            run_and_compare(&model, &batch, Some(&dir.join(name).join("data_ref.npz")))?;
        let elapsed = t0.elapsed();
        let worst = cmps.iter().flatten().map(|c| c.max_abs).fold(0.0, f64::max);
        let cosine = cmps.iter().flatten().map(|c| c.cosine).fold(1.0, f64::min);
        let pass = worst <= *tol;
        ok &= pass;
        let macs = info
            .macs
            .as_ref()
            .map(|m| format!("{:.2}M", m.total as f64 / 1e6))
            .unwrap_or("?".into());
        println!(
            "   {:<12} {:>9} {:>10} {:>11} {:>8} {:>11.2e} {:>9.6} {:>7.1}ms {}",
            name,
            info.params.count,
            human_bytes(std::fs::metadata(&model_path)?.len()),
            macs,
            batch.len(),
            worst,
            cosine,
            elapsed.as_secs_f64() * 1e3,
            if pass { "ok" } else { "MISMATCH" }
        );
        if let (Some(labels), Some((_, o))) = (&batch.labels, outputs.first()) {
            let acc = kiln_io::compare::top1_accuracy(o, labels)?;
            println!(
                "   {:<12} top-1 accuracy on its {} held-out labelled samples: {:.2}%",
                "",
                batch.len(),
                acc * 100.0
            );
        }
    }
    println!();
    if !ok {
        eprintln!("error: some fixture outputs differ from onnxruntime's beyond tolerance");
        return Ok(ExitCode::FAILURE);
    }
    println!("demo ok");
    Ok(ExitCode::SUCCESS)
}
