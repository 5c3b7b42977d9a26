//! int8 quantization as an ONNX → ONNX rewrite into ops tract runs with integer kernels.
//!
//! - `Conv` (static) → `QuantizeLinear → QLinearConv → DequantizeLinear`: per-output-channel
//!   symmetric int8 weights, int32 bias, per-tensor 8-bit activations from calibration
//!   (uint8 for non-negative tensors, symmetric int8 otherwise; zero point always 0). A
//!   following `Relu`/`Clip(0, m)` is absorbed into the output range (uint8 saturation is the
//!   ReLU), and chains of quantized convs pass 8-bit tensors directly, without a
//!   dequantize/quantize round trip.
//! - `MatMul`/`Gemm` with a constant weight → `MatMulInteger` with per-column int8 weights;
//!   the int32 result is rescaled in f32 (`Cast`, `Mul`) and the bias added in f32.
//!   Static mode quantizes the activation per tensor (8-bit, calibrated); dynamic mode per
//!   row at run time (symmetric int8, `ReduceMax(|x|)` over the last axis), which keeps
//!   transformer activations with outlier channels accurate.
//! - `Gather` from a constant table (embeddings) → int8 table with a per-row scale.
//!
//! Why these forms: tract runs `QLinearConv`/`MatMulInteger` on int8 kernels and kiln's
//! NNEF dialect serializes them, whereas QDQ graphs stay f32 matmuls in tract (DESIGN.md).

use std::collections::{HashMap, HashSet};

use anyhow::{bail, Result};
use serde::Serialize;
use tract_onnx::pb::{ModelProto, NodeProto};
use tract_onnx::prelude::f16;

use crate::calib::act_params;
use crate::onnx::{self, Names};
use kiln_graph::proto;

/// Which int8 scheme to apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Int8Mode {
    /// Activation ranges from calibration; convolutions in int8 too.
    Static,
    /// Activation scales computed at run time per row; MatMul/Gemm/Gather only.
    Dynamic,
}

/// A layer the quantizer can convert.
#[derive(Debug, Clone, Serialize)]
pub struct Layer {
    /// ONNX node name (unique; nameless nodes get `op_index`).
    pub name: String,
    /// ONNX op type.
    pub op: String,
    /// Parameters in the layer's constant weight.
    pub params: usize,
    /// The activation tensor it reads (for calibration).
    #[serde(skip)]
    pub input: String,
    /// The tensor whose range sets the output scale (static convs).
    #[serde(skip)]
    pub output: Option<String>,
}

/// Names nameless nodes `op_index` so layers can be referred to (and kept in f32) by name.
pub fn name_nodes(model: &mut ModelProto) -> Result<()> {
    let g = onnx::graph_mut(model)?;
    let mut names = Names::of(g);
    for (i, n) in g.node.iter_mut().enumerate() {
        if n.name.is_empty() {
            n.name = names.fresh(&format!("{}_{i}", n.op_type));
        }
    }
    Ok(())
}

fn clip_bounds(
    n: &NodeProto,
    inits: &HashMap<&str, &tract_onnx::pb::TensorProto>,
) -> Option<(f32, f32)> {
    match n.op_type.as_str() {
        "Relu" => Some((0.0, f32::INFINITY)),
        "Clip" => {
            let read = |i: usize| -> Option<f32> {
                match n.input.get(i).filter(|s| !s.is_empty()) {
                    None => Some(if i == 1 {
                        f32::NEG_INFINITY
                    } else {
                        f32::INFINITY
                    }),
                    Some(name) => proto::read_f32(inits.get(name.as_str())?)
                        .ok()?
                        .data
                        .first()
                        .copied(),
                }
            };
            let (lo, hi) = if n.input.len() > 1 {
                (read(1)?, read(2)?)
            } else {
                (
                    onnx::get_float(n, "min").unwrap_or(f32::NEG_INFINITY),
                    onnx::get_float(n, "max").unwrap_or(f32::INFINITY),
                )
            };
            Some((lo, hi))
        }
        _ => None,
    }
}

