//! `cargo xtask bench <what>`: benchmarks that print numbers and ratios (never timed tests).

use std::path::Path;

use anyhow::{bail, Result};
use kiln_target::{build, elf};

/// Targets whose runner sizes `bench size` reports.
const SIZE_TARGETS: &[&str] = &["x86_64-linux", "aarch64-linux", "armv7-linux"];

/// `cargo xtask bench size|...`.
pub fn bench(root: &Path, args: &[String]) -> Result<()> {
    match args.first().map(String::as_str) {
        Some("size") => size(root),
        _ => bail!("usage: cargo xtask bench size"),
    }
}

/// Runner size per target (stripped, as shipped) with the biggest contributors by crate,
/// from a second build that keeps symbols (same flags otherwise).
fn size(root: &Path) -> Result<()> {
    let dir = root.join("targets");
    let mut rows = vec![];
    for name in SIZE_TARGETS {
        let spec = kiln_target::find(&dir, name)?;
        let shipped = build::build_runner(root, &spec, build::RUNNER_PROFILE)?;
        let stripped = std::fs::read(&shipped)?;
        let report = elf::inspect(&stripped)?;
        let with_symbols = build::build_runner_with(
            root,
            &spec,
            build::RUNNER_PROFILE,
            &[("STRIP", "false")],
            "symbols",
        )?;
        let crates = elf::size_by_crate(&std::fs::read(&with_symbols)?)?;
        rows.push((spec, report, crates));
    }
    println!(
        "\nkiln-runner size (profile `{}`, stripped)\n",
        build::RUNNER_PROFILE
    );
    println!(
        "{:<16} {:>10} {:>10} {:>7} {:>10} {:>10} {:>9}",
        "target", "size", "budget", "ratio", ".text", ".rodata", "static"
    );
    for (spec, r, _) in &rows {
        println!(
            "{:<16} {:>10} {:>10} {:>6.2}x {:>10} {:>10} {:>9}",
            spec.name,
            r.file_size,
            spec.runner_size_budget,
            r.file_size as f64 / spec.runner_size_budget as f64,
            r.sections.get(".text").copied().unwrap_or(0),
            r.sections.get(".rodata").copied().unwrap_or(0),
            r.static_link
        );
    }
    for (spec, _, crates) in &rows {
        let total: u64 = crates.iter().map(|(_, s)| s).sum();
        println!(
            "\n{}: biggest contributors by crate (symbol bytes, {} total)",
            spec.name, total
        );
        for (c, s) in crates.iter().take(12) {
            println!(
                "  {:<28} {:>9}  {:>5.1}%",
                c,
                s,
                *s as f64 * 100.0 / total.max(1) as f64
            );
        }
    }
    Ok(())
}
