//! A/B install on the device. Layout under the install root:
//!
//! ```text
//! ROOT/active           "a" or "b": the pointer, replaced by rename
//! ROOT/slots/a/, b/     complete, verified artifacts (manifest.json, manifest.sig, files)
//! ROOT/slots/.staging/  an install in progress (removed on failure or next install)
//! ROOT/.lock            serializes installs and rollbacks
//! ```
//!
//! A slot only appears by renaming a fully written, fsynced, self-tested staging folder,
//! and the pointer only changes by an atomic rename, so a crash at any point leaves the
//! previous model active and whole.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use ed25519_dalek::VerifyingKey;
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::manifest::Manifest;
use crate::read::{hex, verify, Limits, MANIFEST, SIGNATURE};

/// Install policy.
#[derive(Debug, Clone)]
pub struct InstallOptions {
    /// Accept a version not newer than the active one.
    pub allow_downgrade: bool,
    /// Reading limits.
    pub limits: Limits,
    /// This runner's target; `None` skips the check (a development build).
    pub target: Option<String>,
}

/// What an install did (schema `kiln.install/1`).
#[derive(Debug, Clone, Serialize)]
pub struct InstallReport {
    /// Always `kiln.install/1`.
    pub schema: &'static str,
    /// `installed`, `rejected` or `self-test-failed`.
    pub outcome: String,
    /// Why, when not installed; the self-test summary when installed.
    pub detail: String,
    /// Model name and version of the artifact (when its manifest could be read).
    pub name: Option<String>,
    /// Artifact version.
    pub version: Option<u64>,
    /// Active slot after the install.
    pub active_slot: Option<String>,
    /// Version active after the install.
    pub active_version: Option<u64>,
}

/// One slot's state.
#[derive(Debug, Clone, Serialize)]
pub struct SlotStatus {
    /// `a` or `b`.
    pub slot: String,
    /// Its manifest.
    pub manifest: Manifest,
}

/// `status` (schema `kiln.status/1`).
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    /// Always `kiln.status/1`.
    pub schema: &'static str,
    /// The active slot, if anything is installed.
    pub active: Option<SlotStatus>,
    /// The other slot (the rollback candidate), if it holds a model.
    pub inactive: Option<SlotStatus>,
}

fn slots(root: &Path) -> PathBuf {
    root.join("slots")
}

fn other(slot: &str) -> &'static str {
    if slot == "a" {
        "b"
    } else {
        "a"
    }
}

/// The active slot name, if any.
pub fn active_slot(root: &Path) -> Result<Option<String>> {
    match fs::read_to_string(root.join("active")) {
        Ok(s) => match s.trim() {
            "a" | "b" => Ok(Some(s.trim().to_string())),
            other => bail!(
                "{}/active holds `{other}`, not a or b; the install root is damaged",
                root.display()
            ),
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("cannot read {}/active", root.display())),
    }
}

/// The active slot's folder and manifest.
pub fn active(root: &Path) -> Result<(PathBuf, Manifest)> {
    let Some(slot) = active_slot(root)? else {
        bail!(
            "nothing is installed under {} (kiln-runner install APP.kiln --keys DIR --root {})",
            root.display(),
            root.display()
        );
    };
    let dir = slots(root).join(&slot);
    let m = read_manifest(&dir)?;
    Ok((dir, m))
}

fn read_manifest(dir: &Path) -> Result<Manifest> {
    let bytes = fs::read(dir.join(MANIFEST))
        .with_context(|| format!("cannot read {}/{MANIFEST}", dir.display()))?;
    Manifest::parse(&bytes).with_context(|| format!("{}", dir.display()))
}

/// Both slots' state.
pub fn status(root: &Path) -> Result<Status> {
    let active = active_slot(root)?;
    let slot_status = |slot: &str| -> Option<SlotStatus> {
        read_manifest(&slots(root).join(slot))
            .ok()
            .map(|manifest| SlotStatus {
                slot: slot.into(),
                manifest,
            })
    };
    Ok(Status {
        schema: "kiln.status/1",
        active: active.as_deref().and_then(slot_status),
        inactive: active.as_deref().map(other).and_then(slot_status),
    })
}

fn lock(root: &Path) -> Result<File> {
    fs::create_dir_all(slots(root))
        .with_context(|| format!("cannot create the install root {}", root.display()))?;
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(root.join(".lock"))
        .with_context(|| {
            format!(
                "cannot open {}/.lock (is the root writable?)",
                root.display()
            )
        })?;
    f.lock()
        .with_context(|| format!("cannot lock {}", root.display()))?;
    Ok(f)
}

fn fsync_dir(dir: &Path) -> Result<()> {
    File::open(dir)?
        .sync_all()
        .with_context(|| format!("fsync {}", dir.display()))
}

/// Writes the pointer atomically: temp file, fsync, rename, fsync root.
fn set_active(root: &Path, slot: &str) -> Result<()> {
    let tmp = root.join("active.tmp");
    let mut f = File::create(&tmp)?;
    f.write_all(format!("{slot}\n").as_bytes())?;
    f.sync_all()?;
    drop(f);
    fs::rename(&tmp, root.join("active"))?;
    fsync_dir(root)
}

