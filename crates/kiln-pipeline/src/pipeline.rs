//! The stages of a manifest and their execution: `optimize` per model, then `compile` and
//! `package` per model and target. Each stage's key is the SHA-256 of its inputs (file
//! contents, settings, kiln and tract versions, and the upstream stage's output digest), so
//! a stage runs only when something it depends on changed. [`Pipeline::plan`] says what would
//! run and why; [`Pipeline::build`] runs it, then writes the outputs into the output folder
//! (`target/kiln/` beside the manifest) only once every stage succeeded.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use kiln_graph::LoadOptions;
use kiln_opt::calib::Method;
use kiln_opt::optimize::{Options, Precision};
use kiln_target::TargetSpec;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::cache::{file_digest, sha256_hex, stage_key, Cache, Lookup};
use crate::manifest::{KeySource, Manifest, ModelSpec};
use crate::package::{build_artifact, ArtifactJob};

/// Schema tag of `build.json` and `kiln build --json`.
pub const BUILD_SCHEMA: &str = "kiln.build/1";
const NNEF_FILE: &str = "model.nnef.tar";
const REPORT_FILE: &str = "optimize.json";
/// The pruning report (`kiln.prune/1`) of the optimize stage, when `prune` is set.
const PRUNE_REPORT_FILE: &str = "prune.json";
const RUNNER_FILE: &str = "kiln-runner";
const COMPILE_FILE: &str = "compile.json";
const ARTIFACT_FILE: &str = "artifact.kiln";

/// A stage's output files: name → bytes.
type Files = BTreeMap<String, Vec<u8>>;

/// How `kiln build` / `kiln plan` run.
#[derive(Debug, Clone, Default)]
pub struct BuildOptions {
    /// Only these of the manifest's targets (all when empty).
    pub targets: Vec<String>,
    /// Output folder (default `target/kiln` beside the manifest).
    pub out_dir: Option<PathBuf>,
    /// Run every stage even when its cache entry is valid.
    pub no_cache: bool,
}

/// What happened to (or would happen to) a stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Status {
    /// A valid cache entry was used.
    Cached,
    /// The stage ran.
    Built,
    /// The cache entry was corrupted; the stage ran again and replaced it.
    Rebuilt,
    /// (plan) The stage would run.
    WouldRun,
    /// (plan) The stage's key depends on an upstream stage that would run.
    Waiting,
}

/// One stage in a plan or a build.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StageReport {
    /// `optimize/digits`, `compile/digits/x86_64-linux`, `package/digits/x86_64-linux`.
    pub id: String,
    /// `optimize`, `compile` or `package`.
    pub stage: String,
    /// Model name.
    pub model: String,
    /// Target name (compile, package).
    pub target: Option<String>,
    /// Cache key (SHA-256 of the inputs); null while waiting on an upstream stage.
    pub key: Option<String>,
    /// Inputs: name → digest or value.
    pub inputs: BTreeMap<String, String>,
    /// What happened.
    pub status: Status,
    /// Why (`unchanged`, `changed: calib`, `not built before`...).
    pub reason: String,
    /// Wall time of the stage, seconds (0 when cached or planned).
    pub seconds: f64,
}

/// One written artifact.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ArtifactRecord {
    /// Path (relative to the output folder).
    pub path: String,
    /// Size in bytes.
    pub bytes: u64,
    /// SHA-256 (hex).
    pub sha256: String,
}

/// `kiln.build/1`: the stages of a build, and what it wrote (`OUT/build.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BuildReport {
    /// Always `kiln.build/1`.
    pub schema: String,
    /// The manifest.
    pub manifest: String,
    /// The output folder.
    pub out: String,
    /// Every stage, in order.
    pub stages: Vec<StageReport>,
    /// Signed artifacts written.
    pub artifacts: Vec<ArtifactRecord>,
    /// Budgets file for `kiln check --budgets` (from `[check]`), relative to `out`.
    pub budgets: Option<String>,
    /// The baseline `[check]` names.
    pub baseline: Option<String>,
    /// Wall time, seconds.
    pub seconds: f64,
}

