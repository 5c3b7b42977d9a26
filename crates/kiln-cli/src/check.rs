//! `kiln check` and `kiln baseline update`: measure (or read a measurement), compare with a
//! committed baseline under its budgets, print in a CI format. Exit 0 within budget, 1 on a
//! regression, 2 on usage or input errors. The logic lives in `kiln-check`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use kiln_check::baseline::ModelSpec;
use kiln_check::format::{self, Format, Report};
use kiln_check::measure::{self, BenchCase, BenchPlan, Kind, Measurement, Metric};
use kiln_check::{compare, Baseline, Budgets, MeasureSpec};

use crate::commands::{load_model, read_batch, run_and_compare};
use crate::compile::runner_for;
use kiln_graph::load::model_stem;

/// What to measure, from the command line (else from the baseline's `measure` section).
#[derive(clap::Args, Debug, Default)]
pub struct MeasureArgs {
    /// Model to measure (ONNX or NNEF), `NAME=PATH` or `PATH`. Repeatable.
    #[arg(long = "model", value_name = "[NAME=]PATH")]
    pub models: Vec<String>,
    /// Labelled dataset (.npz with `labels`) for a model's top-1 accuracy, `NAME=PATH`.
    #[arg(long = "data", value_name = "NAME=PATH")]
    pub data: Vec<String>,
    /// Accuracy from a kiln.optimize/1 or kiln.run/1 report, `NAME=PATH`.
    #[arg(long = "accuracy", value_name = "NAME=PATH")]
    pub accuracy: Vec<String>,
    /// A file whose size is gated (e.g. a .kiln artifact), `NAME=PATH` or `PATH`.
    #[arg(long = "artifact", value_name = "[NAME=]PATH")]
    pub artifacts: Vec<String>,
    /// Reference model timed in every round: latency is gated as a ratio to it.
    #[arg(long)]
    pub reference: Option<PathBuf>,
    /// Target whose runner is sized and times the models (default x86_64-linux).
    #[arg(long)]
    pub target: Option<String>,
    /// Latency rounds per model (default 5).
    #[arg(long)]
    pub runs: Option<usize>,
    /// Timed inferences per round (default 20).
    #[arg(long)]
    pub iters: Option<usize>,
    /// Untimed inferences per round (default 3).
    #[arg(long)]
    pub warmup: Option<usize>,
    /// Use this runner binary instead of the target's built one.
    #[arg(long)]
    pub runner: Option<PathBuf>,
    /// Measure sizes and accuracy only.
    #[arg(long)]
    pub no_latency: bool,
}

/// Arguments of `kiln check`.
#[derive(clap::Args, Debug)]
pub struct CheckArgs {
    /// The committed baseline (kiln.baseline/1).
    #[arg(long)]
    pub baseline: Option<PathBuf>,
    /// A measurement taken elsewhere (kiln.measure/1, from `kiln check --measure-only`).
    #[arg(long)]
    pub current: Option<PathBuf>,
    /// Budgets TOML overriding the baseline's (`noise_sigmas = N`, `[budgets]` table).
    #[arg(long)]
    pub budgets: Option<PathBuf>,
    /// Output: table, json, junit, github, markdown.
    #[arg(long, default_value = "table")]
    pub format: String,
    /// Only measure; write the kiln.measure/1 document to -o (or stdout).
    #[arg(long)]
    pub measure_only: bool,
    /// Where --measure-only writes.
    #[arg(short = 'o', long = "out")]
    pub out: Option<PathBuf>,
    /// What to measure.
    #[command(flatten)]
    pub measure: MeasureArgs,
}

/// `kiln baseline` subcommands.
#[derive(clap::Subcommand, Debug)]
pub enum BaselineCmd {
    /// Write a new baseline from the current measurement (keeping budgets), show the diff.
    Update {
        /// The baseline file to (re)write.
        #[arg(long)]
        baseline: PathBuf,
        /// A measurement taken elsewhere (kiln.measure/1) instead of measuring here.
        #[arg(long)]
        current: Option<PathBuf>,
        /// Budgets TOML to store in the baseline.
        #[arg(long)]
        budgets: Option<PathBuf>,
        /// What to measure.
        #[command(flatten)]
        measure: MeasureArgs,
    },
}

