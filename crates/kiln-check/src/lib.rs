//! CI regression gates (`kiln check`): what a measurement is (`kiln.measure/1`), how it is
//! taken (sizes by ELF section, runner latency interleaved with a reference model, accuracy
//! from reports), the committed baseline (`kiln.baseline/1`) with per-metric budgets, the
//! noise-aware comparison, and the output formats CI systems read.

pub mod baseline;
pub mod budget;
pub mod compare;
pub mod format;
pub mod measure;
pub mod stats;

pub use baseline::{Baseline, MeasureSpec};
pub use budget::{Budget, Budgets};
pub use compare::{compare, Comparison, Row, Status};
pub use measure::{Kind, Measurement, Metric};
