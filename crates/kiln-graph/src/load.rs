//! Loading ONNX and NNEF models into one `Model`: a decluttered tract `TypedModel` plus
//! what the source file says about itself (op types, initializers, opset).

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use kiln_io::InputSpec;
use tract_onnx::pb;
use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::DimLike;

/// The on-disk form a model came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelFormat {
    /// An ONNX protobuf file.
    Onnx,
    /// A tract NNEF archive (`.nnef.tar`) or directory: what kiln compiles to.
    Nnef,
}

/// One stored parameter tensor (an ONNX initializer or an NNEF constant).
#[derive(Debug, Clone, serde::Serialize)]
pub struct ParamInfo {
    /// Initializer / constant name.
    pub name: String,
    /// Element type, lowercase (`f32`, `i8`, ...).
    pub dtype: String,
    /// Dimensions.
    pub shape: Vec<usize>,
    /// Number of elements.
    pub count: u64,
    /// Bytes of raw data.
    pub bytes: u64,
}

/// A loaded model, ready to inspect, run or compile.
pub struct Model {
    /// Where it was loaded from.
    pub path: PathBuf,
    /// ONNX or NNEF.
    pub format: ModelFormat,
    /// The decluttered typed graph (symbolic dims left unless fixed at load).
    pub typed: TypedModel,
    /// Operator type of each source node, by node name (ONNX op types for ONNX models).
    pub source_ops: Vec<(String, String)>,
    /// Stored parameters (ONNX initializers, NNEF constants).
    pub params: Vec<ParamInfo>,
    /// ONNX default-domain opset, when known.
    pub opset: Option<i64>,
    /// ONNX producer name and version, when known.
    pub producer: Option<String>,
}

/// Options for [`load`].
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// Fixed shapes for named inputs (fixes symbolic dims, e.g. `batch`).
    pub input_shapes: Vec<(String, Vec<usize>)>,
}

/// Parses `NAME=1x3x224x224` (the `--input-shape` syntax).
pub fn parse_input_shape(s: &str) -> Result<(String, Vec<usize>)> {
    let (name, dims) = s
        .rsplit_once('=')
        .with_context(|| format!("`{s}` is not NAME=DIMS (for example input=1x3x224x224)"))?;
    let dims = dims
        .split(['x', ',', 'X'])
        .map(|d| d.trim().parse::<usize>())
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("`{dims}` is not a shape like 1x3x224x224"))?;
    Ok((name.to_string(), dims))
}

/// Loads an ONNX file or a kiln NNEF archive/directory.
pub fn load(path: &Path, opts: &LoadOptions) -> Result<Model> {
    if !path.exists() {
        bail!("model file {} does not exist", path.display());
    }
    if is_nnef(path)? {
        load_nnef(path, opts)
    } else {
        load_onnx(path, opts)
    }
}

fn is_nnef(path: &Path) -> Result<bool> {
    if path.is_dir() {
        return Ok(path.join("graph.nnef").exists());
    }
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_lowercase())
        .unwrap_or_default();
    if name.ends_with(".tar") || name.ends_with(".nnef.tgz") || name.ends_with(".nnef") {
        return Ok(true);
    }
    // A tar file carries "ustar" at offset 257.
    let head = fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(head.len() > 262 && &head[257..262] == b"ustar")
}

/// The NNEF framework kiln writes and the runner reads: tract-core's registry only, so
/// whatever the host writes, the runner can load.
pub fn nnef() -> tract_nnef::internal::Nnef {
    kiln_io::nnef::framework()
}

fn load_nnef(path: &Path, opts: &LoadOptions) -> Result<Model> {
    let typed = nnef()
        .model_for_path(path)
        .with_context(|| format!("{} is not a loadable tract NNEF model", path.display()))?;
    let typed =
        fix_shapes(typed, &opts.input_shapes).with_context(|| format!("{}", path.display()))?;
    let mut params = vec![];
    let mut source_ops = vec![];
    for node in typed.nodes() {
        if let Some(c) = node.op_as::<tract_onnx::tract_core::ops::konst::Const>() {
            params.push(param_info(&node.name, c.val()));
        } else if !node.op_is::<tract_onnx::tract_core::ops::source::TypedSource>() {
            source_ops.push((node.name.clone(), node.op.name().to_string()));
        }
    }
    Ok(Model {
        path: path.into(),
        format: ModelFormat::Nnef,
        typed,
        source_ops,
        params,
        opset: None,
        producer: None,
    })
}

