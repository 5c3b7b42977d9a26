//! Streaming verification of a `.kiln` artifact: zstd → size limit → tar, manifest and
//! signature first, then every file hashed as it streams to a sink. Nothing from an
//! artifact is trusted before its signature is checked, and no entry is written before
//! its path, type and declared size are.

use std::io::{self, Read};

use anyhow::{bail, Context, Result};
use ed25519_dalek::{Signature, VerifyingKey};
use sha2::{Digest, Sha256};

use crate::keys::key_id;
use crate::manifest::{check_path, Manifest, MAX_MANIFEST_BYTES};

/// Names of the first two entries.
pub const MANIFEST: &str = "manifest.json";
/// The detached Ed25519 signature over the exact manifest bytes.
pub const SIGNATURE: &str = "manifest.sig";

/// Resource limits while reading an artifact (decompression bombs, entry floods).
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest total decompressed payload.
    pub max_bytes: u64,
    /// Most files.
    pub max_files: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_bytes: 2 << 30,
            max_files: 32,
        }
    }
}

/// A verified artifact's manifest, with the exact bytes that were signed.
#[derive(Debug, Clone)]
pub struct Verified {
    /// The parsed manifest.
    pub manifest: Manifest,
    /// Its exact bytes.
    pub manifest_bytes: Vec<u8>,
    /// The signature over them.
    pub signature: Vec<u8>,
}

/// Reads and verifies an artifact from `reader`.
///
/// `policy` sees the manifest right after its signature verified (refuse a wrong target or
/// an old version there, before any payload is read); `sink` receives each file's path
/// and a reader over its bytes, and must read it to the end. On error the caller discards
/// whatever the sink wrote.
pub fn verify<R: Read>(
    reader: R,
    trusted: &[VerifyingKey],
    limits: &Limits,
    policy: &mut dyn FnMut(&Manifest) -> Result<()>,
    sink: &mut dyn FnMut(&str, &mut dyn Read) -> Result<()>,
) -> Result<Verified> {
    let decoder = ruzstd::decoding::StreamingDecoder::new(reader)
        .map_err(|e| anyhow::anyhow!("not a kiln artifact (no zstd frame): {e}"))?;
    // Tar adds 512 bytes of header per entry plus padding and two end blocks.
    let budget = limits.max_bytes + MAX_MANIFEST_BYTES + 512 * (limits.max_files as u64 + 8) * 2;
    let limited = LimitReader {
        inner: decoder,
        remaining: budget,
        limit: limits.max_bytes,
    };
    let mut archive = tar::Archive::new(limited);
    let mut entries = archive.entries().map_err(corrupt)?;

    let manifest_bytes = read_small(entries.next(), MANIFEST, MAX_MANIFEST_BYTES)?;
    let signature = read_small(entries.next(), SIGNATURE, 64)?;
    let manifest = check_signature(&manifest_bytes, &signature, trusted)?;
    if manifest.payload_bytes() > limits.max_bytes {
        bail!(
            "artifact would unpack to {} bytes, over the limit of {} (decompression bomb, or raise --max-size)",
            manifest.payload_bytes(),
            limits.max_bytes
        );
    }
    if manifest.files.len() > limits.max_files {
        bail!(
            "artifact lists {} files, over the limit of {}",
            manifest.files.len(),
            limits.max_files
        );
    }
    policy(&manifest)?;

    let mut seen = std::collections::BTreeSet::new();
    for entry in entries {
        let mut entry = entry.map_err(corrupt)?;
        let path = entry_path(&entry)?;
        check_entry_type(&entry, &path)?;
        let Some(expected) = manifest.files.get(&path) else {
            bail!("artifact holds `{path}`, which the manifest does not list (tampered archive)");
        };
        if !seen.insert(path.clone()) {
            bail!("artifact holds `{path}` twice (tampered archive)");
        }
        let size = entry.header().size().map_err(corrupt)?;
        if size != expected.size {
            bail!(
                "`{path}` is {size} bytes, the manifest says {} (tampered or corrupted)",
                expected.size
            );
        }
        let mut hashing = HashingReader {
            inner: &mut entry,
            hasher: Sha256::new(),
            read: 0,
        };
        sink(&path, &mut hashing).with_context(|| format!("unpacking `{path}`"))?;
        io::copy(&mut hashing, &mut io::sink()).map_err(corrupt)?;
        let digest = hex(&hashing.hasher.finalize());
        if hashing.read != expected.size {
            bail!(
                "`{path}` is truncated ({} of {} bytes)",
                hashing.read,
                expected.size
            );
        }
        if digest != expected.sha256 {
            bail!("`{path}` does not match its SHA-256 in the manifest (corrupted or tampered)");
        }
    }
    if let Some(missing) = manifest.files.keys().find(|p| !seen.contains(*p)) {
        bail!("artifact lacks `{missing}`, listed in the manifest (truncated archive?)");
    }
    Ok(Verified {
        manifest,
        manifest_bytes,
        signature,
    })
}

