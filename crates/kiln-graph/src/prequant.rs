//! Rewrites of ops found in models onnxruntime already quantized, into standard ONNX ops
//! that tract runs and kiln's NNEF dialect can write: `DynamicQuantizeLinear` (tract
//! cannot serialize it) and the `com.microsoft` `QLinearAdd`/`QLinearMul`/
//! `QLinearGlobalAveragePool` of ORT's QOperator format (tract does not know them).

use tract_onnx::pb::{self, AttributeProto, ModelProto, NodeProto, TensorProto};

fn node(op: &str, name: String, inputs: &[&str], outputs: &[&str]) -> NodeProto {
    NodeProto {
        op_type: op.into(),
        name,
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: outputs.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

fn int_attr(name: &str, v: i64) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: pb::attribute_proto::AttributeType::Int as i32,
        i: v,
        ..Default::default()
    }
}

fn scalar(name: String, v: f32) -> TensorProto {
    TensorProto {
        name,
        data_type: pb::tensor_proto::DataType::Float as i32,
        raw_data: v.to_le_bytes().to_vec(),
        ..Default::default()
    }
}

/// True when `rewrite` would change something.
pub fn needs_rewrite(model: &ModelProto) -> bool {
    model.graph.as_ref().is_some_and(|g| {
        g.node.iter().any(|n| {
            n.op_type == "DynamicQuantizeLinear"
                || (n.domain == "com.microsoft"
                    && matches!(
                        n.op_type.as_str(),
                        "QLinearAdd" | "QLinearMul" | "QLinearGlobalAveragePool"
                    ))
        })
    })
}

/// Expands the ops listed in the module doc in place; returns how many nodes it rewrote.
pub fn rewrite(model: &mut ModelProto) -> usize {
    let Some(g) = model.graph.as_mut() else {
        return 0;
    };
    let mut count = 0;
    let mut out = Vec::with_capacity(g.node.len());
    let mut inits = vec![];
    for (i, n) in std::mem::take(&mut g.node).into_iter().enumerate() {
        let p = |s: &str| format!("{}.kiln{i}.{s}", n.name);
        match (n.domain.as_str(), n.op_type.as_str()) {
            ("", "DynamicQuantizeLinear") if n.input.len() == 1 && n.output.len() == 3 => {
                // y_scale = (max(x,0) - min(x,0)) / 255; zp = clip(round(-min/scale), 0, 255);
                // y = clip(round(x / scale) + zp, 0, 255) as u8 — the ONNX definition.
                let x = n.input[0].as_str();
                let (y, ys, yz) = (&n.output[0], &n.output[1], &n.output[2]);
                let t: Vec<String> = [
                    "min", "max", "zero", "min0", "max0", "range", "k255", "raw", "tiny", "div",
                    "neg", "zpr", "lo", "zpf", "xs", "xr", "xz", "xc",
                ]
                .iter()
                .map(|s| p(s))
                .collect();
                inits.push(scalar(t[2].clone(), 0.0));
                inits.push(scalar(t[6].clone(), 255.0));
                inits.push(scalar(t[8].clone(), 1e-12));
                let mut rmin = node("ReduceMin", p("reduce_min"), &[x], &[&t[0]]);
                rmin.attribute.push(int_attr("keepdims", 0));
                let mut rmax = node("ReduceMax", p("reduce_max"), &[x], &[&t[1]]);
                rmax.attribute.push(int_attr("keepdims", 0));
                let mut cast_y = node("Cast", p("cast_y"), &[&t[17]], &[y]);
                cast_y.attribute.push(int_attr("to", 2));
                let mut cast_z = node("Cast", p("cast_zp"), &[&t[13]], &[yz]);
                cast_z.attribute.push(int_attr("to", 2));
                out.extend([
                    rmin,
                    rmax,
                    node("Min", p("min0"), &[&t[0], &t[2]], &[&t[3]]),
                    node("Max", p("max0"), &[&t[1], &t[2]], &[&t[4]]),
                    node("Sub", p("range"), &[&t[4], &t[3]], &[&t[5]]),
                    node("Div", p("scale_raw"), &[&t[5], &t[6]], &[&t[7]]),
                    node("Max", p("scale"), &[&t[7], &t[8]], &[ys]),
                    node("Div", p("min_over_scale"), &[&t[3], ys], &[&t[9]]),
                    node("Neg", p("neg"), &[&t[9]], &[&t[10]]),
                    node("Round", p("zp_round"), &[&t[10]], &[&t[11]]),
                    node("Clip", p("zp_clip"), &[&t[11], &t[2], &t[6]], &[&t[13]]),
                    node("Div", p("x_over_scale"), &[x, ys], &[&t[14]]),
                    node("Round", p("x_round"), &[&t[14]], &[&t[15]]),
                    node("Add", p("x_zp"), &[&t[15], &t[13]], &[&t[16]]),
                    node("Clip", p("x_clip"), &[&t[16], &t[2], &t[6]], &[&t[17]]),
                    cast_y,
                    cast_z,
                ]);
                count += 1;
            }
            ("com.microsoft", op @ ("QLinearAdd" | "QLinearMul")) if n.input.len() >= 7 => {
                let i = &n.input;
                let zp = |k: usize| i.get(k).map(|s| s.as_str()).unwrap_or("");
                let (a, b, c) = (p("a"), p("b"), p("c"));
                out.push(node(
                    "DequantizeLinear",
                    p("dq_a"),
                    &[&i[0], &i[1], zp(2)],
                    &[&a],
                ));
                out.push(node(
                    "DequantizeLinear",
                    p("dq_b"),
                    &[&i[3], &i[4], zp(5)],
                    &[&b],
                ));
                out.push(node(&op[7..], p("op"), &[&a, &b], &[&c]));
                out.push(node(
                    "QuantizeLinear",
                    p("q"),
                    &[&c, &i[6], zp(7)],
                    &[&n.output[0]],
                ));
                count += 1;
            }
            ("com.microsoft", "QLinearGlobalAveragePool")
                if n.input.len() >= 5
                    && !n
                        .attribute
                        .iter()
                        .any(|a| a.name == "channels_last" && a.i != 0) =>
            {
                let i = &n.input;
                let (a, c) = (p("a"), p("c"));
                out.push(node(
                    "DequantizeLinear",
                    p("dq"),
                    &[&i[0], &i[1], &i[2]],
                    &[&a],
                ));
                out.push(node("GlobalAveragePool", p("op"), &[&a], &[&c]));
                out.push(node(
                    "QuantizeLinear",
                    p("q"),
                    &[&c, &i[3], &i[4]],
                    &[&n.output[0]],
                ));
                count += 1;
            }
            _ => out.push(n),
        }
    }
    // A trailing empty name is an absent optional input (a missing zero point).
    for n in out.iter_mut() {
        while n.input.last().is_some_and(|s| s.is_empty()) {
            n.input.pop();
        }
    }
    g.node = out;
    g.initializer.extend(inits);
    count
}
