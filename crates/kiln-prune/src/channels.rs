//! Structured pruning: remove whole output channels (Conv) or hidden units (Gemm/MatMul)
//! and shrink everything that reads them.
//!
//! Channels are followed through the graph as *groups*: the layers producing a channel
//! space (several when residual Adds join them), the per-channel tensors on the way
//! (biases, BatchNormalization parameters, depthwise convolutions, bias Adds) and the
//! layers reading it (the next Conv's input channels, a Gemm's/MatMul's input features).
//! A group is pruned as one, or skipped with a note when the channels reach a model
//! output, a Concat, or an op kiln does not know to be channel-preserving.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};

use anyhow::{bail, Context, Result};
use tract_onnx::pb::ModelProto;

use crate::graph::{attr_i, node_name, Index, Layer};
use crate::magnitude::count;
use crate::report::LayerReport;
use crate::spec::{Norm, Scope};
use crate::tensor::{read_f32, slice_norms, take_axis, write_f32};

/// Where the channel axis of a tensor is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Axis {
    /// Axis 1 of an N-C-spatial tensor (Conv outputs).
    NC,
    /// The last axis (MatMul outputs).
    Last,
    /// A rank-2 [N, C] tensor: axis 1 is also the last.
    Flat,
}

impl Axis {
    fn merge(self, other: Axis) -> Option<Axis> {
        match (self, other) {
            (a, b) if a == b => Some(a),
            (Axis::Flat, _) | (_, Axis::Flat) => Some(Axis::Flat),
            _ => None,
        }
    }
}

/// One channel space and everything to edit when it shrinks.
#[derive(Debug, Default)]
struct Group {
    /// Layers (indices into the layer list) producing the channels.
    sources: Vec<usize>,
    /// (initializer, axis) to slice with the kept channels.
    edits: Vec<(usize, usize)>,
    /// Depthwise Conv nodes whose `group` attribute becomes the kept count.
    depthwise: Vec<usize>,
    /// Why the group cannot be pruned.
    blocked: Option<String>,
}

