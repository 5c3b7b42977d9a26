//! Targets: specs read from `targets/*.toml`, cross toolchain discovery, runner builds and
//! ELF checks. Target facts live in the TOML files, not in code.

pub mod build;
pub mod elf;
pub mod emulate;
pub mod spec;
pub mod toolchain;

pub use spec::{find, load_all, targets_dir, TargetSpec};

use std::path::{Path, PathBuf};

/// The kiln source tree this binary was built from, if it is still there (a checkout):
/// used to find `targets/` and to build runners on demand.
pub fn source_root() -> Option<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    root.join("crates/kiln-runner/Cargo.toml")
        .exists()
        .then(|| root.canonicalize().unwrap_or(root))
}
