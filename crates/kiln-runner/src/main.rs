//! `kiln-runner`: the on-device binary. Loads kiln's NNEF model form (from `--model` or
//! embedded in its own executable) and runs it on `.npy`/`.npz` data.
//!
//! Small by design: no ONNX parser, no async runtime, no argument-parsing framework.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use kiln_io::{exec, Batch};

mod alloc;
mod bench;
mod report;

/// Large buffers are reused across inferences instead of mapped anew (see `alloc`).
#[global_allocator]
static ALLOC: alloc::Caching = alloc::Caching::new();
use tract_nnef::prelude::*;

const USAGE: &str = "\
usage:
  kiln-runner run      [--model M] [--root DIR] --inputs IN.npz --output OUT.npz [--threads N]
  kiln-runner info     [--model M] [--root DIR]
  kiln-runner bench    [--model M] [--root DIR] [--inputs IN.npz] [--iters N | --seconds S]
                       [--warmup N] [--threads N] [--json OUT.json] [REPORT-BACK]
  kiln-runner install  APP.kiln --keys DIR [--root DIR] [--allow-downgrade] [--max-size BYTES]
                       [REPORT-BACK]
  kiln-runner send-spool --report-to URL [--spool DIR] [--root DIR] [--retry-for S]
  kiln-runner status   [--root DIR]
  kiln-runner rollback [--root DIR]
  kiln-runner version

--model defaults to the model embedded in this executable (kiln compile --embed), else
the active installed model under --root (default $KILN_ROOT, else /var/lib/kiln).

REPORT-BACK: --report-to http://HOST:PORT[/PATH] [--spool DIR] [--retry-for S]
  the report is written to the spool (default ROOT/spool) first, then POSTed with older
  spooled reports, retrying for up to S seconds (default 30); exit code 3 when some
  stay in the spool undelivered (a later --report-to or send-spool sends them).
";

/// Exit code when a report was produced but stays in the spool undelivered.
const EXIT_NOT_DELIVERED: u8 = 3;

/// The kiln target this runner was built for (set by `cargo xtask runner`).
pub(crate) const TARGET: &str = match option_env!("KILN_TARGET") {
    Some(t) => t,
    None => "host",
};

