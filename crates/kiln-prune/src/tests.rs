//! Tests of the passes on the committed fixtures.

use std::path::PathBuf;

use tract_onnx::pb::{GraphProto, NodeProto, ValueInfoProto};

use crate::*;

fn fixture(name: &str) -> ModelProto {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures")
        .join(name)
        .join("model.onnx");
    read_model(&p).unwrap()
}

fn data(name: &str) -> NamedTensors {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures")
        .join(name)
        .join("data.npz");
    kiln_io::read_tensors(&p).unwrap()
}

/// What a pruning run must show.
#[derive(Debug)]
struct Expect {
    /// (layer, channels kept) pairs.
    kept: &'static [(&'static str, usize)],
    /// (layer, sparsity) pairs.
    sparsity: &'static [(&'static str, f64)],
    /// MACs must drop.
    fewer_macs: bool,
}

/// Prunes fixture `name` with `spec`: the report must match `expected`, or the error
/// must contain the given text.
fn check(name: &str, spec: PruneSpec, expected: Result<Expect, &str>) {
    let model = fixture(name);
    match (prune(&model, &spec), expected) {
        (Ok((_, r)), Ok(e)) => {
            for (layer, kept) in e.kept {
                let l = r.layers.iter().find(|l| l.name == *layer).unwrap();
                assert_eq!(l.channels_kept, Some(*kept), "{layer}: {l:?}");
            }
            for (layer, s) in e.sparsity {
                let l = r.layers.iter().find(|l| l.name == *layer).unwrap();
                assert!((l.sparsity - s).abs() < 1e-3, "{layer}: {l:?}");
            }
            let (b, a) = (r.totals.macs_before.unwrap(), r.totals.macs_after.unwrap());
            assert_eq!(a < b, e.fewer_macs, "MACs {b} -> {a}");
        }
        (Err(err), Err(msg)) => {
            assert!(format!("{err:#}").contains(msg), "{err:#} lacks {msg}")
        }
        (got, want) => panic!("{name}: got {:?}, want {want:?}", got.map(|(_, r)| r)),
    }
}

fn channels(amount: f64) -> PruneSpec {
    PruneSpec::new(Method::Channels(amount))
}

#[test]
fn structured_mobilenet_residuals_bn_depthwise() {
    // block2/project feeds the residual Adds of blocks 3..6: one group, pruned together.
    check(
        "mobilenet",
        channels(0.3),
        Ok(Expect {
            kept: &[
                ("stem/conv", 16),
                ("block2/expand/conv", 34),
                ("block2/dw/conv", 34),
                ("block2/project/conv", 11),
                ("block3/project/conv", 11),
                ("block6/project/conv", 11),
                ("head/conv", 224),
                ("logits", 100),
            ],
            sparsity: &[],
            fewer_macs: true,
        }),
    );
}

#[test]
fn structured_gemm_and_conv_fixtures() {
    check(
        "digits",
        channels(0.5),
        Ok(Expect {
            kept: &[("fc1", 64), ("fc2", 16), ("logits", 10)],
            sparsity: &[],
            fewer_macs: true,
        }),
    );
    let mut all = channels(0.5);
    all.skip = Some(vec![]);
    all.norm = Norm::L2;
    check(
        "cnn",
        all,
        Ok(Expect {
            kept: &[("conv1", 4), ("conv2", 8), ("logits", 10)],
            sparsity: &[],
            fewer_macs: true,
        }),
    );
    let mut global = channels(0.3);
    global.scope = Scope::Global;
    check(
        "mobilenet",
        global,
        Ok(Expect {
            kept: &[("stem/conv", 16), ("logits", 100)],
            sparsity: &[],
            fewer_macs: true,
        }),
    );
}

