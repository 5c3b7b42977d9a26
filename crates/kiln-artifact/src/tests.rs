//! Tamper, limit and install tests on hand-built artifacts (no model runtime involved).

use std::collections::BTreeMap;
use std::io::Read;

use ed25519_dalek::SigningKey;

use crate::install::{self, InstallOptions};
use crate::read::{verify, Limits};
use crate::write::{package, PackageInput};

fn key(seed: u8) -> SigningKey {
    SigningKey::from_bytes(&[seed; 32])
}

fn input(version: u64) -> PackageInput {
    let mut files = BTreeMap::new();
    files.insert("model.nnef.tar".to_string(), vec![7u8; 5000]);
    files.insert("golden/inputs.npz".to_string(), b"inputs".to_vec());
    files.insert("golden/outputs.npz".to_string(), b"outputs".to_vec());
    PackageInput {
        name: "m".into(),
        version,
        target: "aarch64-linux".into(),
        precision: "f32".into(),
        tract_version: "0.23.9".into(),
        golden_max_abs: 1e-4,
        expected_accuracy: None,
        files,
    }
}

/// Tar entries of an artifact (path, type, bytes), to tamper with.
type Entries = Vec<(String, tar::EntryType, Vec<u8>)>;

fn unpack(artifact: &[u8]) -> Entries {
    let tar = zstd::decode_all(artifact).unwrap();
    let mut a = tar::Archive::new(&tar[..]);
    a.entries()
        .unwrap()
        .map(|e| {
            let mut e = e.unwrap();
            let mut b = vec![];
            e.read_to_end(&mut b).unwrap();
            (
                String::from_utf8(e.path_bytes().to_vec()).unwrap(),
                e.header().entry_type(),
                b,
            )
        })
        .collect()
}

fn repack(entries: &Entries) -> Vec<u8> {
    let mut t = tar::Builder::new(vec![]);
    for (path, kind, bytes) in entries {
        let mut h = tar::Header::new_gnu();
        // set_path refuses `..`; write the name bytes directly like a hostile tool would.
        h.as_old_mut().name[..path.len()].copy_from_slice(path.as_bytes());
        h.set_size(bytes.len() as u64);
        h.set_entry_type(*kind);
        if kind.is_symlink() {
            h.set_link_name("/etc/passwd").unwrap();
        }
        h.set_mode(0o644);
        h.set_cksum();
        t.append(&h, &bytes[..]).unwrap();
    }
    zstd::encode_all(&t.into_inner().unwrap()[..], 3).unwrap()
}

/// Verifies `artifact` with `trusted` keys and `limits`: Ok(file count) or the error text.
fn check(artifact: &[u8], trusted: &[SigningKey], limits: Limits, expected: Result<usize, &str>) {
    let keys: Vec<_> = trusted.iter().map(|k| k.verifying_key()).collect();
    let mut count = 0;
    let got = verify(artifact, &keys, &limits, &mut |_| Ok(()), &mut |_, r| {
        count += 1;
        std::io::copy(r, &mut std::io::sink())?;
        Ok(())
    });
    match (got, expected) {
        (Ok(_), Ok(n)) => assert_eq!(count, n),
        (Err(e), Err(msg)) => assert!(format!("{e:#}").contains(msg), "`{e:#}` lacks `{msg}`"),
        (Ok(_), Err(msg)) => panic!("accepted, expected `{msg}`"),
        (Err(e), Ok(_)) => panic!("rejected: {e:#}"),
    }
}

fn tampered(artifact: &[u8], f: impl FnOnce(&mut Entries)) -> Vec<u8> {
    let mut e = unpack(artifact);
    f(&mut e);
    repack(&e)
}

#[test]
fn tamper_and_limits() {
    let k = key(1);
    let (good, _) = package(&input(1), &k).unwrap();
    let d = Limits::default;
    let one = std::slice::from_ref(&k);
    check(&good, one, d(), Ok(3));
    check(&good, &[key(9), k.clone()], d(), Ok(3));
    check(&repack(&unpack(&good)), one, d(), Ok(3));

    let flip = |i: usize| move |e: &mut Entries| e[i].2[10] ^= 1;
    check(&tampered(&good, flip(0)), one, d(), Err("bad signature"));
    check(&tampered(&good, flip(1)), one, d(), Err("bad signature"));
    let model_at = unpack(&good)
        .iter()
        .position(|e| e.0 == "model.nnef.tar")
        .unwrap();
    check(
        &tampered(&good, flip(model_at)),
        one,
        d(),
        Err("`model.nnef.tar` does not match its SHA-256"),
    );
    let golden_at = unpack(&good)
        .iter()
        .position(|e| e.0 == "golden/outputs.npz")
        .unwrap();
    check(
        &tampered(&good, |e| e[golden_at].2[0] ^= 1),
        one,
        d(),
        Err("`golden/outputs.npz` does not match"),
    );
    check(
        &tampered(&good, |e| e[model_at].2.push(0)),
        one,
        d(),
        Err("the manifest says 5000"),
    );

    check(&good, &[key(2)], d(), Err("signed by key"));
    check(&good, &[key(2)], d(), Err("not trusted here"));

    check(
        &good[..good.len() / 2],
        one,
        d(),
        Err("truncated or corrupted"),
    );
    check(&good[..20], one, d(), Err(""));
    check(b"", one, d(), Err("not a kiln artifact"));
    check(&tampered(&good, |e| e.truncate(3)), one, d(), Err("lacks"));

    let evil = |path: &str, kind| {
        let p = path.to_string();
        tampered(&good, move |e| e.push((p, kind, b"x".to_vec())))
    };
    check(
        &evil("../evil", tar::EntryType::Regular),
        one,
        d(),
        Err("unsafe path `../evil`"),
    );
    check(
        &evil("/etc/evil", tar::EntryType::Regular),
        one,
        d(),
        Err("unsafe path"),
    );
    check(
        &evil("link", tar::EntryType::Symlink),
        one,
        d(),
        Err("`link` is a symlink"),
    );
    check(
        &evil("extra.bin", tar::EntryType::Regular),
        one,
        d(),
        Err("does not list"),
    );
    check(
        &tampered(&good, |e| e.swap(0, 2)),
        one,
        d(),
        Err("must start with manifest.json"),
    );

    // Decompression bomb: 64 MiB of zeros packs into a few kB.
    let mut bomb = input(1);
    bomb.files
        .insert("model.nnef.tar".into(), vec![0u8; 64 << 20]);
    let (bomb, _) = package(&bomb, &k).unwrap();
    assert!(bomb.len() < 100_000);
    let small = Limits {
        max_bytes: 8 << 20,
        max_files: 32,
    };
    check(&bomb, one, small.clone(), Err("over the limit"));
    // A bomb before the signature is checked: a 64 MiB "manifest".
    let huge_manifest = tampered(&good, |e| e[0].2 = vec![b' '; 64 << 20]);
    check(
        &huge_manifest,
        one,
        small,
        Err("`manifest.json` is 67108864 bytes, over the limit"),
    );
}