fn param_info(name: &str, t: &Tensor) -> ParamInfo {
    ParamInfo {
        name: name.to_string(),
        dtype: dtype_name(t.datum_type()),
        shape: t.shape().to_vec(),
        count: t.len() as u64,
        bytes: (t.len() * t.datum_type().size_of()) as u64,
    }
}

/// Lowercase short name of a tract datum type (`f32`, `i64`, `qi8`...).
pub fn dtype_name(dt: DatumType) -> String {
    format!("{dt:?}").to_lowercase()
}

fn onnx_dtype(elem_type: i32) -> (&'static str, u64) {
    // onnx.TensorProto.DataType
    match elem_type {
        1 => ("f32", 4),
        2 => ("u8", 1),
        3 => ("i8", 1),
        4 => ("u16", 2),
        5 => ("i16", 2),
        6 => ("i32", 4),
        7 => ("i64", 8),
        9 => ("bool", 1),
        10 => ("f16", 2),
        11 => ("f64", 8),
        12 => ("u32", 4),
        13 => ("u64", 8),
        16 => ("bf16", 2),
        _ => ("other", 0),
    }
}

/// Loads an ONNX model from memory (e.g. a pass's output); `path` names it in messages and
/// its parent folder resolves external data.
pub fn load_onnx_bytes(bytes: &[u8], path: &Path, opts: &LoadOptions) -> Result<Model> {
    load_onnx_proto(&crate::proto::parse(bytes, path)?, path, opts)
}

fn load_onnx(path: &Path, opts: &LoadOptions) -> Result<Model> {
    let proto = crate::proto::read_onnx_proto(path)?;
    load_onnx_proto(&proto, path, opts)
}

/// Loads an ONNX model held in memory; `path` names it in messages and locates external
/// data (its directory).
pub fn load_onnx_proto(proto: &pb::ModelProto, path: &Path, opts: &LoadOptions) -> Result<Model> {
    if crate::prequant::needs_rewrite(proto) {
        let mut rewritten = proto.clone();
        crate::prequant::rewrite(&mut rewritten);
        return load_onnx_proto(&rewritten, path, opts);
    }
    let onnx = tract_onnx::onnx();
    let Some(graph) = proto.graph.as_ref().filter(|g| !g.output.is_empty()) else {
        bail!(
            "{} is not an ONNX model: it holds no graph with outputs (is it another kind of file?)",
            path.display()
        );
    };
    let opset = proto
        .opset_import
        .iter()
        .find(|o| o.domain.is_empty() || o.domain == "ai.onnx")
        .map(|o| o.version);
    for node in &graph.node {
        if !onnx.op_register.0.contains_key(&node.op_type) {
            bail!(
                "{}: op `{}` (node `{}`{}, opset {}) is not supported by tract {}; \
                 kiln cannot load this model. Re-export it without this op, or replace the node.",
                path.display(),
                node.op_type,
                node.name,
                if node.domain.is_empty() {
                    String::new()
                } else {
                    format!(", domain `{}`", node.domain)
                },
                opset
                    .map(|o| o.to_string())
                    .unwrap_or_else(|| "unknown".into()),
                kiln_io::TRACT_VERSION
            );
        }
    }
    let params = graph
        .initializer
        .iter()
        .map(|t| {
            let (dtype, size) = onnx_dtype(t.data_type);
            let count = t.dims.iter().map(|&d| d.max(0) as u64).product::<u64>();
            let bytes = if t.raw_data.is_empty() {
                count * size
            } else {
                t.raw_data.len() as u64
            };
            ParamInfo {
                name: t.name.clone(),
                dtype: dtype.into(),
                shape: t.dims.iter().map(|&d| d as usize).collect(),
                count,
                bytes,
            }
        })
        .collect();
    let source_ops = graph
        .node
        .iter()
        .map(|n| (n.name.clone(), n.op_type.clone()))
        .collect();
    let producer = (!proto.producer_name.is_empty()).then(|| {
        format!("{} {}", proto.producer_name, proto.producer_version)
            .trim()
            .to_string()
    });

    let model_dir = path.parent().and_then(|p| p.to_str());
    let mut inference = onnx
        .parse(proto, model_dir)
        .map(|r| r.model)
        .with_context(|| format!("{}: cannot build the graph", path.display()))?;
    for (name, shape) in &opts.input_shapes {
        let ix = input_index(
            inference.input_outlets()?,
            |o| inference.node(o.node).name.clone(),
            name,
        )
        .with_context(|| format!("{}: --input-shape", path.display()))?;
        let dt = inference
            .input_fact(ix)?
            .datum_type()
            .unwrap_or(f32::datum_type());
        inference.set_input_fact(ix, InferenceFact::dt_shape(dt, shape.clone()))?;
    }
    let typed = inference
        .into_typed()
        .and_then(|m| m.into_decluttered())
        .map_err(|e| {
            anyhow::anyhow!("{}: tract cannot analyse this model: {e:#}", path.display())
        })?;
    Ok(Model {
        path: path.into(),
        format: ModelFormat::Onnx,
        typed,
        source_ops,
        params,
        opset,
        producer,
    })
}