/// For each conv (by node index), the activation node it can absorb: a `Relu` or a `Clip`
/// with lower bound 0 that is the conv output's only reader.
fn fusable_activations(model: &ModelProto) -> Result<HashMap<usize, usize>> {
    let g = onnx::graph(model)?;
    let consumers = onnx::consumers(g);
    let inits = onnx::initializers(g);
    let mut fused = HashMap::new();
    for (ci, c) in g.node.iter().enumerate() {
        if c.op_type != "Conv" {
            continue;
        }
        let Some(readers) = consumers.get(&c.output[0]) else {
            continue;
        };
        if readers.len() != 1 || readers[0] == usize::MAX {
            continue;
        }
        let a = &g.node[readers[0]];
        if a.input.first() != Some(&c.output[0]) {
            continue;
        }
        if let Some((lo, _)) = clip_bounds(a, &inits) {
            if lo == 0.0 {
                fused.insert(ci, readers[0]);
            }
        }
    }
    Ok(fused)
}

/// The weight granularity `quantize` picks for a conv layer (None for other ops).
pub fn conv_granularity(model: &ModelProto, layer: &Layer) -> Result<Option<Granularity>> {
    let g = onnx::graph(model)?;
    let inits = onnx::initializers(g);
    let Some(n) = g
        .node
        .iter()
        .find(|n| n.name == layer.name && n.op_type == "Conv")
    else {
        return Ok(None);
    };
    let Some(w) = n.input.get(1).and_then(|w| inits.get(w.as_str())) else {
        return Ok(None);
    };
    let w = proto::read_f32(w)?;
    Ok(Some(weight_granularity(&w.data, w.shape[0])))
}

/// Why a candidate layer is better left in f32 for speed, if it is.
///
/// Grouped convolutions that are not depthwise: tract 0.23 lowers an int8 grouped conv to
/// im2col and a grouped matmul, far slower than its f32 one (~50x on MobileNetV2's depthwise
/// convs). Depthwise convs (one input channel per group) are quantized: kiln runs them on its
/// own exact int8 kernel (`kiln_io::kernels::KilnDepthwise`: 5.9 ms over MobileNetV2-224's
/// 17 depthwise convs vs 6.2 ms for tract's f32 ones), which also saves the dequantize and
/// quantize passes around an f32 depthwise conv.
pub fn slow_in_int8(model: &ModelProto, layer: &Layer) -> Result<Option<&'static str>> {
    let g = onnx::graph(model)?;
    let Some(n) = g.node.iter().find(|n| n.name == layer.name) else {
        return Ok(None);
    };
    let group = onnx::get_int(n, "group").unwrap_or(1);
    if n.op_type != "Conv" || group <= 1 {
        return Ok(None);
    }
    let inits = onnx::initializers(g);
    let depthwise = n
        .input
        .get(1)
        .and_then(|w| inits.get(w.as_str()))
        .is_some_and(|w| w.dims.len() == 4 && w.dims[1] == 1 && w.dims[0] == group);
    if depthwise {
        return Ok(None);
    }
    Ok(Some(
        "speed: tract's int8 grouped conv is slower than its f32 one (--int8-everywhere to quantize it anyway)",
    ))
}

