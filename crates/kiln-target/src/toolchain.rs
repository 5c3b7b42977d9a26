//! Cross toolchain discovery: which rust std, linker and emulator a target needs, which
//! are installed, and exactly what to install when one is missing.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Serialize;

use crate::spec::TargetSpec;

/// What is installed for one target.
#[derive(Debug, Clone, Serialize)]
pub struct ToolchainStatus {
    /// The Rust standard library for the triple is installed.
    pub rust_std: bool,
    /// The linker and the C compiler for build scripts are found (or none is needed).
    pub linker: bool,
    /// The qemu-user emulator is found (`None`: the target needs none).
    pub emulator: Option<bool>,
    /// Commands that would install what is missing.
    pub install: Vec<String>,
}

impl ToolchainStatus {
    /// Everything needed to build the runner is there.
    pub fn can_build(&self) -> bool {
        self.rust_std && self.linker
    }
}

/// Finds `program` on `PATH`.
pub fn which(program: &str) -> Option<PathBuf> {
    if program.contains('/') {
        return Path::new(program).exists().then(|| PathBuf::from(program));
    }
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

/// The active rustc's sysroot.
pub fn rustc_sysroot() -> Option<PathBuf> {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let out = Command::new(rustc)
        .args(["--print", "sysroot"])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

/// Checks what `spec` needs against this machine.
pub fn status(spec: &TargetSpec) -> ToolchainStatus {
    let sysroot = rustc_sysroot();
    let rust_std = sysroot.as_ref().is_some_and(|s| {
        s.join("lib/rustlib")
            .join(&spec.triple)
            .join("lib")
            .is_dir()
    });
    let linker = match spec.linker.as_str() {
        "" => true,
        "rust-lld" => sysroot.as_ref().is_some_and(|s| has_rust_lld(s)),
        other => which(other).is_some(),
    };
    let cc = (spec.cc.is_empty() || which(&spec.cc).is_some())
        && spec.tools.iter().all(|t| which(t).is_some());
    let linker = linker && cc;
    let emulator = spec.emulate.as_ref().map(|e| which(&e.qemu).is_some());
    let mut install = vec![];
    if !rust_std {
        install.push(format!(
            "rustup target add {} (or Debian's Rust: see ARCHITECTURE.md, \"Cross toolchains\")",
            spec.triple
        ));
    }
    if (!linker || emulator == Some(false)) && !spec.apt.is_empty() {
        install.push(format!("apt-get install {}", spec.apt.join(" ")));
    } else if !linker {
        install.push(format!(
            "install the linker `{}` and C compiler `{}`",
            spec.linker, spec.cc
        ));
    }
    ToolchainStatus {
        rust_std,
        linker,
        emulator,
        install,
    }
}

fn has_rust_lld(sysroot: &Path) -> bool {
    std::fs::read_dir(sysroot.join("lib/rustlib"))
        .into_iter()
        .flatten()
        .flatten()
        .any(|host| host.path().join("bin/rust-lld").exists())
}