/// Verifies a whole artifact held in `reader` without keeping its files (`kiln verify`).
pub fn verify_only<R: Read>(
    reader: R,
    trusted: &[VerifyingKey],
    limits: &Limits,
) -> Result<Verified> {
    verify(reader, trusted, limits, &mut |_| Ok(()), &mut |_, r| {
        io::copy(r, &mut io::sink())?;
        Ok(())
    })
}

/// Verifies the artifact at `path` and unpacks its files into `dir` (which must exist).
pub fn unpack(
    path: &std::path::Path,
    trusted: &[VerifyingKey],
    limits: &Limits,
    dir: &std::path::Path,
) -> Result<Verified> {
    let file =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    verify(
        io::BufReader::new(file),
        trusted,
        limits,
        &mut |_| Ok(()),
        &mut |p, r| {
            let dest = dir.join(p);
            if let Some(parent) = dest.parent() {
                std::fs::create_dir_all(parent)?;
            }
            io::copy(r, &mut std::fs::File::create(dest)?)?;
            Ok(())
        },
    )
}

/// Checks the Ed25519 signature of `manifest_bytes` against the trusted keys, then parses it.
pub fn check_signature(
    manifest_bytes: &[u8],
    signature: &[u8],
    trusted: &[VerifyingKey],
) -> Result<Manifest> {
    let sig = Signature::from_slice(signature)
        .map_err(|_| anyhow::anyhow!("manifest.sig is not an Ed25519 signature (64 bytes)"))?;
    if trusted
        .iter()
        .any(|k| k.verify_strict(manifest_bytes, &sig).is_ok())
    {
        return Manifest::parse(manifest_bytes);
    }
    // Say why: an unknown signer, or a manifest/signature that no longer match.
    let claimed = serde_json::from_slice::<serde_json::Value>(manifest_bytes)
        .ok()
        .and_then(|v| v.get("key_id").and_then(|k| k.as_str()).map(String::from));
    match claimed {
        Some(id) if !trusted.iter().any(|k| key_id(k) == id) => bail!(
            "artifact is signed by key {id}, which is not trusted here ({} trusted key(s): {})",
            trusted.len(),
            trusted.iter().map(key_id).collect::<Vec<_>>().join(", ")
        ),
        _ => bail!("bad signature: manifest.sig does not verify the manifest (tampered manifest or signature)"),
    }
}

fn read_small<R: Read>(
    entry: Option<io::Result<tar::Entry<'_, R>>>,
    name: &str,
    max: u64,
) -> Result<Vec<u8>> {
    let Some(entry) = entry else {
        bail!("artifact is truncated or empty: `{name}` is missing");
    };
    let mut entry = entry.map_err(corrupt)?;
    let path = entry_path(&entry)?;
    if path != name {
        bail!("artifact must start with manifest.json then manifest.sig; found `{path}` where `{name}` belongs");
    }
    check_entry_type(&entry, &path)?;
    let size = entry.header().size().map_err(corrupt)?;
    if size > max {
        bail!("`{name}` is {size} bytes, over the limit of {max}");
    }
    let mut buf = Vec::with_capacity(size as usize);
    entry.read_to_end(&mut buf).map_err(corrupt)?;
    Ok(buf)
}

fn entry_path<R: Read>(entry: &tar::Entry<'_, R>) -> Result<String> {
    let raw = entry.path_bytes();
    let path = std::str::from_utf8(&raw)
        .map_err(|_| anyhow::anyhow!("artifact entry with a non-UTF-8 path; refusing it"))?;
    check_path(path)?;
    Ok(path.to_string())
}

fn check_entry_type<R: Read>(entry: &tar::Entry<'_, R>, path: &str) -> Result<()> {
    let t = entry.header().entry_type();
    if !t.is_file() {
        let kind = if t.is_symlink() {
            "a symlink"
        } else if t.is_hard_link() {
            "a hard link"
        } else if t.is_dir() {
            "a directory"
        } else {
            "not a regular file"
        };
        bail!("artifact entry `{path}` is {kind}; only regular files are allowed");
    }
    Ok(())
}

fn corrupt(e: io::Error) -> anyhow::Error {
    if e.kind() == io::ErrorKind::FileTooLarge {
        return anyhow::anyhow!("{e}");
    }
    anyhow::anyhow!("artifact is truncated or corrupted ({e})")
}

/// Lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

struct LimitReader<R> {
    inner: R,
    remaining: u64,
    limit: u64,
}

impl<R: Read> Read for LimitReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.remaining == 0 {
            return Err(io::Error::new(
                io::ErrorKind::FileTooLarge,
                format!(
                    "artifact decompresses past the limit of {} bytes (decompression bomb?)",
                    self.limit
                ),
            ));
        }
        let max = buf
            .len()
            .min(self.remaining.min(usize::MAX as u64) as usize);
        let n = self.inner.read(&mut buf[..max])?;
        self.remaining -= n as u64;
        Ok(n)
    }
}

struct HashingReader<'a, R> {
    inner: &'a mut R,
    hasher: Sha256,
    read: u64,
}

impl<R: Read> Read for HashingReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.read += n as u64;
        Ok(n)
    }
}
