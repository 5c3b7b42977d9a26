//! Ed25519 keys in PKCS#8 / SPKI PEM (so `openssl` reads them) and their fingerprints.

use std::path::Path;

use anyhow::{bail, Context, Result};
use ed25519_dalek::pkcs8::DecodePublicKey;
use ed25519_dalek::VerifyingKey;
use sha2::{Digest, Sha256};

/// Short fingerprint of a public key: the first 16 hex digits of SHA-256 of its raw bytes.
pub fn key_id(key: &VerifyingKey) -> String {
    let d = Sha256::digest(key.as_bytes());
    d[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// Reads one public key PEM (`-----BEGIN PUBLIC KEY-----`, Ed25519).
pub fn read_public_key(path: &Path) -> Result<VerifyingKey> {
    let pem = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read public key {}", path.display()))?;
    if pem.contains("PRIVATE KEY") {
        bail!(
            "{} is a private key; give the public key (the .pub file kiln keygen wrote)",
            path.display()
        );
    }
    VerifyingKey::from_public_key_pem(&pem).map_err(|e| {
        anyhow::anyhow!(
            "{} is not an Ed25519 public key in PEM (SPKI) form: {e}",
            path.display()
        )
    })
}

/// Reads every `*.pem` / `*.pub` public key in `dir` (the device's trusted keys).
pub fn read_trusted_keys(dir: &Path) -> Result<Vec<VerifyingKey>> {
    let mut keys = vec![];
    let entries = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read the trusted keys folder {}", dir.display()))?;
    let mut paths: Vec<_> = entries.flatten().map(|e| e.path()).collect();
    paths.sort();
    for p in paths {
        let ext = p.extension().and_then(|e| e.to_str()).unwrap_or("");
        if ext == "pub" || ext == "pem" {
            keys.push(read_public_key(&p)?);
        }
    }
    if keys.is_empty() {
        bail!(
            "no public keys (*.pub, *.pem) in {}; copy the signer's .pub file there",
            dir.display()
        );
    }
    Ok(keys)
}

#[cfg(feature = "host")]
pub use host::*;

#[cfg(feature = "host")]
mod host {
    use super::*;
    use ed25519_dalek::pkcs8::{DecodePrivateKey, EncodePrivateKey, EncodePublicKey};
    pub use ed25519_dalek::SigningKey;

    /// A fresh key pair from the OS's randomness.
    pub fn generate() -> Result<SigningKey> {
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).map_err(|e| anyhow::anyhow!("no OS randomness: {e}"))?;
        Ok(SigningKey::from_bytes(&seed))
    }

    /// PKCS#8 PEM of the private key.
    /// (PKCS#8 v1, no embedded public key: OpenSSL 3.0 refuses the v2 form for Ed25519.)
    pub fn private_pem(key: &SigningKey) -> Result<String> {
        let bytes = ed25519_dalek::pkcs8::KeypairBytes {
            secret_key: key.to_bytes(),
            public_key: None,
        };
        Ok(bytes
            .to_pkcs8_pem(Default::default())
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .to_string())
    }

    /// SPKI PEM of the public key.
    pub fn public_pem(key: &VerifyingKey) -> Result<String> {
        key.to_public_key_pem(Default::default())
            .map_err(|e| anyhow::anyhow!("{e}"))
    }

    /// Reads a PKCS#8 PEM private key, warning on group/world-readable files.
    pub fn read_private_key(path: &Path) -> Result<SigningKey> {
        let pem = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read signing key {}", path.display()))?;
        if pem.contains("BEGIN PUBLIC KEY") {
            bail!(
                "{} is a public key; signing needs the private key (kiln keygen -o KEY writes KEY)",
                path.display()
            );
        }
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(path)?.permissions().mode();
            if mode & 0o077 != 0 {
                eprintln!(
                    "warning: private key {} is readable by group/others (mode {:o}); chmod 600 it",
                    path.display(),
                    mode & 0o777
                );
            }
        }
        private_key_from_pem(&pem, &path.display().to_string())
    }

    /// Parses a PKCS#8 PEM private key; `origin` names where it came from in errors.
    pub fn private_key_from_pem(pem: &str, origin: &str) -> Result<SigningKey> {
        if pem.contains("BEGIN PUBLIC KEY") {
            bail!("{origin} is a public key; signing needs the private key (kiln keygen -o KEY writes KEY)");
        }
        SigningKey::from_pkcs8_pem(pem).map_err(|e| {
            anyhow::anyhow!("{origin} is not an Ed25519 private key in PKCS#8 PEM: {e}")
        })
    }
}