/// Follows the channel space produced by layer `start`.
fn discover(ix: &Index, layers: &[Layer], start: usize) -> Group {
    let layer_of: HashMap<usize, usize> = layers
        .iter()
        .enumerate()
        .map(|(i, l)| (l.node, i))
        .collect();
    let mut g = Group::default();
    let mut axes: HashMap<String, Axis> = HashMap::new();
    let mut queue: VecDeque<(String, Axis)> = VecDeque::new();
    let mut handled: HashSet<(usize, bool)> = HashSet::new();
    let first = &ix.node(layers[start].node).output[0];
    queue.push_back((first.clone(), axis_of_source(&layers[start])));
    let block = |g: &mut Group, why: String| {
        if g.blocked.is_none() {
            g.blocked = Some(why);
        }
    };
    while let Some((t, a)) = queue.pop_front() {
        if g.blocked.is_some() {
            break;
        }
        let a = match axes.get(&t) {
            Some(prev) => match prev.merge(a) {
                Some(m) if m == *prev => continue,
                Some(m) => m,
                None => {
                    block(
                        &mut g,
                        format!("tensor `{t}` is reached with two channel layouts"),
                    );
                    continue;
                }
            },
            None => a,
        };
        axes.insert(t.clone(), a);
        if ix.inputs.contains(t.as_str()) {
            block(&mut g, format!("the channels come from model input `{t}`"));
            continue;
        }
        if ix.outputs.contains(t.as_str()) {
            block(&mut g, format!("the channels reach model output `{t}`"));
            continue;
        }
        let mut visits: Vec<(usize, Option<usize>)> = vec![];
        if let Some(&p) = ix.producer.get(t.as_str()) {
            visits.push((p, None));
        }
        for &(c, slot) in ix.consumers.get(t.as_str()).into_iter().flatten() {
            visits.push((c, Some(slot)));
        }
        for (n, slot) in visits {
            let node = ix.node(n);
            let name = node_name(node);
            let as_sink = slot.is_some();
            let layer = layer_of.get(&n).copied();
            let depthwise = layer.is_some_and(|l| is_depthwise(ix, &layers[l]));
            // Sources and sinks are handled once per role; everything else once.
            let key = (n, as_sink && layer.is_some() && !depthwise);
            if !handled.insert(key) {
                continue;
            }
            match (node.op_type.as_str(), layer, slot) {
                (_, Some(l), None) if !depthwise => {
                    if layers[l].group != 1 {
                        block(&mut g, format!("grouped Conv `{name}`"));
                        continue;
                    }
                    g.sources.push(l);
                    g.edits.push((layers[l].weight, layers[l].out_axis));
                    if let Some(b) = ix.init_input(n, 2) {
                        match bias_axis(&ix.graph.initializer[b].dims) {
                            Some(ax) => g.edits.push((b, ax)),
                            None => block(&mut g, format!("bias of `{name}` is not per-channel")),
                        }
                    }
                }
                (_, Some(l), Some(0)) if !depthwise => {
                    let ok = match layers[l].op.as_str() {
                        "Conv" => a == Axis::NC && layers[l].group == 1,
                        "Gemm" => attr_i(node, "transA", 0) == 0,
                        _ => a != Axis::NC,
                    };
                    if !ok {
                        block(
                            &mut g,
                            format!("`{name}` reads the channels along another axis"),
                        );
                        continue;
                    }
                    g.edits.push((layers[l].weight, layers[l].in_axis));
                }
                (_, Some(l), _) if depthwise => {
                    if a != Axis::NC {
                        block(&mut g, format!("depthwise `{name}` on a non-NC tensor"));
                        continue;
                    }
                    g.depthwise.push(n);
                    g.edits.push((layers[l].weight, 0));
                    if let Some(b) = ix.init_input(n, 2) {
                        g.edits.push((b, 0));
                    }
                    queue.push_back((node.input[0].clone(), a));
                    queue.push_back((node.output[0].clone(), a));
                }
                (
                    "Relu" | "Clip" | "LeakyRelu" | "Sigmoid" | "Tanh" | "HardSigmoid"
                    | "HardSwish" | "Elu" | "Selu" | "Softplus" | "Identity" | "Dropout" | "Neg"
                    | "Abs" | "Exp" | "Sqrt" | "Erf" | "MaxPool" | "AveragePool"
                    | "GlobalAveragePool" | "GlobalMaxPool",
                    _,
                    None | Some(0),
                ) => {
                    queue.push_back((node.input[0].clone(), a));
                    queue.push_back((node.output[0].clone(), a));
                }
                ("BatchNormalization", _, None | Some(0)) => {
                    if a == Axis::Last {
                        block(
                            &mut g,
                            format!("BatchNormalization `{name}` on the last axis"),
                        );
                        continue;
                    }
                    for slot in 1..=4 {
                        match ix.init_input(n, slot) {
                            Some(p) => g.edits.push((p, 0)),
                            None => {
                                block(
                                    &mut g,
                                    format!("BatchNormalization `{name}` has computed parameters"),
                                );
                            }
                        }
                    }
                    queue.push_back((node.input[0].clone(), a));
                    queue.push_back((node.output[0].clone(), a));
                }
                ("Flatten", _, None | Some(0)) => {
                    let pooled = ix.producer.get(node.input[0].as_str()).is_some_and(|&p| {
                        matches!(
                            ix.node(p).op_type.as_str(),
                            "GlobalAveragePool" | "GlobalMaxPool"
                        )
                    });
                    if !pooled || attr_i(node, "axis", 1) != 1 {
                        block(
                            &mut g,
                            format!("Flatten `{name}` mixes channels with spatial positions"),
                        );
                        continue;
                    }
                    queue.push_back((node.input[0].clone(), Axis::NC));
                    queue.push_back((node.output[0].clone(), Axis::Flat));
                }
                ("Add" | "Sub" | "Mul" | "Div" | "Max" | "Min", _, _) => {
                    for (s, input) in node.input.iter().enumerate() {
                        match ix.init.get(input.as_str()) {
                            Some(&p) => {
                                let dims = &ix.graph.initializer[p].dims;
                                if crate::tensor::numel(dims) == 1 {
                                    continue;
                                }
                                match (a, dims.last()) {
                                    (Axis::Last | Axis::Flat, Some(_))
                                        if dims[..dims.len() - 1].iter().all(|&d| d == 1) =>
                                    {
                                        g.edits.push((p, dims.len() - 1))
                                    }
                                    _ => block(
                                        &mut g,
                                        format!("constant input {s} of `{name}` has a layout kiln does not slice"),
                                    ),
                                }
                            }
                            None => queue.push_back((input.clone(), a)),
                        }
                    }
                    queue.push_back((node.output[0].clone(), a));
                }
                ("Concat", _, _) => {
                    block(&mut g, format!("the channels meet at Concat `{name}`"));
                }
                (op, _, _) => {
                    block(
                        &mut g,
                        format!("{op} `{name}` is not known to preserve channels"),
                    );
                }
            }
        }
    }
    g
}

fn axis_of_source(l: &Layer) -> Axis {
    match l.op.as_str() {
        "Conv" => Axis::NC,
        "Gemm" => Axis::Flat,
        _ => Axis::Last,
    }
}