fn main() -> ExitCode {
    let started = std::time::Instant::now();
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Err(e) = kiln_io::configure_tract() {
        eprintln!("warning: cannot apply kiln's tract settings: {e:#}");
    }
    match dispatch(&args, started) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => match e.downcast_ref::<UsageError>() {
            Some(u) => {
                eprintln!("error: {u}\n\n{USAGE}");
                ExitCode::from(2)
            }
            None if e.downcast_ref::<report::NotDelivered>().is_some() => {
                eprintln!("error: {e:#}");
                ExitCode::from(EXIT_NOT_DELIVERED)
            }
            None => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}

/// A command-line mistake: exit code 2 with the usage text.
#[derive(Debug)]
struct UsageError(String);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

fn usage(msg: impl Into<String>) -> anyhow::Error {
    UsageError(msg.into()).into()
}

/// Parsed `--flag value` options.
struct Opts {
    pairs: Vec<(String, String)>,
}

impl Opts {
    fn parse(args: &[String], known: &[&str]) -> Result<Opts> {
        let mut pairs = vec![];
        let mut it = args.iter();
        while let Some(a) = it.next() {
            if !known.contains(&a.as_str()) {
                return Err(usage(format!("unexpected argument `{a}`")));
            }
            let v = it
                .next()
                .ok_or_else(|| usage(format!("`{a}` needs a value")))?;
            pairs.push((a.clone(), v.clone()));
        }
        Ok(Opts { pairs })
    }

    fn get(&self, flag: &str) -> Option<&str> {
        self.pairs
            .iter()
            .rev()
            .find(|(k, _)| k == flag)
            .map(|(_, v)| v.as_str())
    }

    fn require(&self, flag: &str) -> Result<&str> {
        self.get(flag)
            .ok_or_else(|| usage(format!("missing `{flag}`")))
    }
}

/// Applies `--threads N` (default 1): tract's matrix products on a pool of N threads.
/// Runners are single-threaded unless built with feature `threads` (a target's
/// `runner_features`): a pool costs binary size every device pays for.
fn threads(flag: Option<&str>) -> Result<usize> {
    let n =
        match flag {
            None => return Ok(1),
            Some(v) => v.parse::<usize>().ok().filter(|n| *n >= 1).ok_or_else(|| {
                usage(format!("--threads `{v}` is not a thread count (1 or more)"))
            })?,
        };
    if n > 1 {
        #[cfg(feature = "threads")]
        tract_linalg::multithread::set_default_executor(
            tract_linalg::multithread::Executor::multithread(n),
        );
        #[cfg(not(feature = "threads"))]
        return Err(usage(format!(
            "--threads {n}: this runner ({}) was built single-threaded; use 1, or a target \
             whose runner_features include `threads` (e.g. x86_64-linux-v3, aarch64-linux-a76)",
            TARGET
        )));
    }
    Ok(n)
}

fn dispatch(args: &[String], started: std::time::Instant) -> Result<()> {
    match args.first().map(String::as_str) {
        Some("run") => {
            let o = Opts::parse(
                &args[1..],
                &["--model", "--root", "--inputs", "--output", "--threads"],
            )?;
            threads(o.get("--threads"))?;
            let model = load(o.get("--model").map(Path::new), &root(&o))?;
            run(
                model,
                Path::new(o.require("--inputs")?),
                Path::new(o.require("--output")?),
            )
        }
        Some("info") => {
            let o = Opts::parse(&args[1..], &["--model", "--root"])?;
            info(load(o.get("--model").map(Path::new), &root(&o))?)
        }
        Some("bench") => {
            let o = Opts::parse(
                &args[1..],
                &[
                    "--model",
                    "--root",
                    "--inputs",
                    "--iters",
                    "--seconds",
                    "--warmup",
                    "--json",
                    "--report-to",
                    "--spool",
                    "--retry-for",
                    "--threads",
                ],
            )?;
            let back = report::ReportBack::from_opts(&o, &root(&o))?;
            let threads = threads(o.get("--threads"))?;
            let number =
                |flag: &str, default: f64| -> Result<f64> {
                    match o.get(flag) {
                        None => Ok(default),
                        Some(v) => v.parse::<f64>().ok().filter(|x| *x >= 0.0).ok_or_else(|| {
                            usage(format!("{flag} `{v}` is not a non-negative number"))
                        }),
                    }
                };
            let opts = bench::BenchOptions {
                threads,
                warmup: number("--warmup", 5.0)? as usize,
                iters: number("--iters", 50.0)? as usize,
                seconds: o
                    .get("--seconds")
                    .map(|_| number("--seconds", 0.0))
                    .transpose()?,
            };
            let loaded = load(o.get("--model").map(Path::new), &root(&o))?;
            let load_done = std::time::Instant::now();
            let inputs = o
                .get("--inputs")
                .map(|p| kiln_io::read_tensors(Path::new(p)))
                .transpose()?;
            let report = bench::bench(
                started,
                load_done,
                &loaded.model,
                &loaded.name,
                inputs,
                &opts,
            )?;
            let text = serde_json::to_string_pretty(&report)?;
            match o.get("--json") {
                Some(p) => kiln_io::fsutil::write_atomic(Path::new(p), text.as_bytes())?,
                None => print_out(&text)?,
            }
            match back {
                Some(b) => b.send(Some(text.as_bytes())),
                None => Ok(()),
            }
        }
        Some("install") => {
            let Some(artifact) = args.get(1).filter(|a| !a.starts_with("--")) else {
                return Err(usage(
                    "install needs the artifact path: kiln-runner install APP.kiln --keys DIR",
                ));
            };
            let (flags, allow_downgrade) = take_switch(&args[2..], "--allow-downgrade");
            let o = Opts::parse(
                &flags,
                &[
                    "--keys",
                    "--root",
                    "--max-size",
                    "--report-to",
                    "--spool",
                    "--retry-for",
                ],
            )?;
            let back = report::ReportBack::from_opts(&o, &root(&o))?;
            install(
                Path::new(artifact),
                Path::new(o.require("--keys")?),
                &root(&o),
                allow_downgrade,
                o.get("--max-size"),
                back,
            )
        }
        Some("send-spool") => {
            let o = Opts::parse(
                &args[1..],
                &["--report-to", "--spool", "--root", "--retry-for"],
            )?;
            o.require("--report-to")?;
            match report::ReportBack::from_opts(&o, &root(&o))? {
                Some(b) => b.send(None),
                None => Err(usage("send-spool needs --report-to URL")),
            }
        }
        Some("status") => {
            let o = Opts::parse(&args[1..], &["--root"])?;
            println!(
                "{}",
                serde_json::to_string_pretty(&kiln_artifact::install::status(&root(&o))?)?
            );
            Ok(())
        }
        Some("rollback") => {
            let o = Opts::parse(&args[1..], &["--root"])?;
            let m = kiln_artifact::install::rollback(&root(&o))?;
            println!("rolled back to {} version {}", m.name, m.version);
            Ok(())
        }
        Some("version" | "--version" | "-V") => {
            println!(
                "kiln-runner {} (tract {}, target {TARGET})",
                env!("CARGO_PKG_VERSION"),
                kiln_io::TRACT_VERSION
            );
            Ok(())
        }
        Some("help" | "--help" | "-h") => {
            print!("{USAGE}");
            Ok(())
        }
        Some(other) => Err(usage(format!("unknown command `{other}`"))),
        None => Err(usage("no command given")),
    }
}

/// The install root: `--root`, else `$KILN_ROOT`, else `/var/lib/kiln`.
fn root(o: &Opts) -> PathBuf {
    o.get("--root")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("KILN_ROOT").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("/var/lib/kiln"))
}

