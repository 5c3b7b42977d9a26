//! Signed artifacts end to end: keygen, package, verify (also with stock openssl), install
//! into A/B slots with the real runner, rollback, refusals, crash safety, full disk.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::support::*;

fn runner(target: &str) -> PathBuf {
    let spec = kiln_target::find(&fixtures().join("../targets"), target).unwrap();
    kiln_target::build::find_runner(&spec)
        .unwrap_or_else(|| panic!("no runner for {target}: cargo xtask runner --target {target}"))
}

/// Runs the `target` runner (under qemu when needed) with `args`.
fn device(target: &str, args: &[&dyn AsRefOsStr]) -> Run {
    let spec = kiln_target::find(&fixtures().join("../targets"), target).unwrap();
    let mut cmd = kiln_target::emulate::command(&spec, &runner(target)).unwrap();
    for a in args {
        cmd.arg(a.as_os());
    }
    run_cmd(cmd)
}

/// A scratch workspace: a key pair, a trusted-keys dir, and artifacts of fixtures.
struct Bench {
    dir: tempfile::TempDir,
}

impl Bench {
    fn new() -> Bench {
        let b = Bench {
            dir: tempfile::tempdir().unwrap(),
        };
        kiln(&[&"keygen", &"-o", &b.key()]).ok();
        std::fs::create_dir(b.keys()).unwrap();
        std::fs::copy(b.path("signer.pem.pub"), b.keys().join("signer.pub")).unwrap();
        b
    }
    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }
    fn key(&self) -> PathBuf {
        self.path("signer.pem")
    }
    fn keys(&self) -> PathBuf {
        self.path("trusted")
    }
    fn root(&self) -> PathBuf {
        self.path("device-root")
    }
    /// Compiles fixture `name` for `target` and packages it as `version`.
    fn artifact(&self, name: &str, target: &str, version: u64) -> PathBuf {
        let out = self.path(&format!("build-{name}-{target}"));
        if !out.exists() {
            kiln(&[
                &"compile",
                &fixture(name, "model.onnx"),
                &"--target",
                &target,
                &"-o",
                &out,
            ])
            .ok();
        }
        let art = self.path(&format!("{name}-{target}-v{version}.kiln"));
        kiln(&[
            &"package",
            &out,
            &"--key",
            &self.key(),
            &"--version",
            &version.to_string(),
            &"-o",
            &art,
            &"--golden-inputs",
            &fixture(name, "sample.npz"),
        ])
        .ok();
        art
    }
    fn install(&self, target: &str, art: &Path, extra: &[&str]) -> Run {
        let (keys, root) = (self.keys(), self.root());
        let mut args: Vec<&dyn AsRefOsStr> =
            vec![&"install", &art, &"--keys", &keys, &"--root", &root];
        for e in extra {
            args.push(e);
        }
        device(target, &args)
    }
    fn active_version(&self, target: &str) -> Option<u64> {
        let s = device(target, &[&"status", &"--root", &self.root()]);
        let j: serde_json::Value = serde_json::from_str(s.ok()).unwrap();
        j["active"]["manifest"]["version"].as_u64()
    }
    /// Runs the active model on `name`'s sample and checks it against the fixture reference.
    fn runs(&self, target: &str, name: &str) {
        let out = self.path("out.npz");
        device(
            target,
            &[
                &"run",
                &"--root",
                &self.root(),
                &"--inputs",
                &fixture(name, "sample.npz"),
                &"--output",
                &out,
            ],
        )
        .ok();
        let got = kiln_io::read_tensors(&out).unwrap();
        let want = kiln_io::read_tensors(&fixture(name, "sample_ref.npz")).unwrap();
        let c = kiln_io::compare::compare(&got[0].1, &want[0].1, got[0].1.rank()).unwrap();
        assert!(c.max_abs < 1e-4, "{c:?}");
    }
}

