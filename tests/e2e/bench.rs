//! `kiln-runner bench`: the report's shape and invariants, natively and under qemu-user.

use crate::support::*;

/// Benchmarks fixture `name` compiled for `target` and checks the report.
fn check(target: &str, name: &str, emulated: bool) {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("build");
    kiln(&[
        &"compile",
        &fixture(name, "model.onnx"),
        &"--target",
        &target,
        &"-o",
        &out,
    ])
    .ok();
    let spec = kiln_target::find(&fixtures().join("../targets"), target).unwrap();
    let report = dir.path().join("bench.json");
    let mut cmd = kiln_target::emulate::command(&spec, &out.join("kiln-runner")).unwrap();
    cmd.arg("bench")
        .arg("--model")
        .arg(out.join(format!("{name}.nnef.tar")));
    cmd.args(["--iters", "7", "--warmup", "1", "--json"])
        .arg(&report);
    run_cmd(cmd).ok();
    let j: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    assert_eq!(j["schema"], "kiln.bench/1");
    assert_eq!(j["target"], target);
    assert_eq!(j["emulated"], emulated, "{j:#}");
    assert_eq!(j["iterations"], 7);
    let l = &j["latency_ms"];
    let v = |k: &str| l[k].as_f64().unwrap();
    assert!(
        0.0 < v("min")
            && v("min") <= v("p50")
            && v("p50") <= v("p90")
            && v("p90") <= v("p99")
            && v("p99") <= v("max"),
        "{l}"
    );
    let c = &j["cold_start_ms"];
    let parts: f64 = ["load", "prepare", "first_inference"]
        .iter()
        .map(|k| c[k].as_f64().unwrap())
        .sum();
    assert!(parts <= c["total"].as_f64().unwrap() + 1e-6, "{c}");
    assert!(j["peak_rss_bytes"].as_u64().unwrap() > 1 << 20);
    let profile = j["profile"].as_array().unwrap();
    assert!(!profile.is_empty());
    let share: f64 = profile.iter().map(|p| p["share"].as_f64().unwrap()).sum();
    assert!(
        share > 0.5 && share <= 1.0 + 1e-9,
        "top ops cover most of the time: {share}"
    );
}

#[test]
fn bench_report_native_and_emulated() {
    check("x86_64-linux", "mobilenet", false);
    check("aarch64-linux", "cnn", true);
}

#[test]
fn bench_bad_arguments() {
    let spec = kiln_target::find(&fixtures().join("../targets"), "x86_64-linux").unwrap();
    let runner = kiln_target::build::find_runner(&spec).unwrap();
    let r = run_cmd({
        let mut c = std::process::Command::new(&runner);
        c.args(["bench", "--iters", "-3"]);
        c
    });
    r.fails_with(&["--iters `-3`"]);
    assert_eq!(r.code, 2);
    // Thread counts: 0 is not one; the size-optimized x86_64-linux runner is built
    // single-threaded and says which targets are not.
    let model = fixture("digits", "model.onnx");
    let dir = tempfile::tempdir().unwrap();
    kiln(&[
        &"compile",
        &model,
        &"--target",
        &"x86_64-linux",
        &"-o",
        &dir.path(),
    ])
    .ok();
    let nnef = dir.path().join("digits.nnef.tar");
    for (threads, needle) in [("0", "not a thread count"), ("4", "built single-threaded")] {
        let r = run_cmd({
            let mut c = std::process::Command::new(&runner);
            c.arg("bench")
                .arg("--model")
                .arg(&nnef)
                .args(["--threads", threads]);
            c
        });
        r.fails_with(&[needle]);
        assert_eq!(r.code, 2);
    }
    let r = run_cmd({
        let mut c = std::process::Command::new(&runner);
        c.arg("bench")
            .arg("--model")
            .arg(&nnef)
            .args(["--threads", "1", "--iters", "3"]);
        c
    });
    let j: serde_json::Value = serde_json::from_str(r.ok()).unwrap();
    assert_eq!(j["threads"], 1);
}
