//! kiln's own passes on the typed model, run between tract's declutter and its codegen
//! wherever a model is prepared (host inference and the runner alike), where tract 0.23's
//! lowering of kiln's int8 graphs is slow. Each pass leaves what it does not recognise to
//! tract; `KILN_NO_PASSES=1` turns them all off (to compare). ARCHITECTURE.md has the table
//! of what tract does and what each pass does instead:
//!
//! - `depthwise`: quantized depthwise convs → [`KilnDepthwise`] (tract has no int8 kernel);
//! - `conv_zero_point`: uint8 activations of im2col convs offset and padded by kiln, the
//!   zero-point correction folded into the bias once;
//! - `conv_requant`: per-channel conv requantization in one [`KilnRequant`] pass;
//! - `requant_per_channel`: quantized einsums (1x1 convs, `MatMulInteger`) as plain int8
//!   einsums, which tract merges into one matmul and whose fixed-point requantization it fuses;
//! - `quantize_linear`: f32 → 8-bit quantization through [`KilnRequant`]'s vectorized loop.
//!
//! Host, 1 thread: MobileNetV2-224 int8 48.7 → 14.3 ms, ResNet-18 int8 49.9 → 30.9 ms.

use anyhow::{Context, Result};
use tract_core::internal::*;
use tract_core::ops::einsum::EinSum;

use crate::kernels::{KilnDepthwise, KilnRequant};

/// Fixed-point shifts tried for the per-channel multipliers, smallest first. An accumulator
/// overflows int32 only when its requantized value exceeds 2^(31-shift) quantization steps:
/// 2^15 at 16 (128x past the 8-bit range the calibration saw), 2^13 at 18 (32x).
const SHIFTS: [i32; 3] = [16, 17, 18];

/// Smallest multiplier `round(r × 2^shift)` accepted: its rounding changes the channel's
/// scale by at most 1/(2·32) = 1.6%, the error kiln already accepts when it gives a conv
/// per-tensor weights (3% worst channel). Coarser layers keep tract's f32 requantization.
const MIN_MULTIPLIER: f64 = 32.0;

/// What the passes changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PassStats {
    /// Quantized einsums with an 8-bit output (1x1 convs) made plain and requantized after.
    pub requant_fixed_point: usize,
    /// Of those, the ones requantized in f32 by one `KilnRequant` pass because a fixed-point
    /// multiplier would be too coarse.
    pub requant_left: usize,
    /// Quantized einsums with an int32 output (`MatMulInteger`) made plain.
    pub int32_plain: usize,
    /// Quantized depthwise convs run by `KilnDepthwise`.
    pub depthwise: usize,
    /// Quantized convs whose activation zero point moved into the bias.
    pub conv_zero_point: usize,
    /// Quantized convs with per-channel scales requantized by one `KilnRequant` pass.
    pub conv_requant: usize,
    /// f32 → 8-bit `QuantizeLinear`s run by `KilnRequant`'s vectorized loop.
    pub quantize_linear: usize,
}

/// Runs kiln's passes on `model` in place (none with `KILN_NO_PASSES` set: to compare
/// against tract's own lowering).
pub fn run(model: &mut TypedModel) -> Result<PassStats> {
    let mut stats = PassStats::default();
    if std::env::var_os("KILN_NO_PASSES").is_some() {
        return Ok(stats);
    }
    depthwise(model, &mut stats)?;
    conv_zero_point(model, &mut stats)?;
    conv_requant(model, &mut stats)?;
    requant_per_channel(model, &mut stats)?;
    quantize_linear(model, &mut stats)?;
    Ok(stats)
}

/// The ids of the nodes `keep` selects, in graph order (collected first: the passes patch
/// the model while they walk the list).
fn node_ids(model: &TypedModel, keep: impl Fn(&&TypedNode) -> bool) -> Vec<usize> {
    model.nodes().iter().filter(keep).map(|n| n.id).collect()
}

/// Replaces node `id` by `wire` (the output of `patch`) and applies the patch.
fn finish(
    model: &mut TypedModel,
    mut patch: TypedModelPatch,
    id: usize,
    wire: OutletId,
    what: impl FnOnce() -> String,
) -> Result<()> {
    patch.shunt_outside(model, id.into(), wire)?;
    patch.obliterate(id)?;
    patch.apply(model).with_context(what)
}

/// Fixed-point multipliers and shift for per-channel ratios `r`, or None when even the
/// largest shift leaves one too coarse.
fn multipliers(r: &[f64]) -> Option<(Vec<i32>, i32)> {
    SHIFTS.iter().find_map(|&shift| {
        let m: Vec<f64> = r.iter().map(|r| (r * 2f64.powi(shift)).round()).collect();
        let ok = m
            .iter()
            .zip(r)
            .all(|(m, r)| *r == 0.0 || (*m >= MIN_MULTIPLIER && *m < i32::MAX as f64));
        ok.then(|| (m.into_iter().map(|m| m as i32).collect(), shift))
    })
}

