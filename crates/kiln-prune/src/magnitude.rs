//! Unstructured magnitude pruning: zero the smallest |w| per layer or over all layers.

use std::collections::HashSet;

use anyhow::{Context, Result};
use tract_onnx::pb::ModelProto;

use crate::graph::Layer;
use crate::report::LayerReport;
use crate::spec::Scope;
use crate::tensor::{read_f32, write_f32};

/// The `k`-th smallest of `abs` (0-based), by a partial sort (`select_nth_unstable`).
fn kth_smallest(mut abs: Vec<f32>, k: usize) -> f32 {
    let (_, v, _) = abs.select_nth_unstable_by(k, |a, b| a.total_cmp(b));
    *v
}

/// Zeroes exactly `k` of the smallest-magnitude values of `weights` (all tensors together):
/// everything below the k-th smallest |w|, then ties in order.
fn zero_smallest(weights: &mut [Vec<f32>], k: usize) {
    let total: usize = weights.iter().map(|w| w.len()).sum();
    if k == 0 || total == 0 {
        return;
    }
    let abs: Vec<f32> = weights.iter().flatten().map(|v| v.abs()).collect();
    let thr = kth_smallest(abs, k.min(total) - 1);
    let mut zeroed = 0;
    for w in weights.iter_mut() {
        for v in w.iter_mut() {
            if v.abs() < thr {
                *v = 0.0;
                zeroed += 1;
            }
        }
    }
    for w in weights.iter_mut() {
        for v in w.iter_mut() {
            if zeroed >= k {
                return;
            }
            if v.abs() == thr {
                *v = 0.0;
                zeroed += 1;
            }
        }
    }
}

/// Number of elements to remove out of `n` at fraction `amount`.
pub fn count(n: usize, amount: f64) -> usize {
    ((n as f64) * amount).round() as usize
}

/// Prunes the weights of `layers` in place; `skip_reason` says why a layer is left alone.
pub fn prune(
    model: &mut ModelProto,
    layers: &[Layer],
    skip_reason: &dyn Fn(&Layer) -> Option<String>,
    amount: f64,
    scope: Scope,
) -> Result<(Vec<LayerReport>, Vec<String>)> {
    let graph = model
        .graph
        .as_mut()
        .context("the ONNX model holds no graph")?;
    // Shared weights are pruned once.
    let mut seen = HashSet::new();
    let mut chosen = vec![];
    let mut reports = vec![];
    for l in layers {
        let skipped = skip_reason(l);
        if skipped.is_none() && seen.insert(l.weight) {
            chosen.push(l.weight);
        }
        reports.push((l, skipped));
    }
    let mut values: Vec<Vec<f32>> = chosen
        .iter()
        .map(|&w| read_f32(&graph.initializer[w]))
        .collect::<Result<_>>()?;
    match scope {
        Scope::Layer => {
            for v in values.iter_mut() {
                let k = count(v.len(), amount);
                zero_smallest(std::slice::from_mut(v), k);
            }
        }
        Scope::Global => {
            let n: usize = values.iter().map(|v| v.len()).sum();
            zero_smallest(&mut values, count(n, amount));
        }
    }
    for (&w, v) in chosen.iter().zip(&values) {
        let dims = graph.initializer[w].dims.clone();
        write_f32(&mut graph.initializer[w], dims, v);
    }
    let reports = reports
        .into_iter()
        .map(|(l, skipped)| {
            let v = read_f32(&graph.initializer[l.weight])?;
            let zeros = v.iter().filter(|x| **x == 0.0).count();
            Ok(LayerReport {
                name: l.name.clone(),
                op: l.op.clone(),
                params: v.len() as u64,
                sparsity: zeros as f64 / v.len().max(1) as f64,
                channels: None,
                channels_kept: None,
                channels_removed: None,
                norm: None,
                skipped,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((reports, vec![]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(input: Vec<Vec<f32>>, k: usize, expected: Vec<Vec<f32>>) {
        let mut w = input;
        zero_smallest(&mut w, k);
        assert_eq!(w, expected);
    }

    #[test]
    fn zeroing() {
        check(vec![vec![3., -1., 2., -4.]], 2, vec![vec![3., 0., 0., -4.]]);
        check(vec![vec![1., 1., 1., 1.]], 3, vec![vec![0., 0., 0., 1.]]);
        check(
            vec![vec![5., 6.], vec![-1., 7.]],
            1,
            vec![vec![5., 6.], vec![0., 7.]],
        );
        check(
            vec![vec![5., 6.], vec![-1., 7.]],
            0,
            vec![vec![5., 6.], vec![-1., 7.]],
        );
        check(vec![vec![1., 2.]], 2, vec![vec![0., 0.]]);
    }

    #[test]
    fn counts() {
        assert_eq!(count(10, 0.5), 5);
        assert_eq!(count(10, 0.0), 0);
        assert_eq!(count(3, 0.5), 2);
    }
}
