//! Tensor I/O and data conventions shared by the kiln host tools and the on-device runner.
//!
//! Kept small on purpose: the runner links it. No ONNX, no async, no CLI parsing.

pub mod compare;
pub mod data;
pub mod embed;
pub mod exec;
pub mod fsutil;
pub mod nnef;
pub mod npz;

pub use data::{Batch, InputSpec};
pub use npz::{read_tensors, write_tensors, NamedTensors};
pub use tract_core;

use anyhow::Result;
use tract_core::prelude::*;

/// The tract version host and runner link; NNEF is only guaranteed to load in the same one.
pub const TRACT_VERSION: &str = "0.23.9";

/// The elements of a plain in-memory tensor as a slice of `T`.
pub fn slice_of<T: Datum>(t: &Tensor) -> Result<&[T]> {
    t.try_as_plain_ram()?.as_slice::<T>()
}

#[cfg(test)]
mod tests {
    #[test]
    fn tract_version_matches_the_workspace_pin() {
        let manifest = include_str!("../../../Cargo.toml");
        let pin = format!("tract-core = {{ version = \"={}\"", super::TRACT_VERSION);
        assert!(
            manifest.contains(&pin),
            "update TRACT_VERSION with the workspace's tract pin"
        );
    }
}
