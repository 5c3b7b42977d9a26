//! `kiln demo`: the README's first command, a tour of kiln on the bundled fixtures.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Result};
use kiln_graph::inspect::human_bytes;

use crate::artifact::FlashArgs;
use crate::commands::{load_model, read_batch, run_and_compare};
use crate::compile::{compile, CompileArgs};

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
    let work = std::env::temp_dir().join(format!("kiln-demo-{}", std::process::id()));
    if !quantize(&dir, &work)? {
        eprintln!("error: quantization missed its accuracy budget");
        return Ok(ExitCode::FAILURE);
    }
    prune_step(&dir)?;
    ok &= compile_and_run(&dir, &work)?;
    if !ok {
        eprintln!("error: a compiled runner disagrees with host inference");
        return Ok(ExitCode::FAILURE);
    }
    let signed = sign_and_flash(&work);
    let benched = signed
        .as_ref()
        .map_or(Ok(false), |_| bench_on_devices(&dir));
    let _ = std::fs::remove_dir_all(&work);
    if !signed? {
        eprintln!("error: the artifact step did not behave as expected");
        return Ok(ExitCode::FAILURE);
    }
    if !benched? {
        eprintln!("error: benchmarking on a device failed");
        return Ok(ExitCode::FAILURE);
    }
    if !gate(&dir)? {
        eprintln!("error: kiln check found regressions against the shipped baseline");
        return Ok(ExitCode::FAILURE);
    }
    println!("demo ok");
    Ok(ExitCode::SUCCESS)
}

/// Step 1b: int8-static quantization of the trained digits classifier within a 0.5-point
/// top-1 budget, and int8-dynamic on the transformer block (cosine to fp32).
fn quantize(dir: &Path, work: &Path) -> Result<bool> {
    println!("1b. quantize: digits to int8 (static, entropy calibration, 0.5-point budget), transformer to int8 (dynamic)");
    std::fs::create_dir_all(work)?;
    let mut ok = true;
    for (name, precision, calib) in [
        ("digits", "int8-static", true),
        ("transformer", "int8-dynamic", false),
    ] {
        let opts = kiln_opt::optimize::Options {
            precision: kiln_opt::optimize::Precision::parse(precision)?,
            calib: calib.then(|| dir.join(name).join("calib.npz")),
            method: kiln_opt::calib::Method::Entropy,
            eval: Some(dir.join(name).join("data.npz")),
            max_drop: Some(0.5),
            keep_f32: vec![],
            load: Default::default(),
            progress: false,
            int8_everywhere: false,
            speed_search: false,
        };
        let done = kiln_opt::optimize::optimize(&dir.join(name).join("model.onnx"), &opts)?;
        let bytes = kiln_graph::nnef::to_nnef_bytes(&done.model)?;
        kiln_io::fsutil::write_atomic(&work.join(format!("{name}.{precision}.nnef.tar")), &bytes)?;
        let r = &done.report;
        let src = r.size.get("source_onnx").copied().unwrap_or(1);
        let zstd = zstd::bulk::compress(&bytes, 19)?.len() as u64;
        let int8 = r.layers.iter().filter(|l| l.precision == "int8").count();
        if let Some(a) = &r.accuracy {
            println!(
                "   {name:<12} {precision:<13} {int8}/{} layers int8, {} {:.2} → {:.2} (drop {:.2}), zstd size {:.2}x of the fp32 ONNX",
                r.layers.len(), a.metric, a.reference, a.optimized, a.drop, zstd as f64 / src as f64
            );
            ok &= a.drop <= 0.5;
        }
    }
    println!();
    Ok(ok)
}

