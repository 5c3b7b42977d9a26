//! `kiln optimize`: int8 static/dynamic and f16 on the fixtures (accuracy, ops, runner
//! form), the accuracy budget, and every bad input the quantization issue lists.

use std::path::Path;

use kiln_io::tract_core::prelude::*;

use crate::support::*;

/// Runs `kiln optimize` on fixture `name` with `extra` arguments, writing into `dir`;
/// returns the kiln.optimize/1 report.
fn check(dir: &Path, name: &str, precision: &str, extra: &[&str]) -> serde_json::Value {
    let out = dir.join(format!("{name}.{precision}.nnef.tar"));
    let mut args: Vec<Box<dyn AsRefOsStr>> = vec![
        Box::new("optimize"),
        Box::new(fixture(name, "model.onnx")),
        Box::new("-o"),
        Box::new(out.clone()),
        Box::new("--quantize"),
        Box::new(precision.to_string()),
        Box::new("--eval"),
        Box::new(fixture(name, "data.npz")),
        Box::new("--json"),
    ];
    for e in extra {
        args.push(Box::new(e.to_string()));
    }
    let refs: Vec<&dyn AsRefOsStr> = args.iter().map(|a| a.as_ref()).collect();
    let report = kiln(&refs).json();
    assert_eq!(report["schema"], "kiln.optimize/1");
    // The runner form reloads through kiln's NNEF dialect (what the device runner reads)
    // and agrees with the report's accuracy on the same data.
    let run = kiln(&[
        &"run",
        &out,
        &"--inputs",
        &fixture(name, "sample.npz"),
        &"--json",
    ])
    .json();
    assert!(
        run["outputs"].as_array().is_some_and(|o| !o.is_empty()),
        "{run}"
    );
    report
}