/// Verifies `artifact` against `keys`, writes it to the inactive slot, runs `self_test` on
/// the written slot, and only then switches to it. Policy refusals and a failing self-test
/// come back as a report (the previous model stays active); I/O trouble as an error, also
/// leaving the previous model active.
pub fn install(
    artifact: &Path,
    keys: &[VerifyingKey],
    root: &Path,
    opts: &InstallOptions,
    self_test: &dyn Fn(&Path, &Manifest) -> Result<String>,
) -> Result<InstallReport> {
    let file = File::open(artifact)
        .with_context(|| format!("cannot open artifact {}", artifact.display()))?;
    let _lock = lock(root)?;
    let current = active_slot(root)?;
    let current_manifest = current
        .as_ref()
        .and_then(|s| read_manifest(&slots(root).join(s)).ok());
    let staging = slots(root).join(".staging");
    if staging.exists() {
        fs::remove_dir_all(&staging)
            .with_context(|| format!("cannot clear {}", staging.display()))?;
    }
    fs::create_dir_all(&staging)?;
    let mut report = InstallReport {
        schema: "kiln.install/1",
        outcome: "rejected".into(),
        detail: String::new(),
        name: None,
        version: None,
        active_slot: current.clone(),
        active_version: current_manifest.as_ref().map(|m| m.version),
    };
    let mut policy = |m: &Manifest| -> Result<()> {
        if let Some(t) = &opts.target {
            if &m.target != t {
                bail!(
                    "artifact is for target `{}`, this device runs `{t}`",
                    m.target
                );
            }
        }
        if let Some(cur) = &current_manifest {
            if m.version <= cur.version && !opts.allow_downgrade {
                bail!(
                    "artifact version {} is not newer than the installed version {} (anti-rollback; --allow-downgrade to force)",
                    m.version,
                    cur.version
                );
            }
        }
        Ok(())
    };
    let mut sink = |path: &str, r: &mut dyn Read| -> Result<()> {
        let dest = staging.join(path);
        if let Some(parent) = dest.parent() {
            fs::create_dir_all(parent)?;
        }
        let mut f =
            File::create(&dest).with_context(|| format!("cannot write {}", dest.display()))?;
        std::io::copy(r, &mut f)
            .with_context(|| format!("writing {} (disk full?)", dest.display()))?;
        f.sync_all()
            .with_context(|| format!("fsync {} (disk full?)", dest.display()))?;
        Ok(())
    };
    let verified = match verify(
        std::io::BufReader::new(file),
        keys,
        &opts.limits,
        &mut policy,
        &mut sink,
    ) {
        Ok(v) => v,
        Err(e) => {
            let _ = fs::remove_dir_all(&staging);
            let text = format!("{e:#}");
            if is_io_trouble(&text) {
                return Err(e);
            }
            report.detail = text;
            return Ok(report);
        }
    };
    report.name = Some(verified.manifest.name.clone());
    report.version = Some(verified.manifest.version);
    let written = (|| -> Result<()> {
        for (name, bytes) in [
            (MANIFEST, &verified.manifest_bytes),
            (SIGNATURE, &verified.signature),
        ] {
            let mut f = File::create(staging.join(name))?;
            f.write_all(bytes)?;
            f.sync_all()?;
        }
        if staging.join("golden").exists() {
            fsync_dir(&staging.join("golden"))?;
        }
        fsync_dir(&staging)
    })();
    if let Err(e) = written {
        let _ = fs::remove_dir_all(&staging);
        return Err(
            e.context("writing the new slot failed (disk full?); the previous model stays active")
        );
    }
    let tested = self_test(&staging, &verified.manifest);
    if tested.is_ok() {
        if let Err(e) = switch(root, &staging, current.as_deref()) {
            let _ = fs::remove_dir_all(&staging);
            return Err(
                e.context("switching to the new slot failed; the previous model stays active")
            );
        }
    }
    match tested {
        Ok(summary) => report.detail = summary,
        Err(e) => {
            let _ = fs::remove_dir_all(&staging);
            report.outcome = "self-test-failed".into();
            report.detail = format!("{e:#}");
            return Ok(report);
        }
    }
    let target_slot = current.as_deref().map(other).unwrap_or("a");
    report.outcome = "installed".into();
    report.active_slot = Some(target_slot.into());
    report.active_version = Some(verified.manifest.version);
    Ok(report)
}

/// Replaces the inactive slot with `staging` and points `active` at it.
fn switch(root: &Path, staging: &Path, current: Option<&str>) -> Result<()> {
    let target_slot = current.map(other).unwrap_or("a");
    let slot_dir = slots(root).join(target_slot);
    if slot_dir.exists() {
        fs::remove_dir_all(&slot_dir)?;
    }
    fs::rename(staging, &slot_dir)?;
    fsync_dir(&slots(root))?;
    set_active(root, target_slot)
}

fn is_io_trouble(text: &str) -> bool {
    text.contains("disk full")
        || text.contains("No space left")
        || text.contains("Permission denied")
        || text.contains("Read-only file system")
}

/// Checks every file of a slot against its manifest's sizes and hashes.
pub fn check_slot(dir: &Path) -> Result<Manifest> {
    let m = read_manifest(dir)?;
    for (path, f) in &m.files {
        let bytes = fs::read(dir.join(path))
            .with_context(|| format!("{}: `{path}` is missing", dir.display()))?;
        if bytes.len() as u64 != f.size || hex(&Sha256::digest(&bytes)) != f.sha256 {
            bail!(
                "{}: `{path}` no longer matches the manifest (damaged slot)",
                dir.display()
            );
        }
    }
    Ok(m)
}

/// Switches to the other slot after checking its files; returns its manifest.
pub fn rollback(root: &Path) -> Result<Manifest> {
    let _lock = lock(root)?;
    let Some(current) = active_slot(root)? else {
        bail!(
            "nothing is installed under {}; nothing to roll back",
            root.display()
        );
    };
    let target = other(&current);
    let dir = slots(root).join(target);
    if !dir.join(MANIFEST).exists() {
        bail!("slot {target} is empty: there is no previous model to roll back to");
    }
    let m = check_slot(&dir)?;
    set_active(root, target)?;
    Ok(m)
}
