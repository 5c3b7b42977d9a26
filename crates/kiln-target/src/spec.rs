//! Target specs: one TOML per target under `targets/`, read as data.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

/// One deployable target: how to build the runner for it, how to check the binary, how to
/// run it emulated.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetSpec {
    /// Target name used on the command line (`aarch64-linux`); must match the file stem.
    pub name: String,
    /// One line for humans: what boards this is for.
    pub description: String,
    /// Rust target triple.
    pub triple: String,
    /// `-C target-cpu`.
    pub cpu: String,
    /// `-C target-feature` entries (`+neon`, `+avx2`...).
    #[serde(default)]
    pub features: Vec<String>,
    /// Extra `RUSTFLAGS` for the runner build (`-Crelocation-model=static`...).
    #[serde(default)]
    pub rustflags: Vec<String>,
    /// Cargo features of kiln-runner for this target (`no-fp16`).
    #[serde(default)]
    pub runner_features: Vec<String>,
    /// Linker: `rust-lld`, a cross gcc driver, or empty for rustc's default.
    #[serde(default)]
    pub linker: String,
    /// C compiler for build scripts (tract-linalg assembles its kernels): empty for the host's.
    #[serde(default)]
    pub cc: String,
    /// Link statically (musl, or glibc with `+crt-static`): no libc coupling on the device.
    pub static_link: bool,
    /// `opt-level` of the shipped runner (`s` small, `3` fast).
    pub opt_level: String,
    /// Largest acceptable stripped runner, in bytes.
    pub runner_size_budget: u64,
    /// Precisions to prefer on this CPU, best first (`int8`, `f16`, `f32`).
    pub precision: Vec<String>,
    /// What the built ELF must say.
    pub elf: ElfSpec,
    /// How to run the runner under emulation on an x86_64 host.
    pub emulate: Option<EmulateSpec>,
    /// Other executables the build needs on `PATH` (`ld.lld`).
    #[serde(default)]
    pub tools: Vec<String>,
    /// Apt packages providing this target's linker and emulator.
    #[serde(default)]
    pub apt: Vec<String>,
}

/// Expected ELF header facts.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ElfSpec {
    /// `x86_64`, `aarch64` or `arm`.
    pub machine: String,
    /// 32 or 64.
    pub class: u8,
    /// `little` or `big`.
    pub endian: String,
    /// ARM float ABI: `hard` or `soft` (ignored elsewhere).
    #[serde(default)]
    pub float_abi: Option<String>,
}

/// Emulation with qemu-user.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmulateSpec {
    /// qemu-user binary (`qemu-aarch64-static`).
    pub qemu: String,
    /// `-cpu` model to emulate.
    #[serde(default)]
    pub cpu: Option<String>,
    /// Sysroot for dynamically linked runners (`-L`).
    #[serde(default)]
    pub sysroot: Option<String>,
    /// Environment forcing tract's CPU feature detection: under qemu-user /proc/cpuinfo is
    /// the host's, so tract cannot see the emulated CPU's features.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
}

impl TargetSpec {
    /// Reads and validates one spec file.
    pub fn from_file(path: &Path) -> Result<TargetSpec> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read target spec {}", path.display()))?;
        let spec: TargetSpec = toml::from_str(&text)
            .map_err(|e| anyhow::anyhow!("{}: {}", path.display(), e.to_string().trim_end()))?;
        spec.validate()
            .with_context(|| format!("{}", path.display()))?;
        let stem = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        if stem != spec.name {
            bail!(
                "{}: field `name` is `{}` but the file is named `{stem}.toml`; they must match",
                path.display(),
                spec.name
            );
        }
        Ok(spec)
    }

    fn validate(&self) -> Result<()> {
        let field = |name: &str, ok: bool, what: &str| -> Result<()> {
            if ok {
                Ok(())
            } else {
                bail!("field `{name}` {what}")
            }
        };
        field(
            "triple",
            self.triple.split('-').count() >= 3,
            "must be a Rust target triple like aarch64-unknown-linux-musl",
        )?;
        field(
            "elf.machine",
            ["x86_64", "aarch64", "arm"].contains(&self.elf.machine.as_str()),
            "must be x86_64, aarch64 or arm",
        )?;
        field(
            "elf.class",
            [32, 64].contains(&self.elf.class),
            "must be 32 or 64",
        )?;
        field(
            "elf.endian",
            ["little", "big"].contains(&self.elf.endian.as_str()),
            "must be little or big",
        )?;
        field(
            "elf.float_abi",
            self.elf
                .float_abi
                .as_deref()
                .is_none_or(|f| f == "hard" || f == "soft"),
            "must be hard or soft",
        )?;
        field(
            "opt_level",
            ["0", "1", "2", "3", "s", "z"].contains(&self.opt_level.as_str()),
            "must be one of 0 1 2 3 s z",
        )?;
        field(
            "precision",
            self.precision
                .iter()
                .all(|p| ["int8", "f16", "f32"].contains(&p.as_str())),
            "entries must be int8, f16 or f32",
        )?;
        field(
            "runner_size_budget",
            self.runner_size_budget > 0,
            "must be positive",
        )?;
        Ok(())
    }

    /// The `RUSTFLAGS` for this target's runner build; `{targets}` in the spec's extra
    /// flags stands for `targets_dir` (linker scripts live in `targets/link/`).
    pub fn rustflags(&self, targets_dir: &Path) -> String {
        let mut flags = vec![format!("-Ctarget-cpu={}", self.cpu)];
        let mut features = self.features.clone();
        if self.static_link {
            features.push("+crt-static".into());
        }
        if !features.is_empty() {
            flags.push(format!("-Ctarget-feature={}", features.join(",")));
        }
        let dir = targets_dir.display().to_string();
        flags.extend(self.rustflags.iter().map(|f| f.replace("{targets}", &dir)));
        flags.join(" ")
    }
}