fn is_depthwise(ix: &Index, l: &Layer) -> bool {
    let d = &ix.graph.initializer[l.weight].dims;
    l.op == "Conv" && l.group > 1 && d[1] == 1 && d[0] == l.group
}

/// Axis of a bias along the output channels: [C] or [1, C].
fn bias_axis(dims: &[i64]) -> Option<usize> {
    match dims {
        [_] => Some(0),
        [1, _] => Some(1),
        _ => None,
    }
}

/// Removes `amount` of the channels of every prunable group; returns per-layer reports and notes.
pub fn prune(
    model: &mut ModelProto,
    layers: &[Layer],
    skip_reason: &dyn Fn(&Layer) -> Option<String>,
    amount: f64,
    scope: Scope,
    norm: Norm,
) -> Result<(Vec<LayerReport>, Vec<String>)> {
    let graph = model
        .graph
        .as_ref()
        .context("the ONNX model holds no graph")?;
    let ix = Index::new(graph);
    let mut notes = vec![];
    let mut groups: Vec<Group> = vec![];
    let mut group_of_layer: HashMap<usize, usize> = HashMap::new();
    for (i, l) in layers.iter().enumerate() {
        if group_of_layer.contains_key(&i) || l.group != 1 {
            continue;
        }
        let mut g = discover(&ix, layers, i);
        g.sources.sort();
        g.sources.dedup();
        if g.sources.is_empty() {
            g.sources.push(i);
        }
        let names: Vec<&str> = g.sources.iter().map(|&s| layers[s].name.as_str()).collect();
        if g.blocked.is_none() {
            g.blocked = g.sources.iter().find_map(|&s| skip_reason(&layers[s]));
            if g.blocked.is_none() {
                g.blocked = check_group(&ix, layers, &g);
                if let Some(why) = &g.blocked {
                    notes.push(format!(
                        "channels of {} not pruned: {why}",
                        names.join(" + ")
                    ));
                }
            }
        } else if let Some(why) = &g.blocked {
            notes.push(format!(
                "channels of {} not pruned: {why}",
                names.join(" + ")
            ));
        }
        for &s in &g.sources {
            group_of_layer.insert(s, groups.len());
        }
        for &d in &g.depthwise {
            if let Some(l) = layers.iter().position(|l| l.node == d) {
                group_of_layer.insert(l, groups.len());
            }
        }
        groups.push(g);
    }

    // Channel scores of each prunable group: the norms of the sources' output slices.
    let l2 = norm == Norm::L2;
    let mut scores: Vec<Option<Vec<f64>>> = vec![];
    for g in &groups {
        if g.blocked.is_some() {
            scores.push(None);
            continue;
        }
        let mut acc: Vec<f64> = vec![];
        for &s in &g.sources {
            let l = &layers[s];
            let t = &graph.initializer[l.weight];
            let n = slice_norms(&read_f32(t)?, &t.dims, l.out_axis, l2);
            if acc.is_empty() {
                acc = n;
            } else {
                acc.iter_mut().zip(n).for_each(|(a, b)| *a += b);
            }
        }
        scores.push(Some(acc));
    }
    let keeps = choose(&groups, layers, &scores, amount, scope, &mut notes)?;

    // Apply: every (initializer, axis) slice, then the depthwise group attributes.
    let mut edits: BTreeMap<usize, Vec<(usize, &[usize])>> = BTreeMap::new();
    for (g, keep) in groups.iter().zip(&keeps) {
        if let Some(keep) = keep {
            for &(init, axis) in &g.edits {
                let e = edits.entry(init).or_default();
                if !e.iter().any(|(a, _)| *a == axis) {
                    e.push((axis, keep));
                }
            }
        }
    }
    let graph = model
        .graph
        .as_mut()
        .context("the ONNX model holds no graph")?;
    for (init, slices) in edits {
        let t = &mut graph.initializer[init];
        let mut values = read_f32(t)?;
        let mut dims = t.dims.clone();
        for (axis, keep) in slices {
            (values, dims) = take_axis(&values, &dims, axis, keep);
        }
        write_f32(t, dims, &values);
    }
    for (g, keep) in groups.iter().zip(&keeps) {
        if let Some(keep) = keep {
            for &n in &g.depthwise {
                if let Some(a) = graph.node[n]
                    .attribute
                    .iter_mut()
                    .find(|a| a.name == "group")
                {
                    a.i = keep.len() as i64;
                }
            }
        }
    }
    if keeps.iter().any(|k| k.is_some()) {
        // Recorded intermediate shapes are stale now; tract infers them again.
        graph.value_info.clear();
    }

    let reports = layers
        .iter()
        .enumerate()
        .map(|(i, l)| {
            let t = &graph.initializer[l.weight];
            let v = read_f32(t)?;
            let zeros = v.iter().filter(|x| **x == 0.0).count();
            let gi = group_of_layer.get(&i).copied();
            let before = gi
                .and_then(|g| scores[g].as_ref().map(|s| s.len()))
                .unwrap_or(t.dims[l.out_axis] as usize);
            let kept = t.dims[l.out_axis] as usize;
            let skipped = match gi {
                Some(g) => groups[g].blocked.clone(),
                None => Some("reads the channels of another layer only".into()),
            };
            Ok(LayerReport {
                name: l.name.clone(),
                op: l.op.clone(),
                params: v.len() as u64,
                sparsity: zeros as f64 / v.len().max(1) as f64,
                channels: Some(before),
                channels_kept: Some(kept),
                channels_removed: Some(before - kept),
                norm: Some(format!("{norm:?}").to_lowercase()),
                skipped,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((reports, notes))
}

/// Checks a group's edits: one channel count, unshared per-channel tensors.
fn check_group(ix: &Index, layers: &[Layer], g: &Group) -> Option<String> {
    let c = {
        let l = &layers[g.sources[0]];
        ix.graph.initializer[l.weight].dims[l.out_axis]
    };
    for &(init, axis) in &g.edits {
        let t = &ix.graph.initializer[init];
        if t.dims.get(axis) != Some(&c) {
            return Some(format!(
                "`{}` has shape {:?}, not {c} along axis {axis}",
                t.name, t.dims
            ));
        }
        if ix.uses(&t.name) > 1 {
            return Some(format!(
                "initializer `{}` is shared by several nodes",
                t.name
            ));
        }
    }
    None
}

/// The kept channel indices (ascending) of each group, `None` for groups left alone.
fn choose(
    groups: &[Group],
    layers: &[Layer],
    scores: &[Option<Vec<f64>>],
    amount: f64,
    scope: Scope,
    notes: &mut Vec<String>,
) -> Result<Vec<Option<Vec<usize>>>> {
    let name = |g: &Group| {
        g.sources
            .iter()
            .map(|&s| layers[s].name.as_str())
            .collect::<Vec<_>>()
            .join(" + ")
    };
    let top = |s: &[f64], remove: usize| -> Vec<usize> {
        let mut order: Vec<usize> = (0..s.len()).collect();
        // Highest score first; ties keep the lower index.
        order.sort_by(|&a, &b| s[b].total_cmp(&s[a]).then(a.cmp(&b)));
        let mut keep = order[..s.len() - remove].to_vec();
        keep.sort();
        keep
    };
    let mut out = vec![];
    match scope {
        Scope::Layer => {
            for (g, s) in groups.iter().zip(scores) {
                let Some(s) = s else {
                    out.push(None);
                    continue;
                };
                let remove = count(s.len(), amount);
                if remove >= s.len() {
                    bail!(
                        "pruning {:.0}% of the {} channel(s) of `{}` would remove every channel; \
                         lower the fraction or exclude the layer with --prune-skip",
                        amount * 100.0,
                        s.len(),
                        name(g)
                    );
                }
                out.push((remove > 0).then(|| top(s, remove)));
            }
        }
        Scope::Global => {
            // Scores relative to each group's mean, so wide and narrow layers compare.
            let mut all: Vec<(f64, usize, usize)> = vec![];
            for (gi, s) in scores.iter().enumerate() {
                if let Some(s) = s {
                    let mean = s.iter().sum::<f64>() / s.len().max(1) as f64;
                    let mean = if mean > 0.0 { mean } else { 1.0 };
                    all.extend(s.iter().enumerate().map(|(c, v)| (v / mean, gi, c)));
                }
            }
            all.sort_by(|a, b| a.0.total_cmp(&b.0).then((a.1, a.2).cmp(&(b.1, b.2))));
            let mut removed: Vec<HashSet<usize>> = vec![HashSet::new(); groups.len()];
            for &(_, gi, c) in all.iter().take(count(all.len(), amount)) {
                removed[gi].insert(c);
            }
            for (gi, s) in scores.iter().enumerate() {
                let Some(s) = s else {
                    out.push(None);
                    continue;
                };
                let r = &mut removed[gi];
                if r.len() >= s.len() {
                    let best = top(s, s.len() - 1)[0];
                    r.remove(&best);
                    notes.push(format!(
                        "global threshold would remove every channel of {}; kept its strongest one",
                        name(&groups[gi])
                    ));
                }
                let keep: Vec<usize> = (0..s.len()).filter(|c| !r.contains(c)).collect();
                out.push((keep.len() < s.len()).then_some(keep));
            }
        }
    }
    Ok(out)
}
