//! The Python virtual environment xtask makes for fixtures and peer benchmarks (onnxruntime).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Result;

use crate::sh;

/// Packages the fixture script and the onnxruntime benchmarks need, pinned for reproducibility.
const REQUIREMENTS: &[&str] = &[
    "numpy==2.4.6",
    "onnx==1.23.2",
    "onnxruntime==1.31.1",
    "scikit-learn==1.9.1",
];

/// Creates (once) `target/pyenv` with [`REQUIREMENTS`] and returns its python.
pub fn venv(root: &Path) -> Result<PathBuf> {
    let dir = root.join("target/pyenv");
    let python = dir.join("bin/python");
    let stamp = dir.join("kiln-requirements.txt");
    let wanted = REQUIREMENTS.join("\n");
    if python.exists() && std::fs::read_to_string(&stamp).ok().as_deref() == Some(wanted.as_str()) {
        return Ok(python);
    }
    sh(Command::new("python3").args(["-m", "venv"]).arg(&dir))?;
    sh(Command::new(&python)
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
        ])
        .args(REQUIREMENTS))?;
    std::fs::write(&stamp, wanted)?;
    Ok(python)
}
