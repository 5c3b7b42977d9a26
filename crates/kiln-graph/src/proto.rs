//! ONNX protobuf in memory, for the graph passes (kiln-opt, kiln-prune): read, parse and
//! encode models, and read initializer values.

use std::fs;
use std::path::Path;

use anyhow::{bail, Context, Result};
use prost::Message;
use tract_onnx::pb::{self, tensor_proto::DataType, TensorProto};
use tract_onnx::prelude::{f16, Framework};

/// Reads and parses an ONNX file into its protobuf form (what kiln's graph passes edit).
pub fn read_onnx_proto(path: &Path) -> Result<pb::ModelProto> {
    if !path.exists() {
        bail!("model file {} does not exist", path.display());
    }
    let bytes = fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    parse(&bytes, path)
}

/// Parses ONNX protobuf bytes; `path` names them in the error.
pub fn parse(bytes: &[u8], path: &Path) -> Result<pb::ModelProto> {
    tract_onnx::onnx()
        .proto_model_for_read(&mut &bytes[..])
        .map_err(|e| {
            anyhow::anyhow!(
                "{} is not a valid ONNX model: the protobuf does not parse ({e}). \
                 Is the file truncated or corrupted, or not an .onnx file?",
                path.display()
            )
        })
}

/// Serializes a model to ONNX protobuf bytes.
pub fn to_bytes(model: &pb::ModelProto) -> Vec<u8> {
    model.encode_to_vec()
}

/// A dense tensor read from an initializer: shape and values widened to f32.
#[derive(Debug, Clone, PartialEq)]
pub struct F32Tensor {
    /// Dimensions.
    pub shape: Vec<usize>,
    /// Row-major values.
    pub data: Vec<f32>,
}

impl F32Tensor {
    /// Number of elements.
    pub fn len(&self) -> usize {
        self.data.len()
    }

    /// True when the tensor holds no element.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
}

/// Reads an f32 (or f16/f64/integer) initializer as f32 values.
pub fn read_f32(t: &TensorProto) -> Result<F32Tensor> {
    let shape: Vec<usize> = t.dims.iter().map(|&d| d.max(0) as usize).collect();
    let count: usize = shape.iter().product();
    if t.data_location == Some(1) {
        bail!(
            "tensor `{}` keeps its data in an external file; kiln's passes need it inline",
            t.name
        );
    }
    let raw = &t.raw_data;
    let data: Vec<f32> = match DataType::try_from(t.data_type).ok() {
        Some(DataType::Float) if !raw.is_empty() => raw
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Some(DataType::Float) => t.float_data.clone(),
        Some(DataType::Float16) if !raw.is_empty() => raw
            .chunks_exact(2)
            .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Some(DataType::Double) if !raw.is_empty() => raw
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().unwrap_or([0; 8])) as f32)
            .collect(),
        Some(DataType::Double) => t.double_data.iter().map(|&v| v as f32).collect(),
        Some(DataType::Int64) if !raw.is_empty() => raw
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap_or([0; 8])) as f32)
            .collect(),
        Some(DataType::Int64) => t.int64_data.iter().map(|&v| v as f32).collect(),
        Some(DataType::Int32) if !raw.is_empty() => raw
            .chunks_exact(4)
            .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f32)
            .collect(),
        Some(DataType::Int32) => t.int32_data.iter().map(|&v| v as f32).collect(),
        other => bail!(
            "tensor `{}` has element type {other:?}, not a float tensor",
            t.name
        ),
    };
    if data.len() != count {
        bail!(
            "tensor `{}` should hold {count} values for shape {shape:?} but holds {}",
            t.name,
            data.len()
        );
    }
    Ok(F32Tensor { shape, data })
}
