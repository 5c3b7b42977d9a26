//! Models on the host: load ONNX or kiln's NNEF, inspect them, run them with tract.

pub mod inspect;
pub mod load;
pub mod nnef;
pub mod prequant;
pub mod proto;
pub mod run;

pub use inspect::{inspect, Inspection};
pub use load::{load, LoadOptions, Model, ModelFormat};
pub use run::run_batch;
/// ONNX protobuf types (tract-onnx's prost bindings), for graph passes.
pub use tract_onnx::pb;
