//! kiln's own passes on the typed model, run between tract's declutter and its codegen
//! wherever a model is prepared (host inference and the runner alike), where tract 0.23's
//! lowering of kiln's int8 graphs is slow.
//!
//! `requant_per_channel`: a quantized einsum (what tract makes of a quantized 1x1 conv, or
//! `QLinearMatMul`) with per-output-channel weight scales. tract lowers it as H separate
//! matmuls with n = W (its axis merging skips quantized einsums), requantizes the int32
//! accumulator with an f32 `Scale` over a broadcast per-channel tensor plus add, min, max and
//! cast passes it cannot fuse, and sums the weights again at every run when they are too big
//! to constant-fold. kiln rewrites it as a plain int8 × int8 → int32 einsum (the activation
//! offset to int8, its zero-point correction folded into the bias), then requantizes in fixed
//! point: `acc × M[c]` (int32 per-row multiply), one per-tensor `Scale` by `2^-shift`
//! (tract's rounding shift), the zero point, the clamp and the cast. tract merges H·W into
//! one matmul and fuses every one of those into the kernel's epilogue.
//! Measured on MobileNetV2-224 int8 (host, 1 thread): 48.7 → 24.9 ms.

use anyhow::{Context, Result};
use tract_core::internal::*;
use tract_core::ops::einsum::EinSum;

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
    /// Quantized einsums (1x1 convs) whose per-channel requantization became fixed point.
    pub requant_fixed_point: usize,
    /// Per-channel einsums left to tract (a multiplier would be too coarse).
    pub requant_left: usize,
}

