//! kiln's graph passes: ONNX → ONNX rewrites (BatchNorm folding, int8 quantization), f16
//! conversion of the tract graph, calibration, accuracy evaluation and the accuracy-budget
//! search that chooses which layers stay in higher precision.

pub mod calib;
pub mod fold;
pub mod onnx;
pub mod optimize;
pub mod quant;
