//! `cargo xtask bench <what>`: benchmarks that print numbers and ratios (never timed tests).

use std::path::Path;

use anyhow::{bail, Context, Result};
use kiln_target::{build, elf};

/// Targets whose runner sizes `bench size` reports.
const SIZE_TARGETS: &[&str] = &["x86_64-linux", "aarch64-linux", "armv7-linux"];

/// `cargo xtask bench size|...`.
pub fn bench(root: &Path, args: &[String]) -> Result<()> {
    match args.first().map(String::as_str) {
        Some("size") => size(root),
        Some("package") => package(root),
        Some("runtime") => runtime(root),
        Some("prune") => prune(root),
        Some("quantize") => crate::qbench::quantize(root),
        Some("collector") => collector(root),
        _ => bail!("usage: cargo xtask bench size|package|runtime|prune|quantize|collector"),
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

/// Artifact verification throughput (100 MB, SHA-256 bound), packaging overhead, and the
/// install of the ResNet-18 artifact on `local` when the bench fixtures exist.
fn package(root: &Path) -> Result<()> {
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
    install_resnet18(root)
}

/// `kiln flash` of the ResNet-18 artifact to `local` (fresh root each time): deploy,
/// verify, unpack into a slot, fsync, golden self-test, switch. Best of 3.
fn install_resnet18(root: &Path) -> Result<()> {
    use std::process::Command;
    let model = root.join("fixtures/bench/resnet18_224.onnx");
    if !model.exists() {
        eprintln!("(ResNet-18 install skipped: run `cargo xtask fixtures --bench` first)");
        return Ok(());
    }
    // kiln only deploys; the install runs in the shipped runner, so a dev build will do.
    crate::sh(crate::cargo().args(["build", "--package", "kiln"]))?;
    let kiln = root.join("target/debug/kiln");
    let work = root.join("target/bench/install");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(work.join("trusted"))?;
    let build = work.join("resnet18");
    crate::sh(
        Command::new(&kiln)
            .arg("compile")
            .arg(&model)
            .args(["--target", "x86_64-linux", "-o"])
            .arg(&build),
    )?;
    let key = work.join("signer.pem");
    crate::sh(Command::new(&kiln).arg("keygen").arg("-o").arg(&key))?;
    std::fs::copy(work.join("signer.pem.pub"), work.join("trusted/signer.pub"))?;
    let art = work.join("resnet18.kiln");
    crate::sh(
        Command::new(&kiln)
            .arg("package")
            .arg(&build)
            .arg("--key")
            .arg(&key)
            .args(["--version", "1", "-o"])
            .arg(&art),
    )?;
    let mut best = f64::MAX;
    for i in 0..3 {
        let t0 = std::time::Instant::now();
        crate::sh(
            Command::new(&kiln)
                .arg("flash")
                .arg(&art)
                .args(["--device", "local", "--keys"])
                .arg(work.join("trusted"))
                .arg("--root")
                .arg(work.join(format!("device-root-{i}"))),
        )?;
        best = best.min(t0.elapsed().as_secs_f64());
    }
    println!(
        "  install of the ResNet-18 artifact ({:.1} MB) on local (kiln flash: verify, unpack, fsync, self-test, switch; best of 3): {:.3} s (target < 1 s)",
        std::fs::metadata(&art)?.len() as f64 / 1e6,
        best
    );
    Ok(())
}

/// Target whose runner `bench runtime` measures: the host CPU at full speed (opt-level 3).
const RUNTIME_TARGET: &str = "x86_64-linux-v3";

/// kiln-runner vs onnxruntime (PyPI, in the xtask venv) on the same models, inputs and
/// thread count, alternating rounds in one run; medians and ratios, written to
/// `target/bench/runtime.json`.
fn runtime(root: &Path) -> Result<()> {
    use std::process::Command;
    let python = crate::py::venv(root)?;
    let script = root.join("xtask/src/ort_bench.py");
    crate::sh(
        Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())).args([
            "build",
            "--release",
            "--package",
            "kiln",
        ]),
    )?;
    let kiln = root.join("target/release/kiln");
    // Rebuild (or confirm fresh) the runner `kiln compile` will pick up.
    let spec = kiln_target::find(&root.join("targets"), RUNTIME_TARGET)?;
    build::build_runner(root, &spec, build::RUNNER_PROFILE)?;
    let mut models: Vec<(String, std::path::PathBuf, std::path::PathBuf)> =
        ["digits", "cnn", "mobilenet", "transformer"]
            .iter()
            .map(|n| {
                (
                    n.to_string(),
                    root.join("fixtures").join(n).join("model.onnx"),
                    root.join("fixtures").join(n).join("sample.npz"),
                )
            })
            .collect();
    for n in ["mobilenetv2_224", "resnet18_224"] {
        let m = root.join("fixtures/bench").join(format!("{n}.onnx"));
        if m.exists() {
            models.push((
                n.into(),
                m,
                root.join("fixtures/bench").join(format!("{n}.sample.npz")),
            ));
        } else {
            eprintln!("({n} skipped: run `cargo xtask fixtures --bench` first)");
        }
    }
    let work = root.join("target/bench");
    std::fs::create_dir_all(&work)?;
    let rounds = 3;
    let mut rows = vec![];
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let thread_counts: Vec<usize> = if cores > 1 { vec![1, cores] } else { vec![1] };
    for (name, model, sample) in &models {
        let out = work.join(format!("compiled-{name}"));
        crate::sh(
            Command::new(&kiln)
                .arg("compile")
                .arg(model)
                .args(["--target", RUNTIME_TARGET, "-o"])
                .arg(&out),
        )?;
        // `kiln compile` names the model after its file, or its folder for `model.onnx`.
        let nnef = out.join(format!("{name}.nnef.tar"));
        let iters = if name.ends_with("224") { "20" } else { "200" };
        for &threads in &thread_counts {
            let t = threads.to_string();
            let (mut kiln_p50, mut ort_p50) = (vec![], vec![]);
            let (mut kiln_last, mut ort_last) = (serde_json::Value::Null, serde_json::Value::Null);
            for _ in 0..rounds {
                let report = work.join(format!("{name}.kiln.json"));
                crate::sh(
                    Command::new(out.join("kiln-runner"))
                        .arg("bench")
                        .arg("--model")
                        .arg(&nnef)
                        .arg("--inputs")
                        .arg(sample)
                        .args(["--iters", iters, "--threads", &t, "--json"])
                        .arg(&report),
                )?;
                kiln_last = serde_json::from_slice(&std::fs::read(&report)?)?;
                kiln_p50.push(kiln_last["latency_ms"]["p50"].as_f64().unwrap_or(f64::NAN));
                let o = Command::new(&python)
                    .arg(&script)
                    .arg(model)
                    .arg(sample)
                    .args([iters, &t])
                    .output()?;
                if !o.status.success() {
                    bail!(
                        "onnxruntime bench failed on {name}: {}",
                        String::from_utf8_lossy(&o.stderr)
                    );
                }
                ort_last = serde_json::from_slice(&o.stdout)?;
                ort_p50.push(ort_last["p50"].as_f64().unwrap_or(f64::NAN));
            }
            let med = |v: &mut Vec<f64>| {
                v.sort_by(|a, b| a.total_cmp(b));
                v[v.len() / 2]
            };
            let (k, o) = (med(&mut kiln_p50), med(&mut ort_p50));
            rows.push(serde_json::json!({
                "model": name,
                "threads": threads,
                "kiln_p50_ms": k,
                "onnxruntime_p50_ms": o,
                "ratio": k / o,
                "kiln_cold_start_ms": kiln_last["cold_start_ms"]["total"],
                "onnxruntime_cold_start_ms": ort_last["cold_start_ms"],
                "kiln_peak_rss_bytes": kiln_last["peak_rss_bytes"],
                "onnxruntime_peak_rss_bytes": ort_last["peak_rss_bytes"],
                "kiln_top_op": kiln_last["profile"][0],
            }));
        }
    }
    println!("\nkiln-runner ({RUNTIME_TARGET}) vs onnxruntime, same thread count, median of {rounds} alternating rounds\n");
    println!(
        "{:<16} {:>7} {:>10} {:>10} {:>7} {:>11} {:>11}  kiln's top op",
        "model", "threads", "kiln ms", "ort ms", "ratio", "kiln cold", "ort cold"
    );
    for r in &rows {
        println!(
            "{:<16} {:>7} {:>10.3} {:>10.3} {:>6.2}x {:>9.1}ms {:>9.1}ms  {} ({:.0}%)",
            r["model"].as_str().unwrap_or(""),
            r["threads"].as_u64().unwrap_or(1),
            r["kiln_p50_ms"].as_f64().unwrap_or(0.0),
            r["onnxruntime_p50_ms"].as_f64().unwrap_or(0.0),
            r["ratio"].as_f64().unwrap_or(0.0),
            r["kiln_cold_start_ms"].as_f64().unwrap_or(0.0),
            r["onnxruntime_cold_start_ms"].as_f64().unwrap_or(0.0),
            r["kiln_top_op"]["op"].as_str().unwrap_or("?"),
            r["kiln_top_op"]["share"].as_f64().unwrap_or(0.0) * 100.0,
        );
    }
    let path = work.join("runtime.json");
    std::fs::write(
        &path,
        serde_json::to_string_pretty(
            &serde_json::json!({ "schema": "kiln.bench-runtime/1", "target": RUNTIME_TARGET, "rows": rows }),
        )?,
    )?;
    println!("\nwrote {}", path.display());
    Ok(())
}