/// How an int32 accumulator is scaled to the output's quantization steps.
enum Scaling {
    /// One ratio: tract's own exact fixed-point scaler, fused into the matmul.
    PerTensor(f32),
    /// `× M[c]` (int32) then a rounding shift right by `shift`, fused into the matmul.
    FixedPoint(Vec<i32>, i32),
    /// A multiplier would be too coarse: per-channel f32 ratios in one `KilnRequant` pass.
    PerChannelF32,
}

impl Scaling {
    /// The cheapest exact-enough form for per-channel `ratios`.
    fn of(ratios: &[f64]) -> Scaling {
        if ratios.iter().all(|x| *x == ratios[0]) {
            return Scaling::PerTensor(ratios[0] as f32);
        }
        match multipliers(ratios) {
            Some((mult, shift)) => Scaling::FixedPoint(mult, shift),
            None => Scaling::PerChannelF32,
        }
    }
}

/// A quantized einsum kiln rewrites.
struct Candidate {
    /// Its plain int8 form.
    plain: Plain,
    /// For an 8-bit output; None for an int32 one (`MatMulInteger`).
    requant: Option<Requant>,
}

/// How an int32 accumulator becomes the 8-bit output.
struct Requant {
    /// Per-output-channel `a_scale · b_scale / c_scale`.
    ratios: Vec<f64>,
    /// Output zero point.
    zero_point: i32,
}

/// A quantized einsum as tract's plain einsum: activation offset to int8 if it is uint8, its
/// zero-point correction (`-a0 · Σ_k b`, constant since the weights are) folded into the
/// bias. Being a plain two-input einsum, tract merges its H and W axes into one matmul
/// (n = H·W instead of H matmuls with n = W) and fuses the requantization after it.
struct Plain {
    op: EinSum,
    /// The output axis the weights' output channels run along.
    axis: usize,
    /// Offset the uint8 activation to int8 first.
    offset: bool,
    /// Per-channel bias with the zero-point correction.
    bias: Vec<i32>,
}

/// A constant input as an f64 vector.
fn const_f64(model: &TypedModel, outlet: OutletId) -> Option<Vec<f64>> {
    let k = model.outlet_fact(outlet).ok()?.konst.clone()?;
    let k = k.cast_to::<f64>().ok()?;
    Some(k.try_as_plain_ram().ok()?.as_slice::<f64>().ok()?.to_vec())
}

/// The constant inputs of a quantized conv or einsum (tract's nine: x, w, bias, x0, x_scale,
/// w0, w_scale, y0, y_scale), each scalar or per output channel, read once per node.
struct QParams {
    /// The raw int8 weights, when they are a constant of an int8 type.
    weights: Option<Tensor>,
    bias: Vec<f64>,
    x0: Vec<f64>,
    x_scale: Vec<f64>,
    w0: Vec<f64>,
    w_scale: Vec<f64>,
    y0: Vec<f64>,
    y_scale: Vec<f64>,
}

impl QParams {
    /// The parameters of `node`, or None when one of inputs 2..9 is not a constant.
    fn of(model: &TypedModel, node: &TypedNode) -> Option<QParams> {
        if node.inputs.len() != 9 {
            return None;
        }
        let c = |i: usize| const_f64(model, node.inputs[i]);
        let weights = model.outlet_fact(node.inputs[1]).ok()?.konst.clone();
        Some(QParams {
            weights: weights
                .filter(|w| w.datum_type().unquantized() == i8::datum_type())
                .map(|w| w.into_tensor()),
            bias: c(2)?,
            x0: c(3)?,
            x_scale: c(4)?,
            w0: c(5)?,
            w_scale: c(6)?,
            y0: c(7)?,
            y_scale: c(8)?,
        })
    }

    /// The weights' raw int8 values (a cast of a quantized type would dequantize them).
    fn raw_weights(&self) -> Option<&[i8]> {
        let w = self.weights.as_ref()?;
        let bytes = w.try_as_plain_ram().ok()?.as_bytes();
        // SAFETY: i8 and u8 have the same size and alignment; the storage is int8.
        #[allow(unsafe_code)]
        Some(unsafe { std::slice::from_raw_parts(bytes.as_ptr() as *const i8, bytes.len()) })
    }

    /// Symmetric weights: every weight zero point is 0.
    fn weights_centered(&self) -> bool {
        self.w0.iter().all(|z| *z == 0.0)
    }
}

/// The one value of a scalar parameter.
fn scalar(v: &[f64]) -> Option<f64> {
    (v.len() == 1).then(|| v[0])
}

/// Channel `i` of a scalar-or-per-channel parameter of `channels` values, or None when it
/// has another length.
fn at(v: &[f64], i: usize, channels: usize) -> Option<f64> {
    match v.len() {
        1 => Some(v[0]),
        n if n == channels => Some(v[i]),
        _ => None,
    }
}

/// Combines scalar-or-per-channel scales `a · b / c` into one vector of `channels`.
fn combine(a: &[f64], b: &[f64], c: &[f64], channels: usize) -> Option<Vec<f64>> {
    (0..channels)
        .map(|i| Some(at(a, i, channels)? * at(b, i, channels)? / at(c, i, channels)?))
        .collect()
}