#[test]
fn keygen_package_verify_and_openssl() {
    let b = Bench::new();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(b.key()).unwrap().permissions().mode() & 0o777,
        0o600
    );
    kiln(&[&"keygen", &"-o", &b.key()]).fails_with(&["refusing to overwrite"]);

    let art = b.artifact("digits", "x86_64-linux", 1);
    let out = kiln(&[&"verify", &art, &"--pubkey", &b.path("signer.pem.pub")])
        .ok()
        .to_string();
    assert!(
        out.contains("OK") && out.contains("digits v1 for x86_64-linux"),
        "{out}"
    );

    let other = Bench::new();
    kiln(&[&"verify", &art, &"--pubkey", &other.path("signer.pem.pub")])
        .fails_with(&["not trusted"]);
    kiln(&[&"verify", &art, &"--pubkey", &b.key()]).fails_with(&["private key"]);

    // Stock openssl verifies kiln's signature over the exact manifest bytes.
    let pubkey = kiln_artifact::keys::read_public_key(&b.path("signer.pem.pub")).unwrap();
    let v = kiln_artifact::verify_only(
        std::fs::File::open(&art).unwrap(),
        &[pubkey],
        &Default::default(),
    )
    .unwrap();
    std::fs::write(b.path("manifest.json"), &v.manifest_bytes).unwrap();
    std::fs::write(b.path("manifest.sig"), &v.signature).unwrap();
    let ssl = |manifest: &str| {
        Command::new("openssl")
            .args(["pkeyutl", "-verify", "-pubin", "-inkey"])
            .arg(b.path("signer.pem.pub"))
            .arg("-rawin")
            .arg("-in")
            .arg(b.path(manifest))
            .arg("-sigfile")
            .arg(b.path("manifest.sig"))
            .output()
            .expect("openssl is installed by .ci/run")
    };
    let ok = ssl("manifest.json");
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let mut tampered = v.manifest_bytes.clone();
    tampered[20] ^= 1;
    std::fs::write(b.path("tampered.json"), &tampered).unwrap();
    assert!(!ssl("tampered.json").status.success());
    // Keys of the wrong type or missing: clear errors.
    let ec = b.path("ec.pem");
    assert!(Command::new("openssl")
        .args([
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-out"
        ])
        .arg(&ec)
        .status()
        .unwrap()
        .success());
    assert!(Command::new("openssl")
        .args(["pkey", "-pubout", "-in"])
        .arg(&ec)
        .arg("-out")
        .arg(b.path("ec.pub"))
        .status()
        .unwrap()
        .success());
    kiln(&[&"verify", &art, &"--pubkey", &b.path("ec.pub")])
        .fails_with(&["ec.pub", "not an Ed25519 public key"]);
    let build = b.path("build-digits-x86_64-linux");
    let out = b.path("x.kiln");
    kiln(&[
        &"package",
        &build,
        &"--key",
        &ec,
        &"--version",
        &"1",
        &"-o",
        &out,
    ])
    .fails_with(&["ec.pem", "not an Ed25519 private key"]);
    kiln(&[
        &"package",
        &build,
        &"--key",
        &b.path("absent.pem"),
        &"--version",
        &"1",
        &"-o",
        &out,
    ])
    .fails_with(&["absent.pem", "cannot read signing key"]);
    assert!(!out.exists());
    // openssl reads the private key too.
    assert!(Command::new("openssl")
        .args(["pkey", "-noout", "-in"])
        .arg(b.key())
        .status()
        .unwrap()
        .success());
}

