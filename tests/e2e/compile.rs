//! `kiln compile`, `kiln targets` and `kiln-runner`: host and cross-built runners (under
//! qemu-user) reproduce host inference; the ELF check, embedded payloads and bad targets.

use std::path::{Path, PathBuf};

use kiln_target::TargetSpec;

use crate::support::*;

fn spec(name: &str) -> TargetSpec {
    kiln_target::find(&fixtures().join("../targets"), name).unwrap()
}

/// Compiles fixture `name` for `target` into a fresh dir; returns (dir, report JSON).
fn compile(name: &str, target: &str, extra: &[&str]) -> (tempfile::TempDir, serde_json::Value) {
    let dir = tempfile::tempdir().unwrap();
    let model = fixture(name, "model.onnx");
    let out = dir.path().to_path_buf();
    let mut args: Vec<&dyn AsRefOsStr> = vec![
        &"compile",
        &model,
        &"--target",
        &target,
        &"-o",
        &out,
        &"--json",
    ];
    for e in extra {
        args.push(e);
    }
    let j = kiln(&args).json();
    (dir, j)
}

/// Runs a target's binary on `data` (emulated when needed), returning the runner's result.
fn run_runner(target: &str, binary: &Path, model: Option<&Path>, data: &Path, out: &Path) -> Run {
    let mut cmd = kiln_target::emulate::command(&spec(target), binary).unwrap();
    cmd.arg("run");
    if let Some(m) = model {
        cmd.arg("--model").arg(m);
    }
    cmd.arg("--inputs").arg(data).arg("--output").arg(out);
    run_cmd(cmd)
}

/// Checks that the runner built for `target` reproduces host inference on every fixture's
/// dataset (max-abs vs onnxruntime's reference within `tol`).
fn check(target: &str, tol: f64) {
    for name in ["digits", "cnn", "mobilenet", "transformer"] {
        let (dir, j) = compile(name, target, &[]);
        assert_eq!(j["target"], target);
        let out = dir.path().join("out.npz");
        let runner = PathBuf::from(j["runner_file"].as_str().unwrap());
        let model = PathBuf::from(j["model_file"].as_str().unwrap());
        run_runner(
            target,
            &runner,
            Some(&model),
            &fixture(name, "data.npz"),
            &out,
        )
        .ok();
        let got = kiln_io::read_tensors(&out).unwrap();
        let want = kiln_io::read_tensors(&fixture(name, "data_ref.npz")).unwrap();
        for ((gn, g), (wn, w)) in got.iter().zip(&want) {
            assert_eq!(gn, wn);
            let c = kiln_io::compare::compare(g, w, g.rank() - 1).unwrap();
            assert!(c.max_abs <= tol, "{target} {name}: {c:?}");
        }
    }
}

#[test]
fn host_runner_matches_onnxruntime() {
    check("x86_64-linux", 1e-4);
}

#[test]
fn aarch64_runner_under_qemu_matches_onnxruntime() {
    check("aarch64-linux", 1e-4);
}

#[test]
fn armv7_runner_under_qemu_matches_onnxruntime() {
    check("armv7-linux", 1e-4);
}

#[test]
fn embedded_single_file() {
    for target in ["x86_64-linux", "aarch64-linux"] {
        let (dir, j) = compile("digits", target, &["--embed"]);
        let exe = PathBuf::from(j["embedded_file"].as_str().unwrap());
        let size = std::fs::metadata(&exe).unwrap().len();
        assert_eq!(
            size,
            j["runner_bytes"].as_u64().unwrap() + j["model_bytes"].as_u64().unwrap() + 48
        );
        let out = dir.path().join("out.npz");
        run_runner(target, &exe, None, &fixture("digits", "data.npz"), &out).ok();
        let got = kiln_io::read_tensors(&out).unwrap();
        assert_eq!(got[0].1.shape(), &[360, 1, 10]);

        // A flipped byte in the payload, and a payload cut short: both refused.
        let bytes = std::fs::read(&exe).unwrap();
        let model_start = j["runner_bytes"].as_u64().unwrap() as usize;
        let mut flipped = bytes.clone();
        flipped[model_start + 1000] ^= 0x55;
        let bad = dir.path().join("flipped");
        write_exe(&bad, &flipped);
        run_runner(target, &bad, None, &fixture("digits", "sample.npz"), &out)
            .fails_with(&["embedded model is corrupted"]);
        let mut cut = bytes[..model_start + 500].to_vec();
        cut.extend_from_slice(&bytes[bytes.len() - 48..]);
        let bad = dir.path().join("cut");
        write_exe(&bad, &cut);
        run_runner(target, &bad, None, &fixture("digits", "sample.npz"), &out)
            .fails_with(&["embedded model is corrupted or truncated"]);
    }
}

fn write_exe(path: &Path, bytes: &[u8]) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, bytes).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