/// `bias[c] - x0 · sums[c]` per channel as int32, None if one overflows or `bias` has
/// another length: the bias that absorbs an activation zero point `x0`.
fn fold_zero_point(bias: &[f64], x0: i64, sums: &[i64]) -> Option<Vec<i32>> {
    let n = sums.len();
    (0..n)
        .map(|c| i32::try_from(at(bias, c, n)? as i64 - x0 * sums[c]).ok())
        .collect()
}

/// The quantized einsum at `node`, when it has the form kiln rewrites.
fn candidate(model: &TypedModel, node: &TypedNode) -> Result<Option<Candidate>> {
    let Some(einsum) = node.op_as::<EinSum>().filter(|e| e.q_params.is_some()) else {
        return Ok(None);
    };
    let out = &node.outputs[0].fact;
    let c_dt = out.datum_type.unquantized();
    let requant = c_dt == u8::datum_type() || c_dt == i8::datum_type();
    if node.inputs.len() != 9 || !(requant || c_dt == i32::datum_type()) {
        return Ok(None);
    }
    let Some(q) = QParams::of(model, node) else {
        return Ok(None);
    };
    let Some(plain) = plain_einsum(model, node, einsum, &q)? else {
        return Ok(None);
    };
    if !requant {
        return Ok(Some(Candidate {
            plain,
            requant: None,
        }));
    }
    let Some(zp) = scalar(&q.y0) else {
        return Ok(None);
    };
    // Every non-scalar scale must run along the output channel axis.
    for slot in [4, 6, 8] {
        let fact = model.outlet_fact(node.inputs[slot])?;
        for i in 0..fact.rank() {
            if fact.shape[i].is_one() {
                continue;
            }
            let o = einsum
                .axes
                .track_axis((InOut::In(slot), i), InOut::Out(0))?;
            if o != Some(plain.axis) {
                return Ok(None);
            }
        }
    }
    let Some(ratios) = combine(&q.x_scale, &q.w_scale, &q.y_scale, plain.bias.len()) else {
        return Ok(None);
    };
    Ok(Some(Candidate {
        plain,
        requant: Some(Requant {
            ratios,
            zero_point: zp as i32,
        }),
    }))
}

/// The plain form of a quantized einsum whose weights (input 1) are a constant with zero
/// point 0 and whose activation zero point is a constant scalar (see [`Plain`]).
fn plain_einsum(
    model: &TypedModel,
    node: &TypedNode,
    op: &EinSum,
    q: &QParams,
) -> Result<Option<Plain>> {
    let (Some(w), Some(raw), Some(a0)) = (&q.weights, q.raw_weights(), scalar(&q.x0)) else {
        return Ok(None);
    };
    if w.rank() != 2 || !q.weights_centered() {
        return Ok(None);
    }
    // The weights' two axes: k (shared with the activation, not in the output) and the
    // output channel.
    let mut k_pos = None;
    let mut axis = None;
    for i in 0..2 {
        let ax = op.axes.axis((InOut::In(1), i))?;
        if ax.inputs[0].len() == 1 && ax.outputs[0].is_empty() {
            k_pos = Some(i);
        } else if ax.outputs[0].len() == 1 && ax.inputs[0].is_empty() {
            axis = Some(ax.outputs[0][0]);
        }
    }
    let (Some(k_pos), Some(axis)) = (k_pos, axis) else {
        return Ok(None);
    };
    let w = tract_core::ndarray::ArrayView2::from_shape((w.shape()[0], w.shape()[1]), raw)?;
    let sum_b: Vec<i64> = w
        .lanes(tract_core::ndarray::Axis(k_pos))
        .into_iter()
        .map(|lane| lane.iter().map(|v| *v as i64).sum())
        .collect();
    let act = model.outlet_fact(node.inputs[0])?.datum_type.unquantized();
    let offset = act == u8::datum_type();
    if !offset && act != i8::datum_type() {
        return Ok(None);
    }
    let a0 = a0 as i64 - if offset { 128 } else { 0 };
    let Some(new_bias) = fold_zero_point(&q.bias, a0, &sum_b) else {
        return Ok(None);
    };
    let axes = op.axes.extract_sub_mapping(&[0, 1], &[0])?;
    let op = EinSum {
        axes,
        operating_dt: i32::datum_type(),
        q_params: None,
    };
    Ok(Some(Plain {
        op,
        axis,
        offset,
        bias: new_bias,
    }))
}

