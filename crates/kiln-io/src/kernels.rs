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
    /// Requantizes `acc` (of `shape`) into `out`, clamped to `[lo, hi]`.
    pub(crate) fn run<A, T>(&self, acc: &[A], shape: &[usize], lo: i32, hi: i32, out: &mut [T])
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
        let inner = inner.max(1);
        for (i, (chunk, dst)) in acc.chunks(inner).zip(out.chunks_mut(inner)).enumerate() {
            let r = self.ratios[i % channels];
            for (o, a) in dst.iter_mut().zip(chunk) {
                *o = (requantize(a.as_() * r, lo_f, hi_f) + self.zero_point).as_();
            }
        }
    }
}

impl EvalOp for KilnRequant {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let acc = &inputs[0];
        let shape = acc.shape().to_vec();
        let ram = acc.try_as_plain_ram()?;
        let u8_out = self.out.unquantized() == u8::datum_type();
        // A new tensor of the output type, requantized from `acc` read as `A`.
        fn requant<A, T>(
            op: &KilnRequant,
            acc: &tract_core::internal::PlainView,
            shape: &[usize],
            (lo, hi): (i32, i32),
        ) -> TractResult<Tensor>
        where
            A: Datum + Copy + tract_core::num_traits::AsPrimitive<f32>,
            T: Datum + Copy,
            i32: tract_core::num_traits::AsPrimitive<T>,
        {
            filled::<T>(shape, |o| {
                op.run::<A, T>(acc.as_slice()?, shape, lo, hi, o);
                Ok(())
            })
        }
        let mut t = match (acc.datum_type(), u8_out) {
            (DatumType::I32, true) => requant::<i32, u8>(self, &ram, &shape, (0, 255))?,
            (DatumType::I32, false) => requant::<i32, i8>(self, &ram, &shape, (-128, 127))?,
            (DatumType::F32, true) => requant::<f32, u8>(self, &ram, &shape, (0, 255))?,
            (DatumType::F32, false) => requant::<f32, i8>(self, &ram, &shape, (-128, 127))?,
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

/// `dst.copy_from_slice(src)` for the short rows of a depthwise plane (7 to 112 bytes), in
/// fixed 32- and 8-byte pieces the compiler turns into vector moves. A plain
/// `copy_from_slice` calls `memcpy`, and static musl's x86_64 `memcpy` (`rep movsq` plus a
/// byte loop) spends more on each short row than the copy itself: it was 18% of
/// MobileNetV2's int8 time in the x86_64 runner.
#[inline]
fn copy_short<T: Copy>(dst: &mut [T], src: &[T]) {
    /// Copies `N` elements at `at` as one fixed-size move.
    #[inline(always)]
    fn piece<T: Copy, const N: usize>(dst: &mut [T], src: &[T], at: usize) {
        let d: &mut [T; N] = (&mut dst[at..at + N]).try_into().unwrap();
        *d = *<&[T; N]>::try_from(&src[at..at + N]).unwrap();
    }
    let n = src.len();
    assert_eq!(dst.len(), n);
    // The tail is one more piece ending at `n`, overlapping the previous one: no byte loop.
    // `black_box` on the offset keeps the compiler from seeing the loops as one `memcpy`
    // (its loop-idiom pass turns them back into the very call this avoids).
    if n >= 8 {
        let mut at = 0;
        while at + 32 <= n {
            piece::<T, 32>(dst, src, at);
            at = std::hint::black_box(at + 32);
        }
        while at + 8 <= n {
            piece::<T, 8>(dst, src, at);
            at = std::hint::black_box(at + 8);
        }
        if at < n {
            piece::<T, 8>(dst, src, n - 8);
        }
    } else if n >= 4 {
        piece::<T, 4>(dst, src, 0);
        piece::<T, 4>(dst, src, n - 4);
    } else if n > 0 {
        dst[0] = src[0];
        dst[n / 2] = src[n / 2];
        dst[n - 1] = src[n - 1];
    }
}

/// A new tensor of `shape` whose every element `fill` writes. Kernels write their output in
/// place: building a `Vec` and converting it copies it once more (tract's `Tensor` keeps its
/// own aligned buffer), which was 16% of MobileNetV2's int8 time in the runner.
fn filled<T: Datum + Copy>(
    shape: &[usize],
    fill: impl FnOnce(&mut [T]) -> TractResult<()>,
) -> TractResult<Tensor> {
    // SAFETY: 8-bit plain-old-data elements, so any bit pattern is a valid value; `fill`
    // writes every element before the tensor is read (each kernel covers its whole output).
    let mut t = unsafe { Tensor::uninitialized::<T>(shape)? };
    fill(unsafe { t.as_slice_mut_unchecked::<T>() })?;
    Ok(t)
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
        X: Copy + Into<i32> + Into<i16> + 'static,
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
                copy_short(&mut xp[at..at + w], row);
                continue;
            }
            if sx == 2 && w >= 2 {
                // Input columns 2m and 2m+1 go to the two column phases, in one pass the
                // compiler vectorizes (a de-interleave), not one strided pass per phase.
                let (pe, po) = (pl % 2, (pl + 1) % 2);
                let at_e = (py * 2 + pe) * sub + ry * ws + pl / 2;
                let at_o = (py * 2 + po) * sub + ry * ws + pl.div_ceil(2);
                let (n_e, n_o) = (w.div_ceil(2), w / 2);
                let (xe, xo) = if at_e < at_o {
                    let (a, b) = xp.split_at_mut(at_o);
                    (&mut a[at_e..at_e + n_e], &mut b[..n_o])
                } else {
                    let (a, b) = xp.split_at_mut(at_e);
                    (&mut b[..n_e], &mut a[at_o..at_o + n_o])
                };
                for ((e, o), pair) in xe.iter_mut().zip(xo.iter_mut()).zip(row.chunks_exact(2)) {
                    *e = pair[0];
                    *o = pair[1];
                }
                if w % 2 == 1 {
                    xe[n_e - 1] = row[w - 1];
                }
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
        //
        // The run is cut into blocks of `BLOCK` accumulators that stay in registers through all
        // the taps (one store per output instead of a load and a store per tap), and each
        // product is one 16-bit multiply: |x| <= 255 and |w| <= 128, so x·w fits in i16 exactly.
        let span = (oh - 1) * ws + ow;
        let taps: TVec<(usize, i16)> = (0..kh * kw)
            .map(|k| {
                let (ky, kx) = (k / kw, k % kw);
                let at = ((ky % sy) * sx + kx % sx) * sub + (ky / sy) * ws + kx / sx;
                (at, wts[k])
            })
            .collect();
        acc.clear();
        acc.resize(span, start);
        const BLOCK: usize = 32;
        let mut c0 = 0;
        while c0 + BLOCK <= span {
            let mut a = [start; BLOCK];
            for &(at, wt) in &taps {
                let v: &[X; BLOCK] = xp[at + c0..at + c0 + BLOCK].try_into().unwrap();
                for (a, v) in a.iter_mut().zip(v) {
                    *a += wt.wrapping_mul((*v).into()) as i32;
                }
            }
            let dst: &mut [i32; BLOCK] = (&mut acc[c0..c0 + BLOCK]).try_into().unwrap();
            *dst = a;
            c0 += BLOCK;
        }
        let tail = &mut acc[c0..];
        for &(at, wt) in &taps {
            for (a, v) in tail.iter_mut().zip(&xp[at + c0..at + span]) {
                *a += wt.wrapping_mul((*v).into()) as i32;
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
        X: Datum + Copy + Into<i32> + Into<i16>,
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
        let mut oshape: TVec<usize> = shape[..r - 2].into();
        oshape.extend([oh, ow]);
        debug_assert_eq!(oshape.iter().product::<usize>(), n * c * oh * ow);
        filled::<Y>(&oshape, |out| {
            let (mut xp, mut acc) = (vec![], vec![]);
            for (p, (src, dst)) in data.chunks(h * w).zip(out.chunks_mut(oh * ow)).enumerate() {
                self.plane(p % c, src, (h, w), dst, ow, &mut xp, &mut acc);
            }
            Ok(())
        })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_short_copies_every_length() {
        let src: Vec<u8> = (0..=255).collect();
        for len in 0..=113 {
            let mut dst = vec![0u8; len];
            copy_short(&mut dst, &src[7..7 + len]);
            assert_eq!(dst, &src[7..7 + len], "length {len}");
        }
    }
}