/// Step 2: compile the mobilenet fixture for the host and for aarch64 (single-file
/// executables), run both (aarch64 under qemu-user) and compare with host inference.
fn compile_and_run(dir: &Path, out_root: &Path) -> Result<bool> {
    println!("2. compile mobilenet for x86_64-linux and aarch64-linux (--embed: one file), run each runner");
    let model = dir.join("mobilenet/model.onnx");
    let data = dir.join("mobilenet/data.npz");
    let mut ok = true;
    for target in ["x86_64-linux", "aarch64-linux"] {
        let out = out_root.join(target);
        let r = compile(&CompileArgs {
            model: model.clone(),
            target: target.into(),
            out: out.clone(),
            embed: true,
            runner: None,
            input_shapes: vec![],
            json: false,
        })?;
        let exe = PathBuf::from(r.embedded_file.as_deref().unwrap_or_default());
        let spec = kiln_target::find(&kiln_target::targets_dir()?, target)?;
        let result = out.join("out.npz");
        let t0 = Instant::now();
        let status = kiln_target::emulate::command(&spec, &exe)?
            .arg("run")
            .arg("--inputs")
            .arg(&data)
            .arg("--output")
            .arg(&result)
            .status()?;
        let elapsed = t0.elapsed();
        if !status.success() {
            bail!("the {target} runner failed ({status})");
        }
        let got = kiln_io::read_tensors(&result)?;
        let want = kiln_io::read_tensors(&dir.join("mobilenet/data_ref.npz"))?;
        let c = kiln_io::compare::compare(&got[0].1, &want[0].1, 2)?;
        let pass = c.max_abs <= 1e-4;
        ok &= pass;
        println!(
            "   {:<14} runner {:>9} + model {:>9} = {:>9} single file ({}, {}); {} samples in {:.0} ms{}, max-abs {:.2e} {}",
            target,
            human_bytes(r.runner_bytes),
            human_bytes(r.model_bytes),
            human_bytes(r.embedded_bytes.unwrap_or(0)),
            r.runner_elf.machine,
            if r.runner_elf.static_link { "static" } else { "dynamic" },
            got[0].1.shape()[0],
            elapsed.as_secs_f64() * 1e3,
            match kiln_target::emulate::execution(&spec) {
                kiln_target::emulate::Execution::Native => "",
                kiln_target::emulate::Execution::Emulated => " (qemu-user: not a timing)",
            },
            c.max_abs,
            if pass { "ok" } else { "MISMATCH" }
        );
    }
    println!();
    Ok(ok)
}

/// Step 3: sign two versions, flash them to `local` and `qemu-aarch64`, show that a
/// tampered copy is refused and that rollback works.
fn sign_and_flash(work: &Path) -> Result<bool> {
    use crate::artifact::{flash_cmd, keygen, package_cmd, PackageArgs};
    println!("3. sign artifacts, flash to local and qemu-aarch64 (A/B slots), refuse a tampered copy, roll back");
    let key = work.join("demo-key.pem");
    keygen(&key, true)?;
    let keys = work.join("trusted-keys");
    std::fs::create_dir_all(&keys)?;
    std::fs::copy(work.join("demo-key.pem.pub"), keys.join("demo.pub"))?;
    let mut ok = true;
    for (target, device) in [("x86_64-linux", "local"), ("aarch64-linux", "qemu-aarch64")] {
        let root = work.join(format!("device-{device}"));
        for version in [1, 2] {
            let art = work.join(format!("mobilenet-{target}-v{version}.kiln"));
            package_cmd(PackageArgs {
                dir: work.join(target),
                key: key.clone(),
                version,
                out: art.clone(),
                golden_inputs: None,
                with_runner: false,
                accuracy: None,
            })?;
            ok &= flash_cmd(&flash_args(&art, device, &keys, &root))? == ExitCode::SUCCESS;
        }
        // v3, then one byte flipped in the model's compressed bytes (the last entry).
        let v3 = work.join(format!("mobilenet-{target}-v3.kiln"));
        package_cmd(PackageArgs {
            dir: work.join(target),
            key: key.clone(),
            version: 3,
            out: v3.clone(),
            golden_inputs: None,
            with_runner: false,
            accuracy: None,
        })?;
        let mut bad = std::fs::read(&v3)?;
        let at = bad.len() - 4096;
        bad[at] ^= 0x40;
        let tampered = work.join(format!("mobilenet-{target}-v3-tampered.kiln"));
        std::fs::write(&tampered, &bad)?;
        println!("   flashing v3 with one flipped byte to {device}: expect a refusal");
        ok &= flash_cmd(&flash_args(&tampered, device, &keys, &root))? != ExitCode::SUCCESS;
        let spec = kiln_target::find(&kiln_target::targets_dir()?, target)?;
        let runner = crate::compile::runner_for(&spec, None)?;
        let out = kiln_target::emulate::command(&spec, &runner)?
            .arg("rollback")
            .arg("--root")
            .arg(&root)
            .output()?;
        println!(
            "   {device}: {}",
            String::from_utf8_lossy(&out.stdout).trim()
        );
        ok &= out.status.success();
    }
    println!();
    Ok(ok)
}

