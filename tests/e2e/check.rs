//! `kiln check` / `kiln baseline update`: the CI gate catches a bigger model and a slower
//! model, passes an unchanged one, speaks CI formats, and refuses bad input with exit 2.

use std::path::Path;

use serde_json::{json, Value};

use crate::support::*;

fn check_fixture(file: &str) -> std::path::PathBuf {
    fixtures().join("check").join(file)
}

/// Status of `metric` in a `kiln.check/1` document.
fn status(report: &Value, metric: &str) -> String {
    report["metrics"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["metric"] == metric)
        .unwrap_or_else(|| panic!("no {metric} in {report:#}"))["status"]
        .as_str()
        .unwrap()
        .to_string()
}

fn json_of(r: &Run) -> Value {
    serde_json::from_str(&r.stdout)
        .unwrap_or_else(|e| panic!("bad JSON ({e}):\n{}\n{}", r.stdout, r.stderr))
}

#[test]
fn check_catches_bigger_and_slower_models_and_passes_the_same_one() {
    let dir = tempfile::tempdir().unwrap();
    let baseline = dir.path().join("kiln-baseline.json");
    // Latency budget widened for a shared, noisy test machine (the slow variant is 9x); the
    // p90 of a few runs there measures the scheduler's preemptions, so it is reported only.
    let budgets = dir.path().join("budgets.toml");
    std::fs::write(
        &budgets,
        "noise_sigmas = 3\n[budgets]\nlatency = \"+30%\"\nlatency_p90 = \"off\"\n",
    )
    .unwrap();
    let reference = check_fixture("reference.onnx");
    let measure = |model: &str| -> Vec<String> {
        vec![
            "--model".into(),
            format!("net={}", check_fixture(model).display()),
            "--reference".into(),
            reference.display().to_string(),
            "--runs".into(),
            "5".into(),
            "--iters".into(),
            "10".into(),
        ]
    };
    let with = |head: &[&str], model: &str| -> Run {
        let mut args: Vec<String> = head.iter().map(|s| s.to_string()).collect();
        args.extend(measure(model));
        let refs: Vec<&dyn AsRefOsStr> = args.iter().map(|a| a as &dyn AsRefOsStr).collect();
        kiln(&refs)
    };
    let b = baseline.display().to_string();
    let bud = budgets.display().to_string();
    let out = with(
        &["baseline", "update", "--baseline", &b, "--budgets", &bud],
        "net.onnx",
    );
    assert!(out.ok().contains("new baseline with"), "{}", out.stdout);
    let stored: Value = serde_json::from_slice(&std::fs::read(&baseline).unwrap()).unwrap();
    assert_eq!(stored["schema"], "kiln.baseline/1");
    assert_eq!(stored["budgets"]["latency"], "+30%");
    assert_eq!(stored["measurement"]["reference"], "reference");
    assert_eq!(
        stored["measurement"]["metrics"]["net/latency_p50"]["unit"],
        "x ref"
    );
    assert_eq!(
        stored["measurement"]["metrics"]["net/latency_p50"]["samples"]
            .as_array()
            .unwrap()
            .len(),
        5
    );
    assert!(
        stored["measurement"]["metrics"]["runner-x86_64-linux/.text"]["value"]
            .as_f64()
            .unwrap()
            > 0.0
    );

    // Unchanged: re-measured from the baseline's own `measure` section, passes.
    let same = kiln(&[&"check", &"--baseline", &baseline]);
    assert_eq!(same.code, 0, "{}\n{}", same.stdout, same.stderr);
    assert!(same.stdout.contains("passed"), "{}", same.stdout);
    assert!(same.stdout.contains("net/latency_p50"), "{}", same.stdout);

    // Wider: caught by size.
    let wide = with(
        &["check", "--baseline", &b, "--format", "json"],
        "net_wide.onnx",
    );
    assert_eq!(wide.code, 1, "{}\n{}", wide.stdout, wide.stderr);
    let j = json_of(&wide);
    assert_eq!(j["passed"], false);
    assert_eq!(status(&j, "net/model_bytes"), "regressed");
    assert_eq!(status(&j, "net/nnef_bytes"), "regressed");
    assert_eq!(status(&j, "runner-x86_64-linux/bytes"), "ok");

    // Slower (same weights, 9x the MACs): caught by latency, not by size.
    let slow = with(
        &["check", "--baseline", &b, "--format", "json"],
        "net_slow.onnx",
    );
    assert_eq!(slow.code, 1, "{}\n{}", slow.stdout, slow.stderr);
    let j = json_of(&slow);
    assert_eq!(status(&j, "net/latency_p50"), "regressed");
    assert_eq!(status(&j, "net/latency_p90"), "ungated");
    assert_eq!(status(&j, "net/model_bytes"), "ok");
    let row = j["metrics"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["metric"] == "net/latency_p50")
        .unwrap();
    assert!(
        row["current"].as_f64().unwrap() > 3.0 * row["baseline"].as_f64().unwrap(),
        "{row}"
    );
    // Both numbers are there: the budget and the noise band.
    assert_eq!(row["budget"], "+30%");
    assert!(row["noise_pct"].as_f64().is_some(), "{row}");
}