/// Splits a boolean `switch` out of `args`.
fn take_switch(args: &[String], switch: &str) -> (Vec<String>, bool) {
    let rest: Vec<String> = args.iter().filter(|a| *a != switch).cloned().collect();
    let found = rest.len() != args.len();
    (rest, found)
}

/// A loaded model and where it came from (for messages).
struct Loaded {
    model: TypedModel,
    name: String,
}

/// Loads the model: `--model PATH`, else the payload embedded in this executable, else the
/// active installed model under `root`.
fn load(model: Option<&Path>, root: &Path) -> Result<Loaded> {
    let nnef = kiln_io::nnef::framework();
    if let Some(p) = model {
        let m = nnef
            .model_for_path(p)
            .map_err(|e| load_error(&p.display().to_string(), e))?;
        return Ok(Loaded {
            model: m,
            name: p.display().to_string(),
        });
    }
    let exe: PathBuf = std::env::current_exe().context("cannot locate this executable")?;
    if let Some(payload) = kiln_io::embed::read_payload(&exe)? {
        let m = nnef
            .model_for_read(&mut std::io::Cursor::new(payload))
            .map_err(|e| load_error("the embedded model", e))?;
        return Ok(Loaded {
            model: m,
            name: "embedded model".into(),
        });
    }
    if kiln_artifact::install::active_slot(root)?.is_none() {
        return Err(usage(format!(
            "no --model given, this runner has no embedded model, and nothing is installed under {}",
            root.display()
        )));
    }
    let (dir, manifest) = kiln_artifact::install::active(root)?;
    let path = dir.join(kiln_artifact::manifest::MODEL_FILE);
    let m = nnef
        .model_for_path(&path)
        .map_err(|e| load_error(&path.display().to_string(), e))?;
    Ok(Loaded {
        model: m,
        name: format!("{} v{} (installed)", manifest.name, manifest.version),
    })
}

/// Installs an artifact into the A/B slots under `root`, self-testing it first.
fn install(
    artifact: &Path,
    keys: &Path,
    root: &Path,
    allow_downgrade: bool,
    max_size: Option<&str>,
    back: Option<report::ReportBack>,
) -> Result<()> {
    let keys = kiln_artifact::keys::read_trusted_keys(keys)?;
    let mut limits = kiln_artifact::Limits::default();
    if let Some(m) = max_size {
        limits.max_bytes = m
            .parse()
            .map_err(|_| usage(format!("--max-size `{m}` is not a number of bytes")))?;
    }
    let opts = kiln_artifact::install::InstallOptions {
        allow_downgrade,
        limits,
        target: (TARGET != "host").then(|| TARGET.to_string()),
    };
    let report = kiln_artifact::install::install(artifact, &keys, root, &opts, &self_test)?;
    let text = serde_json::to_string_pretty(&report)?;
    println!("{text}");
    // The collector hears about refusals too; a refusal still fails this command below.
    if let Some(b) = back {
        let sent = b.send(Some(text.as_bytes()));
        if report.outcome == "installed" {
            sent?;
        } else if let Err(e) = sent {
            eprintln!("warning: {e:#}");
        }
    }
    if report.outcome != "installed" {
        bail!(
            "{} not installed ({}): {}",
            artifact.display(),
            report.outcome,
            report.detail
        );
    }
    Ok(())
}

