//! Small, checked helpers over ONNX protobuf graphs: typed access to initializers and
//! attributes, building nodes and tensors, fresh names, producer/consumer maps.

use std::collections::{HashMap, HashSet};

use anyhow::{Context, Result};
use tract_onnx::pb::{
    attribute_proto::AttributeType, tensor_proto::DataType, AttributeProto, GraphProto, ModelProto,
    NodeProto, TensorProto, ValueInfoProto,
};

/// The graph of a model, or an error saying the model has none.
pub fn graph(model: &ModelProto) -> Result<&GraphProto> {
    model
        .graph
        .as_ref()
        .context("the ONNX model holds no graph")
}

/// The graph of a model, mutably.
pub fn graph_mut(model: &mut ModelProto) -> Result<&mut GraphProto> {
    model
        .graph
        .as_mut()
        .context("the ONNX model holds no graph")
}

fn tensor(name: &str, dims: &[usize], data_type: DataType, raw_data: Vec<u8>) -> TensorProto {
    TensorProto {
        name: name.to_string(),
        dims: dims.iter().map(|&d| d as i64).collect(),
        data_type: data_type as i32,
        raw_data,
        ..Default::default()
    }
}

/// An f32 initializer.
pub fn f32_tensor(name: &str, dims: &[usize], data: &[f32]) -> TensorProto {
    tensor(
        name,
        dims,
        DataType::Float,
        data.iter().flat_map(|v| v.to_le_bytes()).collect(),
    )
}

/// An int8 initializer.
pub fn i8_tensor(name: &str, dims: &[usize], data: &[i8]) -> TensorProto {
    tensor(
        name,
        dims,
        DataType::Int8,
        data.iter().map(|&v| v as u8).collect(),
    )
}

/// A uint8 initializer.
pub fn u8_tensor(name: &str, dims: &[usize], data: &[u8]) -> TensorProto {
    tensor(name, dims, DataType::Uint8, data.to_vec())
}

/// An int32 initializer.
pub fn i32_tensor(name: &str, dims: &[usize], data: &[i32]) -> TensorProto {
    tensor(
        name,
        dims,
        DataType::Int32,
        data.iter().flat_map(|v| v.to_le_bytes()).collect(),
    )
}

/// An int64 initializer.
pub fn i64_tensor(name: &str, dims: &[usize], data: &[i64]) -> TensorProto {
    tensor(
        name,
        dims,
        DataType::Int64,
        data.iter().flat_map(|v| v.to_le_bytes()).collect(),
    )
}

/// A node of the default ONNX domain.
pub fn node(op: &str, name: &str, inputs: &[&str], outputs: &[&str]) -> NodeProto {
    NodeProto {
        op_type: op.to_string(),
        name: name.to_string(),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: outputs.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

/// An integer attribute.
pub fn attr_int(name: &str, v: i64) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::Int as i32,
        i: v,
        ..Default::default()
    }
}

/// An integer-list attribute.
pub fn attr_ints(name: &str, v: &[i64]) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::Ints as i32,
        ints: v.to_vec(),
        ..Default::default()
    }
}

/// The integer attribute `name` of `node`, if set.
pub fn get_int(node: &NodeProto, name: &str) -> Option<i64> {
    node.attribute.iter().find(|a| a.name == name).map(|a| a.i)
}

/// The float attribute `name` of `node`, if set.
pub fn get_float(node: &NodeProto, name: &str) -> Option<f32> {
    node.attribute.iter().find(|a| a.name == name).map(|a| a.f)
}

/// Index of graph initializers by name.
pub fn initializers(g: &GraphProto) -> HashMap<&str, &TensorProto> {
    g.initializer.iter().map(|t| (t.name.as_str(), t)).collect()
}

