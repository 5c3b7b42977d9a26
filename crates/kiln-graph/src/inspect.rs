//! `kiln inspect`: inputs/outputs, op histogram, parameters by dtype, MACs, largest tensors.
//!
//! The JSON form is versioned (`schema: "kiln.inspect/1"`) and documented in `docs/json.md`.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write;

use anyhow::Result;
use serde::Serialize;
use tract_onnx::prelude::*;
use tract_onnx::tract_core::ops::Cost;

use crate::load::{dtype_name, Model, ModelFormat, ParamInfo};

/// Schema identifier of the inspect JSON document.
pub const SCHEMA: &str = "kiln.inspect/1";

/// A model's vital statistics.
#[derive(Debug, Clone, Serialize)]
pub struct Inspection {
    /// Always [`SCHEMA`].
    pub schema: &'static str,
    /// Path as given.
    pub model: String,
    /// `onnx` or `nnef`.
    pub format: ModelFormat,
    /// ONNX opset (default domain), if any.
    pub opset: Option<i64>,
    /// Producer of the file, if recorded.
    pub producer: Option<String>,
    /// Model inputs.
    pub inputs: Vec<TensorDesc>,
    /// Model outputs.
    pub outputs: Vec<TensorDesc>,
    /// Count of nodes per op type (source op types for ONNX).
    pub ops: BTreeMap<String, usize>,
    /// Parameter totals.
    pub params: ParamTotals,
    /// Multiply-accumulates for one inference; `None` while input dims are symbolic.
    pub macs: Option<Macs>,
    /// The largest parameter tensors, biggest first (at most 10).
    pub largest_params: Vec<ParamInfo>,
}

/// Name, element type and shape of one input or output.
#[derive(Debug, Clone, Serialize)]
pub struct TensorDesc {
    /// Tensor name.
    pub name: String,
    /// Element type (`f32`...).
    pub dtype: String,
    /// Dimensions: numbers, or symbol names (strings) for symbolic dims.
    pub shape: Vec<serde_json::Value>,
}

/// Parameter count and bytes, in total and per element type.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ParamTotals {
    /// Total elements over all parameter tensors.
    pub count: u64,
    /// Total bytes of parameter data.
    pub bytes: u64,
    /// Number of parameter tensors.
    pub tensors: usize,
    /// Per element type: `{count, bytes}`.
    pub by_dtype: BTreeMap<String, CountBytes>,
}

/// Elements and bytes.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CountBytes {
    /// Elements.
    pub count: u64,
    /// Bytes.
    pub bytes: u64,
}

/// Multiply-accumulate counts.
#[derive(Debug, Clone, Serialize)]
pub struct Macs {
    /// Total MACs for one inference.
    pub total: u64,
    /// MACs per source op type (Conv, Gemm, MatMul...).
    pub by_op: BTreeMap<String, u64>,
    /// MACs per source node, in graph order.
    pub by_node: Vec<(String, u64)>,
}

/// Computes the [`Inspection`] of a loaded model.
pub fn inspect(model: &Model) -> Result<Inspection> {
    let typed = &model.typed;
    let inputs = typed
        .input_outlets()?
        .iter()
        .map(|o| desc(typed.node(o.node).name.clone(), typed.outlet_fact(*o)?))
        .collect::<Result<Vec<_>>>()?;
    let outputs = model
        .output_names()?
        .into_iter()
        .zip(typed.output_outlets()?)
        .map(|(n, o)| desc(n, typed.outlet_fact(*o)?))
        .collect::<Result<Vec<_>>>()?;
    let mut ops = BTreeMap::new();
    for (_, op) in &model.source_ops {
        *ops.entry(op.clone()).or_insert(0) += 1;
    }
    let mut params = ParamTotals {
        tensors: model.params.len(),
        ..Default::default()
    };
    for p in &model.params {
        params.count += p.count;
        params.bytes += p.bytes;
        let e = params.by_dtype.entry(p.dtype.clone()).or_default();
        e.count += p.count;
        e.bytes += p.bytes;
    }
    let mut largest_params = model.params.clone();
    largest_params.sort_by(|a, b| b.bytes.cmp(&a.bytes).then(a.name.cmp(&b.name)));
    largest_params.truncate(10);
    Ok(Inspection {
        schema: SCHEMA,
        model: model.path.display().to_string(),
        format: model.format,
        opset: model.opset,
        producer: model.producer.clone(),
        inputs,
        outputs,
        ops,
        params,
        macs: macs(model)?,
        largest_params,
    })
}