/// All target specs found in `dir`, sorted by name.
pub fn load_all(dir: &Path) -> Result<Vec<TargetSpec>> {
    let mut specs = vec![];
    let entries = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read the targets folder {}", dir.display()))?;
    for entry in entries {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "toml") {
            specs.push(TargetSpec::from_file(&path)?);
        }
    }
    specs.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(specs)
}

/// The spec called `name`; an unknown name lists the known ones.
pub fn find(dir: &Path, name: &str) -> Result<TargetSpec> {
    let path = dir.join(format!("{name}.toml"));
    if path.exists() {
        return TargetSpec::from_file(&path);
    }
    let known: Vec<String> = load_all(dir)?.into_iter().map(|s| s.name).collect();
    bail!(
        "unknown target `{name}`; known targets: {}",
        known.join(", ")
    )
}

/// The `targets/` folder: `$KILN_TARGETS_DIR`, else `./targets`, else next to the kiln
/// checkout this binary was built from.
pub fn targets_dir() -> Result<PathBuf> {
    if let Some(d) = std::env::var_os("KILN_TARGETS_DIR") {
        return Ok(PathBuf::from(d));
    }
    let source = crate::source_root().map(|r| r.join("targets"));
    for c in [Some(PathBuf::from("targets")), source]
        .into_iter()
        .flatten()
    {
        if c.join("x86_64-linux.toml").exists() {
            return Ok(c);
        }
    }
    bail!("no targets/ folder found; run kiln from its checkout or set KILN_TARGETS_DIR")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes `text` as `<name>.toml` and parses it: Ok(()) or the error text.
    fn check(name: &str, text: &str, expected: Result<(), &str>) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join(format!("{name}.toml"));
        std::fs::write(&p, text).unwrap();
        match (TargetSpec::from_file(&p), expected) {
            (Ok(_), Ok(())) => {}
            (Err(e), Err(msg)) => {
                let e = format!("{e:#}");
                assert!(
                    e.contains(msg) && e.contains(&format!("{name}.toml")),
                    "{e} lacks {msg}"
                )
            }
            (got, want) => panic!("got {got:?}, want {want:?}"),
        }
    }

    const GOOD: &str = r#"
name = "t"
description = "test"
triple = "aarch64-unknown-linux-musl"
cpu = "generic"
features = ["+neon"]
linker = "rust-lld"
static_link = true
opt_level = "s"
runner_size_budget = 5000000
precision = ["int8", "f32"]
[elf]
machine = "aarch64"
class = 64
endian = "little"
"#;

    #[test]
    fn specs() {
        check("t", GOOD, Ok(()));
        check("u", GOOD, Err("file is named `u.toml`"));
        check(
            "t",
            &GOOD.replace("cpu = \"generic\"\n", ""),
            Err("missing field `cpu`"),
        );
        check(
            "t",
            &GOOD.replace("class = 64", "class = 16"),
            Err("field `elf.class`"),
        );
        check(
            "t",
            &GOOD.replace("class = 64", "class = \"big\""),
            Err("class = \"big\""),
        );
        check(
            "t",
            &format!("{GOOD}\nbogus = 1"),
            Err("unknown field `bogus`"),
        );
        check(
            "t",
            &GOOD.replace("\"int8\", ", "\"int4\", "),
            Err("field `precision`"),
        );
        check("t", "name = ", Err("t.toml"));
    }

    #[test]
    fn repo_targets_all_parse() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../targets");
        let specs = load_all(&dir).unwrap();
        let names: Vec<&str> = specs.iter().map(|s| s.name.as_str()).collect();
        for want in [
            "x86_64-linux",
            "x86_64-linux-v3",
            "aarch64-linux",
            "aarch64-linux-a76",
            "armv7-linux",
        ] {
            assert!(names.contains(&want), "{want} missing from {names:?}");
        }
        let err = find(&dir, "riscv-linux").unwrap_err().to_string();
        assert!(
            err.contains("unknown target `riscv-linux`") && err.contains("aarch64-linux"),
            "{err}"
        );
    }
}