#[test]
fn install_upgrade_rollback_and_refusals() {
    let b = Bench::new();
    let t = "x86_64-linux";
    let v1 = b.artifact("digits", t, 1);
    let v2 = b.artifact("digits", t, 2);
    assert_eq!(b.active_version(t), None);
    device(
        t,
        &[
            &"run",
            &"--root",
            &b.root(),
            &"--inputs",
            &fixture("digits", "sample.npz"),
            &"--output",
            &b.path("o.npz"),
        ],
    )
    .fails_with(&["nothing is installed"]);

    let r = b.install(t, &v1, &[]);
    assert!(
        r.ok().contains("\"installed\"") && r.stdout.contains("self-test ok"),
        "{}",
        r.stdout
    );
    b.runs(t, "digits");
    b.install(t, &v2, &[]).ok();
    assert_eq!(b.active_version(t), Some(2));

    b.install(t, &v1, &[])
        .fails_with(&["not newer than the installed version 2"]);
    assert_eq!(b.active_version(t), Some(2));
    device(t, &[&"rollback", &"--root", &b.root()]).ok();
    assert_eq!(b.active_version(t), Some(1));
    b.runs(t, "digits");
    b.install(t, &v2, &[]).ok();
    b.install(t, &v1, &["--allow-downgrade"]).ok();
    assert_eq!(b.active_version(t), Some(1));

    // Refusals leave the active model untouched.
    let v9 = b.artifact("digits", t, 9);
    let other = Bench::new();
    let foreign = other.artifact("digits", t, 10);
    b.install(t, &foreign, &[])
        .fails_with(&["signed by key", "not trusted"]);
    let wrong_target = b.artifact("digits", "aarch64-linux", 11);
    b.install(t, &wrong_target, &[]).fails_with(&[
        "for target `aarch64-linux`",
        "this device runs `x86_64-linux`",
    ]);
    let bytes = std::fs::read(&v9).unwrap();
    let truncated = b.path("truncated.kiln");
    std::fs::write(&truncated, &bytes[..bytes.len() * 2 / 3]).unwrap();
    b.install(t, &truncated, &[]).fails_with(&["truncated"]);
    b.install(t, &v9, &["--max-size", "1000"])
        .fails_with(&["over the limit of 1000"]);
    b.install(t, &b.path("missing.kiln"), &[])
        .fails_with(&["missing.kiln"]);
    device(
        t,
        &[
            &"install",
            &v9,
            &"--keys",
            &b.path("nokeys"),
            &"--root",
            &b.root(),
        ],
    )
    .fails_with(&["nokeys"]);
    assert_eq!(b.active_version(t), Some(1));
    b.runs(t, "digits");
    assert!(!b.root().join("slots/.staging").exists());

    // A failing self-test: golden outputs doctored before signing (as if the model were
    // miscompiled): refused on the device, v1 stays.
    let doctored = b.path("doctored.kiln");
    let key = kiln_artifact::keys::read_private_key(&b.key()).unwrap();
    let unpacked = b.path("unpacked");
    std::fs::create_dir(&unpacked).unwrap();
    let v =
        kiln_artifact::unpack(&v9, &[key.verifying_key()], &Default::default(), &unpacked).unwrap();
    let mut files = std::collections::BTreeMap::new();
    for p in v.manifest.files.keys() {
        files.insert(p.clone(), std::fs::read(unpacked.join(p)).unwrap());
    }
    let mut outputs = kiln_io::read_tensors(&unpacked.join("golden/outputs.npz")).unwrap();
    outputs[0].1 = kiln_io::tract_core::prelude::Tensor::zero::<f32>(outputs[0].1.shape()).unwrap();
    files.insert(
        "golden/outputs.npz".into(),
        kiln_io::npz::npz_bytes(&outputs).unwrap(),
    );
    let m = &v.manifest;
    let input = kiln_artifact::write::PackageInput {
        name: m.name.clone(),
        version: 12,
        target: m.target.clone(),
        precision: m.precision.clone(),
        tract_version: m.tract_version.clone(),
        golden_max_abs: m.golden_max_abs,
        expected_accuracy: None,
        files,
    };
    std::fs::write(
        &doctored,
        kiln_artifact::write::package(&input, &key).unwrap().0,
    )
    .unwrap();
    b.install(t, &doctored, &[])
        .fails_with(&["self-test-failed", "differs from the golden output"]);
    assert_eq!(b.active_version(t), Some(1));
    b.runs(t, "digits");

    b.install(t, &v9, &[]).ok();
    assert_eq!(b.active_version(t), Some(9));
}

