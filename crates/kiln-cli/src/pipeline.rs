//! `kiln build`, `kiln plan`, `kiln init`: the pipeline of a `kiln.toml` (crate
//! kiln-pipeline) with progress, a summary, and `kiln.build/1` JSON.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use kiln_graph::inspect::human_bytes;
use kiln_pipeline::{BuildOptions, Event, Pipeline, StageReport, Status};

/// Arguments shared by `kiln build` and `kiln plan`.
#[derive(clap::Args)]
pub struct PipelineArgs {
    /// The pipeline manifest.
    #[arg(long, default_value = kiln_pipeline::manifest::FILE_NAME)]
    pub manifest: PathBuf,
    /// Only this target of the manifest's. Repeatable.
    #[arg(long = "target", value_name = "NAME")]
    pub targets: Vec<String>,
    /// Output folder (default: target/kiln beside the manifest).
    #[arg(short = 'o', long = "out")]
    pub out: Option<PathBuf>,
    /// Run every stage even when its cache entry is valid.
    #[arg(long)]
    pub no_cache: bool,
    /// Print the kiln.build/1 JSON document instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `kiln build`.
#[derive(clap::Args)]
pub struct BuildArgs {
    /// Manifest, targets, output.
    #[command(flatten)]
    pub common: PipelineArgs,
    /// Then benchmark every built model on the manifest's `devices` (kiln bench).
    #[arg(long)]
    pub bench: bool,
}

impl PipelineArgs {
    fn options(&self) -> BuildOptions {
        BuildOptions {
            targets: self.targets.clone(),
            out_dir: self.out.clone(),
            no_cache: self.no_cache,
        }
    }
}

fn line(r: &StageReport) -> String {
    let what = format!(
        "{:<9}{:<14}{:<16}",
        r.stage,
        r.model,
        r.target.as_deref().unwrap_or("")
    );
    let status = match r.status {
        Status::Cached => "cached".to_string(),
        Status::Built => format!("built {:.1}s", r.seconds),
        Status::Rebuilt => format!("rebuilt {:.1}s", r.seconds),
        Status::WouldRun => "run".to_string(),
        Status::Waiting => "maybe".to_string(),
    };
    let reason = match r.status {
        Status::Cached => String::new(),
        _ => r.reason.clone(),
    };
    format!("  {what}{status:<14}{reason}")
}

/// `kiln build`.
pub fn build_cmd(a: BuildArgs) -> Result<ExitCode> {
    let mut p = Pipeline::load(&a.common.manifest, &a.common.options())?;
    if a.bench && p.manifest.devices.is_empty() {
        bail!("--bench: {} lists no `devices`", p.manifest.path.display());
    }
    let json = a.common.json;
    let total = p.stage_count() as u64;
    let bar = if json {
        indicatif::ProgressBar::hidden()
    } else {
        let b = indicatif::ProgressBar::new(total);
        b.set_style(
            indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b
    };
    if !json {
        println!(
            "kiln build {} -> {}",
            p.manifest.path.display(),
            p.out.display()
        );
    }
    let report = p.build(&mut |e| match e {
        Event::Start { id, .. } => bar.set_message(id.to_string()),
        Event::Finish(r) => {
            bar.inc(1);
            if json {
            } else if bar.is_hidden() {
                println!("{}", line(r));
            } else {
                bar.println(line(r));
            }
        }
    });
    bar.finish_and_clear();
    let report = report?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        let ran = report
            .stages
            .iter()
            .filter(|s| s.status != Status::Cached)
            .count();
        println!(
            "{} stage(s) ran, {} cached, in {:.2}s",
            ran,
            report.stages.len() - ran,
            report.seconds
        );
        for a in &report.artifacts {
            println!(
                "  {}  {}  sha256 {}",
                p.out.join(&a.path).display(),
                human_bytes(a.bytes),
                &a.sha256[..16]
            );
        }
        if p.manifest.sign.is_none() {
            println!("  (no [sign] key in the manifest: compiled, not packaged)");
        }
        if let Some(b) = &report.budgets {
            let baseline = report.baseline.as_deref().unwrap_or("BASELINE");
            println!(
                "  CI gate: kiln check --baseline {baseline} --budgets {}",
                p.out.join(b).display()
            );
        }
    }
    if a.bench {
        return bench(&p);
    }
    Ok(ExitCode::SUCCESS)
}

/// Benchmarks each model's runner form on the manifest's devices (`kiln bench`).
fn bench(p: &Pipeline) -> Result<ExitCode> {
    let mut code = ExitCode::SUCCESS;
    for m in &p.manifest.models {
        let Some(target) = p.manifest.targets.first() else {
            continue;
        };
        let nnef = p
            .out
            .join(&m.name)
            .join(target)
            .join(format!("{}.nnef.tar", m.name));
        println!("\nbench {} on {}", m.name, p.manifest.devices.join(", "));
        let args = crate::bench::BenchArgs {
            model: nnef,
            devices: p.manifest.devices.clone(),
            targets: p.manifest.targets.clone(),
            iters: None,
            seconds: None,
            warmup: None,
            inputs: m.golden.clone(),
            input_shapes: vec![],
            out: Some(p.out.join(&m.name).join("bench")),
            db: None,
            html: None,
            json: false,
            device: Default::default(),
        };
        if crate::bench::bench_cmd(args)? != ExitCode::SUCCESS {
            code = ExitCode::FAILURE;
        }
    }
    Ok(code)
}

/// `kiln plan`: what `kiln build` would run and why; runs and writes nothing.
pub fn plan_cmd(a: PipelineArgs) -> Result<ExitCode> {
    let p = Pipeline::load(&a.manifest, &a.options())?;
    let stages = p.plan(&mut |_| {})?;
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "schema": "kiln.plan/1",
                "manifest": p.manifest.path.display().to_string(),
                "out": p.out.display().to_string(),
                "stages": stages,
            }))?
        );
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "kiln plan {} -> {}",
        p.manifest.path.display(),
        p.out.display()
    );
    for s in &stages {
        println!("{}", line(s));
    }
    let run = stages
        .iter()
        .filter(|s| s.status == Status::WouldRun)
        .count();
    let maybe = stages
        .iter()
        .filter(|s| s.status == Status::Waiting)
        .count();
    println!(
        "{run} stage(s) would run, {maybe} depend on them, {} cached",
        stages.len() - run - maybe
    );
    if !p.manifest.devices.is_empty() {
        println!(
            "devices (kiln build --bench): {}",
            p.manifest.devices.join(", ")
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `kiln init MODEL`: writes a commented kiln.toml (refuses to overwrite without --force).
pub fn init_cmd(model: &Path, out: &Path, force: bool) -> Result<ExitCode> {
    if out.exists() && !force {
        bail!(
            "{} exists; refusing to overwrite it (use --force)",
            out.display()
        );
    }
    let text = kiln_pipeline::init::template(model, out)?;
    kiln_io::fsutil::write_atomic(out, text.as_bytes())
        .with_context(|| format!("writing {}", out.display()))?;
    println!(
        "wrote {}; see what it would do with `kiln plan --manifest {}`",
        out.display(),
        out.display()
    );
    Ok(ExitCode::SUCCESS)
}
