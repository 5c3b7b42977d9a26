//! kiln's own tract ops, which `crate::passes` puts where tract 0.23's lowering is slow:
//! `KilnRequant` (int32 or f32 → 8-bit in one vectorized pass) and `KilnDepthwise` (an
//! int8 depthwise convolution: tract has none and lowers one to im2col plus a grouped matmul,
//! 50x slower than its f32 depthwise kernel on MobileNetV2). Never serialized: the passes
//! run when a model is prepared, on the host and on the device alike.

#![allow(unsafe_code)] // reinterpreting 8-bit storage: see the SAFETY notes

use anyhow::bail;
use tract_core::internal::*;

/// int32 accumulator (or f32 activation) → 8-bit output in one pass:
/// `clamp(round_even(x · r[c]) + zp)` per channel `c` along `axis`, or with one `r` for the
/// whole tensor (what tract computes with `Scale`, add, min, max and cast, or with
/// `QuantizeLinear`).
#[derive(Debug, Clone, PartialEq)]
pub struct KilnRequant {
    /// Per-channel `x_scale · w_scale / y_scale`.
    pub ratios: Arc<Vec<f32>>,
    /// The channel axis.
    pub axis: usize,
    /// Output zero point.
    pub zero_point: i32,
    /// Output type (u8 or i8, possibly with quantization params).
    pub out: DatumType,
}

impl Eq for KilnRequant {}

impl std::hash::Hash for KilnRequant {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.ratios.iter().for_each(|r| r.to_bits().hash(state));
        self.axis.hash(state);
        self.zero_point.hash(state);
    }
}

impl Op for KilnRequant {
    fn name(&self) -> StaticName {
        "KilnRequant".into()
    }

    op_as_typed_op!();
}

/// Round half to even for |v| < 2^22 with two additions the compiler vectorizes.
#[inline(always)]
pub(crate) fn round_even(v: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0; // 1.5 · 2^23
    (v + MAGIC) - MAGIC
}

/// `round_even(v)` within [lo, hi] (small integers) as i32. `max`/`min` (not `clamp`) turn a
/// NaN into `lo`, so the result is always a finite integer-valued f32 in i32 range and the
/// unchecked conversion is sound; a saturating `as i32` here kept these loops scalar
/// (measured 1.1 vs 0.18 ns per element).
#[inline(always)]
pub(crate) fn requantize(v: f32, lo: f32, hi: f32) -> i32 {
    let v = round_even(v.max(lo).min(hi));
    // SAFETY: v is finite and within [lo, hi] ⊂ i32 range (see above).
    unsafe { v.to_int_unchecked::<i32>() }
}

impl KilnRequant {
    pub(crate) fn run<A, T>(&self, acc: &[A], shape: &[usize], lo: i32, hi: i32) -> Vec<T>
    where
        A: Copy + tract_core::num_traits::AsPrimitive<f32>,
        T: Datum + Copy,
        i32: tract_core::num_traits::AsPrimitive<T>,
    {
        use tract_core::num_traits::AsPrimitive;
        // One ratio: the whole tensor is one channel.
        let (channels, inner) = if self.ratios.len() == 1 {
            (1, acc.len())
        } else {
            (shape[self.axis], shape[self.axis + 1..].iter().product())
        };
        let (lo_f, hi_f) = ((lo - self.zero_point) as f32, (hi - self.zero_point) as f32);
        let mut out = Vec::with_capacity(acc.len());
        for (i, chunk) in acc.chunks(inner.max(1)).enumerate() {
            let r = self.ratios[i % channels];
            out.extend(
                chunk
                    .iter()
                    .map(|a| (requantize(a.as_() * r, lo_f, hi_f) + self.zero_point).as_()),
            );
        }
        out
    }
}

