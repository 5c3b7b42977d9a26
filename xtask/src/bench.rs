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
        Some("package") => package(),
        _ => bail!("usage: cargo xtask bench size|package"),
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

/// Artifact verification throughput (100 MB, SHA-256 bound) and packaging overhead.
fn package() -> Result<()> {
    use std::collections::BTreeMap;
    use std::time::Instant;
    let key = ed25519_dalek::SigningKey::from_bytes(&[3; 32]);
    // Incompressible payload: the worst case for the reader (nothing shrinks, all hashed).
    let mut state = 0x1234_5678_9abc_def0u64;
    let model: Vec<u8> = (0..100_000_000)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect();
    let mut files = BTreeMap::new();
    files.insert("model.nnef.tar".to_string(), model);
    files.insert("golden/inputs.npz".to_string(), vec![1u8; 4096]);
    files.insert("golden/outputs.npz".to_string(), vec![2u8; 4096]);
    let input = kiln_artifact::write::PackageInput {
        name: "bench".into(),
        version: 1,
        target: "x86_64-linux".into(),
        precision: "f32".into(),
        tract_version: "0.23.9".into(),
        golden_max_abs: 1e-4,
        expected_accuracy: None,
        files,
    };
    let t0 = Instant::now();
    let (artifact, _) = kiln_artifact::write::package(&input, &key)?;
    let pack = t0.elapsed();
    let model_zst = zstd::bulk::compress(
        &input.files["model.nnef.tar"],
        kiln_artifact::write::ZSTD_LEVEL,
    )?
    .len();
    let mut best = f64::MAX;
    for _ in 0..3 {
        let t0 = Instant::now();
        kiln_artifact::verify_only(&artifact[..], &[key.verifying_key()], &Default::default())?;
        best = best.min(t0.elapsed().as_secs_f64());
    }
    println!("\nartifact benchmark (100 MB incompressible model)\n");
    println!(
        "  package (zstd level {}):   {:.2} s",
        kiln_artifact::write::ZSTD_LEVEL,
        pack.as_secs_f64()
    );
    println!(
        "  verify (best of 3):        {:.3} s = {:.0} MB/s (target >= 500 MB/s)",
        best,
        100.0 / best
    );
    println!(
        "  overhead beyond the compressed model: {} bytes (manifest, signature, 8 KB golden data, tar headers; target <= 65536)",
        artifact.len() as i64 - model_zst as i64
    );
    Ok(())
}
