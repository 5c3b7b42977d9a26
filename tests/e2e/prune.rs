//! `kiln optimize --prune` and `kiln prune-scan`: outputs, reports, refusals.

use crate::support::*;

/// Runs `kiln optimize` on fixture `name` with extra `args` into `out` (inside a temp dir).
fn optimize(dir: &std::path::Path, name: &str, out: &str, args: &[&str]) -> Run {
    let mut all: Vec<Box<dyn AsRefOsStr>> = vec![
        Box::new("optimize"),
        Box::new(fixture(name, "model.onnx")),
        Box::new("-o"),
        Box::new(dir.join(out)),
    ];
    all.extend(
        args.iter()
            .map(|a| Box::new(a.to_string()) as Box<dyn AsRefOsStr>),
    );
    let refs: Vec<&dyn AsRefOsStr> = all.iter().map(|b| b.as_ref()).collect();
    kiln(&refs)
}

#[test]
fn structured_mobilenet_onnx_and_nnef_outputs_run() {
    let dir = tempfile::tempdir().unwrap();
    let eval = fixture("mobilenet", "data.npz");
    let r = optimize(
        dir.path(),
        "mobilenet",
        "pruned.onnx",
        &[
            "--prune",
            "channels:0.3",
            "--eval",
            eval.to_str().unwrap(),
            "--json",
        ],
    );
    let j = r.json();
    assert_eq!(j["schema"], "kiln.prune/1");
    let t = &j["totals"];
    assert!(t["macs_after"].as_u64().unwrap() < t["macs_before"].as_u64().unwrap());
    assert!(t["params_after"].as_u64().unwrap() < t["params_before"].as_u64().unwrap());
    assert_eq!(j["accuracy"]["samples"], 4);
    // The pruned model is an ordinary ONNX model: kiln runs it on the fixture data.
    let out = kiln(&[
        &"run",
        &dir.path().join("pruned.onnx"),
        &"--inputs",
        &eval,
        &"--json",
    ])
    .json();
    assert_eq!(out["outputs"][0]["shape"], serde_json::json!([4, 1, 100]));
    // The NNEF form (what `kiln compile` ships) loads and runs too.
    let r = optimize(
        dir.path(),
        "mobilenet",
        "pruned.nnef.tar",
        &["--prune", "channels:0.3"],
    );
    assert!(r.ok().contains("wrote"), "{}", r.stdout);
    kiln(&[
        &"run",
        &dir.path().join("pruned.nnef.tar"),
        &"--inputs",
        &eval,
    ])
    .ok();
}

#[test]
fn magnitude_digits_reports_sparsity_zstd_and_accuracy() {
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("prune.json");
    let r = optimize(
        dir.path(),
        "digits",
        "sparse.onnx",
        &[
            "--prune",
            "magnitude:0.5",
            "--prune-scope",
            "global",
            "--prune-skip",
            "none",
            "--eval",
            fixture("digits", "data.npz").to_str().unwrap(),
            "--report",
            report.to_str().unwrap(),
            "--zstd-level",
            "3",
        ],
    );
    let text = r.ok();
    assert!(text.contains("accuracy"), "{text}");
    let j: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    let t = &j["totals"];
    assert_eq!(t["zstd_level"], 3);
    assert!(t["zstd_bytes_after"].as_u64().unwrap() < t["zstd_bytes_before"].as_u64().unwrap());
    let nz = t["nonzero_after"].as_u64().unwrap();
    assert!(nz < t["nonzero_before"].as_u64().unwrap() * 6 / 10, "{t}");
    let acc = j["accuracy"]["accuracy_after"].as_f64().unwrap();
    assert!(acc > 0.3 && acc <= 1.0, "{acc}");
    assert_eq!(
        j["output"]["bytes"],
        std::fs::metadata(dir.path().join("sparse.onnx"))
            .unwrap()
            .len()
    );
}

#[test]
fn bad_input_is_refused_and_nothing_written() {
    let dir = tempfile::tempdir().unwrap();
    let cases: &[(&[&str], &[&str])] = &[
        (&["--prune", "magnitude:1.5"], &["outside [0, 1)"]),
        (
            &["--prune", "channels:0.3", "--prune-skip", "nope"],
            &["no node named `nope`"],
        ),
        (
            &["--prune", "channels:0.95", "--prune-skip", "none"],
            &["would remove every channel", "conv1"],
        ),
        (
            &[
                "--prune",
                "magnitude:0.5",
                "--prune-skip",
                "conv1,conv2,logits",
            ],
            &["nothing was pruned"],
        ),
        (&[], &["nothing to do"]),
    ];
    for (args, needles) in cases {
        optimize(dir.path(), "cnn", "out.onnx", args).fails_with(needles);
        assert!(
            !dir.path().join("out.onnx").exists(),
            "{args:?} left output"
        );
    }
}

#[test]
fn prune_scan_table_json_and_svg() {
    let dir = tempfile::tempdir().unwrap();
    let (json, svg) = (dir.path().join("scan.json"), dir.path().join("scan.svg"));
    let r = kiln(&[
        &"prune-scan",
        &fixture("digits", "model.onnx"),
        &"--eval",
        &fixture("digits", "data.npz"),
        &"--report",
        &json,
        &"--plot",
        &svg,
    ]);
    let text = r.ok();
    assert!(text.contains("fc2") && text.contains("90%"), "{text}");
    let j: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(j["schema"], "kiln.prune-scan/1");
    assert_eq!(j["metric"], "accuracy");
    assert_eq!(j["layers"].as_array().unwrap().len(), 3);
    let s = std::fs::read_to_string(&svg).unwrap();
    assert!(s.starts_with("<svg") && s.contains("logits"));
    // A model without prunable layers is a clear error.
    kiln(&[
        &"prune-scan",
        &fixtures().join("bad/lrn.onnx"),
        &"--eval",
        &fixture("digits", "data.npz"),
    ])
    .fails_with(&["nothing to prune"]);
}