impl EvalOp for KilnRequant {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let acc = &inputs[0];
        let shape = acc.shape().to_vec();
        let ram = acc.try_as_plain_ram()?;
        let u8_out = self.out.unquantized() == u8::datum_type();
        let mut t = match (acc.datum_type(), u8_out) {
            (DatumType::I32, true) => {
                owned(self.run::<i32, u8>(ram.as_slice()?, &shape, 0, 255), &shape)?
            }
            (DatumType::I32, false) => owned(
                self.run::<i32, i8>(ram.as_slice()?, &shape, -128, 127),
                &shape,
            )?,
            (DatumType::F32, true) => {
                owned(self.run::<f32, u8>(ram.as_slice()?, &shape, 0, 255), &shape)?
            }
            (DatumType::F32, false) => owned(
                self.run::<f32, i8>(ram.as_slice()?, &shape, -128, 127),
                &shape,
            )?,
            (dt, _) => bail!("KilnRequant: unexpected input type {dt:?}"),
        };
        // SAFETY: same storage type (8-bit); only the quantization params are attached.
        unsafe { t.set_datum_type(self.out) };
        Ok(tvec!(t.into_tvalue()))
    }
}

impl TypedOp for KilnRequant {
    as_op!();

    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec!(self.out.fact(inputs[0].shape.clone())))
    }
}

/// `values` as a tensor of `shape`, moved, not copied.
fn owned<T: Datum>(values: Vec<T>, shape: &[usize]) -> TractResult<Tensor> {
    Ok(tract_core::ndarray::ArrayD::from_shape_vec(shape, values)?.into_tensor())
}

/// Rows of an output plane of `len` values, `ow` per row.
fn oh_of(len: usize, ow: usize) -> usize {
    len / ow.max(1)
}

/// Output type and its raw 8-bit bounds.
fn out_bounds(out: DatumType) -> (i32, i32) {
    if out.unquantized() == u8::datum_type() {
        (0, 255)
    } else {
        (-128, 127)
    }
}

/// An int8 depthwise convolution on NCHW (or CHW) 8-bit activations (strides up to 8),
/// requantized to 8 bits in the same pass: `y[c] = clamp(round_even((b[c] + Σ w[c,k] · (x - x0)) · r[c]) + y0)`.
/// Padding contributes nothing (ONNX pads a quantized conv with the zero point).
#[derive(Debug, Clone, PartialEq)]
pub struct KilnDepthwise {
    /// Weights [C, kh, kw].
    pub weights: Arc<Vec<i16>>,
    /// Per-channel int32 bias.
    pub bias: Arc<Vec<i32>>,
    /// Per-channel `x_scale · w_scale / y_scale`.
    pub ratios: Arc<Vec<f32>>,
    /// Kernel height and width.
    pub kernel: (usize, usize),
    /// Strides (y, x).
    pub strides: (usize, usize),
    /// Dilations (y, x).
    pub dilations: (usize, usize),
    /// Padding: top, left, bottom, right.
    pub pads: (usize, usize, usize, usize),
    /// Input zero point (raw 8-bit value).
    pub x0: i32,
    /// Output zero point.
    pub y0: i32,
    /// Output type (u8 or i8, possibly with quantization params).
    pub out: DatumType,
}

impl Eq for KilnDepthwise {}

impl std::hash::Hash for KilnDepthwise {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.weights.hash(state);
        self.bias.hash(state);
        self.ratios.iter().for_each(|r| r.to_bits().hash(state));
        (self.kernel, self.strides, self.dilations, self.pads).hash(state);
        (self.x0, self.y0).hash(state);
    }
}

impl KilnDepthwise {
    /// Output height and width for an input of `h` x `w`.
    fn output_hw(&self, h: usize, w: usize) -> Option<(usize, usize)> {
        let (kh, kw) = self.kernel;
        let (sy, sx) = self.strides;
        let (dy, dx) = self.dilations;
        let (pt, pl, pb, pr) = self.pads;
        let eh = dy * (kh - 1) + 1;
        let ew = dx * (kw - 1) + 1;
        let (ph, pw) = (h + pt + pb, w + pl + pr);
        (ph >= eh && pw >= ew).then(|| ((ph - eh) / sy + 1, (pw - ew) / sx + 1))
    }

