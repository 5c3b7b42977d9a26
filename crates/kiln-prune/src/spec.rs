//! What to prune and how: `magnitude:0.5` or `channels:0.3`, scope, norm, skip list.

use anyhow::{bail, Context, Result};
use serde::Serialize;

/// The pruning method and its amount (fraction in [0, 1)).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(tag = "kind", content = "amount", rename_all = "lowercase")]
pub enum Method {
    /// Unstructured: zero the smallest-magnitude weights (the model stays the same shape).
    Magnitude(f64),
    /// Structured: remove whole output channels / hidden units and shrink their consumers.
    Channels(f64),
}

impl Method {
    /// The fraction to prune.
    pub fn amount(&self) -> f64 {
        match self {
            Method::Magnitude(a) | Method::Channels(a) => *a,
        }
    }

    /// `magnitude` or `channels`.
    pub fn kind(&self) -> &'static str {
        match self {
            Method::Magnitude(_) => "magnitude",
            Method::Channels(_) => "channels",
        }
    }

    /// The same method with another amount.
    pub fn with_amount(&self, amount: f64) -> Method {
        match self {
            Method::Magnitude(_) => Method::Magnitude(amount),
            Method::Channels(_) => Method::Channels(amount),
        }
    }
}

/// Whether thresholds are chosen per layer or over all prunable layers at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// Every layer loses the same fraction.
    #[default]
    Layer,
    /// One threshold over all prunable layers (channel scores normalized per layer).
    Global,
}

/// How channels are ranked in structured pruning.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Norm {
    /// Sum of absolute values.
    #[default]
    L1,
    /// Euclidean norm.
    L2,
}

/// A complete pruning request.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PruneSpec {
    /// Method and amount.
    pub method: Method,
    /// Per-layer or global thresholds.
    pub scope: Scope,
    /// Channel ranking norm (structured pruning).
    pub norm: Norm,
    /// Node names never pruned; `None` means the default: the first and last prunable layers.
    pub skip: Option<Vec<String>>,
    /// When set, only these layers are pruned (sensitivity scans), skip list notwithstanding.
    pub only: Option<Vec<String>>,
    /// zstd level used to report the compressed size.
    pub zstd_level: i32,
}

/// zstd level of reported sizes by default: the one `kiln package` compresses with.
pub const DEFAULT_ZSTD_LEVEL: i32 = 19;

impl PruneSpec {
    /// A spec with defaults (layer scope, L1, default skip list).
    pub fn new(method: Method) -> PruneSpec {
        PruneSpec {
            method,
            scope: Scope::Layer,
            norm: Norm::L1,
            skip: None,
            only: None,
            zstd_level: DEFAULT_ZSTD_LEVEL,
        }
    }
}

/// Checks that a fraction lies in [0, 1).
pub fn check_amount(amount: f64) -> Result<f64> {
    if !(0.0..1.0).contains(&amount) {
        bail!("sparsity {amount} is outside [0, 1): give the fraction to remove, e.g. 0.5");
    }
    Ok(amount)
}

/// Parses `magnitude:0.5` / `channels:0.3` (the `--prune` syntax).
pub fn parse_method(s: &str) -> Result<Method> {
    let (kind, amount) = s
        .split_once(':')
        .with_context(|| format!("`{s}` is not METHOD:FRACTION (magnitude:0.5 or channels:0.3)"))?;
    let amount: f64 = amount
        .trim()
        .parse()
        .with_context(|| format!("`{amount}` in `{s}` is not a number"))?;
    let amount = check_amount(amount).with_context(|| format!("--prune {s}"))?;
    match kind.trim() {
        "magnitude" => Ok(Method::Magnitude(amount)),
        "channels" => Ok(Method::Channels(amount)),
        other => bail!("unknown pruning method `{other}` in `{s}`: use magnitude or channels"),
    }
}

/// Parses `layer` / `global`.
pub fn parse_scope(s: &str) -> Result<Scope> {
    match s {
        "layer" => Ok(Scope::Layer),
        "global" => Ok(Scope::Global),
        _ => bail!("unknown prune scope `{s}`: use layer or global"),
    }
}

/// Parses `l1` / `l2`.
pub fn parse_norm(s: &str) -> Result<Norm> {
    match s.to_ascii_lowercase().as_str() {
        "l1" => Ok(Norm::L1),
        "l2" => Ok(Norm::L2),
        _ => bail!("unknown norm `{s}`: use l1 or l2"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(input: &str, expected: Result<Method, &str>) {
        match (parse_method(input), expected) {
            (Ok(m), Ok(want)) => assert_eq!(m, want),
            (Err(e), Err(msg)) => assert!(format!("{e:#}").contains(msg), "{e:#} lacks {msg}"),
            (got, want) => panic!("{input}: got {got:?}, want {want:?}"),
        }
    }

    #[test]
    fn methods() {
        check("magnitude:0.5", Ok(Method::Magnitude(0.5)));
        check("channels:0", Ok(Method::Channels(0.0)));
        check("channels:1", Err("outside [0, 1)"));
        check("magnitude:-0.1", Err("outside [0, 1)"));
        check("magnitude", Err("not METHOD:FRACTION"));
        check("magnitude:x", Err("not a number"));
        check("random:0.5", Err("unknown pruning method `random`"));
    }
}