fn ops(report: &serde_json::Value) -> Vec<String> {
    report["ops"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o[0].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn int8_static_keeps_digits_accuracy_and_computes_in_int8() {
    let tmp = tempfile::tempdir().unwrap();
    for method in ["minmax", "percentile", "entropy"] {
        let calib = fixture("digits", "calib.npz");
        let r = check(
            tmp.path(),
            "digits",
            "int8-static",
            &["--calib", calib.to_str().unwrap(), "--calibration", method],
        );
        let acc = &r["accuracy"];
        assert_eq!(acc["metric"], "top1");
        assert!(
            (acc["reference"].as_f64().unwrap() - 96.94).abs() < 0.01,
            "{acc}"
        );
        assert!(acc["drop"].as_f64().unwrap() <= 0.5, "{method}: {acc}");
        assert!(
            r["layers"]
                .as_array()
                .unwrap()
                .iter()
                .all(|l| l["precision"] == "int8"),
            "{r:#}"
        );
        // Integer matmuls: the activations are quantized in the graph tract runs (by kiln's
        // `KilnRequant`, which replaces tract's `QuantizeLinear`; kiln_io::passes).
        assert!(
            ops(&r)
                .iter()
                .any(|o| o.starts_with("QuantizeLinear") || o == "KilnRequant"),
            "{:?}",
            ops(&r)
        );
    }
}

#[test]
fn int8_static_mobilenet_folds_bn_and_quantizes_every_conv_onto_kilns_kernels() {
    let tmp = tempfile::tempdir().unwrap();
    let calib = fixture("mobilenet", "calib.npz");
    let r = check(
        tmp.path(),
        "mobilenet",
        "int8-static",
        &["--calib", calib.to_str().unwrap()],
    );
    assert!(!r["folded_batch_norms"].as_array().unwrap().is_empty());
    assert!(
        r["accuracy"]["cosine"].as_f64().unwrap() > 0.99,
        "{}",
        r["accuracy"]
    );
    let layers = r["layers"].as_array().unwrap();
    let int8 = layers.iter().filter(|l| l["precision"] == "int8").count();
    assert!(int8 >= 15, "{int8} int8 layers");
    let dw: Vec<_> = layers
        .iter()
        .filter(|l| l["name"].as_str().unwrap().contains("dw"))
        .collect();
    assert!(!dw.is_empty(), "{layers:?}");
    for l in dw {
        assert_eq!(l["precision"], "int8", "{l}");
    }
    // The depthwise convs run on kiln's int8 kernel, not on tract's im2col lowering.
    let ops = ops(&r);
    assert!(ops.iter().any(|o| o == "KilnDepthwise"), "{ops:?}");
    assert!(!ops.iter().any(|o| o == "DepthWiseConv"), "{ops:?}");
    let out = r["size"]["output"].as_u64().unwrap();
    let src = r["size"]["source_onnx"].as_u64().unwrap();
    assert!(out * 10 < src * 6, "int8 NNEF {out} vs fp32 ONNX {src}");

    // kiln's requantization pass (kiln_io::passes) replaces tract's unfused per-channel
    // `Scale` on the quantized 1x1 convs and computes the same outputs as tract's own
    // lowering (`KILN_NO_PASSES`) within rounding of the fixed-point multipliers.
    assert!(ops.iter().any(|o| o == "OptMatMul"), "{ops:?}");
    assert!(!ops.iter().any(|o| o == "Scale"), "{ops:?}");
    let nnef = tmp.path().join("mobilenet.int8-static.nnef.tar");
    let data = fixture("mobilenet", "data.npz");
    let ours = tmp.path().join("ours.npz");
    let tracts = tmp.path().join("tracts.npz");
    kiln(&[&"run", &nnef, &"--inputs", &data, &"--output", &ours]).ok();
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"));
    cmd.env("KILN_NO_PASSES", "1");
    cmd.arg("run").arg(&nnef).arg("--inputs").arg(&data);
    cmd.arg("--output").arg(&tracts);
    run_cmd(cmd).ok();
    let want = kiln_io::read_tensors(&tracts).unwrap();
    let got = kiln_io::read_tensors(&ours).unwrap();
    for ((_, g), (_, w)) in got.iter().zip(&want) {
        let c = kiln_io::compare::compare(g, w, g.rank()).unwrap();
        assert!(c.cosine > 0.999, "{c:?}");
    }
}

#[test]
fn f16_and_int8_dynamic_stay_close_to_fp32() {
    let tmp = tempfile::tempdir().unwrap();
    let r = check(tmp.path(), "mobilenet", "f16", &[]);
    assert!(
        r["accuracy"]["cosine"].as_f64().unwrap() > 0.9999,
        "{}",
        r["accuracy"]
    );
    assert!(
        r["size"]["output"].as_u64().unwrap() < r["size"]["source_onnx"].as_u64().unwrap() * 7 / 10
    );
    let r = check(tmp.path(), "transformer", "int8-dynamic", &[]);
    assert!(
        r["accuracy"]["cosine"].as_f64().unwrap() > 0.99,
        "{}",
        r["accuracy"]
    );
    assert!(
        ops(&r).iter().any(|o| o == "Abs"),
        "run-time activation scales: {:?}",
        ops(&r)
    );
    // Conv layers are left in f32 by int8-dynamic, and the report says so.
    let r = check(tmp.path(), "cnn", "int8-dynamic", &[]);
    assert!(
        r["notes"].to_string().contains("Conv layers in f32"),
        "{}",
        r["notes"]
    );
}

#[test]
fn accuracy_budget_returns_sensitive_layers_to_f32() {
    let tmp = tempfile::tempdir().unwrap();
    let calib = fixture("mobilenet", "calib.npz");
    let free = check(
        tmp.path(),
        "mobilenet",
        "int8-static",
        &["--calib", calib.to_str().unwrap()],
    );
    let full_drop = free["accuracy"]["drop"].as_f64().unwrap();
    assert!(
        full_drop > 0.02,
        "fixture too easy for this test: drop {full_drop}"
    );
    let budget = full_drop / 3.0;
    let r = check(
        tmp.path(),
        "mobilenet",
        "int8-static",
        &[
            "--calib",
            calib.to_str().unwrap(),
            "--max-accuracy-drop",
            &budget.to_string(),
        ],
    );
    assert!(
        r["accuracy"]["drop"].as_f64().unwrap() <= budget,
        "{}",
        r["accuracy"]
    );
    let by_budget: Vec<_> = r["layers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| {
            l["kept_reason"]
                .as_str()
                .is_some_and(|s| s.starts_with("accuracy budget"))
        })
        .collect();
    assert!(!by_budget.is_empty(), "{r:#}");
    // Every layer the search could choose has a measured sensitivity.
    for l in r["layers"].as_array().unwrap() {
        let for_speed = l["kept_reason"]
            .as_str()
            .is_some_and(|s| s.starts_with("speed"));
        assert!(for_speed || l["sensitivity"].is_number(), "{l}");
    }
}

/// A model with no quantizable layer: a single Relu.
fn relu_model(path: &Path) {
    use kiln_graph::pb::*;
    let vi = |name: &str| ValueInfoProto {
        name: name.into(),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: 1,
                shape: Some(TensorShapeProto {
                    dim: [1, 4]
                        .iter()
                        .map(|&d| tensor_shape_proto::Dimension {
                            value: Some(tensor_shape_proto::dimension::Value::DimValue(d)),
                            ..Default::default()
                        })
                        .collect(),
                }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    };
    let model = ModelProto {
        ir_version: 8,
        opset_import: vec![OperatorSetIdProto {
            domain: String::new(),
            version: 17,
        }],
        graph: Some(GraphProto {
            name: "relu".into(),
            node: vec![kiln_opt::onnx::node("Relu", "relu", &["x"], &["y"])],
            input: vec![vi("x")],
            output: vec![vi("y")],
            ..Default::default()
        }),
        ..Default::default()
    };
    std::fs::write(path, kiln_graph::proto::to_bytes(&model)).unwrap();
}

#[test]
fn bad_inputs_fail_cleanly_and_write_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out.nnef.tar");
    let model = fixture("digits", "model.onnx");
    let calib = fixture("digits", "calib.npz");
    let eval = fixture("digits", "data.npz");
    let optimize = |extra: &[&dyn AsRefOsStr]| {
        let mut args: Vec<&dyn AsRefOsStr> = vec![&"optimize", &model, &"-o", &out];
        args.extend_from_slice(extra);
        kiln(&args)
    };
    let wrong_name = tmp.path().join("wrong_name.npz");
    write_npz(
        &wrong_name,
        vec![("pixels", Tensor::zero::<f32>(&[4, 1, 64]).unwrap())],
    );
    let wrong_shape = tmp.path().join("wrong_shape.npz");
    write_npz(
        &wrong_shape,
        vec![("input", Tensor::zero::<f32>(&[4, 1, 63]).unwrap())],
    );
    let empty = tmp.path().join("empty.npz");
    write_npz(
        &empty,
        vec![("input", Tensor::zero::<f32>(&[0, 1, 64]).unwrap())],
    );
    let nan = tmp.path().join("nan.npz");
    let mut values = vec![0f32; 128];
    values[5] = f32::NAN;
    let t = Tensor::from_shape(&[2, 1, 64], &values).unwrap();
    write_npz(&nan, vec![("input", t)]);
    let relu = tmp.path().join("relu.onnx");
    relu_model(&relu);

    optimize(&[&"--quantize", &"int8-static"]).fails_with(&["--calib"]);
    optimize(&[&"--quantize", &"int4"]).fails_with(&["unknown precision", "int8-static"]);
    optimize(&[&"--quantize", &"int8-static", &"--calib", &wrong_name])
        .fails_with(&["wrong_name.npz", "input"]);
    optimize(&[&"--quantize", &"int8-static", &"--calib", &wrong_shape])
        .fails_with(&["wrong_shape.npz"]);
    optimize(&[&"--quantize", &"int8-static", &"--calib", &empty])
        .fails_with(&["empty.npz", "no sample"]);
    optimize(&[&"--quantize", &"int8-static", &"--calib", &nan]).fails_with(&["nan.npz", "NaN"]);
    optimize(&[
        &"--quantize",
        &"int8-static",
        &"--calib",
        &calib,
        &"--eval",
        &eval,
        &"--max-accuracy-drop",
        &"-1",
    ])
    .fails_with(&["--max-accuracy-drop", "≥ 0"]);
    optimize(&[
        &"--quantize",
        &"int8-static",
        &"--calib",
        &calib,
        &"--max-accuracy-drop",
        &"1",
    ])
    .fails_with(&["needs --eval"]);
    optimize(&[
        &"--quantize",
        &"int8-static",
        &"--calib",
        &calib,
        &"--keep-f32",
        &"nope",
    ])
    .fails_with(&["nope", "fc1"]);
    optimize(&[
        &"--quantize",
        &"int8-static",
        &"--calib",
        &calib,
        &"--calibration",
        &"kl",
    ])
    .fails_with(&["unknown calibration method"]);
    let r = kiln(&[
        &"optimize",
        &relu,
        &"-o",
        &out,
        &"--quantize",
        &"int8-dynamic",
    ]);
    r.fails_with(&["nothing to quantize", "unchanged"]);
    assert!(!out.exists(), "a failed optimize left {}", out.display());
    let leftovers: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.ends_with(".npz") && !n.ends_with(".onnx"))
        .collect();
    assert!(leftovers.is_empty(), "partial files: {leftovers:?}");
}