fn input_index(
    outlets: &[OutletId],
    name_of: impl Fn(&OutletId) -> String,
    name: &str,
) -> Result<usize> {
    let names: Vec<String> = outlets.iter().map(&name_of).collect();
    names.iter().position(|n| n == name).with_context(|| {
        format!(
            "the model has no input named `{name}`; its inputs are: {}",
            names.join(", ")
        )
    })
}

/// Substitutes symbolic input dimensions with the given concrete shapes.
fn fix_shapes(typed: TypedModel, shapes: &[(String, Vec<usize>)]) -> Result<TypedModel> {
    if shapes.is_empty() {
        return Ok(typed);
    }
    let mut subs = HashMap::new();
    for (name, shape) in shapes {
        let ix = input_index(
            typed.input_outlets()?,
            |o| typed.node(o.node).name.clone(),
            name,
        )?;
        let fact = typed.input_fact(ix)?;
        if fact.rank() != shape.len() {
            bail!(
                "input `{name}` has rank {}, --input-shape gives {} dims",
                fact.rank(),
                shape.len()
            );
        }
        for (dim, &want) in fact.shape.iter().zip(shape) {
            match dim.to_usize() {
                Ok(d) if d != want => bail!(
                    "input `{name}` has fixed shape {:?}; cannot set it to {shape:?}",
                    fact.shape
                ),
                Ok(_) => {}
                Err(_) => {
                    for sym in dim.symbols() {
                        subs.insert(sym, TDim::Val(want as i64));
                    }
                }
            }
        }
    }
    typed.set_symbols(&subs)
}

impl Model {
    /// The model's inputs as data must match them.
    pub fn input_specs(&self) -> Result<Vec<InputSpec>> {
        kiln_io::exec::input_specs(&self.typed)
    }

    /// Output names, in model output order.
    pub fn output_names(&self) -> Result<Vec<String>> {
        kiln_io::exec::output_names(&self.typed)
    }
}

/// A model's short name: its file stem, or its folder's name for `.../NAME/model.onnx`.
pub fn model_stem(path: &Path) -> String {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    let stem = name
        .trim_end_matches(".onnx")
        .trim_end_matches(".tar")
        .trim_end_matches(".nnef");
    // `fixtures/cnn/model.onnx` -> `cnn`: a folder name says more than `model`.
    if stem == "model" {
        if let Some(dir) = path.parent().and_then(|p| p.file_name()) {
            return dir.to_string_lossy().into_owned();
        }
    }
    stem.to_string()
}
