//! Developer tool: where the time goes in a kiln NNEF model, per op type and per node, after
//! kiln's passes and tract's optimizer (the graph the runner executes).
//!
//! `cargo run --release -p kiln-io --example profile -- MODEL.nnef.tar SAMPLE.npz [NAME]`
//! prints the pass statistics, the mean latency, the top ops and nodes (with tract's info on
//! each, e.g. the matmul kernel picked) and, with NAME, every node whose name contains it
//! with its output fact and inputs. `KILN_NO_PASSES=1` shows tract's own lowering.

use std::collections::HashMap;
use std::time::Instant;

use anyhow::{Context, Result};
use kiln_io::tract_core::prelude::*;

const ITERS: usize = 10;

fn main() -> Result<()> {
    kiln_io::configure_tract()?;
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [model, sample, rest @ ..] = &args[..] else {
        anyhow::bail!("usage: profile MODEL.nnef.tar SAMPLE.npz [NODE-NAME-PART]");
    };
    let typed = kiln_io::nnef::framework()
        .model_for_path(model)
        .with_context(|| model.clone())?;
    let mut probe = typed.clone();
    probe.declutter()?;
    println!("passes: {:?}", kiln_io::passes::run(&mut probe)?);

    let specs = kiln_io::exec::input_specs(&typed)?;
    let batch = kiln_io::Batch::bind(&specs, kiln_io::read_tensors(sample.as_ref())?, sample)?;
    let plan = kiln_io::exec::prepare(&typed, &batch.symbols)?;
    let graph = plan.model();
    if let Some(part) = rest.first() {
        for n in graph
            .nodes()
            .iter()
            .filter(|n| n.name.contains(part.as_str()))
        {
            let inputs: Vec<&str> = n
                .inputs
                .iter()
                .map(|i| graph.node(i.node).name.as_str())
                .collect();
            println!(
                "{:>4} {:<50} {:<20} {:?} <- {inputs:?}",
                n.id,
                n.name,
                n.op().name(),
                n.outputs[0].fact
            );
        }
    }

    let input = batch.sample(0)?;
    let mut state = plan.spawn()?;
    state.run(input.clone())?;
    let t = Instant::now();
    for _ in 0..ITERS {
        state.run(input.clone())?;
    }
    let ms = t.elapsed().as_secs_f64() * 1e3 / ITERS as f64;
    println!("{ms:.2} ms per inference");

    let mut per_node: HashMap<usize, f64> = HashMap::new();
    for _ in 0..ITERS {
        state.run_plan_with_eval(input.clone(), |ctx, op_state, node, inputs| {
            let t0 = Instant::now();
            let r = kiln_io::tract_core::plan::eval(ctx, op_state, node, inputs);
            *per_node.entry(node.id).or_default() +=
                t0.elapsed().as_secs_f64() * 1e3 / ITERS as f64;
            r
        })?;
    }
    let mut by_op: HashMap<String, (f64, usize)> = HashMap::new();
    for (id, ms) in &per_node {
        let e = by_op
            .entry(graph.node(*id).op().name().to_string())
            .or_default();
        e.0 += ms;
        e.1 += 1;
    }
    let mut ops: Vec<_> = by_op.into_iter().collect();
    ops.sort_by(|a, b| b.1 .0.total_cmp(&a.1 .0));
    for (op, (ms, n)) in ops.iter().take(15) {
        println!("  {op:<28} {n:>4} nodes {ms:>8.3} ms");
    }
    let mut nodes: Vec<_> = per_node.into_iter().collect();
    nodes.sort_by(|a, b| b.1.total_cmp(&a.1));
    println!("top nodes:");
    for (id, ms) in nodes.iter().take(15) {
        let n = graph.node(*id);
        let info = n.op().info()?.join("; ");
        println!("  {ms:>8.3} ms  {:<40} {} {info}", n.name, n.op().name());
    }
    Ok(())
}