/// For each tensor name, the nodes (by index) that read it; graph outputs count as a reader
/// named by `usize::MAX`.
pub fn consumers(g: &GraphProto) -> HashMap<String, Vec<usize>> {
    let mut m: HashMap<String, Vec<usize>> = HashMap::new();
    for (i, n) in g.node.iter().enumerate() {
        for input in n.input.iter().filter(|s| !s.is_empty()) {
            m.entry(input.clone()).or_default().push(i);
        }
    }
    for o in &g.output {
        m.entry(o.name.clone()).or_default().push(usize::MAX);
    }
    m
}

/// Hands out names not used by any tensor or node of the graph.
pub struct Names {
    used: HashSet<String>,
}

impl Names {
    /// Collects every name used in `g`.
    pub fn of(g: &GraphProto) -> Names {
        let mut used = HashSet::new();
        for n in &g.node {
            used.insert(n.name.clone());
            used.extend(n.input.iter().cloned());
            used.extend(n.output.iter().cloned());
        }
        used.extend(g.initializer.iter().map(|t| t.name.clone()));
        used.extend(g.input.iter().map(|t| t.name.clone()));
        used.extend(g.output.iter().map(|t| t.name.clone()));
        Names { used }
    }

    /// `base` if free, else `base_2`, `base_3`...
    pub fn fresh(&mut self, base: &str) -> String {
        let mut name = base.to_string();
        let mut i = 2;
        while self.used.contains(&name) {
            name = format!("{base}_{i}");
            i += 1;
        }
        self.used.insert(name.clone());
        name
    }
}

/// Moves `Constant` nodes holding a tensor into initializers, so passes see every weight the
/// same way (exporters emit both forms).
pub fn constants_to_initializers(model: &mut ModelProto) -> Result<()> {
    let g = graph_mut(model)?;
    let mut keep = Vec::with_capacity(g.node.len());
    for n in std::mem::take(&mut g.node) {
        let tensor_attr = (n.op_type == "Constant" && n.domain.is_empty() && n.output.len() == 1)
            .then(|| {
                n.attribute
                    .iter()
                    .find(|a| a.name == "value")
                    .and_then(|a| a.t.clone())
            })
            .flatten();
        match tensor_attr {
            Some(mut t) => {
                t.name = n.output[0].clone();
                g.initializer.push(t);
            }
            None => keep.push(n),
        }
    }
    g.node = keep;
    Ok(())
}

/// Adds graph outputs for `names` (without type info: tract infers it), so a run exposes
/// these intermediate tensors.
pub fn expose_outputs(model: &mut ModelProto, names: &[String]) -> Result<()> {
    let g = graph_mut(model)?;
    let existing: HashSet<String> = g.output.iter().map(|o| o.name.clone()).collect();
    for n in names.iter().filter(|n| !existing.contains(*n)) {
        g.output.push(ValueInfoProto {
            name: n.clone(),
            ..Default::default()
        });
    }
    Ok(())
}

/// Makes sure the model imports the default domain at `min` or later (quantized ops need
/// opset 10+, per-axis QuantizeLinear 13+).
pub fn require_opset(model: &mut ModelProto, min: i64) {
    match model
        .opset_import
        .iter_mut()
        .find(|o| o.domain.is_empty() || o.domain == "ai.onnx")
    {
        Some(o) if o.version < min => o.version = min,
        Some(_) => {}
        None => model.opset_import.push(tract_onnx::pb::OperatorSetIdProto {
            domain: String::new(),
            version: min,
        }),
    }
}

/// Removes initializers no node reads any more.
pub fn drop_unused_initializers(g: &mut GraphProto) {
    let used: HashSet<&str> = g
        .node
        .iter()
        .flat_map(|n| n.input.iter().map(|s| s.as_str()))
        .chain(g.output.iter().map(|o| o.name.as_str()))
        .collect();
    let used: HashSet<String> = used.into_iter().map(|s| s.to_string()).collect();
    let dropped: HashSet<String> = g
        .initializer
        .iter()
        .filter(|t| !used.contains(&t.name))
        .map(|t| t.name.clone())
        .collect();
    g.initializer.retain(|t| used.contains(&t.name));
    // Old IR versions list initializers among the graph inputs too: drop those entries.
    g.input.retain(|i| !dropped.contains(&i.name));
}
