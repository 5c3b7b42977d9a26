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
use tract_nnef::ser::{invocation, numeric, string};

/// Name of kiln's NNEF extension registry (appears in `graph.nnef`).
pub const REGISTRY: &str = "kiln";

/// kiln's registry: tract-core ops that tract-nnef 0.23 has no serializer for.
///
/// - `kiln_gelu_exact`: erf GELU, which tract-onnx fuses from `x*0.5*(1+erf(x/sqrt2))`;
/// - `kiln_quantize_linear_u8` / `_i8` and `kiln_dequantize_linear`: the f32 ⇄ int8 edges
///   of a quantized graph (tract-core's `QuantizeLinearU8/I8`, `DequantizeLinearF32`), so
///   kiln's int8 models keep their integer kernels on the device;
/// - `kiln_lookup_table`: the 256-entry u8 table tract folds `dequantize → unary op →
///   quantize` chains into;
/// - `kiln_widen`: a constant stored in a narrower exact type (`narrow_constants`), read
///   back as the wide constant.
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
    r.register_dumper(dump_widen);
    r.register_primitive(
        "kiln_widen",
        &[
            TypeName::Scalar.tensor().named("input"),
            TypeName::String.named("to"),
        ],
        &[("output", TypeName::Scalar.tensor())],
        load_widen,
    );
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

/// Constants with fewer elements than this stay as they are: the cast line the narrowing
/// adds to the graph text costs about as much as it saves on a small tensor.
const NARROW_MIN_ELEMENTS: usize = 64;

/// The narrowest type that holds every value of `t` exactly, when it is narrower than
/// `t`'s own: i32 → i8 or i16 when the values fit; f32 → f16 when each value survives the
/// round trip bit for bit (kiln's quantizer picks f16-exact weight scales for this).
fn narrowed(t: &Tensor) -> Option<Tensor> {
    if t.len() < NARROW_MIN_ELEMENTS {
        return None;
    }
    match t.datum_type() {
        DatumType::I32 => {
            let v = t.try_as_plain_ram().ok()?.as_slice::<i32>().ok()?;
            let (lo, hi) = v
                .iter()
                .fold((i32::MAX, i32::MIN), |(lo, hi), &x| (lo.min(x), hi.max(x)));
            let dt = if lo >= i8::MIN as i32 && hi <= i8::MAX as i32 {
                DatumType::I8
            } else if lo >= i16::MIN as i32 && hi <= i16::MAX as i32 {
                DatumType::I16
            } else {
                return None;
            };
            t.cast_to_dt(dt).ok().map(|c| c.into_owned())
        }
        DatumType::F32 => {
            let v = t.try_as_plain_ram().ok()?.as_slice::<f32>().ok()?;
            let exact = v
                .iter()
                .all(|&x| f16::from_f32(x).to_f32().to_bits() == x.to_bits());
            if !exact {
                return None;
            }
            t.cast_to_dt(DatumType::F16).ok().map(|c| c.into_owned())
        }
        _ => None,
    }
}

/// Stores each constant in the narrowest type that holds its values exactly, behind a
/// `KilnWiden` back to the original type, so the file shrinks and the computation does not
/// change: reading `kiln_widen` gives back the original constant, bit for bit. Quantized
/// models gain most: int32 biases that fit 16 bits and f16-exact per-channel scales.
/// The model is borrowed, not copied, when no constant narrows.
pub fn narrow_constants(model: &TypedModel) -> TractResult<std::borrow::Cow<'_, TypedModel>> {
    let mut patch = TypedModelPatch::default();
    let mut changed = false;
    for node in &model.nodes {
        let Some(konst) = node.op_as::<tract_core::ops::konst::Const>() else {
            continue;
        };
        if konst.exotic_fact().is_some() {
            continue;
        }
        let wide = konst.val();
        let Some(narrow) = narrowed(wide) else {
            continue;
        };
        let suffix = format!("{:?}", narrow.datum_type()).to_lowercase();
        let k = patch.add_const(format!("{}.{suffix}", node.name), narrow)?;
        // The cast keeps the original node's name, so the model reads back with the same
        // constant names; the narrow constant is stored as `NAME.i16.dat` (or `.i8`, `.f16`).
        let widened = patch.wire_node(
            node.name.clone(),
            KilnWiden {
                to: wide.datum_type(),
            },
            &[k],
        )?[0];
        patch.shunt_outside(model, OutletId::new(node.id, 0), widened)?;
        changed = true;
    }
    if !changed {
        return Ok(std::borrow::Cow::Borrowed(model));
    }
    let mut model = model.clone();
    patch.apply(&mut model)?;
    Ok(std::borrow::Cow::Owned(model.into_compact()?))
}

/// A constant stored narrower than it is used (see `narrow_constants`): casts it back to
/// `to`. It only exists between `narrow_constants` and the NNEF writer; reading
/// `kiln_widen` makes the wide constant again, so no model ever runs it. Not folded by
/// tract's constant propagation, which runs inside the writer and would undo the narrowing.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct KilnWiden {
    /// The type the constant is used as.
    pub to: DatumType,
}

impl Op for KilnWiden {
    fn name(&self) -> StaticName {
        "KilnWiden".into()
    }

    op_as_typed_op!();
}

impl EvalOp for KilnWiden {
    not_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        Ok(tvec!(inputs[0]
            .cast_to_dt(self.to)?
            .into_owned()
            .into_tvalue()))
    }
}

impl TypedOp for KilnWiden {
    as_op!();

    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec!(self.to.fact(inputs[0].shape.clone())))
    }
}

fn dump_widen(
    ast: &mut IntoAst,
    node: &TypedNode,
    op: &KilnWiden,
) -> TractResult<Option<Arc<RValue>>> {
    let input = ast.mapping[&node.inputs[0]].clone();
    Ok(Some(invocation(
        "kiln_widen",
        &[input],
        &[("to", string(format!("{:?}", op.to).to_lowercase()))],
    )))
}

fn load_widen(builder: &mut ModelBuilder, inv: &ResolvedInvocation) -> TractResult<Value> {
    let narrow: Arc<Tensor> = inv.named_arg_as(builder, "input")?;
    let to: String = inv.named_arg_as(builder, "to")?;
    let to: DatumType = to
        .parse()
        .map_err(|_| format_err!("kiln_widen: unknown type {to:?}"))?;
    let wide = narrow
        .cast_to_dt(to)
        .with_context(|| format!("kiln_widen: casting {:?} to {to:?}", narrow.datum_type()))?
        .into_owned();
    Ok(Value::Wire(builder.add_const(wide)?))
}

/// The NNEF framework both the host writer and the runner reader use.
pub fn framework() -> Nnef {
    tract_nnef::nnef().with_registry(registry())
}
