//! Pipeline as code: `kiln.toml` ([`manifest`]) describes models, data, optimization,
//! targets, devices, signing and CI budgets; [`pipeline`] turns it into stages (optimize,
//! compile per target, package per target), each keyed by the SHA-256 of its inputs and
//! stored in a content-addressed [`cache`] under `target/kiln/cache/`, so an unchanged stage
//! is skipped and a corrupted entry is rebuilt. [`init`] writes a starting `kiln.toml`.

pub mod cache;
pub mod init;
pub mod manifest;
pub mod package;
pub mod pipeline;

pub use manifest::Manifest;
pub use pipeline::{BuildOptions, BuildReport, Event, Pipeline, StageReport, Status};

/// kiln's version, part of every stage key.
pub const KILN_VERSION: &str = env!("CARGO_PKG_VERSION");