/// Rewrites per-channel quantized einsums (see the module doc).
fn requant_per_channel(model: &mut TypedModel, stats: &mut PassStats) -> Result<()> {
    let ids = node_ids(model, |n| n.op_is::<EinSum>());
    for id in ids {
        let node = model.node(id).clone();
        let Some(cand) = candidate(model, &node)? else {
            continue;
        };
        let scaling = cand.requant.as_ref().map(|r| Scaling::of(&r.ratios));
        if matches!(scaling, Some(Scaling::PerChannelF32)) {
            stats.requant_left += 1;
        }
        let out_fact = node.outputs[0].fact.clone();
        let rank = out_fact.rank();
        let name = &node.name;
        let mut patch = TypedModelPatch::new(format!("kiln requant fixed point {name}"));
        let taps = patch.taps(model, &node.inputs[0..2])?;
        let mut a = taps[0];
        if cand.plain.offset {
            a = patch.wire_node(
                format!("{name}.kiln_offset_as_i8"),
                tract_core::ops::quant::offset_u8_as_i8(),
                &[a],
            )?[0];
        }
        let mut wire = patch.wire_node(
            format!("{name}.kiln_acc"),
            cand.plain.op.clone(),
            &[a, taps[1]],
        )?[0];
        // Per-channel constants, shaped to broadcast along the output's channel axis.
        let mut shape = tvec![1usize; rank];
        shape[cand.plain.axis] = cand.plain.bias.len();
        let bias = patch.add_const(
            format!("{name}.kiln_bias"),
            tensor1(&cand.plain.bias).into_shape(&shape)?,
        )?;
        wire = patch.wire_node(
            format!("{name}.kiln_add_bias"),
            tract_core::ops::math::add(),
            &[wire, bias],
        )?[0];
        let (Some(scaling), Some(r)) = (scaling, &cand.requant) else {
            // int32 out: the plain einsum and its bias are the whole op.
            finish(model, patch, id, wire, || {
                format!("kiln int8 matmul pass on `{name}`")
            })?;
            stats.int32_plain += 1;
            continue;
        };
        let factor = match scaling {
            Scaling::PerTensor(r) => tensor0(r).broadcast_into_rank(rank)?,
            Scaling::FixedPoint(mult, shift) => {
                let m = patch.add_const(
                    format!("{name}.kiln_multiplier"),
                    tensor1(&mult).into_shape(&shape)?,
                )?;
                wire = patch.wire_node(
                    format!("{name}.kiln_mul"),
                    tract_core::ops::math::mul(),
                    &[wire, m],
                )?[0];
                tensor0(2f32.powi(-shift)).broadcast_into_rank(rank)?
            }
            Scaling::PerChannelF32 => {
                // Too coarse for fixed point: one `KilnRequant` pass over the accumulator (tract
                // would run its f32 `Scale`, the zero point, min, max and cast as five).
                let op = KilnRequant {
                    ratios: Arc::new(r.ratios.iter().map(|x| *x as f32).collect()),
                    axis: cand.plain.axis,
                    zero_point: r.zero_point,
                    out: out_fact.datum_type,
                };
                wire = patch.wire_node(format!("{name}.kiln_requant"), op, &[wire])?[0];
                finish(model, patch, id, wire, || {
                    format!("kiln requant pass on `{name}`")
                })?;
                stats.requant_fixed_point += 1;
                continue;
            }
        };
        let factor = patch.add_const(format!("{name}.kiln_scale"), factor)?;
        wire = patch.wire_node(
            format!("{name}.kiln_requant"),
            tract_core::ops::quant::scale(),
            &[factor, wire],
        )?[0];
        if r.zero_point != 0 {
            let z = patch.add_const(
                format!("{name}.kiln_zero_point"),
                tensor0(r.zero_point).broadcast_into_rank(rank)?,
            )?;
            wire = patch.wire_node(
                format!("{name}.kiln_add_zero_point"),
                tract_core::ops::math::add(),
                &[wire, z],
            )?[0];
        }
        let raw = out_fact.datum_type.unquantized();
        let bound = |v: Tensor| -> Result<Arc<Tensor>> {
            Ok(v.cast_to_dt(i32::datum_type())?
                .into_owned()
                .broadcast_into_rank(rank)?
                .into_arc_tensor())
        };
        let lo = patch.add_const(format!("{name}.kiln_min"), bound(raw.min_value())?)?;
        let hi = patch.add_const(format!("{name}.kiln_max"), bound(raw.max_value())?)?;
        wire = patch.wire_node(
            format!("{name}.kiln_clamp_hi"),
            tract_core::ops::math::min(),
            &[wire, hi],
        )?[0];
        wire = patch.wire_node(
            format!("{name}.kiln_clamp_lo"),
            tract_core::ops::math::max(),
            &[wire, lo],
        )?[0];
        wire = patch.wire_node(
            format!("{name}.kiln_cast"),
            tract_core::ops::cast::cast(out_fact.datum_type),
            &[wire],
        )?[0];
        finish(model, patch, id, wire, || {
            format!("kiln requant pass on `{name}`")
        })?;
        stats.requant_fixed_point += 1;
    }
    Ok(())
}

