//! The NNEF dialect kiln writes and the runner reads: tract-core's registry plus kiln's own
//! small registry for tract-core ops that tract-nnef 0.23 cannot serialize.
//!
//! Both sides build their framework here, so whatever the host writes, the runner loads.

use tract_core::ops::nn::GeluExact;
use tract_nnef::internal::{Nnef, Registry};

/// Name of kiln's NNEF extension registry (appears in `graph.nnef`).
pub const REGISTRY: &str = "kiln";

/// kiln's registry: `kiln_gelu_exact` (tract-core's erf GELU, which tract-onnx fuses from
/// `x*0.5*(1+erf(x/sqrt2))` but tract-nnef has no serializer for).
pub fn registry() -> Registry {
    let mut r =
        Registry::new(REGISTRY).with_doc("kiln extensions: tract-core ops missing from tract-nnef");
    r.register_unit_element_wise("kiln_gelu_exact", &GeluExact {});
    r
}

/// The NNEF framework both the host writer and the runner reader use.
pub fn framework() -> Nnef {
    tract_nnef::nnef().with_registry(registry())
}