    /// Convolves one channel plane `x` [h, w] into `y` [oh, ow], in exact int32.
    ///
    /// The plane is copied once with its padding filled with the zero point `x0` (so a padded
    /// tap adds `w · x0`, which the accumulator's start value `bias - x0 · Σw` cancels), in
    /// the polyphase layout below; the tap loops then vectorize.
    #[allow(clippy::too_many_arguments)]
    fn plane<X, Y>(
        &self,
        c: usize,
        x: &[X],
        (h, w): (usize, usize),
        y: &mut [Y],
        ow: usize,
        xp: &mut Vec<X>,
        acc: &mut Vec<i32>,
    ) where
        X: Copy + Into<i32> + 'static,
        Y: Copy + 'static,
        i32: tract_core::num_traits::AsPrimitive<Y> + tract_core::num_traits::AsPrimitive<X>,
    {
        use tract_core::num_traits::AsPrimitive;
        let (kh, kw) = self.kernel;
        let (sy, sx) = self.strides;
        let (dy, dx) = self.dilations;
        let (pt, pl, pb, pr) = self.pads;
        let (lo, hi) = out_bounds(self.out);
        let (lo_f, hi_f) = ((lo - self.y0) as f32, (hi - self.y0) as f32);
        let r = self.ratios[c];
        let wts = &self.weights[c * kh * kw..(c + 1) * kh * kw];
        let sum_w: i32 = wts.iter().map(|w| *w as i32).sum();
        let start = self.bias[c] - self.x0 * sum_w;
        // Polyphase layout: padded row jy, column jx goes to sub-plane (jy % sy, jx % sx) at
        // row jy / sy, column jx / sx. Consecutive output rows then read consecutive
        // sub-plane rows, so each tap is one contiguous run over a sub-plane.
        let (hp, wp) = (h + pt + pb, w + pl + pr);
        let (hs, ws) = (hp.div_ceil(sy), wp.div_ceil(sx));
        let sub = hs * ws;
        let oh = oh_of(y.len(), ow);
        let x0: X = self.x0.as_();
        xp.clear();
        xp.resize(sy * sx * sub, x0);
        for (iy, row) in x.chunks(w).enumerate() {
            let jy = iy + pt;
            let (py, ry) = (jy % sy, jy / sy);
            if sx == 1 {
                let at = py * sub + ry * ws + pl;
                xp[at..at + w].copy_from_slice(row);
                continue;
            }
            for px in 0..sx {
                let j0 = pl + (px + sx - pl % sx) % sx; // first padded column of phase px
                if j0 >= pl + w {
                    continue;
                }
                let at = (py * sx + px) * sub + ry * ws + j0 / sx;
                let src = row[j0 - pl..].iter().step_by(sx);
                for (d, v) in xp[at..].iter_mut().zip(src) {
                    *d = *v;
                }
            }
        }
        let value = |iy: usize, ix: usize| -> i32 {
            let (py, px) = (iy % sy, ix % sx);
            xp[(py * sx + px) * sub + (iy / sy) * ws + ix / sx].into()
        };
        if dy != 1 || dx != 1 {
            // Dilated (rare in depthwise nets): direct loops.
            for (oy, out_row) in y.chunks_mut(ow).enumerate() {
                for (ox, o) in out_row.iter_mut().enumerate() {
                    let mut a = start;
                    for ky in 0..kh {
                        for kx in 0..kw {
                            let v = value(oy * sy + ky * dy, ox * sx + kx * dx);
                            a += wts[ky * kw + kx] as i32 * v;
                        }
                    }
                    *o = (requantize(a as f32 * r, lo_f, hi_f) + self.y0).as_();
                }
            }
            return;
        }
        // Each output row is computed over the sub-plane width ws (the last ws - ow values of
        // a row are discarded), so every tap is one contiguous run: it vectorizes even for
        // 7x7 planes.
        let span = (oh - 1) * ws + ow;
        acc.clear();
        acc.resize(span, start);
        for ky in 0..kh {
            for kx in 0..kw {
                let wt = wts[ky * kw + kx] as i32;
                let at = ((ky % sy) * sx + kx % sx) * sub + (ky / sy) * ws + kx / sx;
                for (a, v) in acc.iter_mut().zip(&xp[at..at + span]) {
                    *a += wt * (*v).into();
                }
            }
        }
        for (oy, out_row) in y.chunks_mut(ow).enumerate() {
            for (o, a) in out_row.iter_mut().zip(&acc[oy * ws..oy * ws + ow]) {
                *o = (requantize(*a as f32 * r, lo_f, hi_f) + self.y0).as_();
            }
        }
    }

