//! Binary checks with `object`: the ELF header must match the target spec, and the size
//! report breaks the runner down by section and (when symbols are kept) by crate.

use std::collections::BTreeMap;

use anyhow::{bail, Context, Result};
use object::{
    Architecture, BinaryFormat, Endianness, FileFlags, Object, ObjectSection, ObjectSymbol,
    SymbolKind,
};
use serde::Serialize;

use crate::spec::TargetSpec;

/// EF_ARM_ABI_FLOAT_HARD / EF_ARM_ABI_FLOAT_SOFT in an ARM ELF's e_flags.
const EF_ARM_ABI_FLOAT_HARD: u32 = 0x400;
const EF_ARM_ABI_FLOAT_SOFT: u32 = 0x200;

/// What an ELF executable says about itself, and where its bytes go.
#[derive(Debug, Clone, Serialize)]
pub struct ElfReport {
    /// `x86_64`, `aarch64`, `arm` or another architecture's name.
    pub machine: String,
    /// 32 or 64.
    pub class: u8,
    /// `little` or `big`.
    pub endian: String,
    /// ARM float ABI from e_flags (`hard`/`soft`), `None` elsewhere or when unset.
    pub float_abi: Option<String>,
    /// No program interpreter: runs without a dynamic loader or libc on the device.
    pub static_link: bool,
    /// Size of the whole file.
    pub file_size: u64,
    /// Sizes of the main sections (.text, .rodata, .data, .bss) plus `other`.
    pub sections: BTreeMap<String, u64>,
}

/// Parses `bytes` as an ELF executable.
pub fn inspect(bytes: &[u8]) -> Result<ElfReport> {
    let file = object::File::parse(bytes).context("not an executable object file")?;
    if file.format() != BinaryFormat::Elf {
        bail!("not an ELF file (it is {:?})", file.format());
    }
    let machine = match file.architecture() {
        Architecture::X86_64 => "x86_64".to_string(),
        Architecture::Aarch64 => "aarch64".to_string(),
        Architecture::Arm => "arm".to_string(),
        other => format!("{other:?}").to_lowercase(),
    };
    let float_abi = match file.flags() {
        FileFlags::Elf { e_flags, .. } if machine == "arm" => {
            if e_flags & EF_ARM_ABI_FLOAT_HARD != 0 {
                Some("hard".to_string())
            } else if e_flags & EF_ARM_ABI_FLOAT_SOFT != 0 {
                Some("soft".to_string())
            } else {
                None
            }
        }
        _ => None,
    };
    let mut sections = BTreeMap::new();
    let mut static_link = true;
    for s in file.sections() {
        let name = s.name().unwrap_or("");
        if name == ".interp" {
            static_link = false;
        }
        let key = match name {
            ".text" | ".rodata" | ".data" | ".bss" => name,
            _ if name.starts_with(".rodata") => ".rodata",
            _ if name.starts_with(".data") => ".data",
            _ => "other",
        };
        *sections.entry(key.to_string()).or_insert(0) += s.size();
    }
    Ok(ElfReport {
        machine,
        class: if file.is_64() { 64 } else { 32 },
        endian: match file.endianness() {
            Endianness::Little => "little".into(),
            Endianness::Big => "big".into(),
        },
        float_abi,
        static_link,
        file_size: bytes.len() as u64,
        sections,
    })
}

/// Refuses a binary whose machine, class, endianness, float ABI or linking does not match
/// `spec`, naming each mismatch.
pub fn check(report: &ElfReport, spec: &TargetSpec) -> Result<()> {
    let mut wrong = vec![];
    if report.machine != spec.elf.machine {
        wrong.push(format!(
            "machine is {} (target wants {})",
            report.machine, spec.elf.machine
        ));
    }
    if report.class != spec.elf.class {
        wrong.push(format!(
            "class is ELF{} (target wants ELF{})",
            report.class, spec.elf.class
        ));
    }
    if report.endian != spec.elf.endian {
        wrong.push(format!(
            "endianness is {} (target wants {})",
            report.endian, spec.elf.endian
        ));
    }
    if let Some(want) = &spec.elf.float_abi {
        if report.float_abi.as_ref() != Some(want) {
            wrong.push(format!(
                "float ABI is {} (target wants {want})",
                report.float_abi.as_deref().unwrap_or("unspecified")
            ));
        }
    }
    if spec.static_link && !report.static_link {
        wrong.push("it is dynamically linked (target wants a static runner)".into());
    }
    if !wrong.is_empty() {
        bail!(
            "binary does not fit target `{}`: {}",
            spec.name,
            wrong.join("; ")
        );
    }
    Ok(())
}

/// Bytes of function and data symbols grouped by the Rust crate they come from (legacy
/// mangling `_ZN<len><crate>...`); non-Rust symbols are grouped as `[C/asm]`. Empty for a
/// stripped binary.
pub fn size_by_crate(bytes: &[u8]) -> Result<Vec<(String, u64)>> {
    let file = object::File::parse(bytes)?;
    let mut by: BTreeMap<String, u64> = BTreeMap::new();
    for sym in file.symbols() {
        if !matches!(sym.kind(), SymbolKind::Text | SymbolKind::Data) || sym.size() == 0 {
            continue;
        }
        let name = sym.name().unwrap_or("");
        *by.entry(crate_of(name)).or_insert(0) += sym.size();
    }
    let mut v: Vec<(String, u64)> = by.into_iter().collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    Ok(v)
}

fn crate_of(symbol: &str) -> String {
    let rest = symbol
        .strip_prefix("_ZN")
        .or_else(|| symbol.strip_prefix("__ZN"));
    if let Some(rest) = rest {
        let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
        if let Ok(len) = digits.parse::<usize>() {
            let ident = &rest[digits.len()..];
            if ident.len() >= len {
                let name = &ident[..len];
                // Trait impls mangle as `_<impl ...>`: attribute them to the implementing path.
                return name.trim_start_matches('_').to_string();
            }
        }
    }
    if symbol.starts_with("_R") {
        // v0 mangling: `_RNv...C<len><crate>`; take the first crate root.
        if let Some(pos) = symbol.find('C') {
            let rest = &symbol[pos + 1..];
            let rest = rest.trim_start_matches(|c: char| {
                c == 's' || c == '_' || c.is_ascii_alphanumeric() && !c.is_ascii_digit()
            });
            let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
            if let Ok(len) = digits.parse::<usize>() {
                if let Some(name) = rest.get(digits.len()..digits.len() + len) {
                    return name.to_string();
                }
            }
        }
    }
    "[C/asm]".to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crate_names_from_mangled_symbols() {
        assert_eq!(
            crate_of("_ZN10tract_core3ops4conv17h0123456789abcdefE"),
            "tract_core"
        );
        assert_eq!(crate_of("memcpy"), "[C/asm]");
    }

    #[test]
    fn inspects_this_test_binary() {
        let exe = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        let r = inspect(&exe).unwrap();
        assert_eq!(r.machine, std::env::consts::ARCH);
        assert!(r.sections[".text"] > 0);
        assert!(inspect(b"not an elf").is_err());
    }
}
