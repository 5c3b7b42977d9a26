//! `kiln`: the user's command. A thin layer over the kiln libraries.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod artifact;
mod bench;
mod check;
mod collect;
mod commands;
mod compile;
mod demo;
mod optimize;
mod pipeline;
mod prune;

/// kiln bakes trained ONNX models into small, fast artifacts for edge devices.
#[derive(Parser)]
#[command(name = "kiln", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show a model's inputs, outputs, ops, parameters and MACs.
    Inspect {
        /// ONNX file, or kiln's NNEF output (.nnef.tar or directory).
        model: PathBuf,
        /// Fix an input's shape (symbolic dims), e.g. input=1x3x224x224. Repeatable.
        #[arg(long = "input-shape", value_name = "NAME=DIMS")]
        input_shapes: Vec<String>,
        /// Print the versioned JSON document (schema kiln.inspect/1) instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Run a model on the host with tract on a sample or a dataset (.npz/.npy).
    Run(commands::RunArgs),
    /// Quantize a model (f16, int8 dynamic/static) within an accuracy budget.
    Optimize(optimize::OptimizeArgs),
    /// Compile a model for a target: the model in runner form (NNEF) plus the runner.
    Compile(compile::CompileArgs),
    /// List the targets (targets/*.toml) and what is installed for each.
    Targets {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Generate an Ed25519 signing key pair: KEY (PKCS#8 PEM, mode 600) and KEY.pub.
    Keygen {
        /// Private key path; the public key goes to PATH.pub.
        #[arg(short = 'o', long = "out")]
        out: PathBuf,
        /// Overwrite existing key files.
        #[arg(long)]
        force: bool,
    },
    /// Sign a `kiln compile` output folder into one .kiln artifact.
    Package(artifact::PackageArgs),
    /// Verify an artifact's signature, hashes and structure on the host.
    Verify {
        /// The .kiln artifact.
        artifact: PathBuf,
        /// Public key to verify against (KEY.pub from `kiln keygen`).
        #[arg(long)]
        pubkey: PathBuf,
        /// Print the manifest as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Install an artifact on a device (local, qemu-*, ssh://) with A/B rollback.
    Flash(artifact::FlashArgs),
    /// Benchmark a model on devices (local, qemu-*, ssh://) and compare their reports.
    Bench(bench::BenchArgs),
    /// Gate CI: compare sizes, latency and accuracy with a committed baseline (exit 1 on a regression).
    Check(check::CheckArgs),
    /// Manage the `kiln check` baseline (`kiln baseline update`).
    #[command(subcommand)]
    Baseline(check::BaselineCmd),
    /// Per-layer pruning sensitivity on an evaluation set: table, JSON, SVG chart.
    PruneScan(prune::ScanArgs),
    /// Run the pipeline of a kiln.toml: optimize, compile per target, package (cached by content).
    Build(pipeline::BuildArgs),
    /// Print what `kiln build` would run and why (which inputs changed); runs nothing.
    Plan(pipeline::PipelineArgs),
    /// Write a commented kiln.toml for a model.
    Init {
        /// The model (ONNX).
        model: PathBuf,
        /// Where to write the manifest.
        #[arg(short = 'o', long = "out", default_value = "kiln.toml")]
        out: PathBuf,
        /// Overwrite an existing manifest.
        #[arg(long)]
        force: bool,
    },
    /// Receive runner reports over HTTP (POST /v1/reports) into a SQLite store.
    Collect(collect::CollectArgs),
    /// List, show or export the reports a collector stored.
    Reports(collect::ReportsArgs),
    /// Render stored reports as a self-contained HTML page (charts and a comparison table).
    Report(collect::ReportArgs),
    /// Walk through kiln on the bundled fixtures (the README's first command).
    Demo {
        /// Folder holding the fixtures (default: ./fixtures, else the source tree's).
        #[arg(long)]
        fixtures: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = kiln_io::configure_tract() {
        eprintln!("warning: cannot apply kiln's tract settings: {e:#}");
    }
    let result = match cli.command {
        Command::Inspect {
            model,
            input_shapes,
            json,
        } => commands::inspect(&model, &input_shapes, json),
        Command::Run(args) => commands::run(args),
        Command::Optimize(args) => optimize::optimize_cmd(args),
        Command::Compile(args) => compile::compile_cmd(args),
        Command::Targets { json } => compile::targets(json),
        Command::Keygen { out, force } => artifact::keygen(&out, force),
        Command::Package(args) => artifact::package_cmd(args),
        Command::Verify {
            artifact: a,
            pubkey,
            json,
        } => artifact::verify_cmd(&a, &pubkey, json),
        Command::Flash(args) => artifact::flash_cmd(&args),
        Command::Bench(args) => bench::bench_cmd(args),
        Command::Check(args) => check::check_cmd(args),
        Command::Baseline(cmd) => check::baseline_cmd(cmd),
        Command::Build(args) => pipeline::build_cmd(args),
        Command::Plan(args) => pipeline::plan_cmd(args),
        Command::Init { model, out, force } => pipeline::init_cmd(&model, &out, force),
        Command::Demo { fixtures } => demo::demo(fixtures),
        Command::PruneScan(args) => prune::scan_cmd(args),
        Command::Collect(args) => collect::collect(args),
        Command::Reports(args) => collect::reports(args),
        Command::Report(args) => collect::report(args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