/// Runs the golden inputs of a freshly written slot and compares with the golden outputs.
fn self_test(dir: &Path, manifest: &kiln_artifact::Manifest) -> Result<String> {
    use kiln_artifact::manifest::{GOLDEN_INPUTS, GOLDEN_OUTPUTS, MODEL_FILE};
    let model = kiln_io::nnef::framework()
        .model_for_path(dir.join(MODEL_FILE))
        .map_err(|e| load_error("the artifact's model", e))?;
    let inputs = kiln_io::read_tensors(&dir.join(GOLDEN_INPUTS))?;
    let batch = Batch::bind(&exec::input_specs(&model)?, inputs, GOLDEN_INPUTS)?;
    let plan = exec::prepare(&model, &batch.symbols)?;
    let got = exec::run_batch(&plan, &batch, &exec::output_names(&model)?)?;
    let want = kiln_io::read_tensors(&dir.join(GOLDEN_OUTPUTS))?;
    let mut worst = 0f64;
    for (name, t) in &got {
        let (_, w) = want
            .iter()
            .find(|(n, _)| n == name)
            .with_context(|| format!("golden outputs lack `{name}`"))?;
        let c = kiln_io::compare::compare(t, w, t.rank())?;
        if c.max_abs > manifest.golden_max_abs || c.non_finite > 0 {
            bail!("self-test failed: output `{name}` differs from the golden output by {:.3e} (tolerance {:.1e})", c.max_abs, manifest.golden_max_abs);
        }
        worst = worst.max(c.max_abs);
    }
    Ok(format!(
        "self-test ok: {} output(s), max-abs {worst:.2e} (tolerance {:.1e})",
        got.len(),
        manifest.golden_max_abs
    ))
}

fn load_error(what: &str, e: anyhow::Error) -> anyhow::Error {
    let chain = format!("{e:#}");
    if chain.contains("No serialization")
        || chain.contains("Unknown")
        || chain.contains("not found")
    {
        anyhow::anyhow!(
            "{what} uses an operator this runner cannot load (tract-core NNEF ops only): {chain}"
        )
    } else {
        anyhow::anyhow!("{what} is not a loadable kiln model (tract NNEF): {chain}")
    }
}

fn run(loaded: Loaded, inputs: &Path, output: &Path) -> Result<()> {
    let Loaded { model, name } = loaded;
    let arrays = kiln_io::read_tensors(inputs)?;
    let batch = Batch::bind(
        &exec::input_specs(&model)?,
        arrays,
        &inputs.display().to_string(),
    )?;
    for w in &batch.warnings {
        eprintln!("warning: {w}");
    }
    let plan = exec::prepare(&model, &batch.symbols).with_context(|| name.clone())?;
    let outputs = exec::run_batch(&plan, &batch, &exec::output_names(&model)?)
        .with_context(|| name.clone())?;
    kiln_io::write_tensors(output, &outputs)?;
    Ok(())
}

fn info(loaded: Loaded) -> Result<()> {
    let Loaded { model, name } = loaded;
    println!("model   {name}");
    println!(
        "runner  kiln-runner {} (tract {}, target {TARGET})",
        env!("CARGO_PKG_VERSION"),
        kiln_io::TRACT_VERSION
    );
    for spec in exec::input_specs(&model)? {
        println!(
            "input   {} {:?} {}",
            spec.name,
            spec.datum_type,
            spec.shape_string()
        );
    }
    for (name, outlet) in exec::output_names(&model)?
        .iter()
        .zip(model.output_outlets()?)
    {
        println!("output  {name} {:?}", model.outlet_fact(*outlet)?);
    }
    if model.nodes().is_empty() {
        bail!("the model has no nodes");
    }
    Ok(())
}

/// Prints `text` and a newline to stdout; a reader that went away (`| head`) is not an error.
fn print_out(text: &str) -> Result<()> {
    use std::io::Write;
    match writeln!(std::io::stdout().lock(), "{text}") {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => Ok(r?),
    }
}
