//! The single-file executable format: `runner ELF | payload | trailer`, where the 48-byte
//! trailer is `b"KILNPAY1" | payload length (u64 LE) | SHA-256 of the payload`.
//!
//! The ELF loader ignores bytes past the program headers' extent, so the runner still
//! runs; it finds its own model by reading the trailer at the end of its executable.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

/// Magic bytes opening the trailer.
pub const MAGIC: &[u8; 8] = b"KILNPAY1";
/// Trailer size in bytes.
pub const TRAILER_LEN: u64 = 48;

/// The trailer to append after `payload`.
pub fn trailer(payload: &[u8]) -> Vec<u8> {
    let mut t = Vec::with_capacity(TRAILER_LEN as usize);
    t.extend_from_slice(MAGIC);
    t.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    t.extend_from_slice(&Sha256::digest(payload));
    t
}

/// The payload embedded in executable `exe`, `Ok(None)` when it carries none, an error when
/// a trailer is there but the payload is truncated or corrupted.
pub fn read_payload(exe: &Path) -> Result<Option<Vec<u8>>> {
    let mut f = File::open(exe).with_context(|| format!("cannot open {}", exe.display()))?;
    let size = f.metadata()?.len();
    if size < TRAILER_LEN {
        return Ok(None);
    }
    f.seek(SeekFrom::Start(size - TRAILER_LEN))?;
    let mut t = [0u8; TRAILER_LEN as usize];
    f.read_exact(&mut t)?;
    if &t[..8] != MAGIC {
        return Ok(None);
    }
    let len = u64::from_le_bytes(t[8..16].try_into().unwrap());
    if len > size - TRAILER_LEN {
        bail!(
            "{}: the embedded model is truncated (trailer says {len} bytes, the file holds {}); copy the whole file again",
            exe.display(),
            size - TRAILER_LEN
        );
    }
    f.seek(SeekFrom::Start(size - TRAILER_LEN - len))?;
    let mut payload = vec![0u8; len as usize];
    f.read_exact(&mut payload)?;
    if Sha256::digest(&payload)[..] != t[16..] {
        bail!("{}: the embedded model is corrupted or truncated (SHA-256 mismatch); copy the file again or rebuild it with `kiln compile --embed`", exe.display());
    }
    Ok(Some(payload))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(file: &[u8], expected: Result<Option<&[u8]>, &str>) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("exe");
        std::fs::write(&p, file).unwrap();
        match (read_payload(&p), expected) {
            (Ok(got), Ok(want)) => assert_eq!(got.as_deref(), want),
            (Err(e), Err(msg)) => assert!(format!("{e:#}").contains(msg), "{e:#}"),
            (got, want) => panic!("got {got:?}, want {want:?}"),
        }
    }

    #[test]
    fn payloads() {
        let exe = b"\x7fELF pretend runner".to_vec();
        let payload = b"model bytes".to_vec();
        let good = [exe.clone(), payload.clone(), trailer(&payload)].concat();
        check(&good, Ok(Some(&payload)));
        check(&exe, Ok(None));
        check(b"", Ok(None));
        let mut flipped = good.clone();
        flipped[exe.len() + 2] ^= 1;
        check(&flipped, Err("corrupted"));
        let mut truncated = trailer(&payload);
        truncated[8..16].copy_from_slice(&1_000_000u64.to_le_bytes());
        check(&[exe, truncated].concat(), Err("truncated"));
    }
}
