//! Sensitivity scan: prune one layer at a time at 10%..90% and measure the model.

use anyhow::{Context, Result};
use kiln_io::NamedTensors;
use serde::Serialize;
use tract_onnx::pb::ModelProto;

use crate::eval;
use crate::spec::{Method, PruneSpec};

/// Schema identifier of the scan JSON document.
pub const SCHEMA: &str = "kiln.prune-scan/1";

/// The fractions every layer is pruned at.
pub const LEVELS: [f64; 9] = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9];

/// One layer's row of the scan.
#[derive(Debug, Clone, Serialize)]
pub struct ScanLayer {
    /// Node name.
    pub name: String,
    /// ONNX op type.
    pub op: String,
    /// Weight elements.
    pub params: u64,
    /// The metric at each of [`LEVELS`] (null where that level could not be applied).
    pub values: Vec<Option<f64>>,
    /// Why the layer could not be pruned at some level (or at all).
    pub note: Option<String>,
}

/// The `kiln.prune-scan/1` document.
#[derive(Debug, Clone, Serialize)]
pub struct ScanReport {
    /// Always [`SCHEMA`].
    pub schema: &'static str,
    /// `magnitude` or `channels`.
    pub method: &'static str,
    /// Evaluation file.
    pub eval: String,
    /// Samples evaluated.
    pub samples: usize,
    /// `accuracy` (top-1 vs labels), `top1_agreement` or `cosine` (vs the unpruned outputs).
    pub metric: &'static str,
    /// The metric of the unpruned model (1.0 for agreement and cosine).
    pub baseline: f64,
    /// Pruned fractions, the columns of `values`.
    pub levels: Vec<f64>,
    /// One row per prunable layer, graph order.
    pub layers: Vec<ScanLayer>,
}

/// Scans every prunable layer of `model` with `method`'s kind (its amount is ignored).
pub fn scan(
    model: &ModelProto,
    method: Method,
    base: &PruneSpec,
    data: &NamedTensors,
    origin: &str,
) -> Result<ScanReport> {
    let graph = crate::graph::graph_of(model)?;
    let ix = crate::graph::Index::new(graph);
    let layers = crate::graph::layers(&ix);
    if layers.is_empty() {
        anyhow::bail!(
            "the model has nothing to prune: no Conv, Gemm or MatMul node with an f32 weight initializer"
        );
    }
    let bytes = kiln_graph::proto::to_bytes(model);
    let original = eval::load(&bytes, "the original model")?;
    let (ref_out, acc, samples) = eval::run(&original, data, origin)?;
    let dataset = ref_out
        .first()
        .is_some_and(|(_, t)| t.rank() > original.typed.output_fact(0).map_or(0, |f| f.rank()));
    let (_, _, top1) = eval::agreement(&ref_out, &ref_out, dataset)?;
    let metric = match (acc, top1) {
        (Some(_), _) => "accuracy",
        (None, Some(_)) => "top1_agreement",
        _ => "cosine",
    };
    let mut rows = vec![];
    for l in &layers {
        let mut values = vec![];
        let mut note = None;
        for &level in &LEVELS {
            let spec = PruneSpec {
                method: method.with_amount(level),
                only: Some(vec![l.name.clone()]),
                ..base.clone()
            };
            let value = (|| -> Result<Option<f64>> {
                let (pruned, reports, _) = crate::apply(model, &spec)?;
                if let Some(r) = reports.iter().find(|r| r.name == l.name) {
                    if let Some(why) = &r.skipped {
                        note = Some(why.clone());
                        return Ok(None);
                    }
                }
                let m = eval::load(
                    &kiln_graph::proto::to_bytes(&pruned),
                    &format!("{} at {level}", l.name),
                )?;
                let (out, acc, _) = eval::run(&m, data, origin)?;
                let (cos, _, top1) = eval::agreement(&ref_out, &out, dataset)?;
                Ok(Some(match metric {
                    "accuracy" => acc.unwrap_or(0.0),
                    "top1_agreement" => top1.unwrap_or(0.0),
                    _ => cos,
                }))
            })();
            match value {
                Ok(v) => values.push(v),
                Err(e) => {
                    note = Some(format!("{e:#}"));
                    values.push(None);
                }
            }
        }
        rows.push(ScanLayer {
            name: l.name.clone(),
            op: l.op.clone(),
            params: crate::tensor::numel(&graph.initializer[l.weight].dims) as u64,
            values,
            note,
        });
    }
    Ok(ScanReport {
        schema: SCHEMA,
        method: method.kind(),
        eval: origin.to_string(),
        samples,
        metric,
        baseline: acc.unwrap_or(1.0),
        levels: LEVELS.to_vec(),
        layers: rows,
    })
}