fn flash_args(artifact: &Path, device: &str, keys: &Path, root: &Path) -> FlashArgs {
    FlashArgs {
        artifact: artifact.to_path_buf(),
        device: device.into(),
        keys: keys.to_path_buf(),
        root: root.to_path_buf(),
        allow_downgrade: false,
        device_args: Default::default(),
    }
}

/// Step 4: `kiln bench` on `local` and `qemu-aarch64`: each device gets its target's
/// runner, runs `kiln-runner bench` there, the reports come back into one table, through a
/// collector started for the run into a SQLite store, and into an HTML report.
fn bench_on_devices(dir: &Path) -> Result<bool> {
    println!("4. benchmark mobilenet on local and qemu-aarch64 (kiln bench: compile per device, deploy, run, collect)");
    let reports = std::env::temp_dir().join("kiln-demo-reports");
    let _ = std::fs::remove_dir_all(&reports);
    let code = crate::bench::bench_cmd(crate::bench::BenchArgs {
        model: dir.join("mobilenet/model.onnx"),
        devices: vec!["local".into(), "qemu-aarch64".into()],
        targets: vec![],
        iters: Some(10),
        seconds: None,
        warmup: Some(2),
        inputs: Some(dir.join("mobilenet/sample.npz")),
        input_shapes: vec![],
        out: None,
        db: Some(reports.join("kiln.db")),
        html: Some(reports.join("report.html")),
        json: false,
        device: Default::default(),
    })?;
    println!();
    Ok(code == ExitCode::SUCCESS)
}

/// Step 5: `kiln check` against the baseline shipped with the fixtures (sizes, accuracy, and
/// latency as a ratio to a reference model); true when within budget.
fn gate(dir: &Path) -> Result<bool> {
    let baseline = dir.join("kiln-baseline.json");
    println!(
        "\n5. kiln check against the shipped baseline {} (the CI regression gate)",
        baseline.display()
    );
    crate::check::check(
        &baseline,
        None,
        None,
        &crate::check::MeasureArgs::default(),
        kiln_check::format::Format::Table,
    )
}

/// Step 1c: prune the digits classifier (accuracy per sparsity) and the mobilenet fixture
/// (structured: MACs and size before and after).
fn prune_step(dir: &Path) -> Result<()> {
    use kiln_prune::{Method, PruneSpec};
    println!("1c. prune: digits (unstructured magnitude, accuracy on its labelled data), mobilenet (whole channels)");
    let digits = kiln_prune::read_model(&dir.join("digits/model.onnx"))?;
    let data = kiln_io::read_tensors(&dir.join("digits/data.npz"))?;
    for amount in [0.3, 0.5, 0.7, 0.9] {
        // Every layer, one global threshold: the whole classifier at that sparsity.
        let mut spec = PruneSpec::new(Method::Magnitude(amount));
        spec.skip = Some(vec![]);
        spec.scope = kiln_prune::Scope::Global;
        let (pruned, r) = kiln_prune::prune(&digits, &spec)?;
        let acc = kiln_prune::evaluate(&digits, &pruned, &data, "digits/data.npz")?;
        println!(
            "   digits     magnitude {:>3.0}%: accuracy {:.2}% -> {:.2}%, zstd {} -> {}",
            amount * 100.0,
            acc.accuracy_before.unwrap_or(0.0) * 100.0,
            acc.accuracy_after.unwrap_or(0.0) * 100.0,
            human_bytes(r.totals.zstd_bytes_before),
            human_bytes(r.totals.zstd_bytes_after)
        );
    }
    let mobilenet = kiln_prune::read_model(&dir.join("mobilenet/model.onnx"))?;
    let (_, r) = kiln_prune::prune(&mobilenet, &PruneSpec::new(Method::Channels(0.3)))?;
    let t = &r.totals;
    println!(
        "   mobilenet  channels   30%: MACs {:.2}M -> {:.2}M, params {} -> {}, ONNX {} -> {}",
        t.macs_before.unwrap_or(0) as f64 / 1e6,
        t.macs_after.unwrap_or(0) as f64 / 1e6,
        t.params_before,
        t.params_after,
        human_bytes(t.onnx_bytes_before),
        human_bytes(t.onnx_bytes_after)
    );
    println!();
    Ok(())
}
