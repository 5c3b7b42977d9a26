//! `kiln optimize --prune ...` and `kiln prune-scan`: the command-line side of kiln-prune.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use kiln_prune::spec::{parse_method, parse_norm, parse_scope};
use kiln_prune::{ModelProto, PruneReport, PruneSpec};

/// The pruning flags, meant to be `#[command(flatten)]`ed into `kiln optimize`.
#[derive(clap::Args, Debug, Clone)]
pub struct PruneArgs {
    /// Prune: `magnitude:FRACTION` (zero the smallest weights) or `channels:FRACTION`
    /// (remove whole channels / hidden units), FRACTION in [0, 1).
    #[arg(long, value_name = "METHOD:FRACTION")]
    pub prune: Option<String>,
    /// Thresholds per layer, or one over all prunable layers.
    #[arg(long, value_name = "layer|global", default_value = "layer")]
    pub prune_scope: String,
    /// Node names never pruned (repeatable or comma-separated); `none` prunes every layer.
    /// Default: the first and last prunable layers.
    #[arg(long = "prune-skip", value_name = "NODE", value_delimiter = ',')]
    pub prune_skip: Vec<String>,
    /// How channels are ranked for structured pruning.
    #[arg(long, value_name = "l1|l2", default_value = "l1")]
    pub prune_norm: String,
    /// zstd level of the reported compressed sizes.
    #[arg(long, default_value_t = kiln_prune::spec::DEFAULT_ZSTD_LEVEL)]
    pub zstd_level: i32,
}

impl PruneArgs {
    /// The pruning request, or `None` without `--prune`.
    pub fn spec(&self) -> Result<Option<PruneSpec>> {
        let Some(p) = &self.prune else {
            return Ok(None);
        };
        let mut spec = PruneSpec::new(parse_method(p)?);
        spec.scope = parse_scope(&self.prune_scope)?;
        spec.norm = parse_norm(&self.prune_norm)?;
        spec.skip = match self.prune_skip.as_slice() {
            [] => None,
            [none] if none == "none" => Some(vec![]),
            names => Some(names.to_vec()),
        };
        if !(1..=22).contains(&self.zstd_level) {
            bail!("--zstd-level {} is outside 1..=22", self.zstd_level);
        }
        spec.zstd_level = self.zstd_level;
        Ok(Some(spec))
    }
}

/// Prunes `model` as `args` say (the model unchanged, with no report, without `--prune`).
pub fn apply_prune(
    args: &PruneArgs,
    model: ModelProto,
) -> Result<(ModelProto, Option<PruneReport>)> {
    match args.spec()? {
        None => Ok((model, None)),
        Some(spec) => {
            let (m, r) = kiln_prune::prune(&model, &spec)?;
            Ok((m, Some(r)))
        }
    }
}

/// Arguments of `kiln optimize`.
#[derive(clap::Args)]
pub struct OptimizeArgs {
    /// The ONNX model.
    pub model: PathBuf,
    /// Output: `.onnx` writes ONNX, anything else kiln's NNEF form (as `kiln compile`).
    #[arg(short = 'o', long = "out")]
    pub out: PathBuf,
    /// Evaluation dataset (.npz): top-1 accuracy with `labels`, else agreement with the
    /// unpruned model's outputs.
    #[arg(long)]
    pub eval: Option<PathBuf>,
    /// Print the JSON report (schema kiln.prune/1) instead of text.
    #[arg(long)]
    pub json: bool,
    /// Also write the JSON report to this file.
    #[arg(long)]
    pub report: Option<PathBuf>,
    #[command(flatten)]
    pub prune: PruneArgs,
}

