//! `kiln inspect`: text and JSON reports, parameter totals, MACs, symbolic dims, bad models.

use crate::support::*;

/// Inspects `name` (with extra args) and checks the parameter count against the sum of
/// ONNX initializer sizes (computed independently by numpy: fixtures/*/README.md) and the
/// MACs of Conv/Gemm/MatMul against hand-computed values (`None`: unknown, symbolic dims).
fn check(name: &str, extra: &[&str], params: u64, macs: Option<&[(&str, u64)]>) {
    let model = fixture(name, "model.onnx");
    let mut args: Vec<&dyn AsRefOsStr> = vec![&"inspect", &model, &"--json"];
    for e in extra {
        args.push(e);
    }
    let j = kiln(&args).json();
    assert_eq!(j["schema"], "kiln.inspect/1");
    assert_eq!(j["params"]["count"], params, "{name}: {j:#}");
    let by_dtype = j["params"]["by_dtype"].as_object().unwrap();
    let sum = |k: &str| {
        by_dtype
            .values()
            .map(|v| v[k].as_u64().unwrap())
            .sum::<u64>()
    };
    assert_eq!(sum("count"), params);
    assert_eq!(sum("bytes"), j["params"]["bytes"].as_u64().unwrap());
    match macs {
        Some(expected) => {
            for (op, m) in expected {
                assert_eq!(j["macs"]["by_op"][op], *m, "{name} {op}: {:#}", j["macs"]);
            }
            let by_op: u64 = j["macs"]["by_op"]
                .as_object()
                .unwrap()
                .values()
                .map(|v| v.as_u64().unwrap())
                .sum();
            assert_eq!(j["macs"]["total"], by_op);
        }
        None => assert!(j["macs"].is_null(), "{name}: {:#}", j["macs"]),
    }
}

#[test]
fn params_and_macs() {
    // digits: Gemm 64->64->32->10.
    check(
        "digits",
        &[],
        6570,
        Some(&[("Gemm", 64 * 64 + 64 * 32 + 32 * 10)]),
    );
    // transformer: q,k,v,out projections, QK^T and AV over 4 heads of 16, FFN 64->256->64.
    // Its 7 extra params are the two i64 reshape-shape initializers.
    check(
        "transformer",
        &[],
        49995,
        Some(&[(
            "MatMul",
            4 * 16 * 64 * 64 + 2 * 16 * 16 * 64 + 2 * 16 * 64 * 256,
        )]),
    );
    // cnn has a symbolic batch: MACs unknown until the shape is fixed.
    check("cnn", &[], 1482, None);
    let conv = 28 * 28 * 8 * 9 + 14 * 14 * 16 * 8 * 9;
    check(
        "cnn",
        &["--input-shape", "input=1x1x28x28"],
        1482,
        Some(&[("Conv", conv), ("Gemm", 160)]),
    );
    check(
        "cnn",
        &["--input-shape", "input=2x1x28x28"],
        1482,
        Some(&[("Conv", 2 * conv), ("Gemm", 320)]),
    );
    // mobilenet: only the classifier checked by hand; its convs must dominate.
    check("mobilenet", &[], 111574, Some(&[("Gemm", 320 * 100)]));
    let j = kiln(&[&"inspect", &fixture("mobilenet", "model.onnx"), &"--json"]).json();
    assert!(
        j["macs"]["by_op"]["Conv"].as_u64().unwrap()
            > j["macs"]["total"].as_u64().unwrap() * 9 / 10
    );
}

#[test]
fn text_report_names_inputs_and_ops() {
    let out = kiln(&[&"inspect", &fixture("mobilenet", "model.onnx")])
        .ok()
        .to_string();
    for needle in [
        "input",
        "logits",
        "Conv",
        "Clip",
        "opset 17",
        "largest params",
    ] {
        assert!(out.contains(needle), "missing {needle}:\n{out}");
    }
}

#[test]
fn bad_models() {
    let dir = tempfile::tempdir().unwrap();
    kiln(&[&"inspect", &dir.path().join("nope.onnx")]).fails_with(&["nope.onnx", "does not exist"]);

    let text = dir.path().join("notes.onnx");
    std::fs::write(&text, "this is not a model\n").unwrap();
    kiln(&[&"inspect", &text]).fails_with(&["notes.onnx", "ONNX"]);

    let good = std::fs::read(fixture("mobilenet", "model.onnx")).unwrap();
    let truncated = dir.path().join("truncated.onnx");
    std::fs::write(&truncated, &good[..good.len() / 3]).unwrap();
    kiln(&[&"inspect", &truncated]).fails_with(&["truncated.onnx", "truncated or corrupted"]);

    let mut bytes = good.clone();
    for b in bytes.iter_mut().take(64).skip(8) {
        *b = 0xff;
    }
    let corrupted = dir.path().join("corrupted.onnx");
    std::fs::write(&corrupted, &bytes).unwrap();
    kiln(&[&"inspect", &corrupted]).fails_with(&["corrupted.onnx"]);

    kiln(&[&"inspect", &fixture("bad", "unsupported_op.onnx")]).fails_with(&[
        "op `FancyOp`",
        "node `fancy1`",
        "opset 17",
        "not supported",
    ]);

    kiln(&[
        &"inspect",
        &fixture("cnn", "model.onnx"),
        &"--input-shape",
        &"image=1x1x28x28",
    ])
    .fails_with(&["no input named `image`", "input"]);
    kiln(&[
        &"inspect",
        &fixture("cnn", "model.onnx"),
        &"--input-shape",
        &"input=1xAx28",
    ])
    .fails_with(&["not a shape"]);
}