/// The layers `mode` can quantize, in graph order.
pub fn candidates(model: &ModelProto, mode: Int8Mode) -> Result<Vec<Layer>> {
    let g = onnx::graph(model)?;
    let inits = onnx::initializers(g);
    let fused = fusable_activations(model)?;
    let mut out = vec![];
    for (i, n) in g.node.iter().enumerate() {
        if !n.domain.is_empty() {
            continue;
        }
        let weight = |ix: usize| n.input.get(ix).and_then(|w| inits.get(w.as_str()));
        let layer = |w: &tract_onnx::pb::TensorProto, input: &str, output: Option<String>| Layer {
            name: n.name.clone(),
            op: n.op_type.clone(),
            params: w.dims.iter().product::<i64>().max(0) as usize,
            input: input.to_string(),
            output,
        };
        match n.op_type.as_str() {
            "Conv" if mode == Int8Mode::Static => {
                if let Some(w) = weight(1).filter(|w| w.dims.len() >= 3 && w.dims.len() <= 4) {
                    let out_t = match fused.get(&i) {
                        Some(&a) => g.node[a].output[0].clone(),
                        None => n.output[0].clone(),
                    };
                    out.push(layer(w, &n.input[0], Some(out_t)));
                }
            }
            "MatMul" => {
                if let Some(w) = weight(1).filter(|w| w.dims.len() == 2) {
                    out.push(layer(w, &n.input[0], None));
                }
            }
            "Gemm" => {
                let plain = onnx::get_int(n, "transA").unwrap_or(0) == 0
                    && onnx::get_float(n, "beta").unwrap_or(1.0) == 1.0;
                if let Some(w) = weight(1).filter(|w| w.dims.len() == 2 && plain) {
                    out.push(layer(w, &n.input[0], None));
                }
            }
            "Gather" => {
                let axis0 = onnx::get_int(n, "axis").unwrap_or(0) == 0;
                if let Some(w) = weight(0).filter(|w| w.dims.len() == 2 && axis0 && w.dims[0] >= 16)
                {
                    out.push(layer(w, &n.input[1], None));
                }
            }
            _ => {}
        }
    }
    Ok(out)
}

/// How a conv's weights are scaled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Granularity {
    /// One scale for the whole tensor: tract fuses the requantization into its int8 kernel.
    PerTensor,
    /// One scale per output channel: more accurate when channel ranges differ, but tract
    /// 0.23 then requantizes in separate element-wise passes (measured ~2x slower end to end
    /// on MobileNet here).
    PerChannel,
}

/// Worst per-output-channel relative L2 error of symmetric int8 quantization of `data`
/// (`out_channels` rows) when scaled with one scale per `scale_rows` rows-group (1: per
/// tensor, `out_channels`: per channel).
fn worst_channel_error(data: &[f32], out_channels: usize, per_channel: bool) -> f32 {
    let per = data.len() / out_channels.max(1);
    let (q, s) = if per_channel {
        quantize_symmetric(data, out_channels, per, true)
    } else {
        let (q, s) = quantize_symmetric(data, 1, data.len(), true);
        (q, vec![s[0]; out_channels])
    };
    let mut worst = 0f32;
    for (c, &scale) in s.iter().enumerate().take(out_channels) {
        let (mut err, mut norm) = (0f64, 0f64);
        for k in c * per..(c + 1) * per {
            let d = data[k] as f64 - q[k] as f64 * scale as f64;
            err += d * d;
            norm += data[k] as f64 * data[k] as f64;
        }
        if norm > 0.0 {
            worst = worst.max((err / norm).sqrt() as f32);
        }
    }
    worst
}

/// Per-tensor weights when no output channel loses much to them (worst channel's relative
/// error below 3%, or within 1.5x of per-channel's), else per-channel.
pub fn weight_granularity(data: &[f32], out_channels: usize) -> Granularity {
    let pt = worst_channel_error(data, out_channels, false);
    let pc = worst_channel_error(data, out_channels, true);
    if pt <= 0.03 || pt <= 1.5 * pc {
        Granularity::PerTensor
    } else {
        Granularity::PerChannel
    }
}

/// The smallest f16-representable value ≥ `s`, for a weight scale in f16's normal range
/// (else `s` itself). A scale at most 2^-11 larger never clips a weight and costs nothing
/// measurable, and it lets the NNEF writer store every per-channel scale in half the bytes
/// without changing a bit of the computation (`kiln_graph::nnef::narrow_constants`).
fn f16_exact_at_least(s: f32) -> f32 {
    let h = f16::from_f32(s);
    if !(f16::MIN_POSITIVE.to_f32()..=f16::MAX.to_f32()).contains(&s) || !h.is_finite() {
        return s;
    }
    if h.to_f32() >= s {
        h.to_f32()
    } else {
        f16::from_bits(h.to_bits() + 1).to_f32()
    }
}

