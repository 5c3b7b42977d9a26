//! `cargo xtask vendor-tract-linalg`: the copy of tract-linalg in `third_party/`, with its x86
//! matmul kernels' legacy-SSE instructions rewritten to their VEX forms (third_party/README.md).
//!
//! tract-linalg 0.23.9's integer 8x8 kernels (and a few f32 epilogue paths) mix legacy-SSE
//! encoded instructions (`movd`, `movq`, `extractps`, `pinsrd`, ...) into AVX code. After a
//! 256-bit write, each such instruction is an SSE/AVX transition: measured here at 98 ns
//! against 0.5 ns for its VEX twin, which made the `avx2`/`avxvnni`/`avx512vnni` i32 8x8
//! kernels 3–30x slower than they should be. The VEX form computes the same low 128 bits and
//! zeroes the bits above them instead of keeping them; the rewrite is applied only where
//! nothing reads those upper bits afterwards.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// The tract-linalg version vendored (must match the workspace's `=0.23.9` pins).
pub const VERSION: &str = "0.23.9";

/// Where the patched copy lives, relative to the repo root.
pub const DIR: &str = "third_party/tract-linalg";

/// Legacy-SSE instructions whose VEX form has the same operands: a write of the low bits of a
/// register that nothing reads above 128 bits (`movd`/`movq`/`movaps` into an xmm that is then
/// broadcast, stored or extracted), or a pure read (`extractps`, `pextrw`, `pextrd`).
const SAME_OPERANDS: [&str; 6] = ["movd", "movq", "movaps", "extractps", "pextrw", "pextrd"];

/// Lane inserts, rewritten to the 4-operand VEX form `vpinsrX xmmN, xmmN, src, imm`.
const INSERTS: [&str; 2] = ["pinsrw", "pinsrd"];

/// How one template line is rewritten, or None when it stays as it is. `i32_kernel` marks the
/// integer 8x8 kernels, whose `pinsrd` gathers rely on the bits above 128 being kept (they
/// swap ymm halves between two rounds of inserts): those stay legacy (rare paths: strided
/// `add_unicast` and `addc`, not the matmul loop or its requantization).
pub fn rewrite_line(line: &str, i32_kernel: bool) -> Option<String> {
    let body = line.trim_start();
    let indent = &line[..line.len() - body.len()];
    let (mnemonic, rest) = body.split_once(char::is_whitespace)?;
    let operands = rest.trim_start();
    if !operands.contains("xmm") {
        return None;
    }
    if SAME_OPERANDS.contains(&mnemonic) {
        return Some(format!("{indent}v{mnemonic} {operands}"));
    }
    if INSERTS.contains(&mnemonic) && !(i32_kernel && mnemonic == "pinsrd") {
        let (dst, tail) = operands.split_once(',')?;
        let dst = dst.trim();
        return Some(format!("{indent}v{mnemonic} {dst}, {dst},{tail}"));
    }
    None
}

/// The legacy-SSE lines a template still has after [`rewrite_line`]: mnemonic and 1-based line.
pub fn legacy_left(text: &str) -> Vec<(usize, String)> {
    text.lines()
        .enumerate()
        .filter_map(|(i, l)| {
            let body = l.trim_start();
            let (m, rest) = body.split_once(char::is_whitespace)?;
            let simd = SAME_OPERANDS.contains(&m) || INSERTS.contains(&m);
            (simd && rest.contains("xmm")).then(|| (i + 1, m.to_string()))
        })
        .collect()
}

/// Rewrites a whole template (see [`rewrite_line`]); returns it and how many lines changed.
pub fn rewrite(text: &str, i32_kernel: bool) -> (String, usize) {
    let mut changed = 0;
    let mut out = String::with_capacity(text.len() + 256);
    for line in text.split_inclusive('\n') {
        let (content, eol) = match line.strip_suffix('\n') {
            Some(c) => (c, "\n"),
            None => (line, ""),
        };
        match rewrite_line(content, i32_kernel) {
            Some(new) => {
                changed += 1;
                out.push_str(&new);
            }
            None => out.push_str(content),
        }
        out.push_str(eol);
    }
    (out, changed)
}

/// Whether a template file is one of the integer 8x8 kernels (see [`rewrite_line`]).
fn is_i32_kernel(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.contains("_i32_"))
}

/// Every assembly template under `dir/x86_64`.
fn templates(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = vec![];
    let mut stack = vec![dir.join("x86_64")];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).with_context(|| format!("reading {}", d.display()))? {
            let p = e?.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "j2" || x == "raw") {
                out.push(p);
            }
        }
    }
    out.sort();
    Ok(out)
}

/// The pristine crate in cargo's registry cache.
fn pristine() -> Result<PathBuf> {
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .context("neither CARGO_HOME nor HOME is set")?;
    let src = home.join("registry/src");
    let name = format!("tract-linalg-{VERSION}");
    for index in std::fs::read_dir(&src).with_context(|| format!("reading {}", src.display()))? {
        let candidate = index?.path().join(&name);
        if candidate.join("Cargo.toml").is_file() {
            return Ok(candidate);
        }
    }
    bail!(
        "{name} is not in {}: comment out the `[patch.crates-io]` entry in Cargo.toml, run \
         `cargo fetch`, restore the entry, then run this task again",
        src.display()
    )
}