    fn eval_t<X, Y>(&self, x: &Tensor) -> TractResult<Tensor>
    where
        X: Datum + Copy + Into<i32>,
        Y: Datum + Copy,
        i32: tract_core::num_traits::AsPrimitive<Y> + tract_core::num_traits::AsPrimitive<X>,
    {
        let shape = x.shape();
        let r = shape.len();
        let (c, h, w) = (shape[r - 3], shape[r - 2], shape[r - 1]);
        let Some((oh, ow)) = self.output_hw(h, w) else {
            bail!("KilnDepthwise: input {h}x{w} smaller than the kernel");
        };
        let n: usize = shape[..r - 3].iter().product();
        let data = x.try_as_plain_ram()?;
        // The input's raw 8-bit values (its datum type may carry quantization params).
        let data: &[X] = unsafe {
            std::slice::from_raw_parts(data.as_bytes().as_ptr() as *const X, data.as_bytes().len())
        };
        let mut out = vec![Y::default(); n * c * oh * ow];
        let (mut xp, mut acc) = (vec![], vec![]);
        for (p, (src, dst)) in data.chunks(h * w).zip(out.chunks_mut(oh * ow)).enumerate() {
            self.plane(p % c, src, (h, w), dst, ow, &mut xp, &mut acc);
        }
        let mut oshape: TVec<usize> = shape[..r - 2].into();
        oshape.extend([oh, ow]);
        owned(out, &oshape)
    }
}

impl Op for KilnDepthwise {
    fn name(&self) -> StaticName {
        "KilnDepthwise".into()
    }

    op_as_typed_op!();
}

impl EvalOp for KilnDepthwise {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let x = &inputs[0];
        let signed_in = x.datum_type().unquantized() == i8::datum_type();
        let u8_out = self.out.unquantized() == u8::datum_type();
        let mut t = match (signed_in, u8_out) {
            (false, true) => self.eval_t::<u8, u8>(x)?,
            (false, false) => self.eval_t::<u8, i8>(x)?,
            (true, true) => self.eval_t::<i8, u8>(x)?,
            (true, false) => self.eval_t::<i8, i8>(x)?,
        };
        // SAFETY: same storage type (8-bit); only the quantization params are attached.
        unsafe { t.set_datum_type(self.out) };
        Ok(tvec!(t.into_tvalue()))
    }
}

impl TypedOp for KilnDepthwise {
    as_op!();

    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let shape = &inputs[0].shape;
        let r = shape.rank();
        let (Ok(h), Ok(w)) = (shape[r - 2].to_usize(), shape[r - 1].to_usize()) else {
            bail!("KilnDepthwise needs concrete spatial dims");
        };
        let Some((oh, ow)) = self.output_hw(h, w) else {
            bail!("KilnDepthwise: input {h}x{w} smaller than the kernel");
        };
        let mut out: TVec<TDim> = shape.iter().take(r - 2).cloned().collect();
        out.extend([oh.to_dim(), ow.to_dim()]);
        Ok(tvec!(self.out.fact(out)))
    }
}
