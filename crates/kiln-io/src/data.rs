//! The data conventions: a *sample* `.npz` holds one array per model input, shaped as the
//! input; a *dataset* adds one leading axis of N samples and may hold integer `labels` [N].

use std::collections::HashMap;

use anyhow::{bail, Result};
use tract_core::prelude::*;

use crate::NamedTensors;

/// One model input as the data must match it: name, element type, and shape with
/// `None` for a symbolic dimension (bound by the data).
#[derive(Debug, Clone, PartialEq)]
pub struct InputSpec {
    /// Input name, as the array in the `.npz` must be named.
    pub name: String,
    /// Element type.
    pub datum_type: DatumType,
    /// Dimensions; `None` where the model leaves the dimension symbolic.
    pub shape: Vec<Option<usize>>,
    /// Symbol names for the symbolic dimensions (same length as `shape`, empty when concrete).
    pub symbols: Vec<Option<String>>,
}

impl InputSpec {
    /// The shape as text: `1x3x224x224`, with symbol names for symbolic dimensions.
    pub fn shape_string(&self) -> String {
        self.shape
            .iter()
            .enumerate()
            .map(|(i, d)| match d {
                Some(d) => d.to_string(),
                None => self
                    .symbols
                    .get(i)
                    .cloned()
                    .flatten()
                    .unwrap_or_else(|| "?".into()),
            })
            .collect::<Vec<_>>()
            .join("x")
    }
}

/// Data matched to a model's inputs: a single sample or a dataset of N samples.
#[derive(Debug, Clone)]
pub struct Batch {
    /// Input tensors in model input order (with the leading N axis for a dataset).
    pub inputs: Vec<Tensor>,
    /// `Some(N)` for a dataset, `None` for a single sample.
    pub dataset_len: Option<usize>,
    /// Integer labels [N] when the dataset has them.
    pub labels: Option<Tensor>,
    /// Values bound to symbolic input dimensions, by symbol name.
    pub symbols: HashMap<String, usize>,
    /// Non-fatal findings (NaN/Inf values, ignored extra arrays).
    pub warnings: Vec<String>,
}