/// A hand-made measurement: one size, one latency series, one accuracy.
fn measurement(bytes: f64, latency: &[f64], accuracy: f64) -> Value {
    json!({
        "schema": "kiln.measure/1",
        "runs": latency.len(),
        "reference": "ref",
        "metrics": {
            "m/model_bytes": {"kind": "size", "unit": "bytes", "value": bytes},
            "m/latency_p50": {"kind": "latency", "unit": "x ref", "value": latency[latency.len() / 2], "samples": latency, "noise": 0.01},
            "m/accuracy": {"kind": "accuracy", "unit": "%", "value": accuracy},
        }
    })
}

fn write(path: &Path, v: &Value) {
    std::fs::write(path, serde_json::to_string_pretty(v).unwrap()).unwrap();
}

#[test]
fn check_current_measurements_formats_and_update() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let base = d.join("b.json");
    let good = d.join("good.json");
    let bad = d.join("bad.json");
    write(&good, &measurement(1000.0, &[1.0, 1.0, 1.0], 96.9));
    write(&bad, &measurement(1000.0, &[1.0, 1.0, 1.0], 96.0));
    kiln(&[
        &"baseline",
        &"update",
        &"--baseline",
        &base,
        &"--current",
        &good,
    ])
    .ok();
    kiln(&[&"check", &"--baseline", &base, &"--current", &good]).ok();

    // Accuracy down 0.9 points against the default -0.5 budget: JUnit, one case per metric.
    let r = kiln(&[
        &"check",
        &"--baseline",
        &base,
        &"--current",
        &bad,
        &"--format",
        &"junit",
    ]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.stdout.starts_with("<?xml"), "{}", r.stdout);
    assert_eq!(r.stdout.matches("<testcase ").count(), 3, "{}", r.stdout);
    assert_eq!(r.stdout.matches("<failure ").count(), 1, "{}", r.stdout);
    assert!(r.stdout.contains("name=\"m/accuracy\""), "{}", r.stdout);

    // GitHub: annotations on stdout, the Markdown summary appended to $GITHUB_STEP_SUMMARY.
    let summary = d.join("summary.md");
    std::fs::write(&summary, "earlier step\n").unwrap();
    let r = run_cmd({
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"));
        c.args(["check", "--format", "github", "--baseline"])
            .arg(&base)
            .arg("--current")
            .arg(&bad)
            .env("GITHUB_STEP_SUMMARY", &summary);
        c
    });
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(
        r.stdout
            .contains("::error title=kiln check%3A m/accuracy::m/accuracy regressed"),
        "{}",
        r.stdout
    );
    let md = std::fs::read_to_string(&summary).unwrap();
    assert!(
        md.starts_with("earlier step\n### ❌ kiln check: 1 regression"),
        "{md}"
    );
    assert!(md.contains("| `m/accuracy` | 96.90% | 96.00% |"), "{md}");

    let r = kiln(&[
        &"check",
        &"--baseline",
        &base,
        &"--current",
        &good,
        &"--format",
        &"markdown",
    ]);
    assert!(r.ok().contains("### ✅ kiln check: passed"), "{}", r.stdout);

    // A budgets file relaxes accuracy: the same drop passes.
    let budgets = d.join("budgets.toml");
    std::fs::write(&budgets, "[budgets]\n\"m/accuracy\" = \"-1\"\n").unwrap();
    kiln(&[
        &"check",
        &"--baseline",
        &base,
        &"--current",
        &bad,
        &"--budgets",
        &budgets,
    ])
    .ok();

    // Update shows the diff, keeps the budgets, rewrites the file.
    let mut b: Value = serde_json::from_slice(&std::fs::read(&base).unwrap()).unwrap();
    b["budgets"] = json!({"size": "+5%"});
    write(&base, &b);
    let r = kiln(&[
        &"baseline",
        &"update",
        &"--baseline",
        &base,
        &"--current",
        &bad,
    ]);
    let out = r.ok();
    assert!(out.contains("changes from the previous baseline"), "{out}");
    assert!(
        out.contains("m/accuracy") && out.contains("96.90%") && out.contains("96.00%"),
        "{out}"
    );
    let b: Value = serde_json::from_slice(&std::fs::read(&base).unwrap()).unwrap();
    assert_eq!(b["budgets"]["size"], "+5%");
    assert_eq!(b["measurement"]["metrics"]["m/accuracy"]["value"], 96.0);
    kiln(&[&"check", &"--baseline", &base, &"--current", &bad]).ok();
}