/// Runs kiln's passes on `model` in place (none with `KILN_NO_PASSES` set: to compare
/// against tract's own lowering).
pub fn run(model: &mut TypedModel) -> Result<PassStats> {
    crate::configure_tract()?;
    let mut stats = PassStats::default();
    if std::env::var_os("KILN_NO_PASSES").is_some() {
        return Ok(stats);
    }
    requant_per_channel(model, &mut stats)?;
    Ok(stats)
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

/// A quantized einsum kiln can requantize in fixed point.
struct Candidate {
    /// Its plain int8 form.
    plain: Plain,
    /// Per-output-channel `a_scale · b_scale / c_scale`.
    ratios: Vec<f64>,
    /// The output axis the ratios run along.
    axis: usize,
    /// Output zero point.
    zero_point: i32,
}

/// A quantized einsum as tract's plain einsum: activation offset to int8 if it is uint8, its
/// zero-point correction (`-a0 · Σ_k b`, constant since the weights are) folded into the
/// bias. Being a plain two-input einsum, tract merges its H and W axes into one matmul
/// (n = H·W instead of H matmuls with n = W) and fuses the requantization after it.
struct Plain {
    op: EinSum,
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

/// Combines scalar-or-per-channel scales `a · b / c` into one vector of `channels`.
fn combine(a: &[f64], b: &[f64], c: &[f64], channels: usize) -> Option<Vec<f64>> {
    let at = |v: &[f64], i: usize| match v.len() {
        1 => Some(v[0]),
        n if n == channels => Some(v[i]),
        _ => None,
    };
    (0..channels)
        .map(|i| Some(at(a, i)? * at(b, i)? / at(c, i)?))
        .collect()
}

/// The quantized einsum at `node` when its requantization is per channel.
fn candidate(model: &TypedModel, node: &TypedNode) -> Result<Option<Candidate>> {
    let out = &node.outputs[0].fact;
    let c_dt = out.datum_type.unquantized();
    if node.inputs.len() != 9 || (c_dt != u8::datum_type() && c_dt != i8::datum_type()) {
        return Ok(None);
    }
    let scales = [4, 6, 8].map(|i| const_f64(model, node.inputs[i]));
    let [Some(a), Some(b), Some(c)] = scales else {
        return Ok(None);
    };
    if a.len() <= 1 && b.len() <= 1 && c.len() <= 1 {
        return Ok(None); // per tensor: tract fuses it already
    }
    let Some(zp) = const_f64(model, node.inputs[7]).filter(|z| z.len() == 1) else {
        return Ok(None);
    };
    let Some(einsum) = node.op_as::<EinSum>().filter(|e| e.q_params.is_some()) else {
        return Ok(None);
    };
    // Every non-scalar scale must run along one and the same output axis.
    let mut axis = None;
    for slot in [4, 6, 8] {
        let fact = model.outlet_fact(node.inputs[slot])?;
        for i in 0..fact.rank() {
            if fact.shape[i].is_one() {
                continue;
            }
            let Some(o) = einsum
                .axes
                .track_axis((InOut::In(slot), i), InOut::Out(0))?
            else {
                return Ok(None);
            };
            if axis.is_some_and(|a| a != o) {
                return Ok(None);
            }
            axis = Some(o);
        }
    }
    let Some(axis) = axis else { return Ok(None) };
    let Some(plain) = plain_einsum(model, node, einsum, axis)? else {
        return Ok(None);
    };
    let Some(ratios) = combine(&a, &b, &c, plain.bias.len()) else {
        return Ok(None);
    };
    Ok(Some(Candidate {
        plain,
        ratios,
        axis,
        zero_point: zp[0] as i32,
    }))
}

/// The plain form of a quantized einsum whose weights (input 1) are a constant with zero
/// point 0 and whose activation zero point is a constant scalar (see [`Plain`]).
fn plain_einsum(
    model: &TypedModel,
    node: &TypedNode,
    op: &EinSum,
    axis: usize,
) -> Result<Option<Plain>> {
    let weights = model.outlet_fact(node.inputs[1])?;
    let (Some(w), 2) = (weights.konst.clone(), weights.rank()) else {
        return Ok(None);
    };
    let (Some(a0), Some(b0), Some(bias)) = (
        const_f64(model, node.inputs[3]).filter(|v| v.len() == 1),
        const_f64(model, node.inputs[5]),
        const_f64(model, node.inputs[2]),
    ) else {
        return Ok(None);
    };
    if b0.iter().any(|z| *z != 0.0) {
        return Ok(None);
    }
    // The weights' two axes: k (shared with the activation, not in the output) and the
    // output channel.
    let mut k_pos = None;
    let mut c_pos = None;
    for i in 0..2 {
        let ax = op.axes.axis((InOut::In(1), i))?;
        if !ax.inputs[0].is_empty() && ax.outputs[0].is_empty() {
            k_pos = Some(i);
        } else if ax.outputs[0].first() == Some(&axis) && ax.inputs[0].is_empty() {
            c_pos = Some(i);
        }
    }
    let (Some(k_pos), Some(_)) = (k_pos, c_pos) else {
        return Ok(None);
    };
    let w = w.cast_to::<i32>()?;
    let w = w.to_plain_array_view::<i32>()?;
    let sum_b: Vec<i64> = w
        .lanes(tract_core::ndarray::Axis(k_pos))
        .into_iter()
        .map(|lane| lane.iter().map(|v| *v as i64).sum())
        .collect();
    let channels = sum_b.len();
    if bias.len() != 1 && bias.len() != channels {
        return Ok(None);
    }
    let act = model.outlet_fact(node.inputs[0])?.datum_type.unquantized();
    let offset = act == u8::datum_type();
    if !offset && act != i8::datum_type() {
        return Ok(None);
    }
    let a0 = a0[0] as i64 - if offset { 128 } else { 0 };
    let mut new_bias = vec![];
    for (c, s) in sum_b.iter().enumerate() {
        let v = bias[if bias.len() == 1 { 0 } else { c }] as i64 - a0 * s;
        let Ok(v) = i32::try_from(v) else {
            return Ok(None);
        };
        new_bias.push(v);
    }
    let axes = op.axes.extract_sub_mapping(&[0, 1], &[0])?;
    let op = EinSum {
        axes,
        operating_dt: i32::datum_type(),
        q_params: None,
    };
    Ok(Some(Plain {
        op,
        offset,
        bias: new_bias,
    }))
}

/// Rewrites per-channel quantized einsums (see the module doc).
fn requant_per_channel(model: &mut TypedModel, stats: &mut PassStats) -> Result<()> {
    let ids: Vec<usize> = model
        .nodes()
        .iter()
        .filter(|n| n.op_is::<EinSum>())
        .map(|n| n.id)
        .collect();
    for id in ids {
        let node = model.node(id).clone();
        let Some(cand) = candidate(model, &node)? else {
            continue;
        };
        let Some((mult, shift)) = multipliers(&cand.ratios) else {
            stats.requant_left += 1;
            continue;
        };
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
        shape[cand.axis] = mult.len();
        let bias = patch.add_const(
            format!("{name}.kiln_bias"),
            tensor1(&cand.plain.bias).into_shape(&shape)?,
        )?;
        wire = patch.wire_node(
            format!("{name}.kiln_add_bias"),
            tract_core::ops::math::add(),
            &[wire, bias],
        )?[0];
        let m = patch.add_const(
            format!("{name}.kiln_multiplier"),
            tensor1(&mult).into_shape(&shape)?,
        )?;
        wire = patch.wire_node(
            format!("{name}.kiln_mul"),
            tract_core::ops::math::mul(),
            &[wire, m],
        )?[0];
        let shift = patch.add_const(
            format!("{name}.kiln_shift"),
            tensor0(2f32.powi(-shift)).broadcast_into_rank(rank)?,
        )?;
        wire = patch.wire_node(
            format!("{name}.kiln_shift_right"),
            tract_core::ops::quant::scale(),
            &[shift, wire],
        )?[0];
        if cand.zero_point != 0 {
            let z = patch.add_const(
                format!("{name}.kiln_zero_point"),
                tensor0(cand.zero_point).broadcast_into_rank(rank)?,
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
        patch.shunt_outside(model, id.into(), wire)?;
        patch.obliterate(id)?;
        patch
            .apply(model)
            .with_context(|| format!("kiln requant pass on `{name}`"))?;
        stats.requant_fixed_point += 1;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multipliers_pick_the_smallest_shift_that_is_fine_enough() {
        assert_eq!(multipliers(&[0.01, 0.5]), Some((vec![655, 32768], 16)));
        assert_eq!(multipliers(&[0.0, 0.01]), Some((vec![0, 655], 16)));
        // 0.0004 · 2^16 = 26 is too coarse, · 2^17 = 52 is fine.
        assert_eq!(multipliers(&[0.0004, 0.01]), Some((vec![52, 1311], 17)));
        assert_eq!(multipliers(&[0.00001]), None);
    }
}
