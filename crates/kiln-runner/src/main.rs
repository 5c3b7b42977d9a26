//! `kiln-runner`: the on-device binary. Loads kiln's NNEF model form (from `--model` or
//! embedded in its own executable) and runs it on `.npy`/`.npz` data.
//!
//! Small by design: no ONNX parser, no async runtime, no argument-parsing framework.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use kiln_io::{exec, Batch};
use tract_nnef::prelude::*;

const USAGE: &str = "\
usage:
  kiln-runner run  [--model M] --inputs IN.npz --output OUT.npz
  kiln-runner info [--model M]
  kiln-runner version

--model defaults to the model embedded in this executable (kiln compile --embed).
";

/// The kiln target this runner was built for (set by `cargo xtask runner`).
const TARGET: &str = match option_env!("KILN_TARGET") {
    Some(t) => t,
    None => "host",
};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match dispatch(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => match e.downcast_ref::<UsageError>() {
            Some(u) => {
                eprintln!("error: {u}\n\n{USAGE}");
                ExitCode::from(2)
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

fn dispatch(args: &[String]) -> Result<()> {
    match args.first().map(String::as_str) {
        Some("run") => {
            let o = Opts::parse(&args[1..], &["--model", "--inputs", "--output"])?;
            run(
                o.get("--model").map(Path::new),
                Path::new(o.require("--inputs")?),
                Path::new(o.require("--output")?),
            )
        }
        Some("info") => {
            let o = Opts::parse(&args[1..], &["--model"])?;
            info(o.get("--model").map(Path::new))
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

/// Loads the model: `--model PATH`, else the payload embedded in this executable.
fn load(model: Option<&Path>) -> Result<(TypedModel, String)> {
    let nnef = kiln_io::nnef::framework();
    match model {
        Some(p) => {
            let m = nnef
                .model_for_path(p)
                .map_err(|e| load_error(&p.display().to_string(), e))?;
            Ok((m, p.display().to_string()))
        }
        None => {
            let exe: PathBuf = std::env::current_exe().context("cannot locate this executable")?;
            let Some(payload) = kiln_io::embed::read_payload(&exe)? else {
                return Err(usage(
                    "no --model given and this runner has no embedded model",
                ));
            };
            let m = nnef
                .model_for_read(&mut std::io::Cursor::new(payload))
                .map_err(|e| load_error("the embedded model", e))?;
            Ok((m, "embedded model".into()))
        }
    }
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

fn run(model: Option<&Path>, inputs: &Path, output: &Path) -> Result<()> {
    let (model, name) = load(model)?;
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

fn info(model: Option<&Path>) -> Result<()> {
    let (model, name) = load(model)?;
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
