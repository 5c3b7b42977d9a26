//! `manifest.json`: what an artifact holds and promises, signed byte for byte.

use std::collections::BTreeMap;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

/// Schema identifier of the manifest.
pub const SCHEMA: &str = "kiln.manifest/1";
/// Largest manifest accepted (bytes).
pub const MAX_MANIFEST_BYTES: u64 = 1 << 20;
/// Name of the model file inside an artifact.
pub const MODEL_FILE: &str = "model.nnef.tar";
/// Golden self-test inputs inside an artifact.
pub const GOLDEN_INPUTS: &str = "golden/inputs.npz";
/// Golden self-test outputs inside an artifact.
pub const GOLDEN_OUTPUTS: &str = "golden/outputs.npz";
/// Optional runner executable inside an artifact.
pub const RUNNER_FILE: &str = "kiln-runner";

/// The signed description of an artifact.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Always [`SCHEMA`].
    pub schema: String,
    /// Model name.
    pub name: String,
    /// Monotonically increasing version; devices refuse older ones.
    pub version: u64,
    /// Target name the artifact was compiled for (`aarch64-linux`).
    pub target: String,
    /// `f32`, `f16` or `int8`.
    pub precision: String,
    /// kiln version that made it.
    pub kiln_version: String,
    /// tract version the model form needs.
    pub tract_version: String,
    /// Fingerprint of the signing key ([`crate::keys::key_id`]).
    pub key_id: String,
    /// Every other file: path -> size and SHA-256.
    pub files: BTreeMap<String, FileEntry>,
    /// Self-test: outputs on the golden inputs must be within this max-abs error.
    pub golden_max_abs: f64,
    /// Expected top-1 accuracy, if measured.
    pub expected_accuracy: Option<f64>,
}

/// Size and hash of one file in the artifact.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileEntry {
    /// Bytes.
    pub size: u64,
    /// Lowercase hex SHA-256.
    pub sha256: String,
}

impl Manifest {
    /// Parses and validates manifest bytes.
    pub fn parse(bytes: &[u8]) -> Result<Manifest> {
        let m: Manifest =
            serde_json::from_slice(bytes).context("manifest.json is not a valid kiln manifest")?;
        if m.schema != SCHEMA {
            bail!(
                "manifest schema `{}` is not supported (this runner reads {SCHEMA})",
                m.schema
            );
        }
        for required in [MODEL_FILE, GOLDEN_INPUTS, GOLDEN_OUTPUTS] {
            if !m.files.contains_key(required) {
                bail!("manifest lists no `{required}`");
            }
        }
        for (path, f) in &m.files {
            check_path(path)?;
            if f.sha256.len() != 64 || !f.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
                bail!("manifest entry `{path}` has a malformed sha256");
            }
        }
        if !(m.golden_max_abs.is_finite() && m.golden_max_abs >= 0.0) {
            bail!("manifest golden_max_abs must be a non-negative number");
        }
        Ok(m)
    }

    /// Canonical bytes (what gets signed).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec_pretty(self).expect("manifest serializes");
        v.push(b'\n');
        v
    }

    /// Total bytes of the listed files.
    pub fn payload_bytes(&self) -> u64 {
        self.files.values().map(|f| f.size).sum()
    }
}

/// A path inside an artifact must be relative, plain and short: no `..`, no absolute path,
/// no empty or dot components, no backslashes or NULs.
pub fn check_path(path: &str) -> Result<()> {
    let bad = path.is_empty()
        || path.len() > 200
        || path.starts_with('/')
        || path.contains('\\')
        || path.contains('\0')
        || path
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..")
        || path.split('/').count() > 4;
    if bad {
        bail!(
            "unsafe path `{}` in artifact (absolute, `..`, or malformed); refusing it",
            path.escape_debug()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths() {
        for ok in ["model.nnef.tar", "golden/inputs.npz"] {
            assert!(check_path(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "/etc/passwd",
            "../x",
            "a/../../b",
            "a//b",
            "./a",
            "a\\b",
            "a/b/c/d/e",
        ] {
            assert!(check_path(bad).is_err(), "{bad}");
        }
    }
}