/// `kiln-runner bench` p50 latency (ms) of an NNEF model, one round.
fn runner_p50(runner: &Path, nnef: &Path, sample: &Path, report: &Path) -> Result<f64> {
    crate::sh(
        std::process::Command::new(runner)
            .arg("bench")
            .arg("--model")
            .arg(nnef)
            .arg("--inputs")
            .arg(sample)
            .args(["--iters", "20", "--warmup", "3", "--json"])
            .arg(report),
    )?;
    let j: serde_json::Value = serde_json::from_slice(&std::fs::read(report)?)?;
    j["latency_ms"]["p50"]
        .as_f64()
        .ok_or_else(|| anyhow::anyhow!("{}: no latency_ms.p50", report.display()))
}

/// Pruning: 30% structured MobileNetV2-224 (latency vs unpruned through the release-built
/// runner, alternating rounds, MACs, sizes), 50% unstructured ResNet-18-224 (zstd size vs
/// the fp32 ONNX, pruned alone and pruned + int8), digits accuracy per sparsity. Writes
/// `target/bench/prune.json`.
fn prune(root: &Path) -> Result<()> {
    use std::process::Command;
    let bench = root.join("fixtures/bench");
    let (mnv2, resnet) = (
        bench.join("mobilenetv2_224.onnx"),
        bench.join("resnet18_224.onnx"),
    );
    if !mnv2.exists() || !resnet.exists() {
        bail!(
            "benchmark models missing in {}: run `cargo xtask fixtures --bench` first",
            bench.display()
        );
    }
    // Pruning itself is not timed: the dev build the tests use is enough.
    crate::sh(crate::cargo().args(["build", "--package", "kiln"]))?;
    let kiln = root.join("target/debug/kiln");
    let spec = kiln_target::find(&root.join("targets"), RUNTIME_TARGET)?;
    let runner = match build::find_runner(&spec) {
        Some(r) => r,
        None => build::build_runner(root, &spec, build::RUNNER_PROFILE)?,
    };
    let work = root.join("target/bench/prune");
    std::fs::create_dir_all(&work)?;
    let optimize =
        |model: &Path, out: &str, prune: &str, extra: &[&str]| -> Result<serde_json::Value> {
            let report = work.join(format!("{out}.json"));
            crate::sh(
                Command::new(&kiln)
                    .arg("optimize")
                    .arg(model)
                    .arg("-o")
                    .arg(work.join(out))
                    .args(["--prune", prune, "--report"])
                    .arg(&report)
                    .args(extra),
            )?;
            Ok(serde_json::from_slice(&std::fs::read(&report)?)?)
        };

    // 1. MobileNetV2: unpruned (channels:0, the same path) vs 30% of the channels.
    optimize(&mnv2, "mnv2-base.nnef.tar", "channels:0", &[])?;
    let structured = optimize(&mnv2, "mnv2-30.nnef.tar", "channels:0.3", &[])?;
    let sample = bench.join("mobilenetv2_224.sample.npz");
    let rounds = 5;
    let (mut base, mut pruned) = (vec![], vec![]);
    for _ in 0..rounds {
        base.push(runner_p50(
            &runner,
            &work.join("mnv2-base.nnef.tar"),
            &sample,
            &work.join("base.bench.json"),
        )?);
        pruned.push(runner_p50(
            &runner,
            &work.join("mnv2-30.nnef.tar"),
            &sample,
            &work.join("pruned.bench.json"),
        )?);
    }
    let med = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let (b, p) = (med(&mut base), med(&mut pruned));
    let t = &structured["totals"];
    let latency_ratio = p / b;

    // 2. ResNet-18: 50% magnitude, zstd of the pruned fp32 ONNX vs the fp32 ONNX.
    let sparse = optimize(&resnet, "resnet18-50.onnx", "magnitude:0.5", &[])?;
    let rt = &sparse["totals"];
    let fp32 = rt["onnx_bytes_before"].as_f64().unwrap_or(f64::NAN);
    let zstd_ratio = rt["zstd_bytes_after"].as_f64().unwrap_or(f64::NAN) / fp32;
    // ... and pruned then int8 (one `kiln optimize`), every layer pruned, zstd -19 of the
    // runner form, against the same fp32 ONNX.
    let calib = bench.join("resnet18_224.calib.npz");
    let q_report = work.join("resnet18-50-int8.json");
    crate::sh(
        Command::new(&kiln)
            .arg("optimize")
            .arg(&resnet)
            .arg("-o")
            .arg(work.join("resnet18-50-int8.nnef.tar"))
            .args(["--prune", "magnitude:0.5", "--prune-skip", "none"])
            .args(["--quantize", "int8-static", "--calib"])
            .arg(&calib)
            .arg("--report")
            .arg(&q_report),
    )?;
    let q: serde_json::Value = serde_json::from_slice(&std::fs::read(&q_report)?)?;
    let int8_zstd_ratio = q["size"]["output_zstd"].as_f64().unwrap_or(f64::NAN) / fp32;

    // 3. digits: accuracy at each sparsity, every layer, one global threshold.
    let digits = root.join("fixtures/digits");
    let mut accuracy = vec![];
    for pct in (10..=90).step_by(10) {
        let j = optimize(
            &digits.join("model.onnx"),
            &format!("digits-{pct}.onnx"),
            &format!("magnitude:{}", pct as f64 / 100.0),
            &[
                "--prune-skip",
                "none",
                "--prune-scope",
                "global",
                "--eval",
                digits.join("data.npz").to_str().unwrap_or_default(),
            ],
        )?;
        accuracy.push(serde_json::json!({
            "sparsity": pct as f64 / 100.0,
            "accuracy": j["accuracy"]["accuracy_after"],
            "accuracy_unpruned": j["accuracy"]["accuracy_before"],
        }));
    }

    println!("\nkiln pruning benchmark (runner {}, 1 thread, median of {rounds} alternating rounds of 20)\n", spec.name);
    println!(
        "MobileNetV2-224, 30% channels: p50 {b:.2} ms -> {p:.2} ms ({latency_ratio:.2}x, target <= 0.80x); MACs {} -> {} ({:.2}x); params {} -> {}",
        t["macs_before"], t["macs_after"],
        t["macs_after"].as_f64().unwrap_or(f64::NAN) / t["macs_before"].as_f64().unwrap_or(f64::NAN),
        t["params_before"], t["params_after"]
    );
    println!(
        "ResNet-18-224, 50% magnitude: fp32 ONNX {} bytes; pruned + zstd -{} {} bytes ({zstd_ratio:.3}x); \
         all layers pruned + int8 + zstd -19 {} bytes ({int8_zstd_ratio:.3}x, target <= 0.15x)",
        rt["onnx_bytes_before"], rt["zstd_level"], rt["zstd_bytes_after"], q["size"]["output_zstd"]
    );
    println!("digits (trained), magnitude, global, all layers:");
    for a in &accuracy {
        println!(
            "  {:>3.0}%  accuracy {:.2}%  (unpruned {:.2}%)",
            a["sparsity"].as_f64().unwrap_or(0.0) * 100.0,
            a["accuracy"].as_f64().unwrap_or(f64::NAN) * 100.0,
            a["accuracy_unpruned"].as_f64().unwrap_or(f64::NAN) * 100.0
        );
    }
    let doc = serde_json::json!({
        "runner_target": spec.name,
        "mobilenetv2_224_channels_30": {
            "p50_ms_unpruned": b, "p50_ms_pruned": p, "latency_ratio": latency_ratio,
            "rounds": rounds, "totals": t,
        },
        "resnet18_224_magnitude_50": {
            "totals": rt, "zstd_vs_fp32_onnx": zstd_ratio,
            // Pruned (every layer) -> int8 -> zstd -19, compared with the same fp32 size.
            "int8_zstd_vs_fp32_onnx": int8_zstd_ratio,
        },
        "digits_magnitude_accuracy": accuracy,
    });
    let out = root.join("target/bench/prune.json");
    std::fs::write(&out, serde_json::to_string_pretty(&doc)?)?;
    println!("\nwrote {}", out.display());
    Ok(())
}