/// Symmetric int8 quantization of `w` (shape [rows, cols] flattened) with one scale per
/// `axis_len` slice along `axis` (0: per row, 1: per column).
fn quantize_symmetric(
    data: &[f32],
    rows: usize,
    cols: usize,
    per_row: bool,
) -> (Vec<i8>, Vec<f32>) {
    let n_scales = if per_row { rows } else { cols };
    let mut amax = vec![0f32; n_scales];
    for r in 0..rows {
        for c in 0..cols {
            let k = if per_row { r } else { c };
            amax[k] = amax[k].max(data[r * cols + c].abs());
        }
    }
    let scales: Vec<f32> = amax
        .iter()
        .map(|&a| {
            if a > 0.0 {
                f16_exact_at_least(a / 127.0)
            } else {
                1.0
            }
        })
        .collect();
    let mut q = vec![0i8; data.len()];
    for r in 0..rows {
        for c in 0..cols {
            let s = scales[if per_row { r } else { c }];
            q[r * cols + c] = (data[r * cols + c] / s).round().clamp(-127.0, 127.0) as i8;
        }
    }
    (q, scales)
}

struct Rewriter<'a> {
    names: Names,
    nodes: Vec<NodeProto>,
    inits: Vec<tract_onnx::pb::TensorProto>,
    ranges: &'a HashMap<String, (f32, f32)>,
    /// f32 tensor → (8-bit tensor, scale init, zero-point init) already available.
    quantized: HashMap<String, (String, String, String)>,
    /// The model's default-domain opset (ReduceMax takes axes as an input from 18).
    opset: i64,
}