#[test]
fn packaging_is_deterministic() {
    let (a, _) = package(&input(3), &key(1)).unwrap();
    let (b, _) = package(&input(3), &key(1)).unwrap();
    assert_eq!(a, b);
}

fn opts() -> InstallOptions {
    InstallOptions {
        allow_downgrade: false,
        limits: Limits::default(),
        target: Some("aarch64-linux".into()),
    }
}

fn write(dir: &std::path::Path, name: &str, bytes: &[u8]) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

#[test]
fn ab_install_rollback_and_refusals() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    let k = key(1);
    let keys = [k.verifying_key()];
    let ok = |_: &std::path::Path, _: &crate::Manifest| Ok("self-test ok".to_string());
    let v1 = write(tmp.path(), "v1.kiln", &package(&input(1), &k).unwrap().0);
    let v2 = write(tmp.path(), "v2.kiln", &package(&input(2), &k).unwrap().0);

    let r = install::install(&v1, &keys, &root, &opts(), &ok).unwrap();
    assert_eq!(
        (r.outcome.as_str(), r.active_slot.as_deref()),
        ("installed", Some("a"))
    );
    let r = install::install(&v2, &keys, &root, &opts(), &ok).unwrap();
    assert_eq!(
        (r.outcome.as_str(), r.active_slot.as_deref()),
        ("installed", Some("b"))
    );
    assert_eq!(install::active(&root).unwrap().1.version, 2);

    // Older version: refused, v2 stays; explicitly allowed: goes in.
    let r = install::install(&v1, &keys, &root, &opts(), &ok).unwrap();
    assert_eq!(r.outcome, "rejected");
    assert!(
        r.detail.contains("not newer than the installed version 2"),
        "{}",
        r.detail
    );
    assert_eq!(install::active(&root).unwrap().1.version, 2);

    // Wrong target, tampered artifact, failing self-test: refused, v2 untouched.
    let mut other = input(5);
    other.target = "armv7-linux".into();
    let wrong = write(tmp.path(), "wrong.kiln", &package(&other, &k).unwrap().0);
    let r = install::install(&wrong, &keys, &root, &opts(), &ok).unwrap();
    assert!(
        r.detail.contains("for target `armv7-linux`"),
        "{}",
        r.detail
    );
    let v3 = package(&input(3), &k).unwrap().0;
    let bad = write(tmp.path(), "bad.kiln", &tampered(&v3, |e| e[3].2[0] ^= 1));
    let r = install::install(&bad, &keys, &root, &opts(), &ok).unwrap();
    assert!(
        r.detail.contains("does not match its SHA-256"),
        "{}",
        r.detail
    );
    let v3 = write(tmp.path(), "v3.kiln", &v3);
    let failing = |_: &std::path::Path, _: &crate::Manifest| -> anyhow::Result<String> {
        anyhow::bail!("outputs differ by 3.0")
    };
    let r = install::install(&v3, &keys, &root, &opts(), &failing).unwrap();
    assert_eq!(r.outcome, "self-test-failed");
    assert_eq!(install::active(&root).unwrap().1.version, 2);
    assert!(!root.join("slots/.staging").exists());

    // Rollback to v1 and forward again; status shows both.
    assert_eq!(install::rollback(&root).unwrap().version, 1);
    let s = install::status(&root).unwrap();
    assert_eq!(s.active.unwrap().manifest.version, 1);
    assert_eq!(s.inactive.unwrap().manifest.version, 2);
    let mut allow = opts();
    allow.allow_downgrade = true;
    assert_eq!(
        install::install(&v1, &keys, &root, &allow, &ok)
            .unwrap()
            .outcome,
        "installed"
    );

    // A damaged inactive slot cannot be rolled back to.
    let inactive = install::status(&root).unwrap().inactive.unwrap().slot;
    std::fs::write(
        root.join("slots").join(inactive).join("model.nnef.tar"),
        b"rot",
    )
    .unwrap();
    let e = install::rollback(&root).unwrap_err();
    assert!(format!("{e:#}").contains("no longer matches"), "{e:#}");
}
