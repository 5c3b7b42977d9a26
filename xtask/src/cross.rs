//! `cargo xtask setup-cross` and `cargo xtask runner`: cross toolchains and runner builds.

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Result};
use kiln_target::{build, toolchain, TargetSpec};

use crate::sh;

/// Installs rustup targets and the apt packages every target spec names; a no-op when all
/// is there. apt indexes can fail transiently, so `apt-get update` is retried.
pub fn setup(root: &Path) -> Result<()> {
    let specs = kiln_target::load_all(&root.join("targets"))?;
    let missing_std: Vec<&TargetSpec> = specs
        .iter()
        .filter(|s| !toolchain::status(s).rust_std)
        .collect();
    let mut triples: Vec<&str> = missing_std.iter().map(|s| s.triple.as_str()).collect();
    triples.sort();
    triples.dedup();
    if !triples.is_empty() {
        if toolchain::which("rustup").is_none() {
            bail!(
                "the Rust std for {} is missing and rustup is not installed; see ARCHITECTURE.md \
                 (\"Cross toolchains\") for the Debian rustc fallback",
                triples.join(", ")
            );
        }
        sh(Command::new("rustup")
            .args(["target", "add"])
            .args(&triples))?;
    }
    let mut packages: Vec<&str> = specs
        .iter()
        .flat_map(|s| s.apt.iter().map(String::as_str))
        .collect();
    packages.sort();
    packages.dedup();
    let absent: Vec<&str> = packages
        .into_iter()
        .filter(|p| !dpkg_installed(p))
        .collect();
    if !absent.is_empty() {
        let sudo: &[&str] = if is_root() { &[] } else { &["sudo"] };
        let apt = |args: &[&str]| {
            let mut c = Command::new(sudo.first().copied().unwrap_or("apt-get"));
            if !sudo.is_empty() {
                c.arg("apt-get");
            }
            c.args(args).env("DEBIAN_FRONTEND", "noninteractive");
            c
        };
        let mut updated = false;
        for attempt in 1..=3 {
            if sh(&mut apt(&["update", "-qq"])).is_ok() {
                updated = true;
                break;
            }
            eprintln!("apt-get update failed (attempt {attempt}/3); retrying");
            std::thread::sleep(std::time::Duration::from_secs(5 * attempt));
        }
        if !updated {
            eprintln!("apt-get update kept failing; trying the install with the lists there are");
        }
        let mut args = vec!["install", "-y", "-qq", "--no-install-recommends"];
        args.extend(&absent);
        sh(&mut apt(&args))?;
    }
    for s in &specs {
        let st = toolchain::status(s);
        if !st.can_build() {
            bail!(
                "target `{}` still lacks its toolchain after setup: {}",
                s.name,
                st.install.join("; ")
            );
        }
    }
    eprintln!("setup-cross: toolchains ready for {} targets", specs.len());
    Ok(())
}

fn dpkg_installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.starts_with(b"0"))
        .unwrap_or(false)
}

/// `cargo xtask runner --target NAME [--target NAME ...] [--profile P]`.
pub fn runners(root: &Path, args: &[String]) -> Result<()> {
    let mut names = vec![];
    let mut profile = build::RUNNER_PROFILE.to_string();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--target" => names.push(it.next().cloned().unwrap_or_default()),
            "--profile" => profile = it.next().cloned().unwrap_or_default(),
            other => bail!("unexpected argument `{other}`; usage: cargo xtask runner --target NAME [--profile P]"),
        }
    }
    if names.is_empty() {
        bail!("name at least one --target (see `ls targets/`)");
    }
    let dir = root.join("targets");
    for name in names {
        let spec = kiln_target::find(&dir, &name)?;
        let t0 = std::time::Instant::now();
        let path = build::build_runner(root, &spec, &profile)?;
        let size = std::fs::metadata(&path)?.len();
        eprintln!(
            "{}: {} ({} bytes, {:.0}s)",
            spec.name,
            path.display(),
            size,
            t0.elapsed().as_secs_f64()
        );
    }
    Ok(())
}