impl Rewriter<'_> {
    fn range(&self, tensor: &str) -> Result<(f32, f32)> {
        self.ranges.get(tensor).copied().ok_or_else(|| {
            anyhow::anyhow!("no calibration range for tensor `{tensor}` (was it observed?)")
        })
    }

    /// The 8-bit params of `tensor` as initializers (scale, zero point), made once.
    fn params(&mut self, tensor: &str) -> Result<(String, String, f32)> {
        let (lo, hi) = self.range(tensor)?;
        let p = act_params(lo, hi);
        let s = self.names.fresh(&format!("{tensor}_scale"));
        let z = self.names.fresh(&format!("{tensor}_zero_point"));
        self.inits.push(onnx::f32_tensor(&s, &[], &[p.scale]));
        self.inits.push(if p.signed {
            onnx::i8_tensor(&z, &[], &[0])
        } else {
            onnx::u8_tensor(&z, &[], &[0])
        });
        Ok((s, z, p.scale))
    }

    /// The 8-bit form of `tensor`, quantizing it if no quantized producer already gave it.
    fn quantize(&mut self, tensor: &str) -> Result<(String, String, String)> {
        if let Some(q) = self.quantized.get(tensor) {
            return Ok(q.clone());
        }
        let (s, z, _) = self.params(tensor)?;
        let q = self.names.fresh(&format!("{tensor}_quantized"));
        let name = self.names.fresh(&format!("{tensor}_QuantizeLinear"));
        self.nodes.push(onnx::node(
            "QuantizeLinear",
            &name,
            &[tensor, &s, &z],
            &[&q],
        ));
        let entry = (q, s, z);
        self.quantized.insert(tensor.to_string(), entry.clone());
        Ok(entry)
    }

    fn scale_of(&self, init: &str) -> Result<f32> {
        let t = self
            .inits
            .iter()
            .find(|t| t.name == init)
            .ok_or_else(|| anyhow::anyhow!("missing {init}"))?;
        Ok(proto::read_f32(t)?.data[0])
    }

    fn conv(
        &mut self,
        n: &NodeProto,
        w: &proto::F32Tensor,
        bias: Option<Vec<f32>>,
        out: &str,
    ) -> Result<()> {
        let (xq, xs, xz) = self.quantize(&n.input[0])?;
        let x_scale = self.scale_of(&xs)?;
        let o = w.shape[0];
        let per = w.len() / o.max(1);
        let granularity = weight_granularity(&w.data, o);
        let (wq, ws) = match granularity {
            Granularity::PerChannel => quantize_symmetric(&w.data, o, per, true),
            Granularity::PerTensor => quantize_symmetric(&w.data, 1, w.len(), true),
        };
        let base = &n.name;
        let wname = self.names.fresh(&format!("{base}.weight_int8"));
        let wsname = self.names.fresh(&format!("{base}.weight_scale"));
        let wzname = self.names.fresh(&format!("{base}.weight_zero_point"));
        self.inits.push(onnx::i8_tensor(&wname, &w.shape, &wq));
        let scale_dims: &[usize] = if ws.len() == 1 { &[] } else { &[o] };
        self.inits.push(onnx::f32_tensor(&wsname, scale_dims, &ws));
        self.inits.push(onnx::i8_tensor(&wzname, &[], &[0]));
        let (ys, yz, _) = self.params(out)?;
        let yq = self.names.fresh(&format!("{out}_quantized"));
        let mut inputs = vec![xq.as_str(), &xs, &xz, &wname, &wsname, &wzname, &ys, &yz];
        let bname;
        if let Some(b) = bias {
            let bq: Vec<i32> = b
                .iter()
                .zip(ws.iter().cycle())
                .map(|(b, s)| {
                    (b / (x_scale * s))
                        .round()
                        .clamp(i32::MIN as f32, i32::MAX as f32) as i32
                })
                .collect();
            bname = self.names.fresh(&format!("{base}.bias_int32"));
            self.inits.push(onnx::i32_tensor(&bname, &[o], &bq));
            inputs.push(&bname);
        }
        let mut conv = onnx::node(
            "QLinearConv",
            &self.names.fresh(&format!("{base}_quant")),
            &inputs,
            &[&yq],
        );
        conv.attribute = n.attribute.clone();
        self.nodes.push(conv);
        let dq = self.names.fresh(&format!("{out}_DequantizeLinear"));
        self.nodes.push(onnx::node(
            "DequantizeLinear",
            &dq,
            &[&yq, &ys, &yz],
            &[out],
        ));
        self.quantized.insert(out.to_string(), (yq, ys, yz));
        Ok(())
    }

    /// MatMul/Gemm: `x · W (+ bias)` with W [K, N] (already transposed for Gemm transB).
    fn matmul(
        &mut self,
        n: &NodeProto,
        w: &proto::F32Tensor,
        bias: Option<String>,
        alpha: f32,
        mode: Int8Mode,
    ) -> Result<()> {
        let (k, nn, w) = (w.shape[0], w.shape[1], &w.data);
        let (wq, ws) = quantize_symmetric(w, k, nn, false);
        let base = n.name.clone();
        let wname = self.names.fresh(&format!("{base}.weight_int8"));
        self.inits.push(onnx::i8_tensor(&wname, &[k, nn], &wq));
        let acc = self.names.fresh(&format!("{base}_int32"));
        let x = n.input[0].clone();
        let row_scale = match mode {
            Int8Mode::Static => {
                let (xq, xs, xz) = self.quantize(&x)?;
                let x_scale = self.scale_of(&xs)?;
                let op = self.names.fresh(&format!("{base}_quant"));
                self.nodes.push(onnx::node(
                    "MatMulInteger",
                    &op,
                    &[&xq, &wname, &xz],
                    &[&acc],
                ));
                let s: Vec<f32> = ws.iter().map(|s| s * x_scale * alpha).collect();
                let sname = self.names.fresh(&format!("{base}.output_scale"));
                self.inits.push(onnx::f32_tensor(&sname, &[nn], &s));
                (None, sname)
            }
            Int8Mode::Dynamic => {
                // Per-row symmetric int8: s = max|x| / 127 over the last axis (kept).
                let t = |names: &mut Names, s: &str| names.fresh(&format!("{base}_{s}"));
                let abs = t(&mut self.names, "abs");
                let amax = t(&mut self.names, "amax");
                let scale = t(&mut self.names, "row_scale");
                let scaled = t(&mut self.names, "scaled");
                let rounded = t(&mut self.names, "rounded");
                let clipped = t(&mut self.names, "clipped");
                let xq = t(&mut self.names, "quantized");
                let c127 = self.names.fresh(&format!("{base}.inv127"));
                let tiny = self.names.fresh(&format!("{base}.tiny"));
                let lo = self.names.fresh(&format!("{base}.lo"));
                let hi = self.names.fresh(&format!("{base}.hi"));
                let axes = self.names.fresh(&format!("{base}.axes"));
                self.inits
                    .push(onnx::f32_tensor(&c127, &[], &[1.0 / 127.0]));
                self.inits.push(onnx::f32_tensor(&tiny, &[], &[1e-12]));
                self.inits.push(onnx::f32_tensor(&lo, &[], &[-127.0]));
                self.inits.push(onnx::f32_tensor(&hi, &[], &[127.0]));
                self.inits.push(onnx::i64_tensor(&axes, &[1], &[-1]));
                let raw = t(&mut self.names, "raw_scale");
                let mut red = if self.opset >= 18 {
                    onnx::node(
                        "ReduceMax",
                        &t(&mut self.names, "reduce"),
                        &[&abs, &axes],
                        &[&amax],
                    )
                } else {
                    let mut n = onnx::node(
                        "ReduceMax",
                        &t(&mut self.names, "reduce"),
                        &[&abs],
                        &[&amax],
                    );
                    n.attribute.push(onnx::attr_ints("axes", &[-1]));
                    n
                };
                red.attribute.push(onnx::attr_int("keepdims", 1));
                let mut cast =
                    onnx::node("Cast", &t(&mut self.names, "to_int8"), &[&clipped], &[&xq]);
                cast.attribute.push(onnx::attr_int("to", 3));
                let nodes = vec![
                    onnx::node("Abs", &t(&mut self.names, "abs_op"), &[&x], &[&abs]),
                    red,
                    onnx::node(
                        "Mul",
                        &t(&mut self.names, "scale_op"),
                        &[&amax, &c127],
                        &[&raw],
                    ),
                    onnx::node(
                        "Max",
                        &t(&mut self.names, "nonzero"),
                        &[&raw, &tiny],
                        &[&scale],
                    ),
                    onnx::node("Div", &t(&mut self.names, "div"), &[&x, &scale], &[&scaled]),
                    onnx::node(
                        "Round",
                        &t(&mut self.names, "round"),
                        &[&scaled],
                        &[&rounded],
                    ),
                    onnx::node(
                        "Clip",
                        &t(&mut self.names, "clip"),
                        &[&rounded, &lo, &hi],
                        &[&clipped],
                    ),
                    cast,
                    onnx::node(
                        "MatMulInteger",
                        &t(&mut self.names, "quant"),
                        &[&xq, &wname],
                        &[&acc],
                    ),
                ];
                self.nodes.extend(nodes);
                let s: Vec<f32> = ws.iter().map(|s| s * alpha).collect();
                let sname = self.names.fresh(&format!("{base}.weight_scale"));
                self.inits.push(onnx::f32_tensor(&sname, &[nn], &s));
                (Some(scale), sname)
            }
        };
        let accf = self.names.fresh(&format!("{base}_f32"));
        let mut cast = onnx::node(
            "Cast",
            &self.names.fresh(&format!("{base}_cast")),
            &[&acc],
            &[&accf],
        );
        cast.attribute.push(onnx::attr_int("to", 1));
        self.nodes.push(cast);
        let out = n.output[0].clone();
        let mut cur = accf;
        if let Some(rs) = row_scale.0 {
            let next = self.names.fresh(&format!("{base}_row_scaled"));
            self.nodes.push(onnx::node(
                "Mul",
                &self.names.fresh(&format!("{base}_row_rescale")),
                &[&cur, &rs],
                &[&next],
            ));
            cur = next;
        }
        let scaled_name = if bias.is_some() {
            self.names.fresh(&format!("{base}_scaled"))
        } else {
            out.clone()
        };
        self.nodes.push(onnx::node(
            "Mul",
            &self.names.fresh(&format!("{base}_rescale")),
            &[&cur, &row_scale.1],
            &[&scaled_name],
        ));
        if let Some(b) = bias {
            self.nodes.push(onnx::node(
                "Add",
                &self.names.fresh(&format!("{base}_bias")),
                &[&scaled_name, &b],
                &[&out],
            ));
        }
        Ok(())
    }

    fn gather(&mut self, n: &NodeProto, w: &proto::F32Tensor) -> Result<()> {
        let (rows, cols) = (w.shape[0], w.shape[1]);
        let (wq, ws) = quantize_symmetric(&w.data, rows, cols, true);
        let base = n.name.clone();
        let wname = self.names.fresh(&format!("{base}.table_int8"));
        let sname = self.names.fresh(&format!("{base}.row_scale"));
        self.inits.push(onnx::i8_tensor(&wname, &w.shape, &wq));
        self.inits.push(onnx::f32_tensor(&sname, &[rows, 1], &ws));
        let ids = n.input[1].clone();
        let gq = self.names.fresh(&format!("{base}_int8"));
        let gs = self.names.fresh(&format!("{base}_scale"));
        let gf = self.names.fresh(&format!("{base}_f32"));
        self.nodes.push(onnx::node(
            "Gather",
            &self.names.fresh(&format!("{base}_quant")),
            &[&wname, &ids],
            &[&gq],
        ));
        self.nodes.push(onnx::node(
            "Gather",
            &self.names.fresh(&format!("{base}_scales")),
            &[&sname, &ids],
            &[&gs],
        ));
        let mut cast = onnx::node(
            "Cast",
            &self.names.fresh(&format!("{base}_cast")),
            &[&gq],
            &[&gf],
        );
        cast.attribute.push(onnx::attr_int("to", 1));
        self.nodes.push(cast);
        self.nodes.push(onnx::node(
            "Mul",
            &self.names.fresh(&format!("{base}_rescale")),
            &[&gf, &gs],
            &[&n.output[0]],
        ));
        Ok(())
    }
}