/// Runs `f`; an error is a usage or input error: printed, exit 2.
fn exit_2_on_error(f: impl FnOnce() -> Result<ExitCode>) -> Result<ExitCode> {
    match f() {
        Ok(code) => Ok(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            Ok(ExitCode::from(2))
        }
    }
}

/// `kiln check`.
pub fn check_cmd(args: CheckArgs) -> Result<ExitCode> {
    exit_2_on_error(|| {
        let format = Format::parse(&args.format)?;
        if args.measure_only {
            let base = args.baseline.as_deref().map(read_baseline).transpose()?;
            let spec = resolve_spec(&args.measure, base.as_ref(), args.baseline.as_deref())?;
            let m = take_measurement(&spec, args.measure.runner.as_deref())?;
            let text = serde_json::to_string_pretty(&m)? + "\n";
            match &args.out {
                Some(p) => {
                    kiln_io::fsutil::write_atomic(p, text.as_bytes())
                        .with_context(|| format!("cannot write {}", p.display()))?;
                    eprintln!("wrote {}", p.display());
                }
                None => print!("{text}"),
            }
            return Ok(ExitCode::SUCCESS);
        }
        if args.out.is_some() {
            bail!("-o/--out goes with --measure-only (reports go to stdout)");
        }
        let Some(path) = &args.baseline else {
            bail!("--baseline FILE is required (or --measure-only to only measure)");
        };
        let passed = check(
            path,
            args.current.as_deref(),
            args.budgets.as_deref(),
            &args.measure,
            format,
        )?;
        Ok(if passed {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        })
    })
}

/// Checks against the baseline at `path` and prints the verdict in `format`; true when
/// within budget. Errors are input errors (the caller maps them to exit 2).
pub fn check(
    path: &Path,
    current: Option<&Path>,
    budgets: Option<&Path>,
    measure_args: &MeasureArgs,
    format: Format,
) -> Result<bool> {
    let base = read_baseline(path)?;
    let budgets = budgets_for(&base, budgets)?;
    let cur = match current {
        Some(c) => {
            if has_measure_args(measure_args) {
                bail!("--current takes a finished measurement: drop --model/--artifact/--data/--accuracy/--reference");
            }
            Measurement::read(c)?
        }
        None => take_measurement(
            &resolve_spec(measure_args, Some(&base), Some(path))?,
            measure_args.runner.as_deref(),
        )?,
    };
    let cmp = compare(&base.measurement, &cur, &budgets);
    if let Some(problem) = cmp.input_problems() {
        bail!("cannot compare with baseline {}: {problem}", path.display());
    }
    let report = Report {
        comparison: &cmp,
        baseline: path.display().to_string(),
        reference: cur.reference.clone(),
        emulated: cur.emulated,
    };
    print!("{}", format::render(&report, format));
    if format == Format::Github {
        let md = format::markdown(&report);
        match format::write_step_summary(&md)? {
            Some(p) => eprintln!("step summary appended to {}", p.display()),
            None => print!("\n{md}"),
        }
    }
    Ok(cmp.regressions() == 0)
}

/// `kiln baseline ...`.
pub fn baseline_cmd(cmd: BaselineCmd) -> Result<ExitCode> {
    exit_2_on_error(|| match cmd {
        BaselineCmd::Update {
            baseline,
            current,
            budgets,
            measure,
        } => update(&baseline, current.as_deref(), budgets.as_deref(), &measure),
    })
}

