//! `kiln compile` and `kiln targets`: the model in runner form plus the runner for a target.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use kiln_graph::inspect::human_bytes;
use kiln_target::{build, elf, emulate, toolchain, TargetSpec};
use serde::Serialize;

use crate::commands::load_model;

/// The `kiln compile` report (schema `kiln.compile/1`), also written as `compile.json`.
#[derive(Debug, Serialize)]
pub struct CompileReport {
    /// Always `kiln.compile/1`.
    pub schema: &'static str,
    /// Target name.
    pub target: String,
    /// Rust triple of the runner.
    pub triple: String,
    /// Source model path.
    pub model: String,
    /// The model in runner form (NNEF tar).
    pub model_file: String,
    /// Its size.
    pub model_bytes: u64,
    /// The runner copied beside the model (absent with `--embed`).
    pub runner_file: Option<String>,
    /// Runner size (stripped executable).
    pub runner_bytes: u64,
    /// The target's runner size budget.
    pub runner_budget: u64,
    /// ELF facts of the runner, checked against the target spec.
    pub runner_elf: elf::ElfReport,
    /// Single-file executable (runner + model + trailer) with `--embed`.
    pub embedded_file: Option<String>,
    /// Its size.
    pub embedded_bytes: Option<u64>,
}

/// Finds the runner for `spec` (`--runner`, a built one, or builds it from the source tree).
pub fn runner_for(spec: &TargetSpec, given: Option<&Path>) -> Result<PathBuf> {
    build::runner_for(spec, given)
}

/// Arguments of `kiln compile`.
#[derive(clap::Args)]
pub struct CompileArgs {
    /// ONNX file, or kiln's NNEF output.
    pub model: PathBuf,
    /// Target name (see `kiln targets`), e.g. aarch64-linux.
    #[arg(long)]
    pub target: String,
    /// Output folder.
    #[arg(short = 'o', long = "out")]
    pub out: PathBuf,
    /// Produce one executable with the model inside (runner + model + checked trailer).
    #[arg(long)]
    pub embed: bool,
    /// Use this runner binary instead of the built one for the target.
    #[arg(long)]
    pub runner: Option<PathBuf>,
    /// Fix an input's shape (symbolic dims), e.g. input=1x3x224x224. Repeatable.
    #[arg(long = "input-shape", value_name = "NAME=DIMS")]
    pub input_shapes: Vec<String>,
    /// Print the JSON report (schema kiln.compile/1; also written as OUT/compile.json).
    #[arg(long)]
    pub json: bool,
}

/// Compiles `args.model` for `args.target` into `args.out`.
pub fn compile(args: &CompileArgs) -> Result<CompileReport> {
    let spec = kiln_target::find(&kiln_target::targets_dir()?, &args.target)?;
    let model = load_model(&args.model, &args.input_shapes)?;
    // A kiln NNEF input (e.g. `kiln optimize` output) ships as written: a load/re-write
    // round trip through tract 0.23 is not always loadable (max_pool gains a second output).
    let nnef = if model.format == kiln_graph::ModelFormat::Nnef
        && args.input_shapes.is_empty()
        && args.model.is_file()
    {
        std::fs::read(&args.model)
            .with_context(|| format!("cannot read {}", args.model.display()))?
    } else {
        kiln_graph::nnef::to_nnef_bytes(&model)?
    };
    let runner_path = runner_for(&spec, args.runner.as_deref())?;
    let runner = std::fs::read(&runner_path)
        .with_context(|| format!("cannot read runner {}", runner_path.display()))?;
    let runner_elf =
        elf::inspect(&runner).with_context(|| format!("runner {}", runner_path.display()))?;
    elf::check(&runner_elf, &spec).with_context(|| format!("runner {}", runner_path.display()))?;

    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create output folder {}", args.out.display()))?;
    let stem = kiln_graph::load::model_stem(&args.model);
    let model_file = args.out.join(format!("{stem}.nnef.tar"));
    kiln_io::fsutil::write_atomic(&model_file, &nnef)?;
    let (mut runner_file, mut embedded_file, mut embedded_bytes) = (None, None, None);
    if args.embed {
        let exe = args.out.join(&stem);
        let trailer = kiln_io::embed::trailer(&nnef);
        kiln_io::fsutil::write_atomic_with(&exe, |f| {
            use std::io::Write;
            f.write_all(&runner)?;
            f.write_all(&nnef)?;
            f.write_all(&trailer)?;
            Ok(())
        })?;
        set_executable(&exe)?;
        embedded_bytes = Some((runner.len() + nnef.len() + trailer.len()) as u64);
        embedded_file = Some(exe.display().to_string());
    } else {
        let dest = args.out.join("kiln-runner");
        kiln_io::fsutil::write_atomic(&dest, &runner)?;
        set_executable(&dest)?;
        runner_file = Some(dest.display().to_string());
    }
    let report = CompileReport {
        schema: "kiln.compile/1",
        target: spec.name.clone(),
        triple: spec.triple.clone(),
        model: args.model.display().to_string(),
        model_file: model_file.display().to_string(),
        model_bytes: nnef.len() as u64,
        runner_file,
        runner_bytes: runner.len() as u64,
        runner_budget: spec.runner_size_budget,
        runner_elf,
        embedded_file,
        embedded_bytes,
    };
    kiln_io::fsutil::write_atomic(
        &args.out.join("compile.json"),
        serde_json::to_string_pretty(&report)?.as_bytes(),
    )?;
    Ok(report)
}