/// Quantizes the layers of `model` named in `layers` (from [`candidates`]); `ranges` holds
/// calibrated (min, max) per activation tensor (static mode).
pub fn quantize(
    model: &ModelProto,
    mode: Int8Mode,
    layers: &[Layer],
    ranges: &HashMap<String, (f32, f32)>,
) -> Result<ModelProto> {
    let mut out = model.clone();
    let fused = fusable_activations(model)?;
    let g = onnx::graph(model)?;
    let inits = onnx::initializers(g);
    let selected: HashSet<&str> = layers.iter().map(|l| l.name.as_str()).collect();
    let opset = model
        .opset_import
        .iter()
        .find(|o| o.domain.is_empty() || o.domain == "ai.onnx")
        .map(|o| o.version)
        .unwrap_or(13)
        .max(13);
    let mut rw = Rewriter {
        names: Names::of(g),
        nodes: vec![],
        inits: vec![],
        ranges,
        quantized: HashMap::new(),
        opset,
    };
    let mut skip = HashSet::new();
    for (i, n) in g.node.iter().enumerate() {
        if skip.contains(&i) {
            continue;
        }
        if !selected.contains(n.name.as_str()) {
            rw.nodes.push(n.clone());
            continue;
        }
        let ctx = || format!("quantizing node `{}` ({})", n.name, n.op_type);
        let read = |ix: usize| -> Result<proto::F32Tensor> {
            let t = n
                .input
                .get(ix)
                .and_then(|w| inits.get(w.as_str()))
                .ok_or_else(|| anyhow::anyhow!("input {ix} is not a constant"))?;
            proto::read_f32(t)
        };
        use anyhow::Context as _;
        match n.op_type.as_str() {
            "Conv" => {
                let w = read(1).with_context(ctx)?;
                let bias = match n.input.get(2).filter(|s| !s.is_empty()) {
                    Some(_) => Some(read(2).with_context(ctx)?.data),
                    None => None,
                };
                let out_t = match fused.get(&i) {
                    Some(&a) => {
                        skip.insert(a);
                        g.node[a].output[0].clone()
                    }
                    None => n.output[0].clone(),
                };
                rw.conv(n, &w, bias, &out_t).with_context(ctx)?;
            }
            "MatMul" => {
                let w = read(1).with_context(ctx)?;
                rw.matmul(n, &w, None, 1.0, mode).with_context(ctx)?;
            }
            "Gemm" => {
                let w = read(1).with_context(ctx)?;
                let (k, nn, data) = if onnx::get_int(n, "transB").unwrap_or(0) == 1 {
                    let (r, c) = (w.shape[0], w.shape[1]);
                    let mut t = vec![0f32; w.len()];
                    for i in 0..r {
                        for j in 0..c {
                            t[j * r + i] = w.data[i * c + j];
                        }
                    }
                    (c, r, t)
                } else {
                    (w.shape[0], w.shape[1], w.data.clone())
                };
                let bias = n.input.get(2).filter(|s| !s.is_empty()).cloned();
                let alpha = onnx::get_float(n, "alpha").unwrap_or(1.0);
                rw.matmul(
                    n,
                    &proto::F32Tensor {
                        shape: vec![k, nn],
                        data,
                    },
                    bias,
                    alpha,
                    mode,
                )
                .with_context(ctx)?;
            }
            "Gather" => {
                let w = read(0).with_context(ctx)?;
                rw.gather(n, &w).with_context(ctx)?;
            }
            other => bail!("node `{}`: kiln cannot quantize op {other}", n.name),
        }
    }
    let og = onnx::graph_mut(&mut out)?;
    og.node = rw.nodes;
    og.initializer.extend(rw.inits);
    remove_dead_nodes(og);
    onnx::drop_unused_initializers(og);
    onnx::require_opset(&mut out, 13);
    Ok(out)
}