fn update(
    path: &Path,
    current: Option<&Path>,
    budgets: Option<&Path>,
    args: &MeasureArgs,
) -> Result<ExitCode> {
    let old =
        if path.exists() {
            Some(read_baseline(path).context(
                "the existing baseline is unreadable; fix or delete it to start a new one",
            )?)
        } else {
            None
        };
    let (cur, spec) = match current {
        Some(c) => (
            Measurement::read(c)?,
            old.as_ref().and_then(|o| o.measure.clone()),
        ),
        None => {
            let spec = resolve_spec(args, old.as_ref(), Some(path))?;
            let m = take_measurement(&spec, args.runner.as_deref())?;
            let stored = if has_measure_args(args) {
                Some(relative_spec(&spec, path)?)
            } else {
                old.as_ref().and_then(|o| o.measure.clone())
            };
            (m, stored.map(|s| apply_overrides(s, args)))
        }
    };
    let mut new = Baseline::new(cur);
    if let Some(o) = &old {
        new.budgets = o.budgets.clone();
        new.noise_sigmas = o.noise_sigmas;
    }
    if let Some(b) = budgets {
        let (map, sigmas) = read_budgets_toml(b)?;
        new.budgets.extend(map);
        if let Some(s) = sigmas {
            new.noise_sigmas = s;
        }
    }
    new.measure = spec;
    let budgets_in_force = new.budgets()?;
    match &old {
        Some(o) => {
            let cmp = compare(&o.measurement, &new.measurement, &budgets_in_force);
            let report = Report {
                comparison: &cmp,
                baseline: path.display().to_string(),
                reference: new.measurement.reference.clone(),
                emulated: new.measurement.emulated,
            };
            println!("changes from the previous baseline:");
            print!("{}", format::table(&report));
            for m in &cmp.only_baseline {
                println!("  removed: {m}");
            }
            for m in &cmp.only_current {
                println!("  added:   {m}");
            }
            for m in &cmp.mismatched {
                println!("  re-measured differently: {m}");
            }
        }
        None => println!(
            "new baseline with {} metrics",
            new.measurement.metrics.len()
        ),
    }
    new.write(path)?;
    println!("wrote {}", path.display());
    Ok(ExitCode::SUCCESS)
}

fn read_baseline(path: &Path) -> Result<Baseline> {
    Baseline::read(path)
}

fn read_budgets_toml(path: &Path) -> Result<(BTreeMap<String, String>, Option<f64>)> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read budgets {}", path.display()))?;
    kiln_check::budget::parse_toml(&text, &path.display().to_string())
}

/// The baseline's budgets overlaid with a budgets file's.
fn budgets_for(base: &Baseline, file: Option<&Path>) -> Result<Budgets> {
    let mut map = base.budgets.clone();
    let mut sigmas = base.noise_sigmas;
    if let Some(f) = file {
        let (m, s) = read_budgets_toml(f)?;
        map.extend(m);
        sigmas = s.unwrap_or(sigmas);
        return Budgets::new(&map, sigmas, &f.display().to_string());
    }
    base.budgets()
}

fn has_measure_args(a: &MeasureArgs) -> bool {
    !a.models.is_empty()
        || !a.artifacts.is_empty()
        || !a.data.is_empty()
        || !a.accuracy.is_empty()
        || a.reference.is_some()
}

/// Splits `NAME=PATH` (or a bare `PATH` when `default_name` can name it).
fn named(
    arg: &str,
    flag: &str,
    default_name: Option<fn(&Path) -> String>,
) -> Result<(String, String)> {
    match arg.split_once('=') {
        Some((n, p)) if !n.is_empty() && !p.is_empty() => Ok((n.to_string(), p.to_string())),
        Some(_) => bail!("{flag} `{arg}`: expected NAME=PATH"),
        None => match default_name {
            Some(f) => Ok((f(Path::new(arg)), arg.to_string())),
            None => bail!("{flag} `{arg}`: expected NAME=PATH"),
        },
    }
}

fn file_name_of(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "artifact".into())
}

