//! Tensor I/O and data conventions shared by the kiln host tools and the on-device runner.
//!
//! Kept small on purpose: the runner links it. No ONNX, no async, no CLI parsing.

pub mod compare;
pub mod data;
pub mod embed;
pub mod exec;
pub mod fsutil;
pub mod kernels;
pub mod nnef;
pub mod npz;
pub mod passes;

pub use data::{Batch, InputSpec};
pub use npz::{read_tensors, write_tensors, NamedTensors};
pub use tract_core;

use anyhow::Result;
use tract_core::prelude::*;

/// The tract version host and runner link; NNEF is only guaranteed to load in the same one.
pub const TRACT_VERSION: &str = "0.23.9";

/// Process-wide tract settings kiln relies on. `kiln` and `kiln-runner` call it first thing;
/// `exec::optimize` calls it again (idempotent) for library users.
///
/// x86_64: tract 0.23.9's AMX int8 matmul kernel walks the packed activations in 64-deep K
/// steps, but that packing (`PackedI8K4`) pads K to 4 only, so the last panel is over-read
/// by up to 480 bytes. The runner died with SIGSEGV when the buffer ended at a page
/// boundary (seen on Sapphire Rapids, int8 MobileNet). kiln takes the AMX int8 tier out as
/// a config default, below the environment: a `TRACT_CPU_ISA` the user sets still decides.
pub fn configure_tract() -> Result<()> {
    #[cfg(target_arch = "x86_64")]
    tract_core::knobs::set_config_global("TRACT_CPU_ISA", "-amx-int8")?;
    Ok(())
}

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