/// `kiln optimize MODEL -o OUT --prune ...`.
pub fn optimize_cmd(args: OptimizeArgs) -> Result<ExitCode> {
    if args.prune.prune.is_none() {
        bail!("nothing to do: give --prune magnitude:FRACTION or --prune channels:FRACTION");
    }
    let original = kiln_prune::read_model(&args.model)?;
    let (pruned, report) = apply_prune(&args.prune, original.clone())
        .with_context(|| format!("pruning {}", args.model.display()))?;
    let mut report = report.context("no pruning report")?;
    if let Some(eval) = &args.eval {
        let data = kiln_io::read_tensors(eval)?;
        report.accuracy = Some(kiln_prune::evaluate(
            &original,
            &pruned,
            &data,
            &eval.display().to_string(),
        )?);
    }
    let bytes = output_bytes(&pruned, &args.out)?;
    let zstd = zstd::bulk::compress(&bytes, report.totals.zstd_level)?.len() as u64;
    report.output = Some(kiln_prune::report::OutputFile {
        file: args.out.display().to_string(),
        bytes: bytes.len() as u64,
        zstd_bytes: zstd,
    });
    let json = serde_json::to_string_pretty(&report)?;
    kiln_io::fsutil::write_atomic(&args.out, &bytes)?;
    if let Some(r) = &args.report {
        kiln_io::fsutil::write_atomic(r, json.as_bytes())?;
    }
    if args.json {
        println!("{json}");
    } else {
        print!("{}", report.to_text());
        println!(
            "wrote {} ({} bytes; zstd -{}: {} bytes)",
            args.out.display(),
            bytes.len(),
            report.totals.zstd_level,
            zstd
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// The bytes of `model` in the form `out`'s name asks for.
fn output_bytes(model: &ModelProto, out: &Path) -> Result<Vec<u8>> {
    let bytes = kiln_graph::proto::to_bytes(model);
    if out
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("onnx"))
    {
        return Ok(bytes);
    }
    let m = kiln_graph::load::load_onnx_bytes(&bytes, out, &Default::default())?;
    kiln_graph::nnef::to_nnef_bytes(&m)
}

/// Arguments of `kiln prune-scan`.
#[derive(clap::Args)]
pub struct ScanArgs {
    /// The ONNX model.
    pub model: PathBuf,
    /// Evaluation dataset (.npz); with `labels` the metric is top-1 accuracy.
    #[arg(long)]
    pub eval: PathBuf,
    /// What to prune each layer with.
    #[arg(long, value_name = "magnitude|channels", default_value = "magnitude")]
    pub method: String,
    /// How channels are ranked (with --method channels).
    #[arg(long, value_name = "l1|l2", default_value = "l1")]
    pub prune_norm: String,
    /// Write the JSON document (schema kiln.prune-scan/1) here.
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Print the JSON document instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Draw the sensitivity chart into this SVG file.
    #[arg(long)]
    pub plot: Option<PathBuf>,
}

/// `kiln prune-scan MODEL --eval DATA`.
pub fn scan_cmd(args: ScanArgs) -> Result<ExitCode> {
    let method = parse_method(&format!("{}:0", args.method))?;
    let mut base = PruneSpec::new(method);
    base.norm = parse_norm(&args.prune_norm)?;
    let model = kiln_prune::read_model(&args.model)?;
    let data = kiln_io::read_tensors(&args.eval)?;
    let report = kiln_prune::scan(
        &model,
        method,
        &base,
        &data,
        &args.eval.display().to_string(),
    )
    .with_context(|| format!("scanning {}", args.model.display()))?;
    let json = serde_json::to_string_pretty(&report)?;
    let svg = args.plot.as_ref().map(|_| report.to_svg()).transpose()?;
    if let Some(r) = &args.report {
        kiln_io::fsutil::write_atomic(r, json.as_bytes())?;
    }
    if let (Some(p), Some(svg)) = (&args.plot, svg) {
        kiln_io::fsutil::write_atomic(p, svg.as_bytes())?;
    }
    if args.json {
        println!("{json}");
    } else {
        print!("{}", report.to_text());
    }
    Ok(ExitCode::SUCCESS)
}
