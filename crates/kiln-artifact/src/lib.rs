//! The `.kiln` artifact: a zstd-compressed tar of `manifest.json`, `manifest.sig` (Ed25519
//! over the exact manifest bytes), the model, golden self-test data and optionally the
//! runner. Verification and A/B install run on the device; packaging and keys on the host
//! (feature `host`). The format is documented in `docs/artifact.md`.

pub mod install;
pub mod keys;
pub mod manifest;
pub mod read;
#[cfg(feature = "host")]
pub mod write;

#[cfg(feature = "host")]
pub use keys::SigningKey;
pub use manifest::Manifest;

#[cfg(test)]
mod tests;
pub use read::{unpack, verify, verify_only, Limits, Verified};