/// A measure spec with paths resolved against the current folder (command line) or the
/// baseline's folder (its `measure` section); command-line settings override.
fn resolve_spec(
    args: &MeasureArgs,
    base: Option<&Baseline>,
    base_path: Option<&Path>,
) -> Result<MeasureSpec> {
    let spec = if has_measure_args(args) {
        let mut spec = MeasureSpec::default();
        for m in &args.models {
            let (name, path) = named(m, "--model", Some(model_stem))?;
            if spec.models.iter().any(|x| x.name == name) {
                bail!("--model: two models are named `{name}`; name them with NAME=PATH");
            }
            spec.models.push(ModelSpec {
                name,
                path,
                data: None,
                report: None,
            });
        }
        for (flag, list) in [("--data", &args.data), ("--accuracy", &args.accuracy)] {
            for d in list {
                let (name, path) = named(d, flag, None)?;
                let Some(m) = spec.models.iter_mut().find(|m| m.name == name) else {
                    bail!("{flag} `{d}`: no --model is named `{name}`");
                };
                if flag == "--data" {
                    m.data = Some(path);
                } else {
                    m.report = Some(path);
                }
            }
        }
        for a in &args.artifacts {
            let (name, path) = named(a, "--artifact", Some(file_name_of))?;
            spec.artifacts.insert(name, path);
        }
        spec.reference = args.reference.as_ref().map(|p| p.display().to_string());
        spec
    } else {
        let Some(b) = base else {
            bail!("nothing to measure: give --model/--artifact (or --current with a measurement)");
        };
        let Some(spec) = &b.measure else {
            bail!(
                "nothing to measure: baseline {} has no `measure` section; give --model/--artifact or --current",
                base_path.map(|p| p.display().to_string()).unwrap_or_default()
            );
        };
        let dir = base_path
            .and_then(Path::parent)
            .map(Path::to_path_buf)
            .unwrap_or_default();
        let join = |p: &str| dir.join(p).display().to_string();
        let mut s = spec.clone();
        for m in &mut s.models {
            m.path = join(&m.path);
            m.data = m.data.as_deref().map(join);
            m.report = m.report.as_deref().map(join);
        }
        for p in s.artifacts.values_mut() {
            *p = join(p);
        }
        s.reference = s.reference.as_deref().map(join);
        s
    };
    Ok(apply_overrides(spec, args))
}

fn apply_overrides(mut spec: MeasureSpec, args: &MeasureArgs) -> MeasureSpec {
    if let Some(t) = &args.target {
        spec.target = t.clone();
    }
    spec.runs = args.runs.unwrap_or(spec.runs);
    spec.iters = args.iters.unwrap_or(spec.iters);
    spec.warmup = args.warmup.unwrap_or(spec.warmup);
    spec.no_latency |= args.no_latency;
    spec
}

/// `spec` with its paths relative to the folder of the baseline at `baseline`.
fn relative_spec(spec: &MeasureSpec, baseline: &Path) -> Result<MeasureSpec> {
    let dir = baseline
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let dir = dir
        .canonicalize()
        .with_context(|| format!("cannot resolve {}", dir.display()))?;
    let rel = |p: &str| -> Result<String> {
        let abs = Path::new(p)
            .canonicalize()
            .with_context(|| format!("cannot resolve {p}"))?;
        Ok(kiln_io::fsutil::relative_path(&abs, &dir)
            .display()
            .to_string())
    };
    let mut s = spec.clone();
    for m in &mut s.models {
        m.path = rel(&m.path)?;
        m.data = m.data.as_deref().map(rel).transpose()?;
        m.report = m.report.as_deref().map(rel).transpose()?;
    }
    for p in s.artifacts.values_mut() {
        *p = rel(p)?;
    }
    s.reference = s.reference.as_deref().map(rel).transpose()?;
    Ok(s)
}