/// Reports and concurrent senders in `bench collector`.
const COLLECTOR_REPORTS: usize = 10_000;
const COLLECTOR_SENDERS: usize = 32;

/// The real `kiln collect` (dev profile: dependencies such as SQLite optimized, kiln's own
/// code not) under load on loopback: 10,000 distinct reports from 32 concurrent senders
/// (one connection per report, as devices send), then 1,000 re-sends; checks that every
/// report is stored exactly once and prints throughput and request latency.
fn collector(root: &Path) -> Result<()> {
    use kiln_collect::client::{post, Endpoint};
    use kiln_collect::spool::idempotency_key;
    use std::io::BufRead;
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};
    crate::sh(
        Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())).args([
            "build",
            "--package",
            "kiln",
        ]),
    )?;
    let kiln = root.join("target/debug/kiln");
    let work = root.join("target/bench/collector");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let db = work.join("kiln.db");
    let mut child = Command::new(&kiln)
        .args(["collect", "--listen", "127.0.0.1:0", "--db"])
        .arg(&db)
        .stdout(Stdio::piped())
        .spawn()
        .context("cannot start kiln collect")?;
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().context("no stdout")?).read_line(&mut line)?;
    let Some(url) = line.split_whitespace().find(|w| w.starts_with("http://")) else {
        let _ = child.kill();
        bail!("kiln collect did not start: `{}`", line.trim());
    };
    let endpoint = Endpoint::parse(url)?;
    let body = |i: usize| {
        serde_json::json!({
            "schema": "kiln.bench/1", "model": format!("model{}", i % 7), "target": "x86_64-linux",
            "device": format!("device{}", i % COLLECTOR_SENDERS), "precision": "f32", "emulated": false,
            "latency_ms": {"min": 1.0, "p50": 1.0 + (i % 100) as f64 / 100.0, "p90": 2.5, "p99": 3.0, "max": 4.0, "mean": 1.6, "stddev": 0.2},
            "profile": [{"op": "Conv", "nodes": 3, "ms": 0.9, "share": 0.6}],
            "created_at_ms": i,
        })
        .to_string()
    };
    // Each sender: its share of indices; returns (keys, per-request latencies, failures).
    let send = |indices: Vec<usize>, expect: u16| -> (Vec<String>, Vec<f64>, Vec<String>) {
        let (mut keys, mut lat, mut bad) = (vec![], vec![], vec![]);
        for i in indices {
            let b = body(i);
            let key = idempotency_key(b.as_bytes());
            let t0 = Instant::now();
            match post(&endpoint, b.as_bytes(), &key, Duration::from_secs(30)) {
                Ok(r) if r.status == expect => {}
                Ok(r) => bad.push(format!("report {i}: HTTP {} {}", r.status, r.body)),
                Err(e) => bad.push(format!("report {i}: {e:#}")),
            }
            lat.push(t0.elapsed().as_secs_f64() * 1e3);
            keys.push(key);
        }
        (keys, lat, bad)
    };
    let run = |n: usize, stride: usize, expect: u16| {
        let t0 = Instant::now();
        let results: Vec<_> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..COLLECTOR_SENDERS)
                .map(|t| {
                    let idx: Vec<usize> = (0..n)
                        .filter(|j| j % COLLECTOR_SENDERS == t)
                        .map(|j| j * stride)
                        .collect();
                    s.spawn(move || send(idx, expect))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("sender thread"))
                .collect()
        });
        (results, t0.elapsed().as_secs_f64())
    };
    let summarize = |results: &[(Vec<String>, Vec<f64>, Vec<String>)]| {
        let mut lat: Vec<f64> = results.iter().flat_map(|r| r.1.clone()).collect();
        lat.sort_by(|a, b| a.total_cmp(b));
        let q = |p: f64| lat[((lat.len() - 1) as f64 * p) as usize];
        (q(0.5), q(0.99), lat[lat.len() - 1])
    };
    let (first, secs) = run(COLLECTOR_REPORTS, 1, 201);
    let (p50, p99, max) = summarize(&first);
    let (again, secs_again) = run(COLLECTOR_REPORTS / 10, 10, 200);
    let (dp50, dp99, _) = summarize(&again);
    let _ = child.kill();
    let _ = child.wait();
    let failures: Vec<&String> = first.iter().chain(&again).flat_map(|r| &r.2).collect();
    let mut sent: Vec<String> = first.iter().flat_map(|r| r.0.clone()).collect();
    sent.sort();
    let listed = Command::new(&kiln)
        .args(["reports", "list", "--json", "--db"])
        .arg(&db)
        .output()?;
    if !listed.status.success() {
        bail!(
            "kiln reports list failed: {}",
            String::from_utf8_lossy(&listed.stderr)
        );
    }
    let listed: serde_json::Value = serde_json::from_slice(&listed.stdout)?;
    let mut stored: Vec<String> = listed
        .as_array()
        .context("kiln reports list --json printed no array")?
        .iter()
        .filter_map(|r| r["idempotency_key"].as_str().map(String::from))
        .collect();
    let rows = stored.len();
    stored.sort();
    let distinct = {
        let mut d = stored.clone();
        d.dedup();
        d.len()
    };
    println!("\ncollector benchmark: {COLLECTOR_REPORTS} reports from {COLLECTOR_SENDERS} concurrent senders on loopback (one connection each, SQLite synchronous=FULL)\n");
    println!(
        "  stored:     {:>6.0} reports/s ({COLLECTOR_REPORTS} in {secs:.2} s), request p50 {p50:.2} ms, p99 {p99:.2} ms, max {max:.1} ms",
        COLLECTOR_REPORTS as f64 / secs
    );
    println!(
        "  duplicates: {:>6.0} reports/s ({} re-sent in {secs_again:.2} s, answered 200 duplicate), p50 {dp50:.2} ms, p99 {dp99:.2} ms",
        (COLLECTOR_REPORTS / 10) as f64 / secs_again,
        COLLECTOR_REPORTS / 10
    );
    println!(
        "  rows {rows}, distinct keys {distinct}, failed requests {}",
        failures.len()
    );
    if let Some(f) = failures.first() {
        bail!("{} request(s) failed, first: {f}", failures.len());
    }
    if rows != COLLECTOR_REPORTS || distinct != COLLECTOR_REPORTS || stored != sent {
        bail!(
            "lost or duplicated reports: {rows} rows, {distinct} distinct keys, {} sent",
            sent.len()
        );
    }
    println!("  none lost, none duplicated");
    Ok(())
}