impl Batch {
    /// Matches named arrays (from `origin`, for messages) to `specs`.
    pub fn bind(specs: &[InputSpec], mut arrays: NamedTensors, origin: &str) -> Result<Batch> {
        let mut warnings = vec![];
        let labels_at = arrays.iter().position(|(n, _)| n == "labels");
        let labels = labels_at.map(|i| arrays.remove(i).1);
        // A lone unnamed .npy (or a single array) feeds a single-input model whatever its name.
        if specs.len() == 1 && arrays.len() == 1 && arrays[0].0 != specs[0].name {
            let found = arrays[0].0.clone();
            if origin.ends_with(".npy") {
                arrays[0].0 = specs[0].name.clone();
            } else {
                bail!(
                    "{origin} has no array named `{}` (the model's input); it has `{found}`. \
                     Name each array after the model input it feeds (np.savez(f, {}=x))",
                    specs[0].name,
                    specs[0].name
                );
            }
        }
        let mut inputs = Vec::with_capacity(specs.len());
        let mut dataset_len: Option<Option<usize>> = None;
        let mut symbols = HashMap::new();
        for spec in specs {
            let Some(pos) = arrays.iter().position(|(n, _)| *n == spec.name) else {
                let have: Vec<&str> = arrays.iter().map(|(n, _)| n.as_str()).collect();
                bail!(
                    "{origin} is missing input `{}` ({:?} {}); it has: {}",
                    spec.name,
                    spec.datum_type,
                    spec.shape_string(),
                    if have.is_empty() {
                        "no arrays".to_string()
                    } else {
                        have.join(", ")
                    }
                );
            };
            let (_, t) = arrays.remove(pos);
            if t.datum_type() != spec.datum_type {
                bail!(
                    "{origin}: input `{}` must be {:?}, the array is {:?}. Convert it (e.g. x.astype(np.float32))",
                    spec.name,
                    spec.datum_type,
                    t.datum_type()
                );
            }
            let rank = spec.shape.len();
            let this_len = if t.rank() == rank {
                None
            } else if t.rank() == rank + 1 {
                Some(t.shape()[0])
            } else {
                bail!(
                    "{origin}: input `{}` has shape {:?}; the model wants {} (a sample) or Nx{} (a dataset)",
                    spec.name,
                    t.shape(),
                    spec.shape_string(),
                    spec.shape_string()
                );
            };
            match dataset_len {
                None => dataset_len = Some(this_len),
                Some(prev) if prev != this_len => bail!(
                    "{origin}: arrays disagree on being a sample or a dataset of the same length \
                     (`{}` has shape {:?})",
                    spec.name,
                    t.shape()
                ),
                _ => {}
            }
            let dims = &t.shape()[t.rank() - rank..];
            for (i, (want, got)) in spec.shape.iter().zip(dims).enumerate() {
                match want {
                    Some(w) if w != got => bail!(
                        "{origin}: input `{}` has shape {:?}; the model wants {}{} (axis {i} is {got}, expected {w})",
                        spec.name,
                        t.shape(),
                        if this_len.is_some() { "Nx" } else { "" },
                        spec.shape_string()
                    ),
                    Some(_) => {}
                    None => {
                        let sym = spec.symbols.get(i).cloned().flatten().unwrap_or_else(|| format!("{}:{i}", spec.name));
                        if let Some(prev) = symbols.insert(sym.clone(), *got) {
                            if prev != *got {
                                bail!("{origin}: dimension `{sym}` is {prev} in one input and {got} in `{}`", spec.name);
                            }
                        }
                    }
                }
            }
            if let Some(bad) = count_non_finite(&t)? {
                warnings.push(format!(
                    "{origin}: input `{}` holds {bad} NaN/Inf value(s)",
                    spec.name
                ));
            }
            inputs.push(t);
        }
        for (name, _) in &arrays {
            warnings.push(format!(
                "{origin}: array `{name}` is not a model input; ignored"
            ));
        }
        let dataset_len = dataset_len.flatten();
        if let Some(l) = &labels {
            match dataset_len {
                None => bail!("{origin}: `labels` only makes sense in a dataset (inputs with a leading N axis)"),
                Some(n) if l.shape() != [n] || !l.datum_type().is_integer() => bail!(
                    "{origin}: `labels` must be integers of shape [{n}], got {:?} {:?}",
                    l.datum_type(),
                    l.shape()
                ),
                _ => {}
            }
        }
        Ok(Batch {
            inputs,
            dataset_len,
            labels,
            symbols,
            warnings,
        })
    }

    /// Number of samples (1 for a single sample).
    pub fn len(&self) -> usize {
        self.dataset_len.unwrap_or(1)
    }

    /// True when a dataset holds no sample.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The inputs of sample `i`, without the dataset axis.
    pub fn sample(&self, i: usize) -> Result<TVec<TValue>> {
        match self.dataset_len {
            None => Ok(self
                .inputs
                .iter()
                .map(|t| t.clone().into_tvalue())
                .collect()),
            Some(_) => self
                .inputs
                .iter()
                .map(|t| {
                    let mut s = t.slice(0, i, i + 1)?;
                    s.remove_axis(0)?;
                    Ok(s.into_tvalue())
                })
                .collect(),
        }
    }
}

/// Deterministic inputs for `specs` (symbolic dims set to 1): a block of 4096
/// pseudo-random values in [-1, 1) tiled over each tensor. Every weight still sees varied
/// values, and the tiling lets zstd shrink them to ~16 kB whatever the input size. Used by
/// `kiln package` (golden self-test data) and `kiln-runner bench` (when given no inputs).
pub fn synthetic_inputs(specs: &[InputSpec]) -> Result<crate::NamedTensors> {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let block: Vec<f32> = (0..4096)
        .map(|_| {
            // xorshift64*: a fixed sequence, so the same model gets the same inputs.
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            (state.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 40) as f32 / (1u64 << 24) as f32 * 2.0
                - 1.0
        })
        .collect();
    specs
        .iter()
        .map(|s| {
            let shape: Vec<usize> = s.shape.iter().map(|d| d.unwrap_or(1)).collect();
            let n: usize = shape.iter().product();
            let data: Vec<f32> = block.iter().copied().cycle().take(n).collect();
            let t = Tensor::from_shape(&shape, &data)?
                .cast_to_dt(s.datum_type)?
                .into_owned();
            Ok((s.name.clone(), t))
        })
        .collect()
}

