//! `kiln build` / `kiln plan` / `kiln init` on `fixtures/kiln.toml`: cold build, cached
//! rebuild, invalidation by content, corrupted cache entries, byte-identical artifacts from
//! two directories, and every kind of bad manifest (x86_64-linux only, prebuilt runner).

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

use crate::support::*;

/// A copy of the fixture manifest with the files it names, and a signing key.
struct Project {
    dir: tempfile::TempDir,
}

impl Project {
    fn new() -> Project {
        let p = Project {
            dir: tempfile::tempdir().unwrap(),
        };
        for name in ["digits", "mobilenet"] {
            let dest = p.path(name);
            std::fs::create_dir(&dest).unwrap();
            for f in ["model.onnx", "calib.npz", "data.npz", "sample.npz"] {
                std::fs::copy(fixture(name, f), dest.join(f)).unwrap();
            }
        }
        for f in ["kiln.toml", "kiln-baseline.json"] {
            std::fs::copy(fixtures().join(f), p.path(f)).unwrap();
        }
        p
    }
    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }
    fn out(&self) -> PathBuf {
        self.path("target/kiln")
    }
    /// Rewrites kiln.toml, replacing `from` by `to`.
    fn edit(&self, from: &str, to: &str) {
        let text = std::fs::read_to_string(self.path("kiln.toml")).unwrap();
        assert!(text.contains(from), "kiln.toml lacks {from}");
        std::fs::write(self.path("kiln.toml"), text.replacen(from, to, 1)).unwrap();
    }
    /// Runs `kiln ARGS --manifest kiln.toml` with `KILN_SIGNING_KEY=key`.
    fn kiln(&self, key: &Path, args: &[&str]) -> Run {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_kiln"));
        cmd.args(args)
            .arg("--manifest")
            .arg(self.path("kiln.toml"))
            .env("KILN_SIGNING_KEY", key);
        run_cmd(cmd)
    }
    /// `kiln build --target x86_64-linux --json`: the kiln.build/1 report.
    fn build(&self, key: &Path, extra: &[&str]) -> Value {
        let mut args = vec!["build", "--target", "x86_64-linux", "--json"];
        args.extend(extra);
        self.kiln(key, &args).json()
    }
    fn artifact(&self, model: &str) -> Vec<u8> {
        std::fs::read(self.out().join(format!("{model}-x86_64-linux-v1.kiln"))).unwrap()
    }
}

