//! `kiln`: the user's command. A thin layer over the kiln libraries.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod artifact;
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
    Package {
        /// Output folder of `kiln compile`.
        dir: PathBuf,
        /// Private signing key (from `kiln keygen`).
        #[arg(long)]
        key: PathBuf,
        /// Artifact version; devices refuse versions not newer than the installed one.
        #[arg(long)]
        version: u64,
        /// Artifact path (.kiln).
        #[arg(short = 'o', long = "out")]
        out: PathBuf,
        /// Inputs for the on-device self-test (default: deterministic synthetic inputs).
        #[arg(long)]
        golden_inputs: Option<PathBuf>,
        /// Ship the runner inside the artifact too.
        #[arg(long)]
        with_runner: bool,
        /// Expected top-1 accuracy to record in the manifest.
        #[arg(long)]
        accuracy: Option<f64>,
    },
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
    /// Install an artifact on a device (local, qemu-aarch64, qemu-armv7) with A/B rollback.
    Flash {
        /// The .kiln artifact.
        artifact: PathBuf,
        /// Device: local, qemu-aarch64, qemu-armv7.
        #[arg(long)]
        device: String,
        /// Trusted public keys on the device (a folder of .pub files).
        #[arg(long)]
        keys: PathBuf,
        /// Install root on the device.
        #[arg(long, default_value = "/var/lib/kiln")]
        root: PathBuf,
        /// Accept a version not newer than the installed one.
        #[arg(long)]
        allow_downgrade: bool,
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
        Command::Keygen { out, force } => artifact::keygen(&out, force),
        Command::Package {
            dir,
            key,
            version,
            out,
            golden_inputs,
            with_runner,
            accuracy,
        } => artifact::package_cmd(artifact::PackageArgs {
            dir,
            key,
            version,
            out,
            golden_inputs,
            with_runner,
            accuracy,
        }),
        Command::Verify {
            artifact: a,
            pubkey,
            json,
        } => artifact::verify_cmd(&a, &pubkey, json),
        Command::Flash {
            artifact: a,
            device,
            keys,
            root,
            allow_downgrade,
        } => artifact::flash_cmd(&a, &device, &keys, &root, allow_downgrade),
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