/// Progress of a running build or plan.
pub enum Event<'a> {
    /// Stage number `index` (from 0) of `total` starts.
    Start {
        /// Stage id.
        id: &'a str,
        /// Position.
        index: usize,
        /// Number of stages.
        total: usize,
    },
    /// A stage finished (or was planned).
    Finish(&'a StageReport),
}

struct Target {
    spec: TargetSpec,
    spec_digest: String,
    runner: Option<Runner>,
}

struct Runner {
    path: PathBuf,
    bytes: Vec<u8>,
    digest: String,
}

/// A loaded manifest ready to plan or build.
pub struct Pipeline {
    /// The manifest.
    pub manifest: Manifest,
    /// Output folder.
    pub out: PathBuf,
    cache: Cache,
    targets: Vec<Target>,
    key: Option<kiln_artifact::SigningKey>,
    previous: BTreeMap<String, StageReport>,
    no_cache: bool,
}

/// Files produced by the stages of one model, kept until the build succeeds.
#[derive(Default)]
struct Outputs {
    files: Vec<(PathBuf, Vec<u8>, bool)>,
    artifacts: Vec<PathBuf>,
}

impl Pipeline {
    /// Loads and validates `manifest` (files, targets, devices, budgets, signing key): any
    /// error here happens before anything is written.
    pub fn load(manifest: &Path, opts: &BuildOptions) -> Result<Pipeline> {
        let manifest = Manifest::load(manifest)?;
        for t in &opts.targets {
            if !manifest.targets.contains(t) {
                bail!(
                    "--target {t}: not one of the targets in {} ({})",
                    manifest.path.display(),
                    manifest.targets.join(", ")
                );
            }
        }
        let dir = kiln_target::targets_dir()?;
        let mut targets = vec![];
        for name in &manifest.targets {
            if !opts.targets.is_empty() && !opts.targets.contains(name) {
                continue;
            }
            let spec = kiln_target::find(&dir, name)?;
            let spec_digest = file_digest(&dir.join(format!("{name}.toml")))?;
            let runner = kiln_target::build::find_runner(&spec)
                .map(|p| Runner::read(&p))
                .transpose()?;
            targets.push(Target {
                spec,
                spec_digest,
                runner,
            });
        }
        let key = manifest
            .sign
            .as_ref()
            .map(|s| read_key(s, &manifest))
            .transpose()?;
        let out = opts
            .out_dir
            .clone()
            .unwrap_or_else(|| manifest.dir.join("target/kiln"));
        let previous = std::fs::read(out.join("build.json"))
            .ok()
            .and_then(|b| serde_json::from_slice::<BuildReport>(&b).ok())
            .map(|r| r.stages.into_iter().map(|s| (s.id.clone(), s)).collect())
            .unwrap_or_default();
        Ok(Pipeline {
            cache: Cache::new(out.join("cache")),
            out,
            manifest,
            targets,
            key,
            previous,
            no_cache: opts.no_cache,
        })
    }

    /// What `build` would do and why, running nothing and writing nothing.
    pub fn plan(&self, on_event: &mut dyn FnMut(Event)) -> Result<Vec<StageReport>> {
        Ok(self.walk(false, on_event)?.0)
    }

