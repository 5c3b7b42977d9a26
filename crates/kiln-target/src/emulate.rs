//! Running a target's binary on this host: natively when the host can, else under
//! qemu-user with the spec's CPU model, sysroot and forced tract CPU features.

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Result};

use crate::spec::TargetSpec;
use crate::toolchain::which;

/// How a target's binaries run here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Execution {
    /// The host runs them directly (same architecture).
    Native,
    /// Under qemu-user: timings are not representative.
    Emulated,
}

/// Whether this host can run `spec`'s binaries natively.
pub fn execution(spec: &TargetSpec) -> Execution {
    if spec.elf.machine == std::env::consts::ARCH {
        Execution::Native
    } else {
        Execution::Emulated
    }
}

/// A command running `binary` (built for `spec`) on this host.
pub fn command(spec: &TargetSpec, binary: &Path) -> Result<Command> {
    if execution(spec) == Execution::Native {
        return Ok(Command::new(binary));
    }
    let Some(emu) = &spec.emulate else {
        bail!(
            "target `{}` ({}) cannot run on this {} host and its spec has no [emulate] section",
            spec.name,
            spec.elf.machine,
            std::env::consts::ARCH
        );
    };
    if which(&emu.qemu).is_none() {
        bail!(
            "`{}` is not installed: apt-get install qemu-user-static (or cargo xtask setup-cross)",
            emu.qemu
        );
    }
    let mut cmd = Command::new(&emu.qemu);
    if let Some(cpu) = &emu.cpu {
        cmd.args(["-cpu", cpu]);
    }
    if let Some(sysroot) = &emu.sysroot {
        cmd.arg("-L").arg(sysroot);
    }
    cmd.envs(&emu.env);
    cmd.arg(binary);
    Ok(cmd)
}
