//! Indexes of an ONNX graph (producers, consumers, initializers) and its prunable layers.

use std::collections::{HashMap, HashSet};

use anyhow::{bail, Context, Result};
use tract_onnx::pb::{GraphProto, ModelProto, NodeProto};

/// Lookups over a graph's nodes and tensors.
pub struct Index<'a> {
    /// The graph.
    pub graph: &'a GraphProto,
    /// Initializer position by name.
    pub init: HashMap<&'a str, usize>,
    /// Producing node by tensor name.
    pub producer: HashMap<&'a str, usize>,
    /// Consuming (node, input slot) pairs by tensor name.
    pub consumers: HashMap<&'a str, Vec<(usize, usize)>>,
    /// Graph output names.
    pub outputs: HashSet<&'a str>,
    /// Graph input names (initializers excluded).
    pub inputs: HashSet<&'a str>,
}

impl<'a> Index<'a> {
    /// Builds the index of `graph`.
    pub fn new(graph: &'a GraphProto) -> Index<'a> {
        let init: HashMap<&str, usize> = graph
            .initializer
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.as_str(), i))
            .collect();
        let mut producer = HashMap::new();
        let mut consumers: HashMap<&str, Vec<(usize, usize)>> = HashMap::new();
        for (n, node) in graph.node.iter().enumerate() {
            for o in &node.output {
                producer.insert(o.as_str(), n);
            }
            for (slot, i) in node.input.iter().enumerate() {
                if !i.is_empty() {
                    consumers.entry(i.as_str()).or_default().push((n, slot));
                }
            }
        }
        Index {
            graph,
            outputs: graph.output.iter().map(|o| o.name.as_str()).collect(),
            inputs: graph
                .input
                .iter()
                .map(|i| i.name.as_str())
                .filter(|n| !init.contains_key(n))
                .collect(),
            init,
            producer,
            consumers,
        }
    }

    /// Node `n`.
    pub fn node(&self, n: usize) -> &'a NodeProto {
        &self.graph.node[n]
    }

    /// The initializer feeding input `slot` of node `n`, if that input is one.
    pub fn init_input(&self, n: usize, slot: usize) -> Option<usize> {
        self.node(n)
            .input
            .get(slot)
            .and_then(|i| self.init.get(i.as_str()).copied())
    }

    /// How many node inputs read initializer `name`.
    pub fn uses(&self, name: &str) -> usize {
        self.consumers.get(name).map_or(0, |c| c.len())
    }
}

/// An integer attribute of a node, or `default`.
pub fn attr_i(node: &NodeProto, name: &str, default: i64) -> i64 {
    node.attribute
        .iter()
        .find(|a| a.name == name)
        .map_or(default, |a| a.i)
}

/// A node's display name: its name, or its first output when unnamed.
pub fn node_name(node: &NodeProto) -> String {
    if node.name.is_empty() {
        node.output.first().cloned().unwrap_or_default()
    } else {
        node.name.clone()
    }
}

/// A Conv, Gemm or MatMul whose weight is an f32 initializer.
#[derive(Debug, Clone)]
pub struct Layer {
    /// Node position.
    pub node: usize,
    /// Node name.
    pub name: String,
    /// ONNX op type.
    pub op: String,
    /// Weight initializer position.
    pub weight: usize,
    /// Axis of the weight indexing output channels / units.
    pub out_axis: usize,
    /// Axis of the weight indexing input channels / features.
    pub in_axis: usize,
    /// Conv `group` attribute (1 for Gemm/MatMul).
    pub group: i64,
}

/// The prunable layers of `graph`, in graph order.
pub fn layers(ix: &Index) -> Vec<Layer> {
    let mut out = vec![];
    for (n, node) in ix.graph.node.iter().enumerate() {
        let Some(w) = ix.init_input(n, 1) else {
            continue;
        };
        let t = &ix.graph.initializer[w];
        if t.data_type != 1 {
            continue;
        }
        let (out_axis, in_axis, group) = match node.op_type.as_str() {
            "Conv" if t.dims.len() >= 3 => (0, 1, attr_i(node, "group", 1)),
            "Gemm" if t.dims.len() == 2 => {
                if attr_i(node, "transB", 0) != 0 {
                    (0, 1, 1)
                } else {
                    (1, 0, 1)
                }
            }
            "MatMul" if t.dims.len() == 2 => (1, 0, 1),
            _ => continue,
        };
        out.push(Layer {
            node: n,
            name: node_name(node),
            op: node.op_type.clone(),
            weight: w,
            out_axis,
            in_axis,
            group,
        });
    }
    out
}

/// The names of layers not to prune: `skip` checked against the graph's node names, or by
/// default the first and last prunable layers.
pub fn skip_set(ix: &Index, layers: &[Layer], skip: Option<&[String]>) -> Result<HashSet<String>> {
    match skip {
        None => Ok(layers
            .first()
            .into_iter()
            .chain(layers.last())
            .map(|l| l.name.clone())
            .collect()),
        Some(names) => {
            check_names(ix, layers, names, "--prune-skip")?;
            Ok(names.iter().cloned().collect())
        }
    }
}

/// Fails on a name that is no node of the graph, listing the prunable layers.
pub fn check_names(ix: &Index, layers: &[Layer], names: &[String], what: &str) -> Result<()> {
    let all: HashSet<String> = ix.graph.node.iter().map(node_name).collect();
    for n in names {
        if !all.contains(n) {
            bail!(
                "{what}: the model has no node named `{n}`; its prunable layers are: {}",
                layers
                    .iter()
                    .map(|l| l.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
    }
    Ok(())
}

/// The graph of a model, or an error saying it has none.
pub fn graph_of(model: &ModelProto) -> Result<&GraphProto> {
    model
        .graph
        .as_ref()
        .context("the ONNX model holds no graph")
}