    /// Runs every stage that is not cached, then writes the outputs (each file atomically,
    /// unchanged files left alone) and `build.json`.
    pub fn build(&mut self, on_event: &mut dyn FnMut(Event)) -> Result<BuildReport> {
        let t0 = Instant::now();
        for t in &mut self.targets {
            if t.runner.is_none() {
                let p = kiln_target::build::runner_for(&t.spec, None)?;
                t.runner = Some(Runner::read(&p)?);
            }
        }
        let (stages, outputs) = self.walk(true, on_event)?;
        let mut artifacts = vec![];
        for (path, bytes, exec) in &outputs.files {
            write_if_changed(path, bytes, *exec)?;
            if outputs.artifacts.contains(path) {
                artifacts.push(ArtifactRecord {
                    path: self.relative(path),
                    bytes: bytes.len() as u64,
                    sha256: sha256_hex(bytes),
                });
            }
        }
        let budgets = match &self.manifest.check {
            Some(c) => {
                let mut table = toml::Table::new();
                if let Some(s) = c.noise_sigmas {
                    table.insert("noise_sigmas".into(), toml::Value::Float(s));
                }
                let b: toml::Table = c
                    .budgets
                    .iter()
                    .map(|(k, v)| (k.clone(), toml::Value::String(v.clone())))
                    .collect();
                table.insert("budgets".into(), toml::Value::Table(b));
                let text = format!(
                    "# Written by `kiln build` from the [check] section of {}.\n# Use: kiln check --baseline BASELINE --budgets {}\n{}",
                    self.manifest.path.display(),
                    self.out.join("budgets.toml").display(),
                    toml::to_string(&table)?
                );
                kiln_check::budget::parse_toml(&text, "the budgets kiln build writes")?;
                let path = self.out.join("budgets.toml");
                write_if_changed(&path, text.as_bytes(), false)?;
                Some("budgets.toml".to_string())
            }
            None => None,
        };
        let report = BuildReport {
            schema: BUILD_SCHEMA.into(),
            manifest: self.manifest.path.display().to_string(),
            out: self.out.display().to_string(),
            stages,
            artifacts,
            budgets,
            baseline: self
                .manifest
                .check
                .as_ref()
                .and_then(|c| c.baseline.as_ref())
                .map(|b| b.display().to_string()),
            seconds: t0.elapsed().as_secs_f64(),
        };
        kiln_io::fsutil::write_atomic(
            &self.out.join("build.json"),
            &serde_json::to_vec_pretty(&report)?,
        )?;
        Ok(report)
    }

    fn relative(&self, p: &Path) -> String {
        p.strip_prefix(&self.out).unwrap_or(p).display().to_string()
    }

    /// Number of stages.
    pub fn stage_count(&self) -> usize {
        let per_target = 1 + usize::from(self.key.is_some());
        self.manifest.models.len() * (1 + self.targets.len() * per_target)
    }