/// Copies `from` into `to`, leaving out at the top level what the build never reads (benches,
/// integration tests, the core dumps the 0.23.9 crate ships).
fn copy_tree(from: &Path, to: &Path, top: bool) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        let name = e.file_name();
        let name_s = name.to_string_lossy();
        let unused = name_s.starts_with("core.") || name_s == "benches" || name_s == "tests";
        if top && unused {
            continue;
        }
        let (src, dst) = (e.path(), to.join(&name));
        if src.is_dir() {
            copy_tree(&src, &dst, false)?;
        } else {
            std::fs::copy(&src, &dst)
                .with_context(|| format!("copying {} to {}", src.display(), dst.display()))?;
        }
    }
    Ok(())
}

/// Cargo.toml without the `[[bench]]` and `[[test]]` targets whose files are not vendored.
fn strip_targets(manifest: &str) -> String {
    let mut out = String::new();
    let mut skip = false;
    for line in manifest.lines() {
        if line.starts_with('[') {
            skip = line == "[[bench]]" || line == "[[test]]";
        }
        if !skip {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// `cargo xtask vendor-tract-linalg [--check]`: (re)writes `third_party/tract-linalg` from the
/// registry copy, or with `--check` verifies the committed copy has nothing left to rewrite.
pub fn vendor(root: &Path, args: &[String]) -> Result<()> {
    let dir = root.join(DIR);
    if args.iter().any(|a| a == "--check") {
        return check(&dir);
    }
    let from = pristine()?;
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    copy_tree(&from, &dir, true)?;
    let manifest = dir.join("Cargo.toml");
    std::fs::write(
        &manifest,
        strip_targets(&std::fs::read_to_string(&manifest)?),
    )?;
    let mut total = 0;
    for t in templates(&dir)? {
        let text = std::fs::read_to_string(&t)?;
        let (new, changed) = rewrite(&text, is_i32_kernel(&t));
        let kept = legacy_left(&new);
        if changed > 0 {
            std::fs::write(&t, &new)?;
            total += changed;
        }
        if changed > 0 || !kept.is_empty() {
            let kept: Vec<String> = kept.iter().map(|(l, m)| format!("{m}@{l}")).collect();
            eprintln!(
                "{changed:4} lines rewritten  {}  (kept: {})",
                t.strip_prefix(root)?.display(),
                kept.join(" ")
            );
        }
    }
    eprintln!("tract-linalg {VERSION} vendored into {DIR}: {total} template lines rewritten");
    check(&dir)
}

/// Fails when a template under `dir` still has a line [`rewrite_line`] would change.
fn check(dir: &Path) -> Result<()> {
    let mut bad = vec![];
    for t in templates(dir)? {
        let text = std::fs::read_to_string(&t)?;
        if rewrite(&text, is_i32_kernel(&t)).1 > 0 {
            bad.push(t.display().to_string());
        }
    }
    if !bad.is_empty() {
        bail!(
            "legacy-SSE instructions left in {}: run `cargo xtask vendor-tract-linalg`",
            bad.join(", ")
        );
    }
    eprintln!("{DIR}: no legacy-SSE instruction left to rewrite");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(line: &str, i32_kernel: bool, expected: Option<&str>) {
        assert_eq!(
            rewrite_line(line, i32_kernel).as_deref(),
            expected,
            "{line}"
        );
    }

    #[test]
    fn rewrites_legacy_sse() {
        check(
            "    movd            xmm14,  r8d",
            false,
            Some("    vmovd xmm14,  r8d"),
        );
        check(
            "    movq            xmm8, qword ptr [rax]          // read 8 bytes",
            true,
            Some("    vmovq xmm8, qword ptr [rax]          // read 8 bytes"),
        );
        check(
            "            extractps   ebx, xmm{{col}}, {{row}}",
            true,
            Some("            vextractps ebx, xmm{{col}}, {{row}}"),
        );
        check(
            "        pinsrw          xmm12, word ptr [rdi + 8], 0",
            false,
            Some("        vpinsrw xmm12, xmm12, word ptr [rdi + 8], 0"),
        );
        check(
            "    pinsrd  xmm14, eax, {{i}}",
            false,
            Some("    vpinsrd xmm14, xmm14, eax, {{i}}"),
        );
    }

    #[test]
    fn keeps_what_must_stay() {
        // i32 kernels' gathers rely on the upper half being kept.
        check("    pinsrd  xmm14, eax, {{i}}", true, None);
        // Already VEX, not SIMD, or no xmm operand.
        check("    vmovd xmm14, r8d", false, None);
        check("    mov             r8d,    0x01010101", false, None);
        check("    movq rax, rbx", false, None);
        check("{{L}}loop:", false, None);
        check("", false, None);
    }

    #[test]
    fn whole_template_round_trip() {
        let text = "a:\n    movd xmm1, eax\n    vpbroadcastd ymm1, xmm1\n    pinsrd xmm2, eax, 1";
        let (new, n) = rewrite(text, true);
        assert_eq!(n, 1);
        assert_eq!(
            new,
            "a:\n    vmovd xmm1, eax\n    vpbroadcastd ymm1, xmm1\n    pinsrd xmm2, eax, 1"
        );
        assert_eq!(rewrite(&new, true), (new.clone(), 0));
        assert_eq!(legacy_left(&new), vec![(4, "pinsrd".to_string())]);
    }

    /// The committed copy is what the task would produce: nothing left to rewrite.
    #[test]
    fn vendored_copy_is_patched() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(DIR);
        super::check(&dir).unwrap();
        let kernel = dir.join("x86_64/fma/avx2_mmm_i32_8x8.S.j2");
        let text = std::fs::read_to_string(kernel).unwrap();
        assert!(text.contains("vmovq xmm8, qword ptr [rax]"));
    }
}
