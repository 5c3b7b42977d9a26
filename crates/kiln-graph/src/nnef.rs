//! Writing the runner's model form: the decluttered typed model as a tract NNEF tar.

use std::path::Path;

use anyhow::{Context, Result};

use crate::load::{nnef, Model};

/// Serializes `model` as an uncompressed NNEF tar (the artifact compresses it later),
/// deterministically: tract's fixed 1980-01-01 timestamp instead of the clock in every
/// entry, so the same model gives the same bytes (reproducible artifacts, content cache).
///
/// Fails, naming the op, when the graph holds an op the tract-core NNEF registry cannot
/// write, which is exactly what the runner could not read.
pub fn to_nnef_bytes(model: &Model) -> Result<Vec<u8>> {
    let typed = kiln_io::nnef::narrow_constants(&model.typed).with_context(|| {
        format!(
            "{}: cannot store the model's constants in narrower types",
            model.path.display()
        )
    })?;
    let mut buf = vec![];
    nnef()
        .write_to_tar_with_config(&typed, &mut buf, false, true)
        .map_err(|e| {
            anyhow::anyhow!(
                "{}: cannot write the runner's model form (NNEF): {e:#}. \
             An op outside tract-core cannot run on the device runner.",
                model.path.display()
            )
        })?;
    Ok(buf)
}

/// Writes `model` to `path` as NNEF tar, atomically.
pub fn save_nnef(model: &Model, path: &Path) -> Result<()> {
    kiln_io::fsutil::write_atomic(path, &to_nnef_bytes(model)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tract_onnx::prelude::*;

    /// `input + konst`, narrowed and written as NNEF, reads back with `konst` stored as
    /// `expected` and computes exactly what the original model computes.
    fn check(konst: Tensor, expected: DatumType) {
        let dt = konst.datum_type();
        let mut model = TypedModel::default();
        let x = model.add_source("x", dt.fact(konst.shape())).unwrap();
        let k = model.add_const("k", konst.clone()).unwrap();
        let y = model
            .wire_node("y", tract_onnx::tract_core::ops::math::add(), &[x, k])
            .unwrap();
        model.select_output_outlets(&y).unwrap();
        let narrow = kiln_io::nnef::narrow_constants(&model).unwrap();
        let stored = narrow
            .nodes
            .iter()
            .filter_map(|n| n.op_as::<tract_onnx::tract_core::ops::konst::Const>())
            .map(|c| c.val().datum_type())
            .collect::<Vec<_>>();
        assert_eq!(stored, vec![expected], "{konst:?}");

        let mut buf = vec![];
        nnef().write_to_tar(&narrow, &mut buf).unwrap();
        // The file holds the constant in the narrow type (tract's header is 128 bytes).
        let mut tar = tar::Archive::new(&buf[..]);
        let dat: Vec<u64> = tar
            .entries()
            .unwrap()
            .map(|e| e.unwrap())
            .filter(|e| e.path().unwrap().extension().is_some_and(|x| x == "dat"))
            .map(|e| e.header().size().unwrap())
            .collect();
        if konst.len() >= 64 {
            let bytes = 128 + (konst.len() * expected.size_of()) as u64;
            assert_eq!(dat, vec![bytes], "{konst:?}");
        }
        let back = nnef().model_for_read(&mut &buf[..]).unwrap();
        let input = konst.clone();
        let run = |m: TypedModel| {
            m.into_runnable()
                .unwrap()
                .run(tvec!(input.clone().into_tvalue()))
                .unwrap()[0]
                .clone()
                .into_tensor()
        };
        assert_eq!(run(back), run(model));
    }

    fn f32s(n: usize, f: impl Fn(usize) -> f32) -> Tensor {
        tensor1(&(0..n).map(f).collect::<Vec<_>>())
    }

    fn i32s(n: usize, f: impl Fn(usize) -> i32) -> Tensor {
        tensor1(&(0..n).map(f).collect::<Vec<_>>())
    }

    #[test]
    fn constants_are_stored_in_the_narrowest_exact_type() {
        check(i32s(96, |i| i as i32 - 50), DatumType::I8);
        check(i32s(96, |i| i as i32 * 300 - 14_000), DatumType::I16);
        check(i32s(96, |i| i as i32 * 100_000), DatumType::I32);
        check(f32s(96, |i| i as f32 * 0.125 - 3.0), DatumType::F16);
        check(f32s(96, |i| i as f32 * 0.1), DatumType::F32);
        // Too small to pay for the cast line.
        check(i32s(8, |i| i as i32), DatumType::I32);
    }

    #[test]
    fn nnef_bytes_do_not_depend_on_the_clock() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../fixtures/digits/model.onnx");
        let model = crate::load(&path, &Default::default()).unwrap();
        let bytes = to_nnef_bytes(&model).unwrap();
        let mut tar = tar::Archive::new(&bytes[..]);
        let mut entries = 0;
        for e in tar.entries().unwrap() {
            let e = e.unwrap();
            // tract's deterministic timestamp (1980-01-01), not the time of writing.
            assert_eq!(e.header().mtime().unwrap(), 315_532_800);
            entries += 1;
        }
        assert!(entries > 1, "{entries} entries");
        assert_eq!(to_nnef_bytes(&model).unwrap(), bytes);
    }
}