#[test]
fn check_accuracy_from_a_run_report_and_measure_only() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let report = kiln(&[
        &"run",
        &fixture("digits", "model.onnx"),
        &"--inputs",
        &fixture("digits", "data.npz"),
        &"--json",
    ]);
    let run_json = d.join("run.json");
    std::fs::write(&run_json, report.ok()).unwrap();
    let measured = d.join("m.json");
    let acc = format!("digits={}", run_json.display());
    kiln(&[
        &"check",
        &"--measure-only",
        &"-o",
        &measured,
        &"--model",
        &fixture("digits", "model.onnx"),
        &"--accuracy",
        &acc,
        &"--no-latency",
    ])
    .ok();
    let m: Value = serde_json::from_slice(&std::fs::read(&measured).unwrap()).unwrap();
    assert_eq!(m["schema"], "kiln.measure/1");
    let a = m["metrics"]["digits/accuracy"]["value"].as_f64().unwrap();
    assert!((a - 96.94).abs() < 0.01, "{a}");
    assert!(
        m["metrics"]["digits/model_bytes"]["value"]
            .as_f64()
            .unwrap()
            > 20_000.0
    );
    assert!(
        m["metrics"]["runner-x86_64-linux/.text"].is_object(),
        "{m:#}"
    );
    assert!(m["metrics"].get("digits/latency_p50").is_none());

    // Measured once, checked elsewhere: a 1.5-point drop in an optimize report is caught.
    let base = d.join("b.json");
    kiln(&[
        &"baseline",
        &"update",
        &"--baseline",
        &base,
        &"--current",
        &measured,
    ])
    .ok();
    let opt = d.join("opt.json");
    write(
        &opt,
        &json!({"schema": "kiln.optimize/1", "accuracy": {"metric": "top1", "reference": 96.94, "optimized": a - 1.5, "drop": 1.5}}),
    );
    let acc = format!("digits={}", opt.display());
    let r = kiln(&[
        &"check",
        &"--baseline",
        &base,
        &"--model",
        &fixture("digits", "model.onnx"),
        &"--accuracy",
        &acc,
        &"--no-latency",
    ]);
    assert_eq!(r.code, 1, "{}\n{}", r.stdout, r.stderr);
    assert!(
        r.stdout.contains("digits/accuracy regressed"),
        "{}",
        r.stdout
    );
    assert!(r.stdout.contains("-1.50 pts"), "{}", r.stdout);
}