#[test]
fn prune_then_quantize_in_one_command_within_one_budget() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("digits.pq.nnef.tar");
    let (model, calib, eval) = (
        fixture("digits", "model.onnx"),
        fixture("digits", "calib.npz"),
        fixture("digits", "data.npz"),
    );
    let base: Vec<&dyn AsRefOsStr> = vec![
        &"optimize",
        &model,
        &"-o",
        &out,
        &"--quantize",
        &"int8-static",
        &"--calib",
        &calib,
        &"--eval",
        &eval,
        &"--max-accuracy-drop",
        &"1.0",
    ];
    let mut args = base.clone();
    args.extend_from_slice(&[
        &"--prune",
        &"magnitude:0.3",
        &"--prune-skip",
        &"none",
        &"--json",
    ]);
    let r = kiln(&args).json();
    assert_eq!(r["prune"]["schema"], "kiln.prune/1", "{r:#}");
    assert!(
        r["accuracy"]["drop"].as_f64().unwrap() <= 1.0,
        "{}",
        r["accuracy"]
    );
    assert!(out.exists());
    std::fs::remove_file(&out).unwrap();
    // 90% of every weight gone: pruning alone breaks the budget; nothing is written.
    let mut args = base.clone();
    args.extend_from_slice(&[&"--prune", &"magnitude:0.9", &"--prune-skip", &"none"]);
    kiln(&args).fails_with(&["pruning alone drops", "budget"]);
    assert!(!out.exists());
}