/// Drops nodes none of whose outputs is read (dequantizes no f32 consumer needs).
fn remove_dead_nodes(g: &mut tract_onnx::pb::GraphProto) {
    loop {
        let consumers = onnx::consumers(g);
        let before = g.node.len();
        g.node
            .retain(|n| n.output.iter().any(|o| consumers.contains_key(o)));
        if g.node.len() == before {
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(channel_ranges: &[f32], expected: Granularity) {
        // 4 output channels × 64 weights, channel c spanning ±channel_ranges[c].
        let data: Vec<f32> = channel_ranges
            .iter()
            .flat_map(|&r| (0..64).map(move |i| r * ((i as f32 / 63.0) * 2.0 - 1.0)))
            .collect();
        assert_eq!(
            weight_granularity(&data, channel_ranges.len()),
            expected,
            "{channel_ranges:?}"
        );
    }

    #[test]
    fn granularity_follows_channel_spread() {
        check(&[1.0, 1.0, 0.9, 1.1], Granularity::PerTensor);
        check(&[1.0, 0.01, 0.02, 50.0], Granularity::PerChannel);
    }

    #[test]
    fn symmetric_quantization_round_trips_within_half_a_step() {
        let data = [0.5f32, -1.0, 0.25, 2.0, -2.0, 0.0];
        let (q, s) = quantize_symmetric(&data, 2, 3, true);
        for (i, (&v, &qv)) in data.iter().zip(&q).enumerate() {
            assert!((v - qv as f32 * s[i / 3]).abs() <= s[i / 3] / 2.0 + 1e-6);
        }
        assert_eq!(q[3], 127);
    }

    #[test]
    fn weight_scales_are_f16_exact_and_never_smaller() {
        for s in [1e-4f32, 0.0123456, 0.5, 1.0, 3.3333, 1000.1] {
            let r = f16_exact_at_least(s);
            assert!(r >= s && r <= s * (1.0 + 1.0 / 1024.0), "{s} -> {r}");
            assert_eq!(f16::from_f32(r).to_f32(), r, "{s} -> {r} is not f16-exact");
        }
        // Outside f16's normal range the scale is kept as it is.
        assert_eq!(f16_exact_at_least(1e-7), 1e-7);
        assert_eq!(f16_exact_at_least(1e6), 1e6);
        // The largest weight still maps to ±127 exactly or just inside, never clipped.
        let data = [0.0123456f32 * 127.0, -0.3, 0.1];
        let (q, s) = quantize_symmetric(&data, 1, 3, true);
        assert_eq!(f16::from_f32(s[0]).to_f32(), s[0]);
        assert_eq!(q[0], 127);
    }
}
