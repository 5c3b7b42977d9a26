//! f32 initializers of an ONNX graph as flat vectors: read, write, slice along an axis.

use anyhow::{bail, Result};
use tract_onnx::pb::TensorProto;

/// onnx.TensorProto.DataType.FLOAT
const FLOAT: i32 = 1;

/// The values of an f32 initializer (raw little-endian data or `float_data`).
pub fn read_f32(t: &TensorProto) -> Result<Vec<f32>> {
    if t.data_type != FLOAT {
        bail!(
            "initializer `{}` has ONNX data type {}, not float32: kiln prunes f32 weights only",
            t.name,
            t.data_type
        );
    }
    Ok(kiln_graph::proto::read_f32(t)?.data)
}

/// Replaces an initializer's shape and values (stored as raw data).
pub fn write_f32(t: &mut TensorProto, dims: Vec<i64>, values: &[f32]) {
    t.dims = dims;
    t.float_data.clear();
    t.raw_data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
}

/// Number of elements of a shape.
pub fn numel(dims: &[i64]) -> usize {
    dims.iter().map(|&d| d.max(0) as usize).product()
}

/// Keeps only the indices `keep` (ascending) along `axis`.
pub fn take_axis(
    values: &[f32],
    dims: &[i64],
    axis: usize,
    keep: &[usize],
) -> (Vec<f32>, Vec<i64>) {
    let outer: usize = numel(&dims[..axis]);
    let len = dims[axis] as usize;
    let inner: usize = numel(&dims[axis + 1..]);
    let mut out = Vec::with_capacity(outer * keep.len() * inner);
    for o in 0..outer {
        for &k in keep {
            let start = (o * len + k) * inner;
            out.extend_from_slice(&values[start..start + inner]);
        }
    }
    let mut d = dims.to_vec();
    d[axis] = keep.len() as i64;
    (out, d)
}

/// L1 or L2 norm of every slice along `axis` (one value per index of that axis).
pub fn slice_norms(values: &[f32], dims: &[i64], axis: usize, l2: bool) -> Vec<f64> {
    let outer: usize = numel(&dims[..axis]);
    let len = dims[axis] as usize;
    let inner: usize = numel(&dims[axis + 1..]);
    let mut acc = vec![0f64; len];
    for o in 0..outer {
        for (c, a) in acc.iter_mut().enumerate() {
            let start = (o * len + c) * inner;
            for &v in &values[start..start + inner] {
                let v = v as f64;
                *a += if l2 { v * v } else { v.abs() };
            }
        }
    }
    if l2 {
        acc.iter_mut().for_each(|a| *a = a.sqrt());
    }
    acc
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(dims: &[i64], axis: usize, keep: &[usize], expected: &[f32]) {
        let n = numel(dims);
        let values: Vec<f32> = (0..n).map(|i| i as f32).collect();
        let (got, d) = take_axis(&values, dims, axis, keep);
        assert_eq!(got, expected);
        assert_eq!(d[axis], keep.len() as i64);
    }

    #[test]
    fn slicing() {
        // [[0, 1, 2], [3, 4, 5]]
        check(&[2, 3], 0, &[1], &[3., 4., 5.]);
        check(&[2, 3], 1, &[0, 2], &[0., 2., 3., 5.]);
        check(&[2, 3], 1, &[], &[]);
        check(&[3, 1, 2], 0, &[0, 2], &[0., 1., 4., 5.]);
    }

    #[test]
    fn norms() {
        let v = [1f32, -2., 3., -4.];
        assert_eq!(slice_norms(&v, &[2, 2], 0, false), vec![3.0, 7.0]);
        assert_eq!(slice_norms(&v, &[2, 2], 1, false), vec![4.0, 6.0]);
        assert_eq!(slice_norms(&v, &[2, 2], 0, true), vec![5f64.sqrt(), 5.0]);
    }

    #[test]
    fn round_trip() {
        let mut t = TensorProto {
            name: "w".into(),
            data_type: FLOAT,
            dims: vec![2],
            float_data: vec![1.0, 2.0],
            ..Default::default()
        };
        assert_eq!(read_f32(&t).unwrap(), vec![1.0, 2.0]);
        write_f32(&mut t, vec![1], &[5.0]);
        assert_eq!(read_f32(&t).unwrap(), vec![5.0]);
        t.data_type = 7;
        assert!(format!("{:#}", read_f32(&t).unwrap_err()).contains("not float32"));
    }
}
