//! The pruning report (`kiln.prune/1`, documented in docs/json.md).

use serde::Serialize;

use crate::spec::PruneSpec;

/// Schema identifier of the prune JSON document.
pub const SCHEMA: &str = "kiln.prune/1";

/// What one layer went through.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct LayerReport {
    /// Node name.
    pub name: String,
    /// ONNX op type (Conv, Gemm, MatMul).
    pub op: String,
    /// Weight elements.
    pub params: u64,
    /// Fraction of zero weights after pruning.
    pub sparsity: f64,
    /// Output channels / units before (structured pruning).
    pub channels: Option<usize>,
    /// Output channels / units kept (structured pruning).
    pub channels_kept: Option<usize>,
    /// Output channels / units removed (structured pruning).
    pub channels_removed: Option<usize>,
    /// Channel ranking norm (structured pruning).
    pub norm: Option<String>,
    /// Why the layer was left alone, if it was.
    pub skipped: Option<String>,
}

/// Accuracy of the pruned model on an evaluation set.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct AccuracyReport {
    /// Evaluation file.
    pub eval: String,
    /// Samples evaluated.
    pub samples: usize,
    /// Top-1 accuracy of the unpruned model against the labels (null without labels).
    pub accuracy_before: Option<f64>,
    /// Top-1 accuracy of the pruned model against the labels (null without labels).
    pub accuracy_after: Option<f64>,
    /// Top-1 agreement of pruned vs unpruned outputs (classifier-shaped outputs).
    pub top1_agreement: Option<f64>,
    /// Cosine similarity of pruned vs unpruned first output.
    pub cosine: f64,
    /// Largest absolute difference of pruned vs unpruned first output.
    pub max_abs: f64,
}

/// Totals before and after.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Totals {
    /// Stored parameters (all initializers) before.
    pub params_before: u64,
    /// Stored parameters after.
    pub params_after: u64,
    /// Non-zero parameters before.
    pub nonzero_before: u64,
    /// Non-zero parameters after.
    pub nonzero_after: u64,
    /// MACs of one inference before (symbolic dims set to 1), from kiln-graph inspect.
    pub macs_before: Option<u64>,
    /// MACs after.
    pub macs_after: Option<u64>,
    /// Encoded ONNX size before.
    pub onnx_bytes_before: u64,
    /// Encoded ONNX size after.
    pub onnx_bytes_after: u64,
    /// zstd-compressed ONNX size before.
    pub zstd_bytes_before: u64,
    /// zstd-compressed ONNX size after.
    pub zstd_bytes_after: u64,
    /// zstd level used for the sizes.
    pub zstd_level: i32,
}

/// The `kiln.prune/1` document.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PruneReport {
    /// Always [`SCHEMA`].
    pub schema: &'static str,
    /// The request.
    pub spec: PruneSpec,
    /// Per prunable layer, graph order.
    pub layers: Vec<LayerReport>,
    /// Groups skipped and why, clamps, other remarks.
    pub notes: Vec<String>,
    /// Totals before and after.
    pub totals: Totals,
    /// Set when evaluation data was given.
    pub accuracy: Option<AccuracyReport>,
    /// The file written (by `kiln optimize`).
    pub output: Option<OutputFile>,
}

/// A written model and its compressed size.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct OutputFile {
    /// Path.
    pub file: String,
    /// Size.
    pub bytes: u64,
    /// Size after zstd at the report's level.
    pub zstd_bytes: u64,
}

impl PruneReport {
    /// Human-readable summary.
    pub fn to_text(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "pruned {} {:.0}% ({} scope)",
            self.spec.method.kind(),
            self.spec.method.amount() * 100.0,
            match self.spec.scope {
                crate::Scope::Layer => "layer",
                crate::Scope::Global => "global",
            }
        );
        let _ = writeln!(
            s,
            "  {:<28} {:<7} {:>9} {:>9} {:>12}",
            "layer", "op", "params", "sparsity", "channels"
        );
        for l in &self.layers {
            let ch = match (l.channels, l.channels_kept) {
                (Some(c), Some(k)) => format!("{k}/{c}"),
                _ => String::new(),
            };
            let _ = writeln!(
                s,
                "  {:<28} {:<7} {:>9} {:>8.1}% {:>12}{}",
                l.name,
                l.op,
                l.params,
                l.sparsity * 100.0,
                ch,
                l.skipped
                    .as_ref()
                    .map(|r| format!("  skipped: {r}"))
                    .unwrap_or_default()
            );
        }
        for n in &self.notes {
            let _ = writeln!(s, "  note: {n}");
        }
        let t = &self.totals;
        let _ = writeln!(
            s,
            "  params   {} -> {} ({} -> {} non-zero)",
            t.params_before, t.params_after, t.nonzero_before, t.nonzero_after
        );
        if let (Some(b), Some(a)) = (t.macs_before, t.macs_after) {
            let _ = writeln!(
                s,
                "  MACs     {:.2}M -> {:.2}M ({:.2}x)",
                b as f64 / 1e6,
                a as f64 / 1e6,
                a as f64 / b.max(1) as f64
            );
        }
        let _ = writeln!(
            s,
            "  ONNX     {} -> {} bytes; zstd -{}: {} -> {} bytes ({:.2}x of the fp32 ONNX)",
            t.onnx_bytes_before,
            t.onnx_bytes_after,
            t.zstd_level,
            t.zstd_bytes_before,
            t.zstd_bytes_after,
            t.zstd_bytes_after as f64 / t.onnx_bytes_before.max(1) as f64
        );
        if let Some(a) = &self.accuracy {
            if let (Some(b), Some(x)) = (a.accuracy_before, a.accuracy_after) {
                let _ = writeln!(
                    s,
                    "  accuracy {:.2}% -> {:.2}% on {} samples of {}",
                    b * 100.0,
                    x * 100.0,
                    a.samples,
                    a.eval
                );
            }
            let _ = writeln!(
                s,
                "  vs unpruned: cosine {:.6}, max-abs {:.3e}{}",
                a.cosine,
                a.max_abs,
                a.top1_agreement
                    .map(|t| format!(", top-1 agreement {:.2}%", t * 100.0))
                    .unwrap_or_default()
            );
        }
        s
    }
}