/// stage id → status of a kiln.build/1 or kiln.plan/1 document.
fn statuses(doc: &Value) -> Vec<(String, String)> {
    doc["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["id"].as_str().unwrap().to_string(),
                s["status"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn status_of(doc: &Value, id: &str) -> String {
    statuses(doc)
        .into_iter()
        .find(|(i, _)| i == id)
        .unwrap_or_else(|| panic!("no stage {id} in {doc}"))
        .1
}

/// A key pair made by `kiln keygen` in `dir`.
fn keygen(dir: &Path) -> PathBuf {
    let key = dir.join("signer.pem");
    kiln(&[&"keygen", &"-o", &key]).ok();
    key
}

#[test]
fn build_caches_by_content_and_reproduces_artifacts() {
    let a = Project::new();
    let key = keygen(a.dir.path());

    // Cold: every stage runs; the output folder is a set of `kiln compile` folders + artifacts.
    let cold = a.build(&key, &[]);
    let ids: Vec<String> = statuses(&cold).into_iter().map(|(i, _)| i).collect();
    assert_eq!(
        ids,
        [
            "optimize/digits",
            "compile/digits/x86_64-linux",
            "package/digits/x86_64-linux",
            "optimize/mobilenet",
            "compile/mobilenet/x86_64-linux",
            "package/mobilenet/x86_64-linux"
        ]
    );
    assert!(statuses(&cold).iter().all(|(_, s)| s == "built"), "{cold}");
    assert_eq!(cold["artifacts"].as_array().unwrap().len(), 2);
    for f in [
        "digits/x86_64-linux/kiln-runner",
        "digits/x86_64-linux/digits.nnef.tar",
        "digits/x86_64-linux/compile.json",
        "digits/optimize.json",
        "budgets.toml",
        "build.json",
    ] {
        assert!(a.out().join(f).is_file(), "{f} missing");
    }
    kiln(&[
        &"verify",
        &a.out().join("digits-x86_64-linux-v1.kiln"),
        &"--pubkey",
        &a.path("signer.pem.pub"),
    ])
    .ok();
    let (digits, mobilenet) = (a.artifact("digits"), a.artifact("mobilenet"));

    // Unchanged: every stage comes from the cache, the files stay byte for byte.
    let warm = a.build(&key, &[]);
    assert!(statuses(&warm).iter().all(|(_, s)| s == "cached"), "{warm}");
    assert_eq!(a.artifact("digits"), digits);

    // Another directory, --no-cache, the same key: byte-identical artifacts.
    let b = Project::new();
    let rebuilt = b.build(&key, &["--no-cache"]);
    assert!(
        statuses(&rebuilt).iter().all(|(_, s)| s == "built"),
        "{rebuilt}"
    );
    assert_eq!(b.artifact("digits"), digits, "digits artifact differs");
    assert_eq!(
        b.artifact("mobilenet"),
        mobilenet,
        "mobilenet artifact differs"
    );

    // New golden inputs for mobilenet: only its package stage runs, and plan says why.
    std::fs::copy(a.path("mobilenet/data.npz"), a.path("mobilenet/sample.npz")).unwrap();
    let plan = a
        .kiln(&key, &["plan", "--target", "x86_64-linux", "--json"])
        .json();
    let package = &plan["stages"][5];
    assert_eq!(package["id"], "package/mobilenet/x86_64-linux");
    assert_eq!(package["status"], "would-run");
    assert_eq!(package["reason"], "changed: golden");
    assert_eq!(status_of(&plan, "optimize/mobilenet"), "cached");
    let changed = a.build(&key, &[]);
    for (id, status) in statuses(&changed) {
        let want = if id == "package/mobilenet/x86_64-linux" {
            "built"
        } else {
            "cached"
        };
        assert_eq!(status, want, "{id}");
    }
    assert_ne!(a.artifact("mobilenet"), mobilenet);
    assert_eq!(a.artifact("digits"), digits);

    // New calibration data for digits: its optimize stage reruns, mobilenet's stay cached.
    let plan = a
        .kiln(&key, &["plan", "--target", "x86_64-linux", "--json"])
        .json();
    assert!(statuses(&plan).iter().all(|(_, s)| s == "cached"), "{plan}");
    std::fs::copy(a.path("digits/data.npz"), a.path("digits/calib.npz")).unwrap();
    let plan = a
        .kiln(&key, &["plan", "--target", "x86_64-linux", "--json"])
        .json();
    assert_eq!(plan["stages"][0]["reason"], "changed: calib");
    assert_eq!(status_of(&plan, "compile/digits/x86_64-linux"), "waiting");
    assert_eq!(status_of(&plan, "optimize/mobilenet"), "cached");
    let recal = a.build(&key, &[]);
    assert_eq!(status_of(&recal, "optimize/digits"), "built");
    assert_eq!(status_of(&recal, "optimize/mobilenet"), "cached");
    assert_eq!(
        status_of(&recal, "package/mobilenet/x86_64-linux"),
        "cached"
    );

    // A corrupted cache entry is detected by its hash and rebuilt, never used.
    let key_of = |doc: &Value, id: &str| -> String {
        doc["stages"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["id"] == id)
            .unwrap()["key"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let entry = a
        .out()
        .join("cache/package")
        .join(key_of(&recal, "package/mobilenet/x86_64-linux"));
    let good = std::fs::read(entry.join("artifact.kiln")).unwrap();
    let mut bad = good.clone();
    bad[1000] ^= 0x40;
    std::fs::write(entry.join("artifact.kiln"), &bad).unwrap();
    let run = a.kiln(&key, &["build", "--target", "x86_64-linux", "--json"]);
    let after: Value = serde_json::from_str(run.ok()).unwrap();
    assert!(run.stderr.contains("corrupted"), "{}", run.stderr);
    for (id, status) in statuses(&after) {
        let want = if id == "package/mobilenet/x86_64-linux" {
            "rebuilt"
        } else {
            "cached"
        };
        assert_eq!(status, want, "{id}");
    }
    assert_eq!(a.artifact("mobilenet"), good);
    assert_eq!(std::fs::read(entry.join("artifact.kiln")).unwrap(), good);
}

/// Every file under `dir` (none when it does not exist).
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![];
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(files_under(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn bad_manifests_fail_cleanly_and_write_nothing() {
    let p = Project::new();
    let key = keygen(p.dir.path());
    let original = std::fs::read_to_string(p.path("kiln.toml")).unwrap();
    let cases: &[(&str, &str, &[&str])] = &[
        (
            "quantize = \"int8-static\"\ncalibration",
            "quantise = \"int8-static\"\ncalibration",
            &[
                "kiln.toml:40:1",
                "unknown field `quantise`",
                "model.optimize.quantise",
            ],
        ),
        (
            "version = 1",
            "version = \"one\"",
            &["kiln.toml:6:11", "`version`", "invalid type"],
        ),
        ("version = 1", "version 1", &["kiln.toml:6:", "expected"]),
        (
            "digits/calib.npz",
            "digits/calibration.npz",
            &[
                "kiln.toml:35:",
                "key `model.calib`",
                "calibration.npz not found",
            ],
        ),
        (
            "\"aarch64-linux\"]",
            "\"riscv64-linux\"]",
            &[
                "kiln.toml:9:",
                "key `targets`",
                "unknown target `riscv64-linux`",
            ],
        ),
        (
            "\"qemu-aarch64\"]",
            "\"qemu-mips\"]",
            &[
                "kiln.toml:12:",
                "key `devices`",
                "unknown device `qemu-mips`",
            ],
        ),
        (
            "max_accuracy_drop = 0.5",
            "max_accuracy_drop = -0.5",
            &["kiln.toml:42:", "max_accuracy_drop", "impossible budget"],
        ),
        (
            "size = \"+2%\"",
            "size = \"-2%\"",
            &["kiln.toml:25:", "check.budgets.size", "impossible budget"],
        ),
        (
            "{ env = \"KILN_SIGNING_KEY\" }",
            "{ path = \"keys/none.pem\" }",
            &["kiln.toml:17:", "sign.key.path", "none.pem not found"],
        ),
        (
            "{ env = \"KILN_SIGNING_KEY\" }",
            "{ env = \"KILN_TEST_NO_SUCH_KEY_VAR\" }",
            &[
                "kiln.toml:17:",
                "sign.key.env",
                "KILN_TEST_NO_SUCH_KEY_VAR is not set",
            ],
        ),
        (
            "max_accuracy_drop = 0.5",
            "max_accuracy_drop = 0.5\nprune = \"shears:0.3\"",
            &["kiln.toml:43:", "model.optimize.prune", "shears"],
        ),
        (
            "baseline = \"kiln-baseline.json\"",
            "baseline = \"missing-baseline.json\"",
            &["kiln.toml:22:", "check.baseline", "not found"],
        ),
    ];
    for (from, to, needles) in cases {
        std::fs::write(p.path("kiln.toml"), &original).unwrap();
        p.edit(from, to);
        let run = p.kiln(&key, &["build"]);
        run.fails_with(needles);
        assert!(run.stderr.contains("kiln.toml"), "{}", run.stderr);
        assert!(files_under(&p.out()).is_empty(), "{to}: files written");
        p.kiln(&key, &["plan"]).fails_with(needles);
    }
    std::fs::write(p.path("kiln.toml"), &original).unwrap();

    // A key that is not a private key; a target the manifest does not list.
    let public = p.path("signer.pem.pub");
    p.kiln(&public, &["build"])
        .fails_with(&["sign.key.env", "is a public key"]);
    p.kiln(&key, &["build", "--target", "armv7-linux"])
        .fails_with(&["--target armv7-linux", "not one of the targets"]);
    assert!(files_under(&p.out()).is_empty());

    // A stage that fails (an op the runner cannot run): nothing half-written.
    std::fs::copy(
        fixtures().join("bad/unsupported_op.onnx"),
        p.path("mobilenet/model.onnx"),
    )
    .unwrap();
    let head = &original[..original.find("[[model]]\nname = \"mobilenet\"").unwrap()];
    std::fs::write(
        p.path("kiln.toml"),
        format!("{head}[[model]]\nname = \"mobilenet\"\npath = \"mobilenet/model.onnx\"\n"),
    )
    .unwrap();
    let run = p.kiln(&key, &["build", "--target", "x86_64-linux"]);
    run.fails_with(&["stage optimize/mobilenet failed", "nothing was written"]);
    let written: Vec<_> = files_under(&p.out())
        .into_iter()
        .filter(|f| !f.starts_with(p.out().join("cache")))
        .collect();
    assert!(written.is_empty(), "{written:?}");
    assert!(
        files_under(&p.out().join("cache"))
            .iter()
            .all(|f| !f.to_string_lossy().contains(".tmp-")),
        "a temp folder was left in the cache"
    );
}

#[test]
fn group_readable_key_warns_and_init_writes_a_manifest() {
    let dir = tempfile::tempdir().unwrap();
    let key = keygen(dir.path());
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    let manifest = dir.path().join("kiln.toml");
    kiln(&[&"init", &fixture("digits", "model.onnx"), &"-o", &manifest]).ok();
    let text = std::fs::read_to_string(&manifest).unwrap();
    assert!(text.contains("quantize = \"int8-static\""), "{text}");
    kiln(&[&"init", &fixture("digits", "model.onnx"), &"-o", &manifest])
        .fails_with(&["exists", "--force"]);
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kiln"));
    cmd.args(["plan", "--manifest"])
        .arg(&manifest)
        .env("KILN_SIGNING_KEY", &key);
    let run = run_cmd(cmd);
    let out = run.ok();
    assert!(
        out.contains("optimize digits") && out.contains("not built before"),
        "{out}"
    );
    #[cfg(unix)]
    assert!(
        run.stderr.contains("readable by group/others"),
        "{}",
        run.stderr
    );
    kiln(&[
        &"init",
        &fixture("bad", "unsupported_op.onnx"),
        &"-o",
        &dir.path().join("x.toml"),
    ])
    .fails_with(&["unsupported_op.onnx"]);
}
