//! `kiln run`: every fixture against onnxruntime's outputs, datasets, and bad inputs.

use kiln_io::tract_core::prelude::*;

use crate::support::*;

/// Runs fixture `name` on `inputs`, comparing with `reference` within `tol` (max-abs),
/// and returns the JSON report.
fn check(name: &str, inputs: &str, reference: &str, tol: f64) -> serde_json::Value {
    let j = kiln(&[
        &"run",
        &fixture(name, "model.onnx"),
        &"--inputs",
        &fixture(name, inputs),
        &"--compare",
        &fixture(name, reference),
        &"--tolerance",
        &tol.to_string(),
        &"--json",
    ])
    .json();
    assert_eq!(j["within_tolerance"], true, "{name}: {j:#}");
    for o in j["outputs"].as_array().unwrap() {
        assert!(o["max_abs"].as_f64().unwrap() <= tol, "{name}: {o}");
        assert!(o["cosine"].as_f64().unwrap() > 0.99999, "{name}: {o}");
    }
    j
}

#[test]
fn every_fixture_matches_onnxruntime() {
    for name in ["digits", "cnn", "mobilenet", "transformer"] {
        let j = check(name, "sample.npz", "sample_ref.npz", 1e-4);
        assert_eq!(j["dataset"], false);
        let j = check(name, "data.npz", "data_ref.npz", 1e-4);
        assert_eq!(j["dataset"], true);
    }
}

#[test]
fn digits_dataset_accuracy_matches_the_fixture_readme() {
    let j = check("digits", "data.npz", "data_ref.npz", 1e-4);
    assert_eq!(j["samples"], 360);
    // fixtures/digits/README.md: 96.94% (349/360) held-out accuracy.
    assert!(
        (j["accuracy"].as_f64().unwrap() - 349.0 / 360.0).abs() < 1e-9,
        "{j:#}"
    );
    assert_eq!(j["outputs"][0]["top1_agreement"], 1.0);
}

#[test]
fn writes_outputs_named_as_the_model_outputs() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.npz");
    kiln(&[
        &"run",
        &fixture("cnn", "data.npz").with_file_name("model.onnx"),
        &"--inputs",
        &fixture("cnn", "data.npz"),
        &"--output",
        &out,
    ])
    .ok();
    let written = kiln_io::read_tensors(&out).unwrap();
    assert_eq!(written.len(), 1);
    assert_eq!(written[0].0, "logits");
    assert_eq!(written[0].1.shape(), &[8, 1, 10]);
    // The written file compares to the reference like a fresh run does.
    let reference = kiln_io::read_tensors(&fixture("cnn", "data_ref.npz")).unwrap();
    let c = kiln_io::compare::compare(&written[0].1, &reference[0].1, 2).unwrap();
    assert!(c.max_abs < 1e-4);
}

#[test]
fn symbolic_batch_is_bound_from_the_data() {
    // cnn has input [batch,1,28,28]; a batch of 3 in one sample works.
    let dir = tempfile::tempdir().unwrap();
    let inputs = dir.path().join("b3.npz");
    write_npz(
        &inputs,
        vec![("input", Tensor::zero::<f32>(&[3, 1, 28, 28]).unwrap())],
    );
    let j = kiln(&[
        &"run",
        &fixture("cnn", "model.onnx"),
        &"--inputs",
        &inputs,
        &"--json",
    ])
    .json();
    assert_eq!(j["outputs"][0]["shape"], serde_json::json!([3, 10]));
}

#[test]
fn bad_inputs() {
    let dir = tempfile::tempdir().unwrap();
    let digits = fixture("digits", "model.onnx");
    let run = |inputs: &std::path::Path| kiln(&[&"run", &digits, &"--inputs", &inputs]);

    run(&dir.path().join("missing.npz")).fails_with(&["missing.npz"]);

    let p = dir.path().join("shape.npz");
    write_npz(&p, vec![("input", Tensor::zero::<f32>(&[1, 32]).unwrap())]);
    run(&p).fails_with(&["shape.npz", "`input`", "1x64"]);

    let p = dir.path().join("dtype.npz");
    write_npz(&p, vec![("input", Tensor::zero::<f64>(&[1, 64]).unwrap())]);
    run(&p).fails_with(&["dtype.npz", "`input`", "F32", "F64"]);

    let p = dir.path().join("names.npz");
    write_npz(
        &p,
        vec![
            ("x", Tensor::zero::<f32>(&[1, 64]).unwrap()),
            ("y", Tensor::zero::<f32>(&[1, 64]).unwrap()),
        ],
    );
    run(&p).fails_with(&["names.npz", "missing input `input`", "x, y"]);

    let p = dir.path().join("truncated.npz");
    let bytes = std::fs::read(fixture("digits", "data.npz")).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    run(&p).fails_with(&["truncated.npz", "not a valid .npz"]);

    let p = dir.path().join("empty.npz");
    write_npz(
        &p,
        vec![("input", Tensor::zero::<f32>(&[0, 1, 64]).unwrap())],
    );
    run(&p).fails_with(&["no sample"]);

    // NaN is a warning, not an error.
    let p = dir.path().join("nan.npz");
    let mut x = vec![0f32; 64];
    x[3] = f32::NAN;
    write_npz(
        &p,
        vec![("input", Tensor::from_shape(&[1, 64], &x).unwrap())],
    );
    let r = run(&p);
    r.ok();
    assert!(
        r.stderr.contains("warning") && r.stderr.contains("NaN"),
        "{}",
        r.stderr
    );

    // Output into a directory that does not exist: clear error, nothing written.
    let out = dir.path().join("no/such/dir/out.npz");
    kiln(&[
        &"run",
        &digits,
        &"--inputs",
        &fixture("digits", "sample.npz"),
        &"--output",
        &out,
    ])
    .fails_with(&["out.npz"]);
    assert!(!out.exists());
}

#[test]
fn tolerance_violation_exits_non_zero() {
    // Compare the cnn's outputs with a reference made of zeros.
    let dir = tempfile::tempdir().unwrap();
    let reference = dir.path().join("zeros.npz");
    write_npz(
        &reference,
        vec![("logits", Tensor::zero::<f32>(&[1, 10]).unwrap())],
    );
    kiln(&[
        &"run",
        &fixture("cnn", "model.onnx"),
        &"--inputs",
        &fixture("cnn", "sample.npz"),
        &"--compare",
        &reference,
        &"--tolerance",
        &"1e-4",
    ])
    .fails_with(&["tolerance"]);
}