    fn walk(
        &self,
        run: bool,
        on_event: &mut dyn FnMut(Event),
    ) -> Result<(Vec<StageReport>, Outputs)> {
        let total = self.stage_count();
        let mut reports = vec![];
        let mut outputs = Outputs::default();
        for model in &self.manifest.models {
            // optimize
            let id = format!("optimize/{}", model.name);
            on_event(Event::Start {
                id: &id,
                index: reports.len(),
                total,
            });
            let inputs = optimize_inputs(model)?;
            let (report, files) = self.stage(run, "optimize", &id, model, None, inputs, || {
                run_optimize(model)
            })?;
            on_event(Event::Finish(&report));
            let opt_key = report.key.clone();
            reports.push(report);
            let model_dir = self.out.join(&model.name);
            let (nnef_digest, accuracy) = match &files {
                Some(f) => {
                    let nnef = f.get(NNEF_FILE).context("optimize stage without a model")?;
                    if let Some(r) = f.get(REPORT_FILE) {
                        outputs
                            .files
                            .push((model_dir.join("optimize.json"), r.clone(), false));
                    }
                    (Some(sha256_hex(nnef)), top1(f.get(REPORT_FILE)))
                }
                None => (None, None),
            };
            for target in &self.targets {
                let tname = &target.spec.name;
                // compile
                let id = format!("compile/{}/{tname}", model.name);
                on_event(Event::Start {
                    id: &id,
                    index: reports.len(),
                    total,
                });
                let upstream = format!("optimize/{}", model.name);
                let report = match (&nnef_digest, &target.runner) {
                    (Some(nd), Some(runner)) => {
                        let inputs = compile_inputs(model, nd, target, runner);
                        let nnef = files.as_ref().and_then(|f| f.get(NNEF_FILE));
                        let (report, cfiles) = self.stage(
                            run,
                            "compile",
                            &id,
                            model,
                            Some(tname),
                            inputs,
                            || run_compile(model, target, runner, nnef.map_or(0, Vec::len)),
                        )?;
                        if let (Some(c), Some(nnef)) = (cfiles, nnef) {
                            let dir = model_dir.join(tname);
                            outputs.files.push((
                                dir.join(format!("{}.nnef.tar", model.name)),
                                nnef.clone(),
                                false,
                            ));
                            for (name, exec) in [(RUNNER_FILE, true), (COMPILE_FILE, false)] {
                                let bytes = c.get(name).with_context(|| {
                                    format!("compile stage of {} lacks {name}", model.name)
                                })?;
                                outputs.files.push((dir.join(name), bytes.clone(), exec));
                            }
                        }
                        report
                    }
                    (None, _) => waiting(&id, "compile", model, Some(tname), &upstream),
                    (_, None) => StageReport {
                        status: Status::WouldRun,
                        reason: format!(
                            "no runner built for {tname} yet (kiln build builds it; or cargo xtask runner --target {tname})"
                        ),
                        ..waiting(&id, "compile", model, Some(tname), &upstream)
                    },
                };
                on_event(Event::Finish(&report));
                reports.push(report);

                // package
                let Some(key) = &self.key else { continue };
                let id = format!("package/{}/{tname}", model.name);
                on_event(Event::Start {
                    id: &id,
                    index: reports.len(),
                    total,
                });
                let report = match (&nnef_digest, &target.runner, &opt_key) {
                    (Some(nd), Some(runner), Some(ok)) => {
                        let inputs =
                            self.package_inputs(model, nd, tname, runner, key, accuracy)?;
                        let nnef = files.as_ref().and_then(|f| f.get(NNEF_FILE));
                        let nnef_path = self.cache.entry_dir("optimize", ok).join(NNEF_FILE);
                        let (report, pfiles) =
                            self.stage(run, "package", &id, model, Some(tname), inputs, || {
                                let job = ArtifactJob {
                                    name: model.name.clone(),
                                    version: self.manifest.version,
                                    target: tname.clone(),
                                    model_path: &nnef_path,
                                    model_bytes: nnef.cloned().unwrap_or_default(),
                                    golden_inputs: model.golden.as_deref(),
                                    runner: self.manifest.with_runner.then(|| runner.bytes.clone()),
                                    accuracy,
                                };
                                let (bytes, _) = build_artifact(job, key)?;
                                Ok([(ARTIFACT_FILE.to_string(), bytes)].into())
                            })?;
                        if let Some(p) = pfiles {
                            let path = self.out.join(format!(
                                "{}-{tname}-v{}.kiln",
                                model.name, self.manifest.version
                            ));
                            let bytes = p
                                .get(ARTIFACT_FILE)
                                .context("package stage without an artifact")?;
                            outputs.artifacts.push(path.clone());
                            outputs.files.push((path, bytes.clone(), false));
                        }
                        report
                    }
                    _ => waiting(&id, "package", model, Some(tname), &upstream),
                };
                on_event(Event::Finish(&report));
                reports.push(report);
            }
        }
        Ok((reports, outputs))
    }