#[cfg(unix)]
fn set_executable(p: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755))?;
    Ok(())
}

/// `kiln compile`.
pub fn compile_cmd(args: CompileArgs) -> Result<ExitCode> {
    let r = compile(&args)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!("compiled {} for {} ({})", r.model, r.target, r.triple);
    println!("  model   {}  {}", r.model_file, human_bytes(r.model_bytes));
    let over = if r.runner_bytes > r.runner_budget {
        "  OVER BUDGET"
    } else {
        ""
    };
    let sections: Vec<String> = r
        .runner_elf
        .sections
        .iter()
        .map(|(k, v)| format!("{k} {}", human_bytes(*v)))
        .collect();
    println!(
        "  runner  {}  {} (budget {}){over}; {} ELF{} {}{}, {}",
        r.runner_file.as_deref().unwrap_or("(embedded)"),
        human_bytes(r.runner_bytes),
        human_bytes(r.runner_budget),
        r.runner_elf.machine,
        r.runner_elf.class,
        if r.runner_elf.static_link {
            "static"
        } else {
            "dynamic"
        },
        r.runner_elf
            .float_abi
            .as_ref()
            .map(|f| format!(", {f}-float"))
            .unwrap_or_default(),
        sections.join(", ")
    );
    if let (Some(f), Some(b)) = (&r.embedded_file, r.embedded_bytes) {
        println!(
            "  single file  {f}  {} (runner + model + {} B trailer)",
            human_bytes(b),
            kiln_io::embed::TRAILER_LEN
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// One row of `kiln targets`.
#[derive(Serialize)]
struct TargetRow {
    name: String,
    triple: String,
    description: String,
    execution: &'static str,
    toolchain: toolchain::ToolchainStatus,
    runner: Option<String>,
}

/// `kiln targets`: every spec with what is installed for it.
pub fn targets(json: bool) -> Result<ExitCode> {
    let specs = kiln_target::load_all(&kiln_target::targets_dir()?)?;
    let rows: Vec<TargetRow> = specs
        .iter()
        .map(|s| TargetRow {
            name: s.name.clone(),
            triple: s.triple.clone(),
            description: s.description.clone(),
            execution: match emulate::execution(s) {
                emulate::Execution::Native => "native",
                emulate::Execution::Emulated => "qemu",
            },
            toolchain: toolchain::status(s),
            runner: build::find_runner(s).map(|p| p.display().to_string()),
        })
        .collect();
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<20} {:<32} {:<6} {:<8} {:<8} {:<8} runner",
        "target", "triple", "runs", "std", "linker", "qemu"
    );
    let yes = |b: bool| if b { "ok" } else { "MISSING" };
    for r in &rows {
        println!(
            "{:<20} {:<32} {:<6} {:<8} {:<8} {:<8} {}",
            r.name,
            r.triple,
            r.execution,
            yes(r.toolchain.rust_std),
            yes(r.toolchain.linker),
            r.toolchain.emulator.map(yes).unwrap_or("-"),
            r.runner.as_deref().unwrap_or("not built")
        );
        for i in &r.toolchain.install {
            println!("{:<20} install: {i}", "");
        }
    }
    Ok(ExitCode::SUCCESS)
}
