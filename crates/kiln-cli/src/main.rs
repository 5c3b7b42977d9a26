//! `kiln`: the user's command. A thin layer over the kiln libraries.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod commands;
mod compile;
mod demo;

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
    Run {
        /// ONNX file, or kiln's NNEF output.
        model: PathBuf,
        /// Inputs: a sample .npz (one array per input) or a dataset (extra leading N axis).
        #[arg(long)]
        inputs: PathBuf,
        /// Write the outputs here (.npz), named as the model's outputs.
        #[arg(long)]
        output: Option<PathBuf>,
        /// Reference outputs to compare with: max-abs, cosine, top-1 agreement.
        #[arg(long)]
        compare: Option<PathBuf>,
        /// With --compare: fail (exit 1) when any output's max-abs error exceeds this.
        #[arg(long, value_name = "MAX_ABS")]
        tolerance: Option<f64>,
        /// Fix an input's shape (symbolic dims), e.g. input=1x3x224x224. Repeatable.
        #[arg(long = "input-shape", value_name = "NAME=DIMS")]
        input_shapes: Vec<String>,
        /// Print the versioned JSON document (schema kiln.run/1).
        #[arg(long)]
        json: bool,
    },
    /// Compile a model for a target: the model in runner form (NNEF) plus the runner.
    Compile {
        /// ONNX file, or kiln's NNEF output.
        model: PathBuf,
        /// Target name (see `kiln targets`), e.g. aarch64-linux.
        #[arg(long)]
        target: String,
        /// Output folder.
        #[arg(short = 'o', long = "out")]
        out: PathBuf,
        /// Produce one executable with the model inside (runner + model + checked trailer).
        #[arg(long)]
        embed: bool,
        /// Use this runner binary instead of the built one for the target.
        #[arg(long)]
        runner: Option<PathBuf>,
        /// Fix an input's shape (symbolic dims), e.g. input=1x3x224x224. Repeatable.
        #[arg(long = "input-shape", value_name = "NAME=DIMS")]
        input_shapes: Vec<String>,
        /// Print the JSON report (schema kiln.compile/1; also written as OUT/compile.json).
        #[arg(long)]
        json: bool,
    },
    /// List the targets (targets/*.toml) and what is installed for each.
    Targets {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Walk through kiln on the bundled fixtures (the README's first command).
    Demo {
        /// Folder holding the fixtures (default: ./fixtures, else the source tree's).
        #[arg(long)]
        fixtures: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Inspect {
            model,
            input_shapes,
            json,
        } => commands::inspect(&model, &input_shapes, json),
        Command::Run {
            model,
            inputs,
            output,
            compare,
            tolerance,
            input_shapes,
            json,
        } => commands::run(commands::RunArgs {
            model,
            inputs,
            output,
            compare,
            tolerance,
            input_shapes,
            json,
        }),
        Command::Compile {
            model,
            target,
            out,
            embed,
            runner,
            input_shapes,
            json,
        } => compile::compile_cmd(compile::CompileArgs {
            model,
            target,
            out,
            embed,
            runner,
            input_shapes,
            json,
        }),
        Command::Targets { json } => compile::targets(json),
        Command::Demo { fixtures } => demo::demo(fixtures),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