/// Stacks per-sample outputs along a new leading axis (the dataset convention).
pub fn stack_samples(per_sample: &[Tensor]) -> Result<Tensor> {
    let with_axis = per_sample
        .iter()
        .map(|t| {
            let mut t = t.clone();
            t.insert_axis(0)?;
            Ok(t)
        })
        .collect::<Result<Vec<_>>>()?;
    Tensor::stack_tensors(0, &with_axis)
}

fn count_non_finite(t: &Tensor) -> Result<Option<usize>> {
    if !t.datum_type().is_float() {
        return Ok(None);
    }
    let f = t.cast_to::<f32>()?;
    let n = crate::slice_of::<f32>(&f)?
        .iter()
        .filter(|v| !v.is_finite())
        .count();
    Ok((n > 0).then_some(n))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, shape: &[Option<usize>]) -> InputSpec {
        InputSpec {
            name: name.into(),
            datum_type: f32::datum_type(),
            shape: shape.to_vec(),
            symbols: shape
                .iter()
                .map(|d| d.is_none().then(|| "batch".to_string()))
                .collect(),
        }
    }

    /// Binds `arrays` to one input of `shape`: Ok(dataset_len) or the error text.
    fn check(shape: &[Option<usize>], arrays: NamedTensors, expected: Result<Option<usize>, &str>) {
        let got = Batch::bind(&[spec("x", shape)], arrays, "d.npz");
        match (got, expected) {
            (Ok(b), Ok(n)) => assert_eq!(b.dataset_len, n),
            (Err(e), Err(msg)) => assert!(format!("{e:#}").contains(msg), "{e:#} lacks {msg}"),
            (got, want) => panic!("got {got:?}, want {want:?}"),
        }
    }

    #[test]
    fn binding() {
        let z = |s: &[usize]| Tensor::zero::<f32>(s).unwrap();
        check(
            &[Some(1), Some(4)],
            vec![("x".into(), z(&[1, 4]))],
            Ok(None),
        );
        check(
            &[Some(1), Some(4)],
            vec![("x".into(), z(&[5, 1, 4]))],
            Ok(Some(5)),
        );
        check(&[None, Some(4)], vec![("x".into(), z(&[3, 4]))], Ok(None));
        check(
            &[Some(1), Some(4)],
            vec![("x".into(), z(&[1, 5]))],
            Err("axis 1 is 5, expected 4"),
        );
        check(
            &[Some(1), Some(4)],
            vec![("y".into(), z(&[1, 4]))],
            Err("no array named `x`"),
        );
        check(&[Some(1), Some(4)], vec![], Err("missing input `x`"));
        check(
            &[Some(4)],
            vec![("x".into(), tensor1(&[1i64, 2, 3, 4]))],
            Err("must be F32"),
        );
        check(
            &[Some(1), Some(4)],
            vec![
                ("x".into(), z(&[2, 1, 4])),
                ("labels".into(), tensor1(&[1i64, 2, 3])),
            ],
            Err("`labels` must be integers of shape [2]"),
        );
    }

    #[test]
    fn dataset_samples_and_stacking() {
        let data = Tensor::from_shape(&[3, 2], &[0f32, 1., 2., 3., 4., 5.]).unwrap();
        let b = Batch::bind(
            &[spec("x", &[Some(2)])],
            vec![("x".into(), data.clone())],
            "d.npz",
        )
        .unwrap();
        let samples: Vec<Tensor> = (0..3)
            .map(|i| b.sample(i).unwrap()[0].clone().into_tensor())
            .collect();
        assert_eq!(samples[1], tensor1(&[2f32, 3.]));
        assert_eq!(stack_samples(&samples).unwrap(), data);
    }

    #[test]
    fn nan_is_a_warning() {
        let b = Batch::bind(
            &[spec("x", &[Some(2)])],
            vec![("x".into(), tensor1(&[f32::NAN, 1.]))],
            "d.npz",
        )
        .unwrap();
        assert!(b.warnings[0].contains("1 NaN/Inf"), "{:?}", b.warnings);
    }
}