impl ScanReport {
    /// The table: one row per layer, one column per level.
    pub fn to_text(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "{} sensitivity ({} on {} samples of {}; unpruned {:.4})",
            self.method, self.metric, self.samples, self.eval, self.baseline
        );
        let _ = write!(s, "  {:<28} {:>9}", "layer", "params");
        for l in &self.levels {
            let _ = write!(s, " {:>6}", format!("{:.0}%", l * 100.0));
        }
        let _ = writeln!(s);
        for r in &self.layers {
            let _ = write!(s, "  {:<28} {:>9}", r.name, r.params);
            for v in &r.values {
                match v {
                    Some(v) => {
                        let _ = write!(s, " {v:>6.3}");
                    }
                    None => {
                        let _ = write!(s, " {:>6}", "-");
                    }
                }
            }
            if let Some(n) = &r.note {
                let _ = write!(s, "  ({n})");
            }
            let _ = writeln!(s);
        }
        s
    }

    /// The chart as an SVG document: the metric against the pruned fraction, one line per layer.
    pub fn to_svg(&self) -> Result<String> {
        use plotters::prelude::*;
        let mut svg = String::new();
        {
            let root = SVGBackend::with_string(&mut svg, (900, 560)).into_drawing_area();
            root.fill(&WHITE).map_err(plot_err)?;
            let lo = self
                .layers
                .iter()
                .flat_map(|r| r.values.iter().flatten())
                .copied()
                .fold(self.baseline, f64::min);
            let y0 = (lo - 0.05).max(if self.metric == "cosine" { -1.0 } else { 0.0 });
            let y1 = self.baseline.max(1.0) + 0.02;
            let mut chart = ChartBuilder::on(&root)
                .caption(
                    format!("{} pruning sensitivity ({})", self.method, self.metric),
                    ("sans-serif", 20),
                )
                .margin(12)
                .x_label_area_size(40)
                .y_label_area_size(56)
                .right_y_label_area_size(0)
                .build_cartesian_2d(0f64..100f64, y0..y1)
                .map_err(plot_err)?;
            chart
                .configure_mesh()
                .x_desc("pruned fraction of the layer (%)")
                .y_desc(self.metric)
                .draw()
                .map_err(plot_err)?;
            for (i, r) in self.layers.iter().enumerate() {
                let color = Palette99::pick(i).to_rgba();
                let points: Vec<(f64, f64)> = std::iter::once((0.0, self.baseline))
                    .chain(
                        self.levels
                            .iter()
                            .zip(&r.values)
                            .filter_map(|(l, v)| v.map(|v| (l * 100.0, v))),
                    )
                    .collect();
                if points.len() < 2 {
                    continue;
                }
                chart
                    .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))
                    .map_err(plot_err)?
                    .label(r.name.clone())
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2))
                    });
                chart
                    .draw_series(points.iter().map(|&p| Circle::new(p, 3, color.filled())))
                    .map_err(plot_err)?;
            }
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .position(SeriesLabelPosition::LowerLeft)
                .draw()
                .map_err(plot_err)?;
            root.present().map_err(plot_err)?;
        }
        Ok(svg)
    }
}

fn plot_err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow::anyhow!("cannot draw the chart: {e:?}")
}

/// Writes the chart of `report` to `path` (atomically).
pub fn write_svg(report: &ScanReport, path: &std::path::Path) -> Result<()> {
    let svg = report.to_svg()?;
    kiln_io::fsutil::write_atomic(path, svg.as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))
}
