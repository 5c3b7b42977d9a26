//! Packaging (host only): a deterministic tar (fixed order, zero timestamps and owners)
//! compressed with zstd at a fixed level, so the same inputs give byte-identical artifacts.

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use ed25519_dalek::{Signer, SigningKey};
use sha2::{Digest, Sha256};

use crate::keys::key_id;
use crate::manifest::{FileEntry, Manifest, RUNNER_FILE, SCHEMA};
use crate::read::{hex, MANIFEST, SIGNATURE};

/// zstd level of artifacts: compact, still fast to decode on a small board.
pub const ZSTD_LEVEL: i32 = 19;

/// What goes into an artifact besides the manifest and signature.
pub struct PackageInput {
    /// Model name.
    pub name: String,
    /// Version (monotonic).
    pub version: u64,
    /// Target name.
    pub target: String,
    /// Precision label.
    pub precision: String,
    /// tract version the model needs.
    pub tract_version: String,
    /// Self-test tolerance.
    pub golden_max_abs: f64,
    /// Expected accuracy, if measured.
    pub expected_accuracy: Option<f64>,
    /// Files: path in the artifact -> bytes.
    pub files: BTreeMap<String, Vec<u8>>,
}

/// Builds the manifest for `input`, signs it with `key`, and returns the artifact bytes
/// and the manifest.
pub fn package(input: &PackageInput, key: &SigningKey) -> Result<(Vec<u8>, Manifest)> {
    let files = input
        .files
        .iter()
        .map(|(p, b)| {
            (
                p.clone(),
                FileEntry {
                    size: b.len() as u64,
                    sha256: hex(&Sha256::digest(b)),
                },
            )
        })
        .collect();
    let manifest = Manifest {
        schema: SCHEMA.into(),
        name: input.name.clone(),
        version: input.version,
        target: input.target.clone(),
        precision: input.precision.clone(),
        kiln_version: env!("CARGO_PKG_VERSION").into(),
        tract_version: input.tract_version.clone(),
        key_id: key_id(&key.verifying_key()),
        files,
        golden_max_abs: input.golden_max_abs,
        expected_accuracy: input.expected_accuracy,
    };
    let manifest_bytes = manifest.to_bytes();
    // Re-parse what we wrote: the device will.
    Manifest::parse(&manifest_bytes).context("kiln wrote a manifest it cannot read back")?;
    let signature = key.sign(&manifest_bytes).to_bytes();
    let mut tar = tar::Builder::new(Vec::new());
    append(&mut tar, MANIFEST, &manifest_bytes, 0o644)?;
    append(&mut tar, SIGNATURE, &signature, 0o644)?;
    for (path, bytes) in &input.files {
        append(
            &mut tar,
            path,
            bytes,
            if path == RUNNER_FILE { 0o755 } else { 0o644 },
        )?;
    }
    let tar = tar.into_inner()?;
    let compressed = zstd::bulk::compress(&tar, ZSTD_LEVEL)?;
    Ok((compressed, manifest))
}

fn append(tar: &mut tar::Builder<Vec<u8>>, path: &str, bytes: &[u8], mode: u32) -> Result<()> {
    let mut h = tar::Header::new_gnu();
    h.set_path(path)?;
    h.set_size(bytes.len() as u64);
    h.set_mode(mode);
    h.set_mtime(0);
    h.set_uid(0);
    h.set_gid(0);
    h.set_entry_type(tar::EntryType::Regular);
    h.set_cksum();
    tar.append(&h, bytes)?;
    Ok(())
}
