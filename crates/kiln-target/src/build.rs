//! Building `kiln-runner` for a target from the kiln source tree, and finding built runners.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::spec::TargetSpec;
use crate::{elf, toolchain};

/// The cargo profile of shipped runners (size-optimized, fat LTO, panic=abort, stripped).
pub const RUNNER_PROFILE: &str = "runner";

/// Where the runner for `spec` lives once built: `<root>/target/runners/<name>/kiln-runner`.
pub fn runner_path(root: &Path, spec: &TargetSpec) -> PathBuf {
    root.join("target/runners")
        .join(&spec.name)
        .join("kiln-runner")
}

/// Finds an already-built runner for `spec`: `$KILN_RUNNER_DIR/<name>/kiln-runner`, then
/// `runners/<name>/kiln-runner` beside the directory holding the running kiln (the layout
/// of `target/` in a checkout and of a kiln distribution), then the source tree's.
pub fn find_runner(spec: &TargetSpec) -> Option<PathBuf> {
    let mut candidates = vec![];
    if let Some(d) = std::env::var_os("KILN_RUNNER_DIR") {
        candidates.push(PathBuf::from(d).join(&spec.name).join("kiln-runner"));
    }
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_path_buf))
    {
        for up in [dir.parent(), dir.parent().and_then(Path::parent)]
            .into_iter()
            .flatten()
        {
            candidates.push(up.join("runners").join(&spec.name).join("kiln-runner"));
        }
    }
    if let Some(root) = crate::source_root() {
        candidates.push(runner_path(&root, spec));
    }
    candidates.into_iter().find(|p| p.is_file())
}

/// The runner for `spec`: `given`, else an already-built one ([`find_runner`]), else one
/// built now from the kiln source tree this binary came from.
pub fn runner_for(spec: &TargetSpec, given: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = given {
        return Ok(p.to_path_buf());
    }
    if let Some(p) = find_runner(spec) {
        return Ok(p);
    }
    match crate::source_root() {
        Some(root) => build_runner(&root, spec, RUNNER_PROFILE),
        None => bail!(
            "no kiln-runner for target `{}` found; build one with `cargo xtask runner --target {}` \
             or set KILN_RUNNER_DIR",
            spec.name,
            spec.name
        ),
    }
}

/// Cross-builds the runner for `spec` from the source tree at `root` with `profile`, checks
/// the ELF against the spec, and returns the path of the installed runner.
pub fn build_runner(root: &Path, spec: &TargetSpec, profile: &str) -> Result<PathBuf> {
    build_runner_with(root, spec, profile, &[], "")
}

/// [`build_runner`] with profile settings overridden (`("STRIP", "false")`) into a build
/// variant of its own (`variant` names its directory; empty for the shipped runner).
pub fn build_runner_with(
    root: &Path,
    spec: &TargetSpec,
    profile: &str,
    overrides: &[(&str, &str)],
    variant: &str,
) -> Result<PathBuf> {
    let status = toolchain::status(spec);
    if !status.can_build() {
        bail!(
            "cannot build the runner for `{}` ({}): missing toolchain. Install it with:\n  {}\n(or run `cargo xtask setup-cross`)",
            spec.name,
            spec.triple,
            status.install.join("\n  ")
        );
    }
    let build_dir = if variant.is_empty() {
        "build".to_string()
    } else {
        format!("build-{variant}")
    };
    let target_dir = root.join("target/runners").join(&spec.name).join(build_dir);
    let profile_env = profile.to_uppercase().replace('-', "_");
    let triple_env = spec.triple.to_uppercase().replace('-', "_");
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(root)
        .args([
            "build",
            "--package",
            "kiln-runner",
            "--profile",
            profile,
            "--target",
            &spec.triple,
        ])
        .args(if spec.runner_features.is_empty() {
            vec![]
        } else {
            vec!["--features".to_string(), spec.runner_features.join(",")]
        })
        .arg("--target-dir")
        .arg(&target_dir)
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env(
            format!("CARGO_TARGET_{triple_env}_RUSTFLAGS"),
            spec.rustflags(&root.join("targets")),
        )
        .env(
            format!("CARGO_PROFILE_{profile_env}_OPT_LEVEL"),
            &spec.opt_level,
        )
        .env("KILN_TARGET", &spec.name);
    for (key, value) in overrides {
        cmd.env(format!("CARGO_PROFILE_{profile_env}_{key}"), value);
    }
    if !spec.linker.is_empty() {
        cmd.env(format!("CARGO_TARGET_{triple_env}_LINKER"), &spec.linker);
    }
    if !spec.cc.is_empty() {
        cmd.env(format!("CC_{}", spec.triple.replace('-', "_")), &spec.cc);
    }
    eprintln!(
        "building kiln-runner for {} ({}, profile {profile}, opt-level {})",
        spec.name, spec.triple, spec.opt_level
    );
    let st = cmd.status().context("cannot start cargo")?;
    if !st.success() {
        bail!(
            "building kiln-runner for `{}` failed ({st}); see cargo's output above",
            spec.name
        );
    }
    let built = target_dir
        .join(&spec.triple)
        .join(profile)
        .join("kiln-runner");
    let bytes = std::fs::read(&built)
        .with_context(|| format!("cargo did not produce {}", built.display()))?;
    let report = elf::inspect(&bytes).with_context(|| format!("{}", built.display()))?;
    elf::check(&report, spec).with_context(|| format!("{}", built.display()))?;
    if !variant.is_empty() {
        return Ok(built);
    }
    let dest = runner_path(root, spec);
    std::fs::create_dir_all(dest.parent().unwrap())?;
    let tmp = dest.with_extension("tmp");
    std::fs::copy(&built, &tmp)?;
    std::fs::rename(&tmp, &dest)?;
    Ok(dest)
}