/// `depthwise`: a quantized depthwise conv (group = input = output channels). tract has no
/// int8 depthwise kernel: it lowers one to im2col and a grouped matmul, about 50x slower than
/// its f32 depthwise conv on MobileNetV2. [`KilnDepthwise`] convolves and requantizes it in
/// one pass over the 8-bit input.
fn depthwise(model: &mut TypedModel, stats: &mut PassStats) -> Result<()> {
    use tract_core::ops::cnn::Conv;
    let ids = node_ids(model, |n| {
        n.op_as::<Conv>().is_some_and(|c| {
            c.q_params.is_some()
                && c.group > 1
                && c.group == c.input_channels()
                && c.group == c.output_channels()
                && !c.pool_spec.data_format.c_is_last()
                && c.pool_spec.kernel_shape.len() == 2
        })
    });
    for id in ids {
        let node = model.node(id).clone();
        let conv = node.op_as::<Conv>().unwrap();
        let out = node.outputs[0].fact.clone();
        let x_fact = model.outlet_fact(node.inputs[0])?.clone();
        let eight_bit = |dt: DatumType| {
            dt.unquantized() == u8::datum_type() || dt.unquantized() == i8::datum_type()
        };
        if !eight_bit(out.datum_type) || !eight_bit(x_fact.datum_type) {
            continue;
        }
        let Some(q) = QParams::of(model, &node) else {
            continue;
        };
        let (Some(raw), Some(x0), Some(y0)) = (q.raw_weights(), scalar(&q.x0), scalar(&q.y0))
        else {
            continue;
        };
        let c = conv.group;
        let (Some(ratios), Some(bias)) = (
            combine(&q.x_scale, &q.w_scale, &q.y_scale, c),
            (0..c)
                .map(|i| at(&q.bias, i, c))
                .collect::<Option<Vec<f64>>>(),
        ) else {
            continue;
        };
        let Some(x_shape) = x_fact.shape.as_concrete().map(|s| s.to_vec()) else {
            continue;
        };
        if !q.weights_centered() {
            continue;
        }
        let weights: Vec<i16> = raw.iter().map(|w| *w as i16).collect();
        let (kh, kw) = (
            conv.pool_spec.kernel_shape[0],
            conv.pool_spec.kernel_shape[1],
        );
        let strides = conv.pool_spec.strides();
        if weights.len() != c * kh * kw || strides.iter().any(|s| *s > 8) {
            continue;
        }
        let shape = conv.pool_spec.data_format.shape(x_shape)?;
        let padding = conv.pool_spec.computed_padding(shape.hw_dims());
        let dilations = conv.pool_spec.dilations();
        let op = KilnDepthwise {
            weights: Arc::new(weights),
            bias: Arc::new(bias.iter().map(|b| *b as i32).collect()),
            ratios: Arc::new(ratios.iter().map(|r| *r as f32).collect()),
            kernel: (kh, kw),
            strides: (strides[0], strides[1]),
            dilations: (dilations[0], dilations[1]),
            pads: (
                padding[0].pad_before,
                padding[1].pad_before,
                padding[0].pad_after,
                padding[1].pad_after,
            ),
            x0: x0 as i32,
            y0: y0 as i32,
            out: out.datum_type,
        };
        let patch = TypedModelPatch::replace_single_op(model, &node, &node.inputs[0..1], op)?;
        patch
            .apply(model)
            .with_context(|| format!("kiln depthwise pass on `{}`", node.name))?;
        stats.depthwise += 1;
    }
    Ok(())
}