#[test]
fn check_bad_inputs_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let good = d.join("good.json");
    write(&good, &measurement(1000.0, &[1.0, 1.0, 1.0], 96.9));
    let base = d.join("b.json");
    kiln(&[
        &"baseline",
        &"update",
        &"--baseline",
        &base,
        &"--current",
        &good,
    ])
    .ok();
    let expect_2 = |r: Run, needles: &[&str]| {
        r.fails_with(needles);
        assert_eq!(r.code, 2, "{}", r.stderr);
    };

    // Corrupted baseline: truncated JSON.
    let text = std::fs::read_to_string(&base).unwrap();
    let corrupt = d.join("corrupt.json");
    std::fs::write(&corrupt, &text[..text.len() / 2]).unwrap();
    expect_2(
        kiln(&[&"check", &"--baseline", &corrupt, &"--current", &good]),
        &["baseline", "corrupt.json", "is not valid JSON"],
    );
    // Missing baseline.
    expect_2(
        kiln(&[
            &"check",
            &"--baseline",
            &d.join("nope.json"),
            &"--current",
            &good,
        ]),
        &["cannot read baseline", "nope.json"],
    );
    // Some other JSON document.
    let other = d.join("other.json");
    write(&other, &json!({"schema": "kiln.run/1"}));
    expect_2(
        kiln(&[&"check", &"--baseline", &other, &"--current", &good]),
        &["other.json", "expected `kiln.baseline/1`"],
    );
    // Metrics on one side only: listed.
    let mut fewer = measurement(1000.0, &[1.0, 1.0, 1.0], 96.9);
    fewer["metrics"]
        .as_object_mut()
        .unwrap()
        .remove("m/accuracy");
    fewer["metrics"]["m/cosine"] = json!({"kind": "accuracy", "unit": "cosine", "value": 0.99});
    let fewer_path = d.join("fewer.json");
    write(&fewer_path, &fewer);
    expect_2(
        kiln(&[&"check", &"--baseline", &base, &"--current", &fewer_path]),
        &[
            "not measured now: m/accuracy",
            "not in the baseline: m/cosine",
        ],
    );
    // A budget that does not parse, in a budgets file and in the baseline.
    let budgets = d.join("budgets.toml");
    std::fs::write(&budgets, "[budgets]\nlatency = \"ten percent\"\n").unwrap();
    expect_2(
        kiln(&[
            &"check",
            &"--baseline",
            &base,
            &"--current",
            &good,
            &"--budgets",
            &budgets,
        ]),
        &["budgets.toml", "`latency`", "ten percent"],
    );
    let mut b: Value = serde_json::from_str(&text).unwrap();
    b["budgets"] = json!({"m/model_bytes": "2%"});
    let bad_budget = d.join("bad-budget.json");
    write(&bad_budget, &b);
    expect_2(
        kiln(&[&"check", &"--baseline", &bad_budget, &"--current", &good]),
        &["bad-budget.json", "`m/model_bytes`", "no sign"],
    );
    // Broken current measurement, unknown format, nothing to measure.
    let broken = d.join("broken.json");
    std::fs::write(&broken, "{\"schema\": \"kiln.measure/1\", \"metrics\": 3}").unwrap();
    expect_2(
        kiln(&[&"check", &"--baseline", &base, &"--current", &broken]),
        &["broken.json", "not a valid kiln.measure/1"],
    );
    expect_2(
        kiln(&[
            &"check",
            &"--baseline",
            &base,
            &"--current",
            &good,
            &"--format",
            &"xml",
        ]),
        &["unknown format `xml`"],
    );
    expect_2(
        kiln(&[&"check", &"--baseline", &base]),
        &["nothing to measure", "no `measure` section"],
    );
    // Update refuses to overwrite a corrupted baseline silently.
    expect_2(
        kiln(&[
            &"baseline",
            &"update",
            &"--baseline",
            &corrupt,
            &"--current",
            &good,
        ]),
        &["existing baseline is unreadable", "corrupt.json"],
    );
}