    /// Looks a stage up in the cache and, when building, runs it if needed. Returns its
    /// report and its files (None when planning a stage that would run).
    #[allow(clippy::too_many_arguments)]
    fn stage(
        &self,
        run: bool,
        stage: &str,
        id: &str,
        model: &ModelSpec,
        target: Option<&String>,
        inputs: BTreeMap<String, String>,
        work: impl FnOnce() -> Result<Files>,
    ) -> Result<(StageReport, Option<Files>)> {
        let key = stage_key(stage, &inputs);
        let mut report = StageReport {
            id: id.to_string(),
            stage: stage.to_string(),
            model: model.name.clone(),
            target: target.cloned(),
            key: Some(key.clone()),
            inputs,
            status: Status::Cached,
            reason: "unchanged".into(),
            seconds: 0.0,
        };
        let lookup = if self.no_cache {
            report.reason = "--no-cache".into();
            Lookup::Miss
        } else {
            self.cache.lookup(stage, &key)
        };
        let corrupted = match lookup {
            Lookup::Hit(files) => return Ok((report, Some(files))),
            Lookup::Miss => {
                if !self.no_cache {
                    report.reason = self.why(id, &report.inputs);
                }
                None
            }
            Lookup::Corrupted(why) => {
                report.reason = format!("cache entry corrupted ({why}); rebuilt");
                Some(why)
            }
        };
        if !run {
            report.status = Status::WouldRun;
            if corrupted.is_some() {
                report.reason = report.reason.replace("; rebuilt", "; will rebuild");
            }
            return Ok((report, None));
        }
        if let Some(why) = &corrupted {
            eprintln!(
                "warning: cache entry {} of {id} is corrupted ({why}); rebuilding it",
                self.cache.entry_dir(stage, &key).display()
            );
            self.cache.remove(stage, &key)?;
        }
        let t0 = Instant::now();
        let files = work().with_context(|| {
            format!(
                "stage {id} failed; nothing was written to {}",
                self.out.display()
            )
        })?;
        self.cache.store(stage, &key, &report.inputs, &files)?;
        report.seconds = t0.elapsed().as_secs_f64();
        report.status = if corrupted.is_some() {
            Status::Rebuilt
        } else {
            Status::Built
        };
        Ok((report, Some(files)))
    }

    /// Why a stage is not cached: which inputs changed since the last build.
    fn why(&self, id: &str, inputs: &BTreeMap<String, String>) -> String {
        let Some(prev) = self.previous.get(id) else {
            return "not built before".into();
        };
        let mut changed: Vec<&str> = inputs
            .iter()
            .filter(|(k, v)| prev.inputs.get(*k) != Some(v))
            .map(|(k, _)| k.as_str())
            .collect();
        changed.extend(
            prev.inputs
                .keys()
                .filter(|k| !inputs.contains_key(*k))
                .map(String::as_str),
        );
        if changed.is_empty() {
            "cache entry missing".into()
        } else {
            format!("changed: {}", changed.join(", "))
        }
    }

    fn package_inputs(
        &self,
        model: &ModelSpec,
        nnef_digest: &str,
        target: &str,
        runner: &Runner,
        key: &kiln_artifact::SigningKey,
        accuracy: Option<f64>,
    ) -> Result<BTreeMap<String, String>> {
        let mut i = versions();
        i.insert("nnef".into(), nnef_digest.into());
        i.insert(
            "golden".into(),
            match &model.golden {
                Some(g) => file_digest(g)?,
                None => "synthetic".into(),
            },
        );
        i.insert("key".into(), sha256_hex(key.verifying_key().as_bytes()));
        i.insert(
            "settings".into(),
            json!({
                "name": model.name,
                "version": self.manifest.version,
                "target": target,
                "accuracy": accuracy,
                "with_runner": self.manifest.with_runner,
            })
            .to_string(),
        );
        if self.manifest.with_runner {
            i.insert("runner".into(), runner.digest.clone());
        }
        Ok(i)
    }
}

impl Runner {
    fn read(path: &Path) -> Result<Runner> {
        let bytes = std::fs::read(path)
            .with_context(|| format!("cannot read runner {}", path.display()))?;
        Ok(Runner {
            path: path.to_path_buf(),
            digest: sha256_hex(&bytes),
            bytes,
        })
    }
}

