//! `kiln optimize`: quantize a model within an accuracy budget and write it in runner form.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use kiln_graph::load::parse_input_shape;
use kiln_graph::LoadOptions;
use kiln_opt::calib::Method;
use kiln_opt::optimize::{self, Options, Precision, Report};

/// Arguments of `kiln optimize`.
#[derive(clap::Args)]
pub struct OptimizeArgs {
    /// The fp32 ONNX model.
    pub model: PathBuf,
    /// Output: kiln's NNEF form (.nnef.tar, what `kiln compile`/the runner load) or, for
    /// int8, the quantized ONNX graph (.onnx).
    #[arg(short = 'o', long = "out")]
    pub out: PathBuf,
    /// Target precision: f16, int8-dynamic or int8-static.
    #[arg(long, value_name = "PRECISION")]
    pub quantize: Option<String>,
    /// Pruning, applied before quantization.
    #[command(flatten)]
    pub prune: crate::prune::PruneArgs,
    /// Calibration dataset (.npz, one array per input with a leading N axis); int8-static.
    #[arg(long)]
    pub calib: Option<PathBuf>,
    /// Calibration method: minmax, percentile[:P] (default 99.99) or entropy.
    #[arg(long, default_value = "minmax")]
    pub calibration: String,
    /// Evaluation dataset: top-1 accuracy with a `labels` array, else cosine to fp32.
    #[arg(long)]
    pub eval: Option<PathBuf>,
    /// Largest accepted accuracy drop in points; layers go back to f32 by sensitivity until
    /// it holds (needs --eval).
    #[arg(long, value_name = "PTS", allow_negative_numbers = true)]
    pub max_accuracy_drop: Option<f64>,
    /// Keep this layer (ONNX node name) in f32. Repeatable.
    #[arg(long = "keep-f32", value_name = "NODE")]
    pub keep_f32: Vec<String>,
    /// Write the kiln.optimize/1 JSON report here.
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Fix an input's shape (symbolic dims), e.g. input=1x3x224x224. Repeatable.
    #[arg(long = "input-shape", value_name = "NAME=DIMS")]
    pub input_shapes: Vec<String>,
    /// Also quantize layers kiln keeps in f32 because tract runs them slower in int8
    /// (grouped convolutions that are not depthwise; depthwise ones are int8 already).
    #[arg(long)]
    pub int8_everywhere: bool,
    /// When the int8 model runs slower than fp32 on this host, return to f32 the layers that
    /// make it faster (each change measured; the report says which and by how much).
    #[arg(long)]
    pub speed_search: bool,
    /// Print the report as JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// `kiln optimize`.
pub fn optimize_cmd(args: OptimizeArgs) -> Result<ExitCode> {
    let Some(quantize) = args.quantize.clone() else {
        if args.prune.prune.is_none() {
            bail!("nothing to do: give --quantize f16|int8-dynamic|int8-static and/or --prune magnitude:F|channels:F");
        }
        return crate::prune::optimize_cmd(crate::prune::OptimizeArgs {
            model: args.model,
            out: args.out,
            eval: args.eval,
            json: args.json,
            report: args.report,
            prune: args.prune,
        });
    };
    let precision = Precision::parse(&quantize)?;
    let method = Method::parse(&args.calibration)?;
    let input_shapes = args
        .input_shapes
        .iter()
        .map(|s| parse_input_shape(s))
        .collect::<Result<_>>()?;
    let as_onnx = args.out.extension().is_some_and(|e| e == "onnx");
    if as_onnx && precision == Precision::F16 {
        bail!(
            "{}: f16 output is written in kiln's NNEF form only; name the output .nnef.tar",
            args.out.display()
        );
    }
    if precision != Precision::Int8Static && args.calib.is_some() {
        eprintln!(
            "note: --calib is used by int8-static only; ignored for {}",
            quantize
        );
    }
    let opts = Options {
        precision,
        calib: args.calib.clone(),
        method,
        eval: args.eval.clone(),
        max_drop: args.max_accuracy_drop,
        keep_f32: args.keep_f32.clone(),
        load: LoadOptions { input_shapes },
        progress: !args.json,
        int8_everywhere: args.int8_everywhere,
        speed_search: args.speed_search,
    };
    let (start, prune_report) = match args.prune.prune.is_some() {
        true => {
            let original = kiln_prune::read_model(&args.model)?;
            let (pruned, report) = crate::prune::apply_prune(&args.prune, original)
                .with_context(|| format!("pruning {}", args.model.display()))?;
            (Some(pruned), report)
        }
        false => (None, None),
    };
    let mut done = optimize::optimize_from(&args.model, start, &opts)?;
    done.report.prune = prune_report.map(|r| serde_json::to_value(&r)).transpose()?;
    // Serialize before writing anything: an op the runner cannot read fails here.
    let bytes = if as_onnx {
        kiln_graph::proto::to_bytes(&done.onnx)
    } else {
        kiln_graph::nnef::to_nnef_bytes(&done.model)?
    };
    let zstd_size = zstd::bulk::compress(&bytes, args.prune.zstd_level)
        .map(|c| c.len() as u64)
        .unwrap_or(0);
    done.report.size.insert("output".into(), bytes.len() as u64);
    done.report.size.insert("output_zstd".into(), zstd_size);
    done.report
        .size
        .insert("zstd_level".into(), args.prune.zstd_level.max(0) as u64);
    let json = serde_json::to_vec_pretty(&done.report)?;
    if let Some(r) = &args.report {
        kiln_io::fsutil::write_atomic(r, &json)
            .with_context(|| format!("writing {}", r.display()))?;
    }
    kiln_io::fsutil::write_atomic(&args.out, &bytes)
        .with_context(|| format!("writing {}", args.out.display()))?;
    if args.json {
        println!("{}", String::from_utf8_lossy(&json));
    } else {
        print!("{}", to_text(&done.report, &args.out));
    }
    Ok(ExitCode::SUCCESS)
}

fn to_text(r: &Report, out: &std::path::Path) -> String {
    use kiln_graph::inspect::human_bytes;
    let mut s = String::new();
    let src = r.size.get("source_onnx").copied().unwrap_or(0);
    let o = r.size.get("output").copied().unwrap_or(0);
    let z = r.size.get("output_zstd").copied().unwrap_or(0);
    s += &format!(
        "optimized {} → {} ({:?})\n",
        r.model,
        out.display(),
        r.precision
    );
    s += &format!(
        "  size      {} → {} ({:.2}x); zstd {} ({:.2}x)\n",
        human_bytes(src),
        human_bytes(o),
        o as f64 / src.max(1) as f64,
        human_bytes(z),
        z as f64 / src.max(1) as f64
    );
    let q = r.layers.iter().filter(|l| l.precision != "f32").count();
    s += &format!("  layers    {q}/{} converted", r.layers.len());
    if !r.kept_f32.is_empty() {
        s += &format!("; kept in f32: {}", r.kept_f32.join(", "));
    }
    s += "\n";
    // Why, for the first few (all of them are in the JSON report).
    const WHY_SHOWN: usize = 8;
    let why: Vec<(&str, &str)> = r
        .layers
        .iter()
        .filter_map(|l| Some((l.name.as_str(), l.kept_reason.as_deref()?)))
        .collect();
    for (name, reason) in why.iter().take(WHY_SHOWN) {
        s += &format!("  f32       {name}: {reason}\n");
    }
    if why.len() > WHY_SHOWN {
        s += &format!(
            "  f32       … and {} more (see --report)\n",
            why.len() - WHY_SHOWN
        );
    }
    if let Some(a) = &r.accuracy {
        s += &format!(
            "  accuracy  {} {:.2} → {:.2} (drop {:.2} points; cosine {:.5}, max-abs {:.4}) on {} samples of {}\n",
            a.metric, a.reference, a.optimized, a.drop, a.cosine, a.max_abs, a.samples, a.data
        );
    }
    if let Some(l) = &r.latency {
        s += &format!(
            "  latency   {:.3} ms → {:.3} ms on this host ({:.2}x)\n",
            l.reference_ms,
            l.optimized_ms,
            l.optimized_ms / l.reference_ms.max(1e-9)
        );
    }
    let ops: Vec<String> = r
        .ops
        .iter()
        .take(8)
        .map(|(n, c)| format!("{n}×{c}"))
        .collect();
    s += &format!("  ops       {}\n", ops.join(" "));
    let sens: Vec<String> = r
        .layers
        .iter()
        .filter_map(|l| l.sensitivity.map(|v| format!("{} {:+.2}", l.name, -v)))
        .collect();
    if !sens.is_empty() {
        s += &format!(
            "  per-layer accuracy change (only that layer quantized): {}\n",
            sens.join(", ")
        );
    }
    for n in &r.notes {
        s += &format!("  note: {n}\n");
    }
    s
}