#[test]
fn magnitude_layer_and_global() {
    let mut spec = PruneSpec::new(Method::Magnitude(0.5));
    spec.skip = Some(vec!["logits".into()]);
    check(
        "digits",
        spec.clone(),
        Ok(Expect {
            kept: &[],
            sparsity: &[("fc1", 0.5), ("fc2", 0.5), ("logits", 0.0)],
            fewer_macs: false,
        }),
    );
    spec.scope = Scope::Global;
    let (_, r) = prune(&fixture("digits"), &spec).unwrap();
    let zeros: f64 = r.layers.iter().map(|l| l.sparsity * l.params as f64).sum();
    assert_eq!(zeros.round() as u64, (4096 + 2048) / 2);
    assert!(r.totals.zstd_bytes_after < r.totals.zstd_bytes_before);
}

#[test]
fn zero_pruning_is_identity() {
    for (name, method) in [
        ("mobilenet", Method::Channels(0.0)),
        ("digits", Method::Magnitude(0.0)),
        ("cnn", Method::Channels(0.0)),
    ] {
        let model = fixture(name);
        let (pruned, _) = prune(&model, &PruneSpec::new(method)).unwrap();
        assert_eq!(pruned, model, "{name}");
        let acc = evaluate(&model, &pruned, &data(name), "data.npz").unwrap();
        assert_eq!(acc.max_abs, 0.0, "{name}");
    }
}

#[test]
fn pruned_models_run_and_digits_stay_accurate() {
    let model = fixture("digits");
    let (pruned, _) = prune(&model, &channels(0.3)).unwrap();
    let acc = evaluate(&model, &pruned, &data("digits"), "data.npz").unwrap();
    assert_eq!(acc.samples, 360);
    let (before, after) = (acc.accuracy_before.unwrap(), acc.accuracy_after.unwrap());
    assert!(before > 0.9, "{acc:?}");
    // Pruned, but far from random guessing (10%).
    assert!(after > 0.5 && after <= 1.0, "{acc:?}");
}

#[test]
fn bad_requests() {
    let mut all = channels(0.95);
    all.skip = Some(vec![]);
    check("cnn", all, Err("would remove every channel"));
    let mut bad = channels(0.3);
    bad.skip = Some(vec!["nope".into()]);
    check("cnn", bad, Err("no node named `nope`"));
    check("cnn", channels(1.0), Err("outside [0, 1)"));
    // Every prunable layer skipped: nothing done is an error, not a silent copy.
    let mut none = PruneSpec::new(Method::Magnitude(0.5));
    none.skip = Some(vec!["conv1".into(), "conv2".into(), "logits".into()]);
    check("cnn", none, Err("nothing was pruned"));
}

#[test]
fn nothing_prunable() {
    let vi = |n: &str| ValueInfoProto {
        name: n.into(),
        ..Default::default()
    };
    let model = ModelProto {
        graph: Some(GraphProto {
            node: vec![NodeProto {
                name: "relu".into(),
                op_type: "Relu".into(),
                input: vec!["x".into()],
                output: vec!["y".into()],
                ..Default::default()
            }],
            input: vec![vi("x")],
            output: vec![vi("y")],
            ..Default::default()
        }),
        ..Default::default()
    };
    let err = prune(&model, &channels(0.3)).unwrap_err();
    assert!(format!("{err:#}").contains("nothing to prune"), "{err:#}");
}

#[test]
fn scan_digits() {
    let model = fixture("digits");
    let base = PruneSpec::new(Method::Magnitude(0.0));
    let r = scan(
        &model,
        Method::Magnitude(0.0),
        &base,
        &data("digits"),
        "data.npz",
    )
    .unwrap();
    assert_eq!(r.metric, "accuracy");
    assert_eq!(r.layers.len(), 3);
    assert!(r.layers.iter().all(|l| l.values.len() == 9));
    // The smallest layer pruned at 90% hurts more than at 10%.
    let logits = &r.layers[2].values;
    assert!(logits[8].unwrap() < logits[0].unwrap(), "{logits:?}");
    let svg = r.to_svg().unwrap();
    assert!(
        svg.starts_with("<svg") && svg.contains("fc1"),
        "{}",
        &svg[..200]
    );
}