fn waiting(
    id: &str,
    stage: &str,
    model: &ModelSpec,
    target: Option<&String>,
    upstream: &str,
) -> StageReport {
    StageReport {
        id: id.to_string(),
        stage: stage.to_string(),
        model: model.name.clone(),
        target: target.cloned(),
        key: None,
        inputs: BTreeMap::new(),
        status: Status::Waiting,
        reason: format!("after {upstream} (its output decides whether this runs)"),
        seconds: 0.0,
    }
}

fn versions() -> BTreeMap<String, String> {
    [
        ("kiln".to_string(), crate::KILN_VERSION.to_string()),
        ("tract".to_string(), kiln_io::TRACT_VERSION.to_string()),
    ]
    .into()
}

fn optimize_inputs(model: &ModelSpec) -> Result<BTreeMap<String, String>> {
    let mut i = versions();
    i.insert("model".into(), file_digest(&model.path)?);
    let o = &model.optimize;
    if let Some(q) = o.quantize {
        if q == Precision::Int8Static {
            if let Some(c) = &model.calib {
                i.insert("calib".into(), file_digest(c)?);
            }
        }
        if let Some(e) = &model.eval {
            i.insert("eval".into(), file_digest(e)?);
        }
    }
    i.insert(
        "settings".into(),
        json!({
            "quantize": o.quantize,
            "calibration": (o.quantize == Some(Precision::Int8Static)).then_some(&o.calibration),
            "max_accuracy_drop": o.max_accuracy_drop,
            "keep_f32": o.keep_f32,
            "int8_everywhere": o.int8_everywhere,
            "prune": o.prune,
            "input_shapes": model.input_shapes,
        })
        .to_string(),
    );
    Ok(i)
}

fn compile_inputs(
    model: &ModelSpec,
    nnef_digest: &str,
    target: &Target,
    runner: &Runner,
) -> BTreeMap<String, String> {
    let mut i = versions();
    i.insert("nnef".into(), nnef_digest.into());
    i.insert("name".into(), model.name.clone());
    i.insert("target".into(), target.spec_digest.clone());
    i.insert("runner".into(), runner.digest.clone());
    i
}

/// The optimize stage: quantize (kiln-opt) or convert, then the runner form (NNEF).
fn run_optimize(model: &ModelSpec) -> Result<BTreeMap<String, Vec<u8>>> {
    let input_shapes = model
        .input_shapes
        .iter()
        .map(|s| kiln_graph::load::parse_input_shape(s))
        .collect::<Result<_>>()?;
    let load = LoadOptions { input_shapes };
    let mut files = BTreeMap::new();
    let o = &model.optimize;
    // Pruning first (kiln-prune), then quantization measured against the unpruned model.
    let pruned = match &o.prune {
        None => None,
        Some(p) => {
            let spec = kiln_prune::spec::PruneSpec::new(kiln_prune::spec::parse_method(p)?);
            let original = kiln_graph::proto::read_onnx_proto(&model.path)?;
            let (m, report) = kiln_prune::prune(&original, &spec)
                .with_context(|| format!("pruning {}", model.path.display()))?;
            files.insert(
                PRUNE_REPORT_FILE.to_string(),
                serde_json::to_vec_pretty(&report)?,
            );
            Some(m)
        }
    };
    match o.quantize {
        Some(precision) => {
            let opts = Options {
                precision,
                calib: model.calib.clone(),
                method: Method::parse(&o.calibration)?,
                eval: model.eval.clone(),
                max_drop: o.max_accuracy_drop,
                keep_f32: o.keep_f32.clone(),
                load,
                progress: false,
                int8_everywhere: o.int8_everywhere,
                speed_search: false, // timing-dependent: a pipeline stays reproducible
            };
            let done = kiln_opt::optimize::optimize_from(&model.path, pruned, &opts)?;
            files.insert(
                NNEF_FILE.to_string(),
                kiln_graph::nnef::to_nnef_bytes(&done.model)?,
            );
            files.insert(
                REPORT_FILE.to_string(),
                serde_json::to_vec_pretty(&done.report)?,
            );
        }
        None => {
            let m = match pruned {
                Some(p) => kiln_graph::load::load_onnx_proto(&p, &model.path, &load)?,
                None => kiln_graph::load(&model.path, &load)?,
            };
            files.insert(NNEF_FILE.to_string(), kiln_graph::nnef::to_nnef_bytes(&m)?);
        }
    }
    Ok(files)
}