/// Measures everything `spec` names: model sizes (source and runner form), accuracy, the
/// runner's size by ELF section, artifact sizes, and latency (reference interleaved).
fn take_measurement(spec: &MeasureSpec, runner: Option<&Path>) -> Result<Measurement> {
    if spec.models.is_empty() && spec.artifacts.is_empty() {
        bail!("nothing to measure: no models and no artifacts");
    }
    let target = kiln_target::find(&kiln_target::targets_dir()?, &spec.target)?;
    let mut m = Measurement {
        target: Some(target.name.clone()),
        ..Measurement::default()
    };
    let scratch = std::env::temp_dir().join(format!("kiln-check-nnef-{}", std::process::id()));
    std::fs::create_dir_all(&scratch)
        .with_context(|| format!("cannot create {}", scratch.display()))?;
    let result = (|| {
        let mut cases = vec![];
        for model in &spec.models {
            let case = measure_model(&mut m, model, &scratch)
                .with_context(|| format!("measuring model `{}` ({})", model.name, model.path))?;
            cases.push(case);
        }
        for (name, path) in &spec.artifacts {
            measure::file_size(&mut m, name, "bytes", Path::new(path))?;
        }
        if spec.models.is_empty() {
            return Ok(m.clone());
        }
        let runner = runner_for(&target, runner)?;
        measure::elf_sizes(&mut m, &format!("runner-{}", target.name), &runner)?;
        if !spec.no_latency {
            let reference = match &spec.reference {
                Some(r) => Some(
                    nnef_case(Path::new(r), "reference", &scratch)
                        .with_context(|| format!("preparing reference model {r}"))?,
                ),
                None => None,
            };
            let plan = BenchPlan {
                runs: spec.runs,
                iters: spec.iters,
                warmup: spec.warmup,
            };
            let make = || kiln_target::emulate::command(&target, &runner);
            let t0 = std::time::Instant::now();
            measure::latency(&mut m, &make, &cases, reference.as_ref(), &plan)?;
            eprintln!(
                "kiln check: timed {} model(s) x {} rounds in {:.1}s{}",
                cases.len(),
                plan.runs,
                t0.elapsed().as_secs_f64(),
                if reference.is_some() {
                    " (with reference)"
                } else {
                    ""
                }
            );
            if let Some(r) = &spec.reference {
                m.reference = Some(model_stem(Path::new(r)));
            }
        }
        Ok(m.clone())
    })();
    let _ = std::fs::remove_dir_all(&scratch);
    result
}

/// Writes the runner form of `path` into `scratch`.
fn nnef_case(path: &Path, name: &str, scratch: &Path) -> Result<BenchCase> {
    let model = load_model(path, &[])?;
    let nnef = scratch.join(format!("{name}.nnef.tar"));
    kiln_graph::nnef::save_nnef(&model, &nnef)?;
    Ok(BenchCase {
        name: name.to_string(),
        model: nnef,
    })
}

/// Sizes and accuracy of one model; returns its bench case.
fn measure_model(m: &mut Measurement, spec: &ModelSpec, scratch: &Path) -> Result<BenchCase> {
    let path = Path::new(&spec.path);
    measure::file_size(m, &spec.name, "model_bytes", path)?;
    let model = load_model(path, &[])?;
    let nnef = scratch.join(format!("{}.nnef.tar", spec.name));
    kiln_graph::nnef::save_nnef(&model, &nnef)?;
    measure::file_size(m, &spec.name, "nnef_bytes", &nnef)?;
    if let Some(data) = &spec.data {
        let batch = read_batch(&model, Path::new(data))?;
        let Some(labels) = &batch.labels else {
            bail!("{data} has no `labels` array: accuracy needs a labelled dataset");
        };
        let (outputs, _) = run_and_compare(&model, &batch, None)?;
        let (_, first) = outputs.first().context("the model has no outputs")?;
        let acc = kiln_io::compare::top1_accuracy(first, labels)?;
        m.insert(
            &spec.name,
            "accuracy",
            Metric::exact(Kind::Accuracy, "%", acc * 100.0),
        );
    }
    if let Some(report) = &spec.report {
        measure::accuracy_from_report(m, &spec.name, Path::new(report))?;
    }
    Ok(BenchCase {
        name: spec.name.clone(),
        model: nnef,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn named_arguments() {
        assert_eq!(
            named("n=a/b.onnx", "--model", Some(model_stem)).unwrap(),
            ("n".to_string(), "a/b.onnx".to_string())
        );
        assert_eq!(
            named("fixtures/cnn/model.onnx", "--model", Some(model_stem))
                .unwrap()
                .0,
            "cnn"
        );
        assert!(named("x.npz", "--data", None)
            .unwrap_err()
            .to_string()
            .contains("NAME=PATH"));
        assert!(named("=x", "--data", None).is_err());
    }
}