fn desc(name: String, fact: &TypedFact) -> Result<TensorDesc> {
    let shape = fact
        .shape
        .iter()
        .map(|d| match d.to_i64() {
            Ok(v) => serde_json::Value::from(v),
            Err(_) => serde_json::Value::from(d.to_string()),
        })
        .collect();
    Ok(TensorDesc {
        name,
        dtype: dtype_name(fact.datum_type),
        shape,
    })
}

/// MACs from tract's own cost model (FMA counts), attributed back to source nodes.
fn macs(model: &Model) -> Result<Option<Macs>> {
    let typed = &model.typed;
    let source_op: HashMap<&str, &str> = model
        .source_ops
        .iter()
        .map(|(n, o)| (n.as_str(), o.as_str()))
        .collect();
    let mut by_node: Vec<(String, u64)> = vec![];
    let mut by_op = BTreeMap::new();
    let mut total = 0u64;
    for id in typed.eval_order()? {
        let node = typed.node(id);
        let facts = typed.node_input_facts(id)?;
        let mut fma = 0u64;
        for (cost, count) in node.op.cost(&facts)? {
            if let Cost::FMA(_) = cost {
                match count.to_i64() {
                    Ok(c) => fma += c as u64,
                    Err(_) => return Ok(None),
                }
            }
        }
        if fma == 0 {
            continue;
        }
        // Decluttering renames nodes `conv1` -> `conv1.matmul`: walk back to the source name.
        let mut name = node.name.as_str();
        while !source_op.contains_key(name) {
            match name.rsplit_once('.') {
                Some((head, _)) => name = head,
                None => break,
            }
        }
        let (name, op) = match source_op.get(name) {
            Some(op) => (name.to_string(), op.to_string()),
            None => (node.name.clone(), node.op.name().to_string()),
        };
        total += fma;
        *by_op.entry(op).or_insert(0) += fma;
        match by_node.iter_mut().find(|(n, _)| *n == name) {
            Some((_, m)) => *m += fma,
            None => by_node.push((name, fma)),
        }
    }
    Ok(Some(Macs {
        total,
        by_op,
        by_node,
    }))
}

impl Inspection {
    /// Human-readable report.
    pub fn to_text(&self) -> String {
        let mut s = String::new();
        let fmt_desc = |d: &TensorDesc| {
            let dims: Vec<String> = d
                .shape
                .iter()
                .map(|v| v.to_string().trim_matches('"').to_string())
                .collect();
            format!("  {:<20} {:<5} [{}]", d.name, d.dtype, dims.join(", "))
        };
        let _ = writeln!(
            s,
            "model    {} ({:?}{})",
            self.model,
            self.format,
            self.opset
                .map(|o| format!(", opset {o}"))
                .unwrap_or_default()
        );
        let _ = writeln!(s, "inputs");
        for d in &self.inputs {
            let _ = writeln!(s, "{}", fmt_desc(d));
        }
        let _ = writeln!(s, "outputs");
        for d in &self.outputs {
            let _ = writeln!(s, "{}", fmt_desc(d));
        }
        let _ = writeln!(
            s,
            "params   {} in {} tensors, {}",
            self.params.count,
            self.params.tensors,
            human_bytes(self.params.bytes)
        );
        for (dt, cb) in &self.params.by_dtype {
            let _ = writeln!(
                s,
                "  {:<6} {:>12} params {:>12}",
                dt,
                cb.count,
                human_bytes(cb.bytes)
            );
        }
        match &self.macs {
            Some(m) => {
                let _ = writeln!(s, "macs     {} ({:.2} M)", m.total, m.total as f64 / 1e6);
                for (op, v) in &m.by_op {
                    let _ = writeln!(s, "  {:<20} {:>14}", op, v);
                }
            }
            None => {
                let _ = writeln!(s, "macs     unknown: inputs have symbolic dims (fix them with --input-shape NAME=1x...)");
            }
        }
        let _ = writeln!(s, "ops      {} nodes", self.ops.values().sum::<usize>());
        for (op, n) in &self.ops {
            let _ = writeln!(s, "  {:<20} {:>5}", op, n);
        }
        let _ = writeln!(s, "largest params");
        for p in &self.largest_params {
            let _ = writeln!(
                s,
                "  {:<32} {:<5} {:?} {}",
                p.name,
                p.dtype,
                p.shape,
                human_bytes(p.bytes)
            );
        }
        s
    }
}

/// `1234567` -> `1.2 MB` (decimal units).
pub fn human_bytes(b: u64) -> String {
    match b {
        b if b >= 1_000_000_000 => format!("{:.2} GB", b as f64 / 1e9),
        b if b >= 1_000_000 => format!("{:.2} MB", b as f64 / 1e6),
        b if b >= 1_000 => format!("{:.1} kB", b as f64 / 1e3),
        b => format!("{b} B"),
    }
}