/// `conv_zero_point`: a quantized conv (tract's im2col path: 3x3 and larger) reading a
/// uint8 activation. tract offsets it to int8 (zero point z - 128) and corrects the
/// accumulator by `(z - 128) · Σ w` per channel, but when the int32 copy of the weights
/// exceeds its constant-folding budget (4 MB: ResNet's 256- and 512-channel 3x3 convs) it
/// casts and sums the weights again at every inference. kiln offsets the activation itself,
/// pads it explicitly with the int8 value of real zero, folds the correction into the int32
/// bias once, and hands tract a conv with zero point 0 and no padding, which needs no
/// correction at all.
fn conv_zero_point(model: &mut TypedModel, stats: &mut PassStats) -> Result<()> {
    use tract_core::ops::array::{Pad, PadMode};
    use tract_core::ops::cnn::{Conv, PaddingSpec};
    let ids = node_ids(model, |n| {
        n.op_as::<Conv>()
            .is_some_and(|c| c.q_params.is_some() && c.group == 1)
    });
    for id in ids {
        let node = model.node(id).clone();
        let conv = node.op_as::<Conv>().unwrap();
        let x_fact = model.outlet_fact(node.inputs[0])?.clone();
        let offset = match x_fact.datum_type.unquantized() {
            dt if dt == u8::datum_type() => true,
            dt if dt == i8::datum_type() => false,
            _ => continue,
        };
        let Some(q) = QParams::of(model, &node) else {
            continue;
        };
        let (Some(kernel), Some(raw), Some(x0)) = (&q.weights, q.raw_weights(), scalar(&q.x0))
        else {
            continue;
        };
        let x0 = x0 as i64 - if offset { 128 } else { 0 };
        if x0 == 0 || !q.weights_centered() {
            continue;
        }
        let Some(x_shape) = x_fact.shape.as_concrete().map(|s| s.to_vec()) else {
            continue;
        };
        // Σ w per output channel (OIHW: the first axis).
        let per = kernel.len() / kernel.shape()[0].max(1);
        let sums: Vec<i64> = raw
            .chunks(per.max(1))
            .map(|c| c.iter().map(|w| *w as i64).sum())
            .collect();
        let Some(new_bias) = fold_zero_point(&q.bias, x0, &sums) else {
            continue;
        };
        let shape = conv.pool_spec.data_format.shape(x_shape.clone())?;
        let padding = conv.pool_spec.computed_padding(shape.hw_dims());
        let name = &node.name;
        let mut patch = TypedModelPatch::new(format!("kiln conv zero point {name}"));
        let mut inputs = patch.taps(model, &node.inputs)?;
        let mut x = inputs[0];
        if offset {
            x = patch.wire_node(
                format!("{name}.kiln_offset_as_i8"),
                tract_core::ops::quant::offset_u8_as_i8(),
                &[x],
            )?[0];
        }
        let mut new_conv = conv.clone();
        if padding
            .iter()
            .any(|p| p.pad_before != 0 || p.pad_after != 0)
        {
            let mut pads = vec![(0usize, 0usize); x_shape.len()];
            for (axis, p) in shape.hw_axes().zip(&padding) {
                pads[axis] = (p.pad_before, p.pad_after);
            }
            let x_dt = patch.outlet_fact(x)?.datum_type;
            let value = tensor0(x0 as i8).cast_to_dt(x_dt)?.into_owned();
            if value.as_bytes() != [x0 as i8 as u8] {
                continue; // the cast would not keep the raw value: leave this conv to tract
            }
            x = patch.wire_node(
                format!("{name}.kiln_pad"),
                Pad {
                    pads,
                    mode: PadMode::Constant(value.into_arc_tensor()),
                },
                &[x],
            )?[0];
            new_conv.pool_spec.padding = PaddingSpec::Valid;
        }
        inputs[0] = x;
        inputs[2] = patch.add_const(format!("{name}.kiln_bias"), tensor1(&new_bias))?;
        inputs[3] = patch.add_const(format!("{name}.kiln_x0"), tensor0(0i32))?;
        let wire = patch.wire_node(format!("{name}.kiln_conv"), new_conv, &inputs)?[0];
        finish(model, patch, id, wire, || {
            format!("kiln conv zero-point pass on `{name}`")
        })?;
        stats.conv_zero_point += 1;
    }
    Ok(())
}

/// `conv_requant`: a quantized conv (im2col path) with per-channel weight scales. tract
/// requantizes its int32 output in five element-wise passes (an f32 `Scale` over a
/// broadcast per-channel tensor, zero point, min, max, cast) that it cannot fuse into the
/// matmul. kiln asks tract for the int32 accumulator and requantizes it in one pass
/// ([`KilnRequant`]).
fn conv_requant(model: &mut TypedModel, stats: &mut PassStats) -> Result<()> {
    use tract_core::ops::cnn::Conv;
    let ids = node_ids(model, |n| {
        n.op_as::<Conv>().is_some_and(|c| c.q_params.is_some())
    });
    for id in ids {
        let node = model.node(id).clone();
        let conv = node.op_as::<Conv>().unwrap();
        let out = node.outputs[0].fact.clone();
        let c_dt = out.datum_type.unquantized();
        if c_dt != u8::datum_type() && c_dt != i8::datum_type() {
            continue;
        }
        let Some(q) = QParams::of(model, &node) else {
            continue;
        };
        let Some(zp) = scalar(&q.y0) else {
            continue;
        };
        if q.w_scale.len() <= 1 {
            continue; // per tensor: tract fuses it into the matmul
        }
        let Ok(shape) = conv.pool_spec.data_format.shape(out.shape.to_tvec()) else {
            continue;
        };
        let axis = shape.c_axis();
        let Some(channels) = out.shape[axis].to_usize().ok() else {
            continue;
        };
        let Some(ratios) = combine(&q.x_scale, &q.w_scale, &q.y_scale, channels) else {
            continue;
        };
        let ratios: Vec<f32> = ratios.iter().map(|r| *r as f32).collect();
        let name = &node.name;
        let mut patch = TypedModelPatch::new(format!("kiln conv requant {name}"));
        let mut inputs = patch.taps(model, &node.inputs)?;
        let one = patch.add_const(format!("{name}.kiln_unit_scale"), tensor0(1f32))?;
        inputs[4] = one;
        inputs[6] = one;
        inputs[8] = one;
        inputs[7] = patch.add_const(format!("{name}.kiln_c0"), tensor0(0i32))?;
        let i32_conv = Conv {
            q_params: Some(i32::datum_type()),
            ..conv.clone()
        };
        let acc = patch.wire_node(format!("{name}.kiln_acc"), i32_conv, &inputs)?[0];
        let op = KilnRequant {
            ratios: Arc::new(ratios),
            axis,
            zero_point: zp as i32,
            out: out.datum_type,
        };
        let wire = patch.wire_node(format!("{name}.kiln_requant"), op, &[acc])?[0];
        finish(model, patch, id, wire, || {
            format!("kiln conv requant pass on `{name}`")
        })?;
        stats.conv_requant += 1;
    }
    Ok(())
}

