//! Output comparison: max-abs error, cosine similarity, top-1 agreement.

use anyhow::{bail, Result};
use tract_core::prelude::*;

/// How close one output is to its reference.
#[derive(Debug, Clone, PartialEq)]
pub struct Comparison {
    /// Largest absolute element-wise difference.
    pub max_abs: f64,
    /// Mean absolute element-wise difference.
    pub mean_abs: f64,
    /// Cosine similarity of the flattened tensors (1.0 for identical directions).
    pub cosine: f64,
    /// Fraction of rows whose argmax agrees, for classifier-shaped outputs ([rows, classes]).
    pub top1_agreement: Option<f64>,
    /// Number of non-finite values in the output that are finite in the reference.
    pub non_finite: usize,
}

/// Compares `actual` with `expected`; `sample_rank` is the rank of one sample's output
/// (the tensors may carry one extra leading dataset axis). Top-1 is reported when one
/// sample's output is 2-D ([batch, classes]).
pub fn compare(actual: &Tensor, expected: &Tensor, sample_rank: usize) -> Result<Comparison> {
    if actual.shape() != expected.shape() {
        bail!(
            "shape {:?} differs from the reference's {:?}",
            actual.shape(),
            expected.shape()
        );
    }
    let a = actual.cast_to::<f64>()?;
    let e = expected.cast_to::<f64>()?;
    let (a, e) = (crate::slice_of::<f64>(&a)?, crate::slice_of::<f64>(&e)?);
    let (mut max_abs, mut sum_abs, mut dot, mut na, mut ne, mut non_finite) =
        (0f64, 0f64, 0f64, 0f64, 0f64, 0);
    for (&x, &y) in a.iter().zip(e) {
        if !x.is_finite() && y.is_finite() {
            non_finite += 1;
            continue;
        }
        let d = (x - y).abs();
        if d.is_finite() {
            max_abs = max_abs.max(d);
            sum_abs += d;
        }
        dot += x * y;
        na += x * x;
        ne += y * y;
    }
    let cosine = if na == 0.0 && ne == 0.0 {
        1.0
    } else if na == 0.0 || ne == 0.0 {
        0.0
    } else {
        dot / (na.sqrt() * ne.sqrt())
    };
    let classes = *actual.shape().last().unwrap_or(&1);
    let top1_agreement = (sample_rank == 2 && classes > 1 && !a.is_empty()).then(|| {
        let rows = a.len() / classes;
        let agree = (0..rows)
            .filter(|r| {
                argmax(&a[r * classes..][..classes]) == argmax(&e[r * classes..][..classes])
            })
            .count();
        agree as f64 / rows as f64
    });
    let mean_abs = if a.is_empty() {
        0.0
    } else {
        sum_abs / a.len() as f64
    };
    Ok(Comparison {
        max_abs,
        mean_abs,
        cosine,
        top1_agreement,
        non_finite,
    })
}

/// Index of the largest value (first one on ties; NaN never wins).
pub fn argmax(row: &[f64]) -> usize {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] || row[best].is_nan() {
            best = i;
        }
    }
    best
}

/// Top-1 accuracy of classifier outputs ([N, 1, C] or [N, C]) against integer labels [N].
pub fn top1_accuracy(outputs: &Tensor, labels: &Tensor) -> Result<f64> {
    let n = labels.len();
    if n == 0 || !outputs.len().is_multiple_of(n) {
        bail!(
            "{} labels do not match outputs of shape {:?}",
            n,
            outputs.shape()
        );
    }
    let per = outputs.len() / n;
    let o = outputs.cast_to::<f64>()?;
    let o = crate::slice_of::<f64>(&o)?;
    let l = labels.cast_to::<i64>()?;
    let l = crate::slice_of::<i64>(&l)?;
    let correct = (0..n)
        .filter(|&i| argmax(&o[i * per..][..per]) as i64 == l[i])
        .count();
    Ok(correct as f64 / n as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(a: Tensor, e: Tensor, rank: usize, max_abs: f64, cosine: f64, top1: Option<f64>) {
        let c = compare(&a, &e, rank).unwrap();
        assert!((c.max_abs - max_abs).abs() < 1e-9, "{c:?}");
        assert!((c.cosine - cosine).abs() < 1e-9, "{c:?}");
        assert_eq!(c.top1_agreement, top1, "{c:?}");
    }

    #[test]
    fn metrics() {
        check(
            tensor2(&[[1f32, 2.], [3., 4.]]),
            tensor2(&[[1f32, 2.], [3., 4.]]),
            2,
            0.0,
            1.0,
            Some(1.0),
        );
        check(
            tensor2(&[[1f32, 0.], [0., 1.]]),
            tensor2(&[[0f32, 1.], [0., 1.]]),
            2,
            1.0,
            0.5,
            Some(0.5),
        );
        check(
            tensor1(&[1f32, 0.]),
            tensor1(&[-1f32, 0.]),
            1,
            2.0,
            -1.0,
            None,
        );
        check(
            tensor1(&[0f32, 0.]),
            tensor1(&[0f32, 0.]),
            1,
            0.0,
            1.0,
            None,
        );
    }

    #[test]
    fn shape_mismatch_is_an_error() {
        assert!(compare(&tensor1(&[1f32]), &tensor1(&[1f32, 2.]), 1).is_err());
    }

    #[test]
    fn accuracy() {
        let out = tensor3(&[[[0.1f32, 0.9]], [[0.8, 0.2]], [[0.3, 0.7]]]);
        let acc = top1_accuracy(&out, &tensor1(&[1i64, 0, 0])).unwrap();
        assert!((acc - 2.0 / 3.0).abs() < 1e-12);
    }
}
