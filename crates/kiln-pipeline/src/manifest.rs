//! `kiln.toml`: parsing (serde + toml, unknown keys refused) and validation. Every error
//! names the file, the line and column, and the key (`model.optimize.quantize`); paths in
//! the manifest are relative to its folder. docs/kiln-toml.md documents every key.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use kiln_opt::calib::Method;
use kiln_opt::optimize::Precision;
use serde::Deserialize;
use toml::Spanned;

/// The manifest file name `kiln build` looks for by default.
pub const FILE_NAME: &str = "kiln.toml";

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    version: Spanned<u64>,
    targets: Spanned<Vec<Spanned<String>>>,
    #[serde(default)]
    devices: Vec<Spanned<String>>,
    #[serde(default)]
    with_runner: bool,
    #[serde(default)]
    sign: Option<RawSign>,
    #[serde(default)]
    check: Option<RawCheck>,
    model: Spanned<Vec<RawModel>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModel {
    #[serde(default)]
    name: Option<Spanned<String>>,
    path: Spanned<String>,
    #[serde(default)]
    input_shapes: Vec<Spanned<String>>,
    #[serde(default)]
    calib: Option<Spanned<String>>,
    #[serde(default)]
    eval: Option<Spanned<String>>,
    #[serde(default)]
    golden: Option<Spanned<String>>,
    #[serde(default)]
    optimize: Option<RawOptimize>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawOptimize {
    #[serde(default)]
    quantize: Option<Spanned<String>>,
    #[serde(default)]
    calibration: Option<Spanned<String>>,
    #[serde(default)]
    max_accuracy_drop: Option<Spanned<f64>>,
    #[serde(default)]
    keep_f32: Vec<String>,
    #[serde(default)]
    int8_everywhere: bool,
    #[serde(default)]
    prune: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSign {
    key: Spanned<RawKey>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKey {
    #[serde(default)]
    path: Option<Spanned<String>>,
    #[serde(default)]
    env: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCheck {
    #[serde(default)]
    baseline: Option<Spanned<String>>,
    #[serde(default)]
    noise_sigmas: Option<Spanned<f64>>,
    #[serde(default)]
    budgets: BTreeMap<String, Spanned<String>>,
}

/// A validated `kiln.toml`: paths resolved against its folder, settings parsed.
#[derive(Debug, Clone)]
pub struct Manifest {
    /// The manifest file as given.
    pub path: PathBuf,
    /// Its folder (paths in it are relative to this).
    pub dir: PathBuf,
    /// Artifact version (monotonic: devices refuse one not newer than the installed one).
    pub version: u64,
    /// Targets to compile and package for, in order.
    pub targets: Vec<String>,
    /// Devices to benchmark on (validated device strings).
    pub devices: Vec<String>,
    /// Ship the runner inside each artifact.
    pub with_runner: bool,
    /// Models, in order.
    pub models: Vec<ModelSpec>,
    /// Where the signing key comes from; no packaging without it.
    pub sign: Option<KeySource>,
    /// CI budgets for `kiln check`.
    pub check: Option<CheckSpec>,
    text: String,
}

/// One `[[model]]`.
#[derive(Debug, Clone)]
pub struct ModelSpec {
    /// Name: output file names and artifact name.
    pub name: String,
    /// The ONNX (or NNEF) file, resolved.
    pub path: PathBuf,
    /// `NAME=DIMS` input shapes (symbolic dims fixed).
    pub input_shapes: Vec<String>,
    /// Calibration dataset (int8-static).
    pub calib: Option<PathBuf>,
    /// Evaluation dataset (accuracy and the budget).
    pub eval: Option<PathBuf>,
    /// Self-test inputs for the artifact (default: deterministic synthetic inputs).
    pub golden: Option<PathBuf>,
    /// Optimization settings.
    pub optimize: OptimizeSpec,
}

/// `[model.optimize]`.
#[derive(Debug, Clone, Default)]
pub struct OptimizeSpec {
    /// `None` converts the model to the runner form unchanged.
    pub quantize: Option<Precision>,
    /// Calibration method as written (`minmax`, `percentile:99.9`, `entropy`).
    pub calibration: String,
    /// Largest accepted accuracy drop in points.
    pub max_accuracy_drop: Option<f64>,
    /// Layers kept in f32.
    pub keep_f32: Vec<String>,
    /// Quantize depthwise convolutions too.
    pub int8_everywhere: bool,
    /// Pruning before quantization (`magnitude:F` or `channels:F`; first and last layers
    /// skipped), as `kiln optimize --prune`.
    pub prune: Option<String>,
}

/// Where the private signing key comes from (never the key itself in the manifest).
#[derive(Debug, Clone, PartialEq)]
pub enum KeySource {
    /// A PKCS#8 PEM file, resolved against the manifest's folder.
    Path(PathBuf),
    /// An environment variable holding the key's path or its PEM text.
    Env(String),
}

/// `[check]`: the budgets `kiln check` holds the build to.
#[derive(Debug, Clone)]
pub struct CheckSpec {
    /// The committed baseline (kiln.baseline/1), resolved.
    pub baseline: Option<PathBuf>,
    /// Noise band width in standard deviations.
    pub noise_sigmas: Option<f64>,
    /// Budgets by key (kiln-check's keys: `size`, `latency`, `accuracy`, `net/latency_p50`...).
    pub budgets: BTreeMap<String, String>,
}

/// (line, column), both from 1, of byte `offset` in `text`.
pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let col = before.rfind('\n').map_or(offset, |nl| offset - nl - 1) + 1;
    (line, col)
}

/// The dotted key at byte `offset`: the enclosing `[table]` / `[[array]]` header joined with
/// the key of the `key = value` line holding (or opening) the offset.
pub fn key_at(text: &str, offset: usize) -> String {
    let offset = offset.min(text.len());
    let end = text[offset..].find('\n').map_or(text.len(), |i| offset + i);
    let lines: Vec<&str> = text[..end].split('\n').collect();
    let mut key = None;
    let mut header = None;
    for (i, line) in lines.iter().enumerate().rev() {
        let t = line.trim();
        if t.starts_with('[') {
            let h = t.trim_start_matches('[');
            let h = h.split(']').next().unwrap_or("").trim();
            header = Some(h.to_string());
            if i + 1 == lines.len() {
                // The offset is on the header itself (e.g. an unknown table).
                return h.to_string();
            }
            break;
        }
        if key.is_none() && !t.starts_with('#') {
            if let Some((k, _)) = t.split_once('=') {
                let k = k.trim();
                if !k.is_empty() && !k.contains(['"', '{', '[']) {
                    key = Some(k.to_string());
                }
            }
        }
    }
    match (header, key) {
        (Some(h), Some(k)) => format!("{h}.{k}"),
        (None, Some(k)) => k,
        (Some(h), None) => h,
        (None, None) => String::new(),
    }
}

impl Manifest {
    /// Reads, parses and validates the manifest at `path`.
    pub fn load(path: &Path) -> Result<Manifest> {
        let text = std::fs::read_to_string(path).with_context(|| {
            format!(
                "cannot read the manifest {} (write one with `kiln init MODEL`)",
                path.display()
            )
        })?;
        Manifest::parse(&text, path)
    }

    /// Parses and validates manifest `text`, read from `path` (paths resolve against its
    /// folder; files must exist).
    pub fn parse(text: &str, path: &Path) -> Result<Manifest> {
        let raw: Raw = toml::from_str(text).map_err(|e| {
            let msg = e.message().trim_end();
            match e.span() {
                Some(span) => {
                    let (line, col) = line_col(text, span.start);
                    let key = key_at(text, span.start);
                    let key = if key.is_empty() {
                        String::new()
                    } else {
                        format!(" key `{key}`:")
                    };
                    anyhow::anyhow!("{}:{line}:{col}:{key} {msg}", path.display())
                }
                None => anyhow::anyhow!("{}: {msg}", path.display()),
            }
        })?;
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let v = Validator {
            text,
            path,
            dir: &dir,
        };
        v.build(raw)
    }

    /// The error location `FILE:LINE:COL` of a span, for callers validating further.
    pub fn at(&self, span: Range<usize>) -> String {
        let (l, c) = line_col(&self.text, span.start);
        format!("{}:{l}:{c}", self.path.display())
    }
}

struct Validator<'a> {
    text: &'a str,
    path: &'a Path,
    dir: &'a Path,
}

impl Validator<'_> {
    /// An error at `span` about `key`.
    fn err(&self, span: Range<usize>, key: &str, msg: impl std::fmt::Display) -> anyhow::Error {
        let (l, c) = line_col(self.text, span.start);
        anyhow::anyhow!("{}:{l}:{c}: key `{key}`: {msg}", self.path.display())
    }

    /// Resolves a path value and checks the file exists.
    fn file(&self, v: &Spanned<String>, key: &str) -> Result<PathBuf> {
        let p = self.dir.join(v.get_ref());
        if !p.is_file() {
            return Err(self.err(
                v.span(),
                key,
                format!(
                    "file {} not found (paths are relative to the manifest's folder {})",
                    p.display(),
                    self.dir.display()
                ),
            ));
        }
        Ok(p)
    }

    fn build(&self, raw: Raw) -> Result<Manifest> {
        let models_span = raw.model.span();
        let raw_models = raw.model.into_inner();
        if raw_models.is_empty() {
            return Err(self.err(models_span, "model", "no model: add a [[model]] table"));
        }
        let mut models: Vec<ModelSpec> = vec![];
        for m in raw_models {
            let spec = self.model(m)?;
            if models.iter().any(|o| o.name == spec.name) {
                bail!(
                    "{}: two models are named `{}`; set `name` in one of them",
                    self.path.display(),
                    spec.name
                );
            }
            models.push(spec);
        }

        let targets_span = raw.targets.span();
        let raw_targets = raw.targets.into_inner();
        if raw_targets.is_empty() {
            return Err(self.err(
                targets_span,
                "targets",
                "no target: list at least one (see `kiln targets`)",
            ));
        }
        let dir = kiln_target::targets_dir()?;
        let known: Vec<String> = kiln_target::load_all(&dir)?
            .into_iter()
            .map(|s| s.name)
            .collect();
        let mut targets = vec![];
        for t in raw_targets {
            if !known.contains(t.get_ref()) {
                return Err(self.err(
                    t.span(),
                    "targets",
                    format!(
                        "unknown target `{}`; known targets: {}",
                        t.get_ref(),
                        known.join(", ")
                    ),
                ));
            }
            if targets.contains(t.get_ref()) {
                return Err(self.err(
                    t.span(),
                    "targets",
                    format!("target `{}` is listed twice", t.get_ref()),
                ));
            }
            targets.push(t.into_inner());
        }

        let mut devices = vec![];
        for d in raw.devices {
            kiln_device::Device::parse(d.get_ref())
                .map_err(|e| self.err(d.span(), "devices", format!("{e:#}")))?;
            devices.push(d.into_inner());
        }

        let sign = raw.sign.map(|s| self.key(s.key)).transpose()?;
        let check = raw.check.map(|c| self.check(c)).transpose()?;
        Ok(Manifest {
            path: self.path.to_path_buf(),
            dir: self.dir.to_path_buf(),
            version: raw.version.into_inner(),
            targets,
            devices,
            with_runner: raw.with_runner,
            models,
            sign,
            check,
            text: self.text.to_string(),
        })
    }

    fn model(&self, m: RawModel) -> Result<ModelSpec> {
        let path = self.file(&m.path, "model.path")?;
        let name = match &m.name {
            Some(n) => {
                let ok = !n.get_ref().is_empty()
                    && !n.get_ref().starts_with('.')
                    && n.get_ref()
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
                if !ok {
                    return Err(self.err(
                        n.span(),
                        "model.name",
                        format!(
                            "`{}` is not a usable name: letters, digits, `.`, `_`, `-` (it names output files)",
                            n.get_ref()
                        ),
                    ));
                }
                n.get_ref().clone()
            }
            None => kiln_graph::load::model_stem(&path),
        };
        let mut input_shapes = vec![];
        for s in &m.input_shapes {
            kiln_graph::load::parse_input_shape(s.get_ref())
                .map_err(|e| self.err(s.span(), "model.input_shapes", format!("{e:#}")))?;
            input_shapes.push(s.get_ref().clone());
        }
        let calib = m
            .calib
            .as_ref()
            .map(|c| self.file(c, "model.calib"))
            .transpose()?;
        let eval = m
            .eval
            .as_ref()
            .map(|c| self.file(c, "model.eval"))
            .transpose()?;
        let golden = m
            .golden
            .as_ref()
            .map(|c| self.file(c, "model.golden"))
            .transpose()?;
        let o = m.optimize.unwrap_or_default();
        let prune = match &o.prune {
            None => None,
            Some(p) => {
                kiln_prune::spec::parse_method(p.get_ref())
                    .map_err(|e| self.err(p.span(), "model.optimize.prune", format!("{e:#}")))?;
                Some(p.get_ref().clone())
            }
        };
        let quantize = match &o.quantize {
            None => None,
            Some(q) if q.get_ref() == "none" => None,
            Some(q) => Some(Precision::parse(q.get_ref()).map_err(|e| {
                self.err(
                    q.span(),
                    "model.optimize.quantize",
                    format!("{e:#} (or none)"),
                )
            })?),
        };
        let calibration = match &o.calibration {
            Some(c) => {
                Method::parse(c.get_ref()).map_err(|e| {
                    self.err(c.span(), "model.optimize.calibration", format!("{e:#}"))
                })?;
                c.get_ref().clone()
            }
            None => "minmax".to_string(),
        };
        if quantize == Some(Precision::Int8Static) && calib.is_none() {
            let span = o.quantize.as_ref().map(Spanned::span).unwrap_or(0..0);
            return Err(self.err(
                span,
                "model.calib",
                "int8-static needs calibration data: set `calib = \"CALIB.npz\"` in the [[model]]",
            ));
        }
        if let Some(d) = &o.max_accuracy_drop {
            let v = *d.get_ref();
            if !v.is_finite() || v < 0.0 {
                return Err(self.err(
                    d.span(),
                    "model.optimize.max_accuracy_drop",
                    format!(
                        "impossible budget {v}: the drop allowed must be a number of points ≥ 0"
                    ),
                ));
            }
            if eval.is_none() {
                return Err(self.err(
                    d.span(),
                    "model.optimize.max_accuracy_drop",
                    "an accuracy budget needs `eval = \"DATA.npz\"` in the [[model]] to measure the drop",
                ));
            }
            if quantize.is_none() {
                return Err(self.err(
                    d.span(),
                    "model.optimize.max_accuracy_drop",
                    "an accuracy budget needs `quantize` (nothing else changes accuracy)",
                ));
            }
        }
        let mut keep_f32 = o.keep_f32.clone();
        keep_f32.sort();
        keep_f32.dedup();
        Ok(ModelSpec {
            name,
            path,
            input_shapes,
            calib,
            eval,
            golden,
            optimize: OptimizeSpec {
                quantize,
                calibration,
                max_accuracy_drop: o.max_accuracy_drop.map(|d| *d.get_ref()),
                keep_f32,
                int8_everywhere: o.int8_everywhere,
                prune,
            },
        })
    }

    fn key(&self, k: Spanned<RawKey>) -> Result<KeySource> {
        let span = k.span();
        let k = k.into_inner();
        match (k.path, k.env) {
            (Some(p), None) => {
                let path = self.dir.join(p.get_ref());
                if !path.exists() {
                    return Err(self.err(
                        p.span(),
                        "sign.key.path",
                        format!(
                            "signing key {} not found (create one with `kiln keygen -o {}`)",
                            path.display(),
                            p.get_ref()
                        ),
                    ));
                }
                Ok(KeySource::Path(path))
            }
            (None, Some(e)) => {
                let var = e.get_ref();
                let valid = !var.is_empty()
                    && var
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_');
                if !valid {
                    return Err(self.err(
                        e.span(),
                        "sign.key.env",
                        format!("`{var}` is not an environment variable name"),
                    ));
                }
                match std::env::var_os(var) {
                    None => Err(self.err(
                        e.span(),
                        "sign.key.env",
                        format!(
                            "environment variable {var} is not set; it must hold the path of the \
                             private key (`kiln keygen -o KEY`) or its PEM text"
                        ),
                    )),
                    Some(v) => {
                        let v = v.to_string_lossy();
                        if !v.trim_start().starts_with("-----BEGIN") && !Path::new(&*v).exists() {
                            return Err(self.err(
                                e.span(),
                                "sign.key.env",
                                format!(
                                    "environment variable {var} names the signing key {v}, which does not exist"
                                ),
                            ));
                        }
                        Ok(KeySource::Env(var.clone()))
                    }
                }
            }
            _ => Err(self.err(
                span,
                "sign.key",
                "give exactly one of `path = \"KEY.pem\"` or `env = \"VARIABLE\"`, e.g. key = { env = \"KILN_SIGNING_KEY\" }",
            )),
        }
    }

    fn check(&self, c: RawCheck) -> Result<CheckSpec> {
        let baseline = c
            .baseline
            .as_ref()
            .map(|b| self.file(b, "check.baseline"))
            .transpose()?;
        if let Some(s) = &c.noise_sigmas {
            let v = *s.get_ref();
            if !v.is_finite() || v < 0.0 {
                return Err(self.err(
                    s.span(),
                    "check.noise_sigmas",
                    format!("impossible noise band {v}: must be a number ≥ 0"),
                ));
            }
        }
        let mut budgets = BTreeMap::new();
        for (k, v) in &c.budgets {
            let key = format!("check.budgets.{k}");
            let b = kiln_check::Budget::parse(v.get_ref(), k)
                .map_err(|e| self.err(v.span(), &key, format!("{e:#}")))?;
            if let (Some(limit), Some(worse_up)) = (b.limit, worse_direction(k)) {
                if limit.worse_up != worse_up {
                    return Err(self.err(
                        v.span(),
                        &key,
                        format!(
                            "impossible budget `{}`: `{k}` gets worse when it {}, so its budget starts with `{}`",
                            v.get_ref(),
                            if worse_up { "grows" } else { "drops" },
                            if worse_up { "+" } else { "-" }
                        ),
                    ));
                }
            }
            budgets.insert(k.clone(), v.get_ref().clone());
        }
        Ok(CheckSpec {
            baseline,
            noise_sigmas: c.noise_sigmas.map(|s| *s.get_ref()),
            budgets,
        })
    }
}

/// Which way metric `key` (a kind or a metric name, possibly `case/metric`) gets worse:
/// `Some(true)` when growing, `Some(false)` when dropping, `None` when unknown.
fn worse_direction(key: &str) -> Option<bool> {
    let metric = key.rsplit_once('/').map_or(key, |(_, m)| m);
    match metric {
        "size" | "latency" | "latency_p50" | "latency_p90" | "model_bytes" | "nnef_bytes"
        | "bytes" | ".text" | ".rodata" | ".data" | ".bss" | "other" => Some(true),
        "accuracy" | "cosine" => Some(false),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A folder with a model, data files and a key, and `kiln.toml` holding `text`.
    fn parse(text: &str) -> (tempfile::TempDir, Result<Manifest>) {
        let dir = tempfile::tempdir().unwrap();
        for f in [
            "m/model.onnx",
            "m/calib.npz",
            "m/data.npz",
            "signer.pem",
            "base.json",
        ] {
            let p = dir.path().join(f);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, b"x").unwrap();
        }
        let path = dir.path().join("kiln.toml");
        std::fs::write(&path, text).unwrap();
        let r = Manifest::parse(text, &path);
        (dir, r)
    }

    const GOOD: &str = r#"version = 3
targets = ["x86_64-linux"]
devices = ["local", "qemu-aarch64", "ssh://pi@board:2222"]

[sign]
key = { path = "signer.pem" }

[check]
baseline = "base.json"
noise_sigmas = 3
[check.budgets]
size = "+2%"
accuracy = "-0.5"

[[model]]
path = "m/model.onnx"
calib = "m/calib.npz"
eval = "m/data.npz"
[model.optimize]
quantize = "int8-static"
calibration = "percentile:99.9"
max_accuracy_drop = 1
"#;

    fn error(text: &str) -> String {
        match parse(text).1 {
            Ok(_) => panic!("accepted:\n{text}"),
            Err(e) => format!("{e:#}"),
        }
    }

    /// Replaces `from` by `to` in the good manifest and returns the error.
    fn error_with(from: &str, to: &str) -> String {
        assert!(GOOD.contains(from), "{from}");
        error(&GOOD.replacen(from, to, 1))
    }

    #[test]
    fn parses_a_full_manifest() {
        let (dir, m) = parse(GOOD);
        let m = m.unwrap();
        assert_eq!(m.version, 3);
        assert_eq!(m.models[0].name, "m");
        assert_eq!(m.models[0].path, dir.path().join("m/model.onnx"));
        assert_eq!(m.models[0].optimize.quantize, Some(Precision::Int8Static));
        assert_eq!(m.models[0].optimize.max_accuracy_drop, Some(1.0));
        assert_eq!(m.devices.len(), 3);
        assert_eq!(m.sign, Some(KeySource::Path(dir.path().join("signer.pem"))));
        assert_eq!(m.check.unwrap().budgets["size"], "+2%");
    }

    #[test]
    fn unknown_keys_and_wrong_types_name_key_line_and_file() {
        let e = error_with("calibration =", "calibrate =");
        assert!(e.contains("kiln.toml:21:1:"), "{e}");
        assert!(e.contains("unknown field `calibrate`"), "{e}");
        assert!(e.contains("`model.optimize.calibrate`"), "{e}");
        let e = error_with("version = 3", "version = \"3\"");
        assert!(
            e.contains("kiln.toml:1:11:") && e.contains("`version`"),
            "{e}"
        );
        let e = error_with("noise_sigmas = 3", "noise_sigmas = [3]");
        assert!(
            e.contains(":10:") && e.contains("`check.noise_sigmas`"),
            "{e}"
        );
        let e = error_with("[check.budgets]", "[check.budget]");
        assert!(
            e.contains(":11:") && e.contains("unknown field `budget`"),
            "{e}"
        );
        let e = error("version = 1\ntargets = [\"x86_64-linux\"\n");
        assert!(
            e.contains("kiln.toml:3:") && e.contains("invalid array"),
            "{e}"
        );
        let e = error("version = 1\ntargets = [\"x86_64-linux\"]\n");
        assert!(e.contains("missing field `model`"), "{e}");
    }

    #[test]
    fn semantic_errors_name_key_line_and_file() {
        let cases = [
            (
                "m/calib.npz",
                "m/nope.npz",
                ":17:",
                "model.calib",
                "nope.npz not found",
            ),
            (
                "\"x86_64-linux\"",
                "\"x86_64-linux\", \"riscv-linux\"",
                ":2:",
                "targets",
                "unknown target `riscv-linux`",
            ),
            (
                "\"local\"",
                "\"locale\"",
                ":3:",
                "devices",
                "unknown device `locale`",
            ),
            (
                "ssh://pi@board:2222",
                "ssh://pi@board:99999",
                ":3:",
                "devices",
                "bad ssh device",
            ),
            (
                "max_accuracy_drop = 1",
                "max_accuracy_drop = -1",
                ":22:",
                "model.optimize.max_accuracy_drop",
                "impossible budget -1",
            ),
            (
                "\"-0.5\"",
                "\"+0.5\"",
                ":13:",
                "check.budgets.accuracy",
                "impossible budget `+0.5`",
            ),
            ("\"+2%\"", "\"2%\"", ":12:", "check.budgets.size", "no sign"),
            (
                "noise_sigmas = 3",
                "noise_sigmas = -3",
                ":10:",
                "check.noise_sigmas",
                "impossible noise band",
            ),
            (
                "\"int8-static\"",
                "\"int4\"",
                ":20:",
                "model.optimize.quantize",
                "unknown precision `int4`",
            ),
            (
                "percentile:99.9",
                "percentile:20",
                ":21:",
                "model.optimize.calibration",
                "outside [50, 100]",
            ),
            (
                "{ path = \"signer.pem\" }",
                "{ path = \"gone.pem\" }",
                ":6:",
                "sign.key.path",
                "gone.pem not found",
            ),
            (
                "{ path = \"signer.pem\" }",
                "{ env = \"KILN_TEST_UNSET_VARIABLE\" }",
                ":6:",
                "sign.key.env",
                "KILN_TEST_UNSET_VARIABLE is not set",
            ),
            (
                "{ path = \"signer.pem\" }",
                "{ path = \"signer.pem\", env = \"K\" }",
                ":6:",
                "sign.key",
                "exactly one",
            ),
            (
                "max_accuracy_drop = 1",
                "max_accuracy_drop = 1\nprune = \"channels:1.3\"",
                ":23:",
                "model.optimize.prune",
                "[0, 1)",
            ),
            (
                "baseline = \"base.json\"",
                "baseline = \"nobase.json\"",
                ":9:",
                "check.baseline",
                "not found",
            ),
        ];
        for (from, to, line, key, msg) in cases {
            let e = error_with(from, to);
            assert!(e.contains("kiln.toml") && e.contains(line), "{to}: {e}");
            assert!(e.contains(&format!("key `{key}`")), "{to}: {e}");
            assert!(e.contains(msg), "{to}: {e}");
        }
        let e = error_with("calib = \"m/calib.npz\"\n", "");
        assert!(e.contains("needs calibration data"), "{e}");
        let e = error_with("targets = [\"x86_64-linux\"]", "targets = []");
        assert!(e.contains("no target"), "{e}");
        let e = error(&format!("{GOOD}\n[[model]]\npath = \"m/model.onnx\"\n"));
        assert!(e.contains("two models are named `m`"), "{e}");
    }

    /// The fields serde accepts in a table, from its "unknown field" error.
    fn accepted_fields(from: &str, to: &str) -> Vec<String> {
        let e = error_with(from, to);
        let list = e
            .split("expected one of ")
            .nth(1)
            .or_else(|| e.split("expected ").nth(1))
            .unwrap_or_else(|| panic!("{e}"));
        let mut v: Vec<String> = list
            .split(", ")
            .map(|f| f.trim().trim_matches('`').to_string())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn json_schema_lists_the_same_keys() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/kiln.schema.json");
        let schema: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let keys = |v: &serde_json::Value| {
            let mut k: Vec<String> = v["properties"]
                .as_object()
                .unwrap()
                .keys()
                .cloned()
                .collect();
            k.sort();
            k
        };
        let p = &schema["properties"];
        assert_eq!(
            keys(&schema),
            accepted_fields("version = 3", "version = 3\nzz = 1")
        );
        assert_eq!(
            keys(&p["check"]),
            accepted_fields("noise_sigmas = 3", "noise_sigmas = 3\nzz = 1")
        );
        assert_eq!(
            keys(&p["sign"]),
            accepted_fields("key = {", "zz = 1\nkey = {")
        );
        assert_eq!(
            keys(&p["model"]["items"]),
            accepted_fields("eval = \"m/data.npz\"", "eval = \"m/data.npz\"\nzz = 1")
        );
        assert_eq!(
            keys(&p["model"]["items"]["properties"]["optimize"]),
            accepted_fields("max_accuracy_drop = 1", "max_accuracy_drop = 1\nzz = 1")
        );
    }

    #[test]
    fn line_columns_and_keys() {
        let t = "a = 1\n[x.y]\nb = [\n  1,\n  2]\n";
        assert_eq!(line_col(t, 0), (1, 1));
        assert_eq!(line_col(t, 6), (2, 1));
        assert_eq!(key_at(t, 2), "a");
        assert_eq!(key_at(t, 7), "x.y");
        assert_eq!(key_at(t, t.find('2').unwrap()), "x.y.b");
    }

    #[test]
    fn model_names() {
        assert_eq!(
            kiln_graph::load::model_stem(Path::new("f/digits/model.onnx")),
            "digits"
        );
        assert_eq!(kiln_graph::load::model_stem(Path::new("net.onnx")), "net");
    }
}