/// The compile stage: check the target's runner (ELF facts against the spec) and record
/// the `kiln.compile/1` report; the folder it makes is a `kiln compile` output folder.
fn run_compile(
    model: &ModelSpec,
    target: &Target,
    runner: &Runner,
    nnef_bytes: usize,
) -> Result<BTreeMap<String, Vec<u8>>> {
    let spec = &target.spec;
    let elf = kiln_target::elf::inspect(&runner.bytes)
        .with_context(|| format!("runner {}", runner.path.display()))?;
    kiln_target::elf::check(&elf, spec)
        .with_context(|| format!("runner {}", runner.path.display()))?;
    let report = json!({
        "schema": "kiln.compile/1",
        "target": spec.name,
        "triple": spec.triple,
        "model": format!("{}.nnef.tar", model.name),
        "model_file": format!("{}.nnef.tar", model.name),
        "model_bytes": nnef_bytes,
        "runner_file": RUNNER_FILE,
        "runner_bytes": runner.bytes.len(),
        "runner_budget": spec.runner_size_budget,
        "runner_elf": elf,
        "embedded_file": null,
        "embedded_bytes": null,
    });
    Ok([
        (RUNNER_FILE.to_string(), runner.bytes.clone()),
        (
            COMPILE_FILE.to_string(),
            serde_json::to_vec_pretty(&report)?,
        ),
    ]
    .into())
}

/// Top-1 accuracy of the optimized model from a `kiln.optimize/1` report, if measured.
fn top1(report: Option<&Vec<u8>>) -> Option<f64> {
    let v: serde_json::Value = serde_json::from_slice(report?).ok()?;
    let a = &v["accuracy"];
    (a["metric"] == "top1")
        .then(|| a["optimized"].as_f64())
        .flatten()
}

/// Reads the signing key `source` names; errors name the manifest key.
fn read_key(source: &KeySource, manifest: &Manifest) -> Result<kiln_artifact::SigningKey> {
    let origin = manifest.path.display();
    match source {
        KeySource::Path(p) => kiln_artifact::keys::read_private_key(p)
            .with_context(|| format!("{origin}: key `sign.key.path`")),
        KeySource::Env(var) => {
            let value = std::env::var(var).with_context(|| {
                format!("{origin}: key `sign.key.env`: {var} is not set (or not UTF-8)")
            })?;
            if value.trim_start().starts_with("-----BEGIN") {
                kiln_artifact::keys::private_key_from_pem(&value, &format!("${var}"))
                    .with_context(|| format!("{origin}: key `sign.key.env`"))
            } else {
                kiln_artifact::keys::read_private_key(Path::new(&value))
                    .with_context(|| format!("{origin}: key `sign.key.env` (${var})"))
            }
        }
    }
}

/// Writes `bytes` to `path` atomically unless it already holds exactly them (mode 0755
/// when `exec`).
fn write_if_changed(path: &Path, bytes: &[u8], exec: bool) -> Result<()> {
    if std::fs::read(path).is_ok_and(|old| old == bytes) {
        return Ok(());
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    kiln_io::fsutil::write_atomic_with(path, |f| {
        use std::io::Write;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = if exec { 0o755 } else { 0o644 };
            f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        }
        f.write_all(bytes)?;
        Ok(())
    })
}
