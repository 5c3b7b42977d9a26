//! Writing the runner's model form: the decluttered typed model as a tract NNEF tar.

use std::path::Path;

use anyhow::Result;

use crate::load::{nnef, Model};

/// Serializes `model` as an uncompressed NNEF tar (the artifact compresses it later),
/// deterministically: tract's fixed 1980-01-01 timestamp instead of the clock in every
/// entry, so the same model gives the same bytes (reproducible artifacts, content cache).
///
/// Fails, naming the op, when the graph holds an op the tract-core NNEF registry cannot
/// write, which is exactly what the runner could not read.
pub fn to_nnef_bytes(model: &Model) -> Result<Vec<u8>> {
    let mut buf = vec![];
    nnef()
        .write_to_tar_with_config(&model.typed, &mut buf, false, true)
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
