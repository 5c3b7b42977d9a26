//! The NNEF dialect kiln writes and the runner reads: tract-core's registry plus kiln's own
//! small registry for tract-core ops that tract-nnef 0.23 cannot serialize.
//!
//! Both sides build their framework here, so whatever the host writes, the runner loads.

use std::any::TypeId;
use std::sync::Arc;

use tract_core::ops::element_wise::ElementWiseOp;
use tract_core::ops::nn::GeluExact;
use tract_core::ops::quant::{
    lookup_table, quantize_linear_i8, quantize_linear_u8, DequantizeLinearF32, LookupTable,
    QuantizeLinearI8, QuantizeLinearU8,
};
use tract_nnef::internal::*;
use tract_nnef::ser::{invocation, numeric};

/// Name of kiln's NNEF extension registry (appears in `graph.nnef`).
pub const REGISTRY: &str = "kiln";

/// kiln's registry: tract-core ops that tract-nnef 0.23 has no serializer for.
///
/// - `kiln_gelu_exact`: erf GELU, which tract-onnx fuses from `x*0.5*(1+erf(x/sqrt2))`;
/// - `kiln_quantize_linear_u8` / `_i8` and `kiln_dequantize_linear`: the f32 ⇄ int8 edges
///   of a quantized graph (tract-core's `QuantizeLinearU8/I8`, `DequantizeLinearF32`), so
///   kiln's int8 models keep their integer kernels on the device;
/// - `kiln_lookup_table`: the 256-entry u8 table tract folds `dequantize → unary op →
///   quantize` chains into.
pub fn registry() -> Registry {
    let mut r =
        Registry::new(REGISTRY).with_doc("kiln extensions: tract-core ops missing from tract-nnef");
    r.register_unit_element_wise("kiln_gelu_exact", &GeluExact {});
    let q_params = || {
        vec![
            TypeName::Scalar.tensor().named("input"),
            TypeName::Scalar.named("scale"),
            TypeName::Integer.named("zero_point"),
        ]
    };
    r.register_element_wise(
        "kiln_quantize_linear_u8",
        TypeId::of::<QuantizeLinearU8>(),
        Box::new(dump_quantize),
        q_params(),
        load_quantize_u8,
    );
    r.register_element_wise(
        "kiln_quantize_linear_i8",
        TypeId::of::<QuantizeLinearI8>(),
        Box::new(dump_quantize),
        q_params(),
        load_quantize_i8,
    );
    r.register_element_wise(
        "kiln_lookup_table",
        TypeId::of::<LookupTable>(),
        Box::new(dump_lookup_table),
        vec![
            TypeName::Scalar.tensor().named("input"),
            TypeName::Integer.tensor().named("table"),
        ],
        load_lookup_table,
    );
    r.register_dumper(dump_dequantize);
    r.register_primitive(
        "kiln_dequantize_linear",
        &q_params(),
        &[("output", TypeName::Scalar.tensor())],
        load_dequantize,
    );
    r
}

/// `QuantizeLinearU8/I8` store the reciprocal of the ONNX scale (`y = x * scale + zp`);
/// the NNEF form keeps that multiplier as is.
fn dump_quantize(ast: &mut IntoAst, node: &TypedNode) -> TractResult<Option<Arc<RValue>>> {
    let op = &node
        .op_as::<ElementWiseOp>()
        .context("quantize: not an element-wise op")?
        .0;
    let (id, scale, zp) = if let Some(q) = op.downcast_ref::<QuantizeLinearU8>() {
        ("kiln_quantize_linear_u8", q.scale, q.zero_point as i64)
    } else if let Some(q) = op.downcast_ref::<QuantizeLinearI8>() {
        ("kiln_quantize_linear_i8", q.scale, q.zero_point as i64)
    } else {
        return Ok(None);
    };
    let input = ast.mapping[&node.inputs[0]].clone();
    Ok(Some(invocation(
        id,
        &[input],
        &[("scale", numeric(scale)), ("zero_point", numeric(zp))],
    )))
}

fn load_quantize_u8(builder: &mut ModelBuilder, inv: &ResolvedInvocation) -> TractResult<Value> {
    let input = inv.named_arg_as(builder, "input")?;
    let scale: f32 = inv.named_arg_as(builder, "scale")?;
    let zp: i64 = inv.named_arg_as(builder, "zero_point")?;
    let zp = u8::try_from(zp).map_err(|_| format_err!("u8 zero point out of range: {zp}"))?;
    builder.wire(quantize_linear_u8(scale, zp), &[input])
}

fn load_quantize_i8(builder: &mut ModelBuilder, inv: &ResolvedInvocation) -> TractResult<Value> {
    let input = inv.named_arg_as(builder, "input")?;
    let scale: f32 = inv.named_arg_as(builder, "scale")?;
    let zp: i64 = inv.named_arg_as(builder, "zero_point")?;
    let zp = i8::try_from(zp).map_err(|_| format_err!("i8 zero point out of range: {zp}"))?;
    builder.wire(quantize_linear_i8(scale, zp), &[input])
}

fn dump_lookup_table(ast: &mut IntoAst, node: &TypedNode) -> TractResult<Option<Arc<RValue>>> {
    let op = &node
        .op_as::<ElementWiseOp>()
        .context("lookup table: not an element-wise op")?
        .0;
    let Some(lut) = op.downcast_ref::<LookupTable>() else {
        return Ok(None);
    };
    let table = Arc::new(tract_core::internal::tensor1(lut.table.table()));
    let table = ast.konst(format!("{}_table", node.name), &table)?;
    let input = ast.mapping[&node.inputs[0]].clone();
    Ok(Some(invocation("kiln_lookup_table", &[input, table], &[])))
}

fn load_lookup_table(builder: &mut ModelBuilder, inv: &ResolvedInvocation) -> TractResult<Value> {
    let input = inv.named_arg_as(builder, "input")?;
    let table: Arc<Tensor> = inv.named_arg_as(builder, "table")?;
    let table = table.cast_to::<u8>()?;
    let table = table.try_as_plain_ram()?.as_slice::<u8>()?.to_vec();
    ensure!(
        table.len() == 256,
        "kiln_lookup_table: table has {} entries, expected 256",
        table.len()
    );
    builder.wire(
        lookup_table(tract_core::tract_linalg::routines::lut_u8(&table)?),
        &[input],
    )
}

fn dump_dequantize(
    ast: &mut IntoAst,
    node: &TypedNode,
    op: &DequantizeLinearF32,
) -> TractResult<Option<Arc<RValue>>> {
    let input = ast.mapping[&node.inputs[0]].clone();
    Ok(Some(invocation(
        "kiln_dequantize_linear",
        &[input],
        &[
            ("scale", numeric(op.scale)),
            ("zero_point", numeric(op.zero_point as i64)),
        ],
    )))
}

fn load_dequantize(builder: &mut ModelBuilder, inv: &ResolvedInvocation) -> TractResult<Value> {
    let input = inv.named_arg_as(builder, "input")?;
    let scale: f32 = inv.named_arg_as(builder, "scale")?;
    let zp: i64 = inv.named_arg_as(builder, "zero_point")?;
    let zero_point = i32::try_from(zp).map_err(|_| format_err!("zero point out of range: {zp}"))?;
    builder.wire(DequantizeLinearF32 { scale, zero_point }, &[input])
}

/// The NNEF framework both the host writer and the runner reader use.
pub fn framework() -> Nnef {
    tract_nnef::nnef().with_registry(registry())
}
