//! Writing the runner's model form: the decluttered typed model as a tract NNEF tar.

use std::path::Path;

use anyhow::Result;

use crate::load::{nnef, Model};

/// Serializes `model` as an uncompressed NNEF tar (the artifact compresses it later).
///
/// Fails, naming the op, when the graph holds an op the tract-core NNEF registry cannot
/// write, which is exactly what the runner could not read.
pub fn to_nnef_bytes(model: &Model) -> Result<Vec<u8>> {
    let mut buf = vec![];
    nnef().write_to_tar(&model.typed, &mut buf).map_err(|e| {
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
