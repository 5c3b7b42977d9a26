//! Folds `BatchNormalization` into the `Conv` before it, so quantization sees the weights
//! the model really applies (and the int8 kernel absorbs the affine map).

use anyhow::Result;
use tract_onnx::pb::ModelProto;

use crate::onnx::{self, Names};
use kiln_graph::proto;

/// Folds every `Conv → BatchNormalization` pair whose conv output feeds only the BN and whose
/// weights and BN parameters are initializers; returns the names of the folded BN nodes.
pub fn fold_batch_norms(model: &mut ModelProto) -> Result<Vec<String>> {
    let g = onnx::graph_mut(model)?;
    let mut names = Names::of(g);
    let mut folded = vec![];
    let mut remove = vec![];
    loop {
        let consumers = onnx::consumers(g);
        let inits = onnx::initializers(g);
        let mut plan = None;
        for (bi, bn) in g.node.iter().enumerate() {
            if bn.op_type != "BatchNormalization" || !bn.domain.is_empty() || remove.contains(&bi) {
                continue;
            }
            if bn.input.len() < 5 || bn.output.len() != 1 {
                continue;
            }
            let Some(ci) = g
                .node
                .iter()
                .position(|n| n.output.first() == Some(&bn.input[0]))
            else {
                continue;
            };
            let conv = &g.node[ci];
            if conv.op_type != "Conv" || consumers.get(&bn.input[0]).map(|c| c.len()) != Some(1) {
                continue;
            }
            let Some(w) = conv.input.get(1).and_then(|n| inits.get(n.as_str())) else {
                continue;
            };
            let params: Option<Vec<_>> = bn.input[1..5]
                .iter()
                .map(|n| inits.get(n.as_str()))
                .collect();
            let Some(params) = params else { continue };
            let w = proto::read_f32(w)?;
            let p: Vec<Vec<f32>> = params
                .iter()
                .map(|t| proto::read_f32(t).map(|t| t.data))
                .collect::<Result<_>>()?;
            let out_ch = w.shape.first().copied().unwrap_or(0);
            if out_ch == 0 || p.iter().any(|v| v.len() != out_ch) {
                continue;
            }
            let bias = match conv.input.get(2).filter(|s| !s.is_empty()) {
                Some(b) => match inits.get(b.as_str()) {
                    Some(t) => proto::read_f32(t)?.data,
                    None => continue,
                },
                None => vec![0.0; out_ch],
            };
            let eps = onnx::get_float(bn, "epsilon").unwrap_or(1e-5);
            let per = w.len() / out_ch;
            let mut wf = w.data.clone();
            let mut bf = vec![0f32; out_ch];
            for o in 0..out_ch {
                let s = p[0][o] / (p[3][o] + eps).sqrt();
                wf[o * per..(o + 1) * per].iter_mut().for_each(|v| *v *= s);
                bf[o] = (bias[o] - p[2][o]) * s + p[1][o];
            }
            plan = Some((bi, ci, w.shape, wf, bf));
            break;
        }
        let Some((bi, ci, shape, wf, bf)) = plan else {
            break;
        };
        let wname = names.fresh(&format!("{}.folded_weight", g.node[ci].name));
        let bname = names.fresh(&format!("{}.folded_bias", g.node[ci].name));
        g.initializer.push(onnx::f32_tensor(&wname, &shape, &wf));
        g.initializer
            .push(onnx::f32_tensor(&bname, &[shape[0]], &bf));
        let out = g.node[bi].output[0].clone();
        folded.push(g.node[bi].name.clone());
        let conv = &mut g.node[ci];
        conv.input.truncate(1);
        conv.input.push(wname);
        conv.input.push(bname);
        conv.output[0] = out;
        remove.push(bi);
    }
    let mut i = 0;
    g.node.retain(|_| {
        i += 1;
        !remove.contains(&(i - 1))
    });
    onnx::drop_unused_initializers(g);
    Ok(folded)
}