#[test]
fn runner_without_model_or_with_bad_model() {
    let runner = kiln_target::build::find_runner(&spec("x86_64-linux"))
        .expect("x86_64-linux runner built by cargo xtask runner");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("o.npz");
    let r = run_runner(
        "x86_64-linux",
        &runner,
        None,
        &fixture("digits", "sample.npz"),
        &out,
    );
    r.fails_with(&["no embedded model"]);
    assert_eq!(r.code, 2, "a usage error exits 2");

    // An NNEF whose graph calls an op no registry knows: the runner names it.
    let (cdir, j) = compile("transformer", "x86_64-linux", &[]);
    let unpacked = cdir.path().join("unpacked");
    std::fs::create_dir(&unpacked).unwrap();
    let st = std::process::Command::new("tar")
        .arg("xf")
        .arg(j["model_file"].as_str().unwrap())
        .arg("-C")
        .arg(&unpacked)
        .status()
        .unwrap();
    assert!(st.success());
    let graph = unpacked.join("graph.nnef");
    let text = std::fs::read_to_string(&graph)
        .unwrap()
        .replace("kiln_gelu_exact(", "fancy_gelu(");
    std::fs::write(&graph, text).unwrap();
    run_runner(
        "x86_64-linux",
        &runner,
        Some(&unpacked),
        &fixture("transformer", "sample.npz"),
        &out,
    )
    .fails_with(&["fancy_gelu"]);
    assert!(!out.exists());

    let garbage = dir.path().join("garbage.nnef.tar");
    std::fs::write(&garbage, b"definitely not a tar").unwrap();
    run_runner(
        "x86_64-linux",
        &runner,
        Some(&garbage),
        &fixture("digits", "sample.npz"),
        &out,
    )
    .fails_with(&["garbage.nnef.tar"]);
}

#[test]
fn elf_check_refuses_a_runner_of_the_wrong_architecture() {
    let x86 = kiln_target::build::find_runner(&spec("x86_64-linux")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    kiln(&[
        &"compile",
        &fixture("digits", "model.onnx"),
        &"--target",
        &"aarch64-linux",
        &"-o",
        &dir.path(),
        &"--runner",
        &x86,
    ])
    .fails_with(&[
        "does not fit target `aarch64-linux`",
        "machine is x86_64 (target wants aarch64)",
    ]);
    let arm64 = kiln_target::build::find_runner(&spec("aarch64-linux")).unwrap();
    kiln(&[
        &"compile",
        &fixture("digits", "model.onnx"),
        &"--target",
        &"armv7-linux",
        &"-o",
        &dir.path(),
        &"--runner",
        &arm64,
    ])
    .fails_with(&[
        "machine is aarch64 (target wants arm)",
        "class is ELF64 (target wants ELF32)",
        "float ABI",
    ]);
    assert!(
        std::fs::read_dir(dir.path()).unwrap().next().is_none(),
        "nothing written on refusal"
    );
}

#[test]
fn targets_lists_every_spec() {
    let out = kiln(&[&"targets"]).ok().to_string();
    for t in [
        "x86_64-linux",
        "x86_64-linux-v3",
        "aarch64-linux",
        "aarch64-linux-a76",
        "armv7-linux",
    ] {
        assert!(out.contains(t), "{out}");
    }
}

#[test]
fn bad_targets() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixture("digits", "model.onnx");
    kiln(&[
        &"compile",
        &model,
        &"--target",
        &"riscv-linux",
        &"-o",
        &dir.path(),
    ])
    .fails_with(&[
        "unknown target `riscv-linux`",
        "aarch64-linux",
        "armv7-linux",
    ]);

    // A spec with a wrong field, and one whose toolchain is not installed.
    let specs = dir.path().join("targets");
    std::fs::create_dir(&specs).unwrap();
    let good = std::fs::read_to_string(fixtures().join("../targets/x86_64-linux.toml")).unwrap();
    std::fs::write(
        specs.join("x86_64-linux.toml"),
        good.replace("class = 64", "class = \"sixty-four\""),
    )
    .unwrap();
    let ghost: String = good
        .replace("name = \"x86_64-linux\"", "name = \"ghost-linux\"")
        .replace("x86_64-unknown-linux-musl", "riscv64gc-unknown-linux-musl")
        .lines()
        .map(|l| match l.starts_with("linker =") {
            true => "linker = \"riscv64-linux-gnu-gcc-nonexistent\"\n".to_string(),
            false => format!("{l}\n"),
        })
        .collect();
    std::fs::write(specs.join("ghost-linux.toml"), ghost).unwrap();
    let with_specs = |target: &str| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"));
        cmd.env("KILN_TARGETS_DIR", &specs)
            .args(["compile"])
            .arg(&model)
            .args(["--target", target, "-o"])
            .arg(dir.path().join("out"));
        run_cmd(cmd)
    };
    with_specs("x86_64-linux").fails_with(&["x86_64-linux.toml", "class = \"sixty-four\""]);
    with_specs("ghost-linux").fails_with(&[
        "missing toolchain",
        "rustup target add riscv64gc-unknown-linux-musl",
        "riscv64-linux-gnu-gcc-nonexistent",
    ]);
}

#[test]
fn runner_unloadable_op_is_refused_at_compile_time() {
    let dir = tempfile::tempdir().unwrap();
    kiln(&[
        &"compile",
        &fixture("bad", "lrn.onnx"),
        &"--target",
        &"x86_64-linux",
        &"-o",
        &dir.path(),
    ])
    .fails_with(&["lrn.onnx", "Lrn", "device runner"]);
}