/// Compiles `model` (ONNX or kiln NNEF) for `target`, runs the runner on `sample` (under
/// qemu-user for ARM) and returns its outputs.
fn on_runner(model: &Path, target: &str, sample: &Path) -> kiln_io::NamedTensors {
    let dir = tempfile::tempdir().unwrap();
    let j = kiln(&[
        &"compile",
        &model,
        &"--target",
        &target,
        &"-o",
        &dir.path(),
        &"--json",
    ])
    .json();
    let spec = kiln_target::find(&fixtures().join("../targets"), target).unwrap();
    let runner = std::path::PathBuf::from(j["runner_file"].as_str().unwrap());
    let out = dir.path().join("out.npz");
    let mut cmd = kiln_target::emulate::command(&spec, &runner).unwrap();
    cmd.arg("run")
        .arg("--model")
        .arg(j["model_file"].as_str().unwrap());
    cmd.arg("--inputs").arg(sample).arg("--output").arg(&out);
    run_cmd(cmd).ok();
    kiln_io::read_tensors(&out).unwrap()
}

fn assert_close(got: &kiln_io::NamedTensors, want: &kiln_io::NamedTensors, tol: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    for ((gn, g), (wn, w)) in got.iter().zip(want) {
        assert_eq!(gn, wn, "{what}");
        let c = kiln_io::compare::compare(g, w, g.rank()).unwrap();
        assert!(c.max_abs <= tol, "{what}: {c:?}");
    }
}