#[test]
fn flash_to_qemu_aarch64() {
    let b = Bench::new();
    let t = "aarch64-linux";
    b.install(t, &b.artifact("cnn", t, 1), &[]).ok();
    b.runs(t, "cnn");
    b.install(t, &b.artifact("cnn", t, 2), &[]).ok();
    device(t, &[&"rollback", &"--root", &b.root()]).ok();
    assert_eq!(b.active_version(t), Some(1));
}

#[test]
fn crash_at_any_point_of_an_install_leaves_a_working_model() {
    let b = Bench::new();
    let t = "x86_64-linux";
    let v1 = b.artifact("cnn", t, 1);
    let v2 = b.artifact("mobilenet", t, 2);
    b.install(t, &v1, &[]).ok();
    let pristine = b.path("pristine");
    copy_dir(&b.root(), &pristine);
    // How long a whole install takes, to spread the kills over it.
    let t0 = std::time::Instant::now();
    b.install(t, &v2, &[]).ok();
    let full = t0.elapsed();
    let mut seed = 0x1234_5678u64;
    let (mut old, mut new) = (0, 0);
    for _ in 0..100 {
        std::fs::remove_dir_all(b.root()).unwrap();
        copy_dir(&pristine, &b.root());
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let delay = full.mul_f64((seed % 1000) as f64 / 1000.0 * 1.2);
        let mut child = Command::new(runner(t))
            .args(["install"])
            .arg(&v2)
            .arg("--keys")
            .arg(b.keys())
            .arg("--root")
            .arg(b.root())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(delay);
        let _ = child.kill(); // SIGKILL
        let _ = child.wait();
        // Old or new, whole, and it runs its own golden self-test data.
        let version = b.active_version(t).expect("a model is always active");
        let slot: serde_json::Value =
            serde_json::from_str(device(t, &[&"status", &"--root", &b.root()]).ok()).unwrap();
        let dir = b
            .root()
            .join("slots")
            .join(slot["active"]["slot"].as_str().unwrap());
        kiln_artifact::install::check_slot(&dir).unwrap();
        let out = b.path("crash-out.npz");
        device(
            t,
            &[
                &"run",
                &"--root",
                &b.root(),
                &"--inputs",
                &dir.join("golden/inputs.npz"),
                &"--output",
                &out,
            ],
        )
        .ok();
        let got = kiln_io::read_tensors(&out).unwrap();
        let want = kiln_io::read_tensors(&dir.join("golden/outputs.npz")).unwrap();
        assert!(
            kiln_io::compare::compare(&got[0].1, &want[0].1, 2)
                .unwrap()
                .max_abs
                < 1e-4
        );
        match version {
            1 => old += 1,
            2 => new += 1,
            v => panic!("version {v}"),
        }
    }
    eprintln!(
        "crash test: {old} kills left v1 active, {new} left v2 active (install takes {full:?})"
    );
    assert!(
        old > 0,
        "kills should land before the switch at least sometimes"
    );
}

#[test]
fn full_disk_during_install_keeps_the_old_model() {
    if !is_root() {
        eprintln!("full-disk test needs root to mount a small tmpfs; CI runs it as root");
        return;
    }
    let b = Bench::new();
    let t = "x86_64-linux";
    let v1 = b.artifact("digits", t, 1);
    let v2 = b.artifact("mobilenet", t, 2);
    std::fs::create_dir_all(b.root()).unwrap();
    // Room for one small model, not for the mobilenet next to it.
    let st = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=400k", "tmpfs"])
        .arg(b.root())
        .status()
        .unwrap();
    assert!(st.success(), "mount tmpfs failed although running as root");
    let result = std::panic::catch_unwind(|| {
        b.install(t, &v1, &[]).ok();
        b.install(t, &v2, &[]).fails_with(&["No space left"]);
        assert_eq!(b.active_version(t), Some(1));
        b.runs(t, "digits");
        assert!(!b.root().join("slots/.staging").exists());
    });
    Command::new("umount").arg(b.root()).status().unwrap();
    result.unwrap();
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.starts_with(b"0\n"))
        .unwrap_or(false)
}

fn copy_dir(from: &Path, to: &Path) {
    let st = Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .unwrap();
    assert!(st.success());
}
