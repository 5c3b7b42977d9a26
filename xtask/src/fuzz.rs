//! `cargo xtask fuzz [--seconds N]`: an in-tree mutation fuzzer for the artifact reader and
//! the manifest parser. Inputs are mutated both as raw bytes and inside the decompressed
//! tar (recompressed), so mutations reach the tar, manifest and hashing logic instead of
//! dying in zstd framing. Any panic is a bug: the input is saved and the task fails.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use ed25519_dalek::SigningKey;
use kiln_artifact::write::{package, PackageInput};
use kiln_artifact::{Limits, Manifest};

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn mutate(rng: &mut Rng, data: &mut Vec<u8>) {
    for _ in 0..1 + rng.below(4) {
        if data.is_empty() {
            data.push(rng.next() as u8);
            continue;
        }
        let at = rng.below(data.len());
        match rng.below(6) {
            0 => data[at] ^= 1 << rng.below(8),
            1 => data[at] = [0, 0xff, b'.', b'/', b'"', b'9'][rng.below(6)],
            2 => data.truncate(at),
            3 => {
                let len = rng.below(64).min(data.len() - at);
                let chunk = data[at..at + len].to_vec();
                let to = rng.below(data.len());
                data.splice(to..to, chunk);
            }
            4 => {
                let len = rng.below(16).min(data.len() - at);
                data.drain(at..at + len);
            }
            _ => data.insert(at, rng.next() as u8),
        }
    }
}

/// Runs the fuzzer for `seconds`.
pub fn fuzz(root: &Path, args: &[String]) -> Result<()> {
    let seconds = match args {
        [flag, n] if flag == "--seconds" => n.parse()?,
        [] => 30,
        _ => bail!("usage: cargo xtask fuzz [--seconds N]"),
    };
    let key = SigningKey::from_bytes(&[7; 32]);
    let trusted = [key.verifying_key()];
    let mut files = BTreeMap::new();
    files.insert(
        "model.nnef.tar".to_string(),
        b"version 1.0; graph g(i) -> (o) { o = i; }".repeat(20),
    );
    files.insert("golden/inputs.npz".to_string(), vec![1; 300]);
    files.insert("golden/outputs.npz".to_string(), vec![2; 300]);
    let input = PackageInput {
        name: "fuzz".into(),
        version: 1,
        target: "x86_64-linux".into(),
        precision: "f32".into(),
        tract_version: "0.23.9".into(),
        golden_max_abs: 1e-4,
        expected_accuracy: None,
        files,
    };
    let (seed, manifest) = package(&input, &key)?;
    let seed_tar = zstd::decode_all(&seed[..])?;
    let seed_manifest = manifest.to_bytes();
    let crashes = root.join("target/fuzz-crashes");
    let limits = Limits {
        max_bytes: 1 << 20,
        max_files: 32,
    };
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut rng = Rng(0x5eed_cafe_f00d_1234);
    let (mut runs, mut accepted) = (0u64, 0u64);
    std::panic::set_hook(Box::new(|_| {}));
    while Instant::now() < deadline {
        for _ in 0..64 {
            let (kind, input) = match rng.below(3) {
                0 => {
                    let mut d = seed.clone();
                    mutate(&mut rng, &mut d);
                    ("raw", d)
                }
                1 => {
                    let mut t = seed_tar.clone();
                    mutate(&mut rng, &mut t);
                    ("tar", zstd::encode_all(&t[..], 1)?)
                }
                _ => {
                    let mut m = seed_manifest.clone();
                    mutate(&mut rng, &mut m);
                    ("manifest", m)
                }
            };
            let outcome = std::panic::catch_unwind(|| {
                if kind == "manifest" {
                    let _ = Manifest::parse(&input);
                    let _ = kiln_artifact::read::check_signature(&input, &[0u8; 64], &trusted);
                    return false;
                }
                kiln_artifact::verify(
                    &input[..],
                    &trusted,
                    &limits,
                    &mut |_| Ok(()),
                    &mut |_, r| {
                        let mut buf = [0u8; 4096];
                        while r.read(&mut buf)? > 0 {}
                        Ok(())
                    },
                )
                .is_ok()
            });
            runs += 1;
            match outcome {
                Ok(ok) => accepted += ok as u64,
                Err(_) => {
                    std::fs::create_dir_all(&crashes)?;
                    let path = crashes.join(format!("crash-{kind}-{runs}.bin"));
                    std::fs::write(&path, &input)?;
                    let _ = std::panic::take_hook();
                    bail!(
                        "fuzz: the {kind} reader panicked on {} (saved)",
                        path.display()
                    );
                }
            }
        }
    }
    let _ = std::panic::take_hook();
    eprintln!("fuzz: {runs} inputs in {seconds}s, no panic ({accepted} mutated artifacts still verified: harmless mutations of tar padding)");
    Ok(())
}