/// `quantize_linear`: tract's f32 → u8/i8 `QuantizeLinear` rounds element by element
/// through a scalar function; [`KilnRequant`] (one channel, one ratio) computes the same
/// values in a loop the compiler vectorizes.
fn quantize_linear(model: &mut TypedModel, stats: &mut PassStats) -> Result<()> {
    use tract_core::ops::element_wise::ElementWiseOp;
    use tract_core::ops::quant::{QuantizeLinearI8, QuantizeLinearU8};
    for id in 0..model.nodes().len() {
        let node = &model.nodes()[id];
        let Some(ew) = node.op_as::<ElementWiseOp>() else {
            continue;
        };
        let (scale, zero_point) = if let Some(q) = ew.0.downcast_ref::<QuantizeLinearU8>() {
            (q.scale, q.zero_point as i32)
        } else if let Some(q) = ew.0.downcast_ref::<QuantizeLinearI8>() {
            (q.scale, q.zero_point as i32)
        } else {
            continue;
        };
        if model.outlet_fact(node.inputs[0])?.datum_type != f32::datum_type() {
            continue;
        }
        let op = KilnRequant {
            ratios: Arc::new(vec![scale]),
            axis: 0,
            zero_point,
            out: node.outputs[0].fact.datum_type,
        };
        let patch = TypedModelPatch::replace_single_op(model, node, &node.inputs, op)?;
        patch.apply(model)?;
        stats.quantize_linear += 1;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tract_core::ops::cnn::{Conv, KernelFormat, PaddingSpec, PoolSpec};
    use tract_core::ops::nn::DataFormat;

    /// Deterministic pseudo-random values in [lo, hi].
    fn values(n: usize, seed: u64, lo: i32, hi: i32) -> Vec<i32> {
        let mut x = seed;
        (0..n)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                lo + ((x >> 33) % (hi - lo + 1) as u64) as i32
            })
            .collect()
    }

    /// One quantized conv: per-channel int8 weights, activation zero point `x0`, uint8 out.
    struct QConv {
        ci: usize,
        co: usize,
        k: usize,
        pad: usize,
        seed: u64,
        x0: i32,
        group: usize,
        stride: usize,
        /// Channel c's weight scale is `w_scale · (1 + c/2)`.
        w_scale: f32,
    }

    fn wire(m: &mut TypedModel, name: &str, x: OutletId, c: QConv) -> Result<OutletId> {
        let QConv {
            ci,
            co,
            k,
            pad,
            seed,
            x0,
            group,
            stride,
            w_scale,
        } = c;
        let w: Vec<i8> = values(co * ci / group * k * k, seed, -127, 127)
            .into_iter()
            .map(|v| v as i8)
            .collect();
        let w = tensor1(&w).into_shape(&[co, ci / group, k, k])?;
        let ks: Vec<f32> = (0..co).map(|c| w_scale * (1.0 + 0.5 * c as f32)).collect();
        let consts = [
            w,
            tensor1(&values(co, seed + 1, -500, 500)),
            tensor0(x0),
            tensor0(0.05f32),
            tensor0(0i32),
            tensor1(&ks),
            tensor0(0i32),
            tensor0(0.08f32),
        ];
        let mut inputs = vec![x];
        for (i, t) in consts.into_iter().enumerate() {
            inputs.push(m.add_const(format!("{name}.{i}"), t)?);
        }
        let conv = Conv {
            pool_spec: PoolSpec {
                data_format: DataFormat::NCHW,
                kernel_shape: tvec!(k, k),
                padding: PaddingSpec::Explicit(tvec!(pad, pad), tvec!(pad, pad)),
                dilations: None,
                strides: Some(tvec!(stride, stride)),
                input_channels: ci,
                output_channels: co,
            },
            kernel_fmt: KernelFormat::OIHW,
            group,
            q_params: Some(u8::datum_type()),
        };
        Ok(m.wire_node(name, conv, &inputs)?[0])
    }

    /// uint8 NCHW input → k x k quantized conv (zero point 3) → 1x1 quantized conv; or a
    /// k x k depthwise conv (zero point 5) alone: the shapes of kiln's int8 conv models.
    /// `hw` is the input's height and width; `coarse` gives the 1x1 conv ratios too small for
    /// a fixed-point multiplier.
    fn model(
        k: usize,
        pad: usize,
        stride: usize,
        depthwise: bool,
        hw: usize,
        coarse: bool,
    ) -> Result<TypedModel> {
        let mut m = TypedModel::default();
        let channels = if depthwise { 16 } else { 4 };
        let x = m.add_source("x", u8::datum_type().fact([1, channels, hw, hw]))?;
        let y = if depthwise {
            let dw = QConv {
                ci: 16,
                co: 16,
                k,
                pad,
                seed: 3,
                x0: 5,
                group: 16,
                stride,
                w_scale: 0.002,
            };
            wire(&mut m, "depthwise", x, dw)?
        } else {
            let (group, seed) = (1, 1);
            let first = QConv {
                ci: 4,
                co: 8,
                k,
                pad,
                seed,
                x0: 3,
                group,
                stride,
                w_scale: 0.002,
            };
            let y = wire(&mut m, "first", x, first)?;
            let second = QConv {
                ci: 8,
                co: 16,
                k: 1,
                pad: 0,
                seed: 2,
                x0: 0,
                group,
                stride: 1,
                w_scale: if coarse { 1e-4 } else { 0.002 },
            };
            wire(&mut m, "second", y, second)?
        };
        m.select_output_outlets(&[y])?;
        Ok(m)
    }

    fn run(mut m: TypedModel, passes: bool) -> Result<(Tensor, PassStats)> {
        crate::configure_tract()?; // what exec::optimize does first (AMX int8 off)
        m.declutter()?;
        let stats = if passes {
            super::run(&mut m)?
        } else {
            PassStats::default()
        };
        m.optimize()?;
        let shape = m.input_fact(0)?.shape.as_concrete().unwrap().to_vec();
        let n: usize = shape.iter().product();
        let input: Vec<u8> = values(n, 9, 0, 255).into_iter().map(|v| v as u8).collect();
        let input = tensor1(&input).into_shape(&shape)?;
        let out = m.into_runnable()?.run(tvec!(input.into_tvalue()))?;
        Ok((out[0].clone().into_tensor(), stats))
    }

    #[test]
    fn passes_compute_what_tract_computes() {
        // 23x23 planes take KilnDepthwise through several 32-accumulator blocks and a tail,
        // 7x7 ones through the tail alone; 8x8 ones have an even width (stride-2 split).
        let cases = [(3, 1, 1), (3, 1, 2), (3, 0, 1), (1, 0, 2)];
        // `coarse`: the 1x1 conv's requantization goes through `KilnRequant` (f32 ratios).
        for ((k, pad, stride), depthwise, hw, coarse) in cases.into_iter().flat_map(|c| {
            [
                (c, false, 7, false),
                (c, false, 7, true),
                (c, true, 7, false),
                (c, true, 8, false),
                (c, true, 23, false),
            ]
        }) {
            {
                let m = || model(k, pad, stride, depthwise, hw, coarse).unwrap();
                let (want, _) = run(m(), false).unwrap();
                let (got, stats) = run(m(), true).unwrap();
                let (w, g) = (want.as_bytes(), got.as_bytes());
                assert_eq!(w.len(), g.len());
                assert!(w.iter().any(|v| *v != 0), "degenerate test data");
                let worst = w.iter().zip(g).map(|(a, b)| (*a as i32 - *b as i32).abs());
                let worst = worst.max().unwrap();
                let what = format!(
                    "kernel {k}x{k}, pad {pad}, stride {stride}, {hw}x{hw}, coarse {coarse}"
                );
                if depthwise {
                    // Exact int32 accumulation; the requantization multiplies by one f32
                    // ratio where tract's lowering rescales in its own order, so an output
                    // that falls within f32 rounding of a half step can round the other way:
                    // one step, on a handful of outputs (2 of 8464 at 23x23), never more.
                    assert_eq!(stats.depthwise, 1, "{what}: {stats:?}");
                    let n_diff = w.iter().zip(g).filter(|(a, b)| a != b).count();
                    assert!(
                        worst <= 1 && n_diff * 1000 <= w.len(),
                        "{what}: depthwise differs in {n_diff} of {} (worst {worst})",
                        w.len()
                    );
                } else {
                    assert!(
                        stats.requant_fixed_point + stats.conv_requant >= 2,
                        "{stats:?}"
                    );
                    if k == 3 {
                        assert_eq!(stats.conv_zero_point, 1, "{what}: {stats:?}");
                    }
                    assert_eq!(stats.requant_left, coarse as usize, "{what}: {stats:?}");
                    // Up to the rounding of the fixed-point multipliers: one step.
                    assert!(worst <= 1, "{what}: worst {worst}");
                }
            }
        }
    }

    #[test]
    fn kiln_requant_rounds_half_to_even_and_saturates() {
        let op = KilnRequant {
            ratios: Arc::new(vec![0.5, 1.0]),
            axis: 1,
            zero_point: 10,
            out: u8::datum_type(),
        };
        let acc = [1i32, 3, 5, -100, 300, 7];
        let mut got = vec![0u8; acc.len()];
        op.run::<i32, u8>(&acc, &[1, 2, 3], 0, 255, &mut got);
        // channel 0 (x 0.5): 0.5 → 0, 1.5 → 2, 2.5 → 2, then + 10; channel 1: -90 → 0,
        // 310 → 255, 17.
        assert_eq!(got, vec![10, 12, 12, 0, 255, 17]);
    }

    #[test]
    fn multipliers_pick_the_smallest_shift_that_is_fine_enough() {
        assert_eq!(multipliers(&[0.01, 0.5]), Some((vec![655, 32768], 16)));
        assert_eq!(multipliers(&[0.0, 0.01]), Some((vec![0, 655], 16)));
        // 0.0004 · 2^16 = 26 is too coarse, · 2^17 = 52 is fine.
        assert_eq!(multipliers(&[0.0004, 0.01]), Some((vec![52, 1311], 17)));
        assert_eq!(multipliers(&[0.00001]), None);
    }
}