#[test]
fn onnxruntime_quantized_models_load_run_and_compile() {
    // fixtures/prequant: made by onnxruntime's quantize_dynamic / quantize_static (QDQ),
    // with onnxruntime's own outputs on the sample.
    for (model, fixture_name) in [
        ("digits.dynamic", "digits"),
        ("transformer.dynamic", "transformer"),
        ("mobilenet.qdq", "mobilenet"),
    ] {
        let onnx = fixtures().join("prequant").join(format!("{model}.onnx"));
        let reference = fixtures()
            .join("prequant")
            .join(format!("{model}.sample_ref.npz"));
        let sample = fixture(fixture_name, "sample.npz");
        let j = kiln(&[
            &"run",
            &onnx,
            &"--inputs",
            &sample,
            &"--compare",
            &reference,
            &"--tolerance",
            &"1e-4",
            &"--json",
        ])
        .json();
        assert_eq!(j["within_tolerance"], true, "{model}: {j}");
        let want = kiln_io::read_tensors(&reference).unwrap();
        assert_close(
            &on_runner(&onnx, "x86_64-linux", &sample),
            &want,
            1e-4,
            model,
        );
    }
    let onnx = fixtures().join("prequant/digits.dynamic.onnx");
    let want =
        kiln_io::read_tensors(&fixtures().join("prequant/digits.dynamic.sample_ref.npz")).unwrap();
    let got = on_runner(&onnx, "aarch64-linux", &fixture("digits", "sample.npz"));
    assert_close(&got, &want, 1e-4, "digits.dynamic on aarch64");
}

#[test]
fn kiln_int8_models_run_on_the_cross_built_runner() {
    let tmp = tempfile::tempdir().unwrap();
    let calib = fixture("mobilenet", "calib.npz");
    check(
        tmp.path(),
        "mobilenet",
        "int8-static",
        &["--calib", calib.to_str().unwrap()],
    );
    let nnef = tmp.path().join("mobilenet.int8-static.nnef.tar");
    let sample = fixture("mobilenet", "sample.npz");
    let host = tmp.path().join("host.npz");
    kiln(&[&"run", &nnef, &"--inputs", &sample, &"--output", &host]).ok();
    let want = kiln_io::read_tensors(&host).unwrap();
    assert_close(
        &on_runner(&nnef, "x86_64-linux", &sample),
        &want,
        1e-5,
        "x86_64",
    );
    assert_close(
        &on_runner(&nnef, "aarch64-linux", &sample),
        &want,
        1e-3,
        "aarch64",
    );
}

#[test]
fn f16_model_keeps_f32_inputs_and_outputs_on_the_runner() {
    let tmp = tempfile::tempdir().unwrap();
    check(tmp.path(), "cnn", "f16", &[]);
    let nnef = tmp.path().join("cnn.f16.nnef.tar");
    let sample = fixture("cnn", "sample.npz");
    let got = on_runner(&nnef, "x86_64-linux", &sample);
    let want = kiln_io::read_tensors(&fixture("cnn", "sample_ref.npz")).unwrap();
    for (_, t) in &got {
        assert_eq!(t.datum_type(), f32::datum_type());
    }
    assert_close(&got, &want, 1e-2, "cnn f16");
}

/// `--speed-search` on the small cnn (whose int8 form is about as fast as its fp32 one, so
/// the search may or may not move layers, depending on this host): every layer it returns
/// to f32 says why with the measured times, at least one layer stays int8, `kept_f32` lists
/// exactly the f32 layers, the accuracy stays within 0.5 points, and the written model runs.
#[test]
fn speed_search_moves_layers_only_with_a_measured_reason() {
    let tmp = tempfile::tempdir().unwrap();
    let calib = fixture("cnn", "calib.npz");
    let r = check(
        tmp.path(),
        "cnn",
        "int8-static",
        &["--calib", calib.to_str().unwrap(), "--speed-search"],
    );
    let layers = r["layers"].as_array().unwrap();
    assert!(layers.iter().any(|l| l["precision"] == "int8"), "{r}");
    for l in layers {
        let why = l["kept_reason"].as_str().unwrap_or("");
        if why.starts_with("speed:") {
            assert_eq!(l["precision"], "f32", "{l}");
            assert!(why.contains(" ms; fp32 "), "{why}");
        }
    }
    let kept: Vec<&str> = r["kept_f32"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k.as_str().unwrap())
        .collect();
    let f32_layers: Vec<&str> = layers
        .iter()
        .filter(|l| l["precision"] == "f32")
        .map(|l| l["name"].as_str().unwrap())
        .collect();
    assert_eq!(kept, f32_layers, "{r}");
    assert!(r["accuracy"]["drop"].as_f64().unwrap() <= 0.5, "{r}");
}
