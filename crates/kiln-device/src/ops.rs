//! What kiln does on a device through a [`Session`]: benchmark a model
//! (`kiln-runner bench`, a `kiln.bench/1` report back) and install an artifact
//! (`kiln-runner install`, its install report back).

use std::path::Path;

use anyhow::{bail, Context, Result};
use kiln_target::TargetSpec;
use serde_json::Value;

use crate::{Device, DeviceOptions, Finished, Session};

/// One benchmark to run on a device.
pub struct BenchJob<'a> {
    /// The runner for the device's target (a single-file build when `model` is `None`).
    pub runner: &'a Path,
    /// The model in runner form (NNEF tar), unless embedded in the runner.
    pub model: Option<&'a Path>,
    /// Inputs to time (default: the runner's synthetic inputs).
    pub inputs: Option<&'a Path>,
    /// Extra `kiln-runner bench` arguments (`--iters N`, `--seconds S`, `--warmup N`).
    pub runner_args: Vec<String>,
}

/// Deploys and runs `kiln-runner bench` on `device` (CPU `arch`), returning its
/// `kiln.bench/1` report with a `device` field added; `step` hears what happens.
pub fn bench(
    device: &Device,
    arch: &str,
    spec: &TargetSpec,
    opts: &DeviceOptions,
    job: &BenchJob,
    step: &mut dyn FnMut(&str),
) -> Result<Value> {
    step("creating a work directory");
    let session = Session::open(device, spec, arch, opts)?;
    step("copying runner and model");
    let runner = session.stage(job.runner, true)?;
    let mut args: Vec<String> = vec!["bench".into()];
    if let Some(m) = job.model {
        args.extend(["--model".into(), session.stage(m, false)?]);
    }
    if let Some(i) = job.inputs {
        args.extend(["--inputs".into(), session.stage(i, false)?]);
    }
    args.extend(job.runner_args.iter().cloned());
    let report_path = session.work_path("bench.json");
    args.extend(["--json".into(), report_path.clone()]);
    step("running kiln-runner bench");
    let f = session.run(&runner, &args)?;
    session.check(&f)?;
    step("fetching the report");
    let bytes = session.fetch(&report_path)?;
    let mut report: Value = serde_json::from_slice(&bytes)
        .with_context(|| format!("the bench report from {device} is not JSON"))?;
    if report["schema"] != "kiln.bench/1" {
        bail!(
            "the bench report from {device} has schema {} (expected kiln.bench/1)",
            report["schema"]
        );
    }
    report["device"] = Value::String(device.to_string());
    session.close()?;
    Ok(report)
}

/// What `kiln-runner install` said.
pub struct InstallOutcome {
    /// The artifact is installed and active.
    pub installed: bool,
    /// The runner's install report (`outcome`, `detail`, `active_slot`...), when it wrote one.
    pub report: Option<Value>,
    /// The runner's process result.
    pub finished: Finished,
}

/// Where and how to install an artifact on a device.
pub struct InstallJob<'a> {
    /// The runner for the artifact's target.
    pub runner: &'a Path,
    /// The `.kiln` artifact on the host.
    pub artifact: &'a Path,
    /// Trusted public keys folder, a path on the device.
    pub keys: &'a str,
    /// Install root, a path on the device.
    pub root: &'a str,
    /// Accept a version not newer than the installed one.
    pub allow_downgrade: bool,
}

/// Deploys the runner and the artifact, runs `kiln-runner install` on `device`. A refusal
/// (bad signature, older version...) is an outcome; an unreachable device or a crashed
/// runner is an error.
pub fn install(
    device: &Device,
    arch: &str,
    spec: &TargetSpec,
    opts: &DeviceOptions,
    job: &InstallJob,
) -> Result<InstallOutcome> {
    let session = Session::open(device, spec, arch, opts)?;
    let runner = session.stage(job.runner, true)?;
    let artifact = session.stage(job.artifact, false)?;
    let mut args: Vec<String> = vec![
        "install".into(),
        artifact,
        "--keys".into(),
        job.keys.into(),
        "--root".into(),
        job.root.into(),
    ];
    if job.allow_downgrade {
        args.push("--allow-downgrade".into());
    }
    let f = session.run(&runner, &args)?;
    let report: Option<Value> = serde_json::from_slice(&f.stdout).ok();
    if report.is_none() {
        session.check(&f)?;
    }
    session.close()?;
    Ok(InstallOutcome {
        installed: f.success(),
        report,
        finished: f,
    })
}
