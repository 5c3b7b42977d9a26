//! `kiln bench MODEL|DIR --device D [--device D2 ...]`: compile for each device's target,
//! deploy, run `kiln-runner bench` there, collect the `kiln.bench/1` reports and compare.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use kiln_device::{ops, Device, DeviceOptions, SshOptions};
use kiln_graph::inspect::human_bytes;
use kiln_target::TargetSpec;
use serde_json::{json, Value};

use crate::compile::{compile, CompileArgs};

/// How kiln reaches devices: shared by `kiln bench` and `kiln flash`.
#[derive(clap::Args, Clone, Debug)]
pub struct DeviceArgs {
    /// ssh option for ssh:// devices as in `ssh -o KEY=VALUE` (after any in $KILN_SSH_OPTS),
    /// e.g. StrictHostKeyChecking=accept-new. Repeatable.
    #[arg(long = "ssh-opt", value_name = "KEY=VALUE")]
    pub ssh_opts: Vec<String>,
    /// Private key for ssh:// devices (ssh -i).
    #[arg(long = "ssh-identity", value_name = "FILE")]
    pub ssh_identity: Option<PathBuf>,
    /// Seconds to wait for an ssh connection to a device.
    #[arg(long = "connect-timeout", value_name = "SECS", default_value_t = 10)]
    pub connect_timeout: u64,
    /// Kill any step on a device (copy, run, fetch) after this many seconds.
    #[arg(long, value_name = "SECS", default_value_t = kiln_device::DEFAULT_TIMEOUT_SECS)]
    pub timeout: u64,
    /// Parent of the per-run work directory on the device (default: its $TMPDIR or /tmp).
    #[arg(long = "device-dir", value_name = "DIR")]
    pub device_dir: Option<String>,
}

impl Default for DeviceArgs {
    fn default() -> Self {
        DeviceArgs {
            ssh_opts: vec![],
            ssh_identity: None,
            connect_timeout: 10,
            timeout: kiln_device::DEFAULT_TIMEOUT_SECS,
            device_dir: None,
        }
    }
}

impl DeviceArgs {
    /// The device options these flags (and `$KILN_SSH_OPTS`) describe.
    pub fn options(&self) -> Result<DeviceOptions> {
        let mut ssh = SshOptions::from_env_and(&self.ssh_opts, self.ssh_identity.clone())?;
        ssh.connect_timeout_secs = self.connect_timeout.max(1);
        Ok(DeviceOptions {
            ssh,
            work_parent: self.device_dir.clone(),
            timeout: Duration::from_secs(self.timeout.max(1)),
        })
    }
}

/// Arguments of `kiln bench`.
#[derive(clap::Args)]
pub struct BenchArgs {
    /// ONNX model (compiled for each device's target), or an output folder of `kiln compile`.
    pub model: PathBuf,
    /// Device: local, qemu-aarch64, qemu-armv7, ssh://[user@]host[:port]. Repeatable.
    #[arg(long = "device", value_name = "DEVICE", required = true)]
    pub devices: Vec<String>,
    /// Target to compile for; each device uses the first given target its CPU runs
    /// (default: x86_64-linux, aarch64-linux or armv7-linux by its architecture). Repeatable.
    #[arg(long = "target", value_name = "NAME")]
    pub targets: Vec<String>,
    /// Timed runs per device.
    #[arg(long, conflicts_with = "seconds")]
    pub iters: Option<u64>,
    /// Run for this many seconds per device instead of a number of runs.
    #[arg(long)]
    pub seconds: Option<f64>,
    /// Untimed runs first.
    #[arg(long)]
    pub warmup: Option<u64>,
    /// Sample inputs (.npz) to time (default: deterministic synthetic inputs).
    #[arg(long)]
    pub inputs: Option<PathBuf>,
    /// Fix an input's shape (symbolic dims), e.g. input=1x3x224x224. Repeatable.
    #[arg(long = "input-shape", value_name = "NAME=DIMS")]
    pub input_shapes: Vec<String>,
    /// Folder for the compiled outputs (OUT/TARGET/), each device's report
    /// (OUT/bench-DEVICE.json) and the summary (OUT/bench.json).
    #[arg(short = 'o', long = "out")]
    pub out: Option<PathBuf>,
    /// Collect the run's reports through a collector kiln starts for it, into this SQLite
    /// store (default: OUT/kiln.db with -o); `kiln reports --db` reads it.
    #[arg(long)]
    pub db: Option<PathBuf>,
    /// Write the HTML report of the store (latency CDFs, per-op charts, device table).
    #[arg(long, value_name = "OUT.html")]
    pub html: Option<PathBuf>,
    /// Print the summary as JSON (schema kiln.bench-run/1) instead of the table.
    #[arg(long)]
    pub json: bool,
    /// How to reach the devices.
    #[command(flatten)]
    pub device: DeviceArgs,
}

/// What to deploy for one target: the runner, and the model unless embedded in it.
#[derive(Clone)]
struct Build {
    runner: PathBuf,
    model: Option<PathBuf>,
}

/// One device's result.
struct Row {
    device: Device,
    target: Option<String>,
    result: Result<Value>,
}

/// `kiln bench`: returns the rows and writes/prints them; exit 1 if any device failed.
pub fn bench_cmd(a: BenchArgs) -> Result<ExitCode> {
    let rows = bench(&a)?;
    let failed = rows.iter().filter(|r| r.result.is_err()).count();
    let summary = summary(&a.model, &rows);
    if let Some(out) = &a.out {
        for r in &rows {
            if let Ok(report) = &r.result {
                let path = out.join(format!("bench-{}.json", slug(&r.device.to_string())));
                kiln_io::fsutil::write_atomic(
                    &path,
                    serde_json::to_string_pretty(report)?.as_bytes(),
                )?;
            }
        }
        kiln_io::fsutil::write_atomic(
            &out.join("bench.json"),
            serde_json::to_string_pretty(&summary)?.as_bytes(),
        )?;
    }
    let db =
        a.db.clone()
            .or_else(|| a.out.as_ref().map(|o| o.join("kiln.db")));
    let db = match (&db, &a.html) {
        (Some(d), _) => Some(d.clone()),
        (None, Some(h)) => Some(h.with_extension("db")),
        (None, None) => None,
    };
    if let Some(db) = &db {
        collect_run(&rows, db, a.html.as_deref(), a.json)?;
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        print_table(&rows);
        if let Some(out) = &a.out {
            println!("reports in {}", out.display());
        }
    }
    for r in &rows {
        if let Err(e) = &r.result {
            eprintln!("error: {}: {e:#}", r.device);
        }
    }
    Ok(if failed > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// Sends the run's reports to a collector started for this run (the same HTTP path and
/// idempotency keys devices use), then renders the HTML report when asked.
fn collect_run(
    rows: &[Row],
    db: &std::path::Path,
    html: Option<&std::path::Path>,
    json: bool,
) -> Result<()> {
    // With --json, stdout carries only the JSON document.
    let say = |m: String| {
        if json {
            eprintln!("{m}")
        } else {
            println!("{m}")
        }
    };
    if let Some(dir) = db.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let collector = kiln_collect::server::start_ephemeral(db)?;
    let endpoint = kiln_collect::client::Endpoint::parse(&collector.url())?;
    for r in rows {
        if let Ok(report) = &r.result {
            let body = serde_json::to_vec(report)?;
            let key = kiln_collect::spool::idempotency_key(&body);
            let resp = kiln_collect::client::post(
                &endpoint,
                &body,
                &key,
                std::time::Duration::from_secs(10),
            )?;
            if !resp.delivered() {
                anyhow::bail!("the collector refused {}'s report: {:?}", r.device, resp);
            }
        }
    }
    collector.stop();
    let store = kiln_collect::store::Store::open_existing(db)?;
    let all = store.list(&kiln_collect::store::Filter {
        with_body: true,
        ..Default::default()
    })?;
    say(format!(
        "collected into {} ({} report(s) stored)",
        db.display(),
        all.len()
    ));
    if let Some(html) = html {
        let page = kiln_collect::html::render(&all, &db.display().to_string())?;
        kiln_io::fsutil::write_atomic(html, page.as_bytes())?;
        say(format!("wrote {}", html.display()));
    }
    Ok(())
}

/// Resolves devices and targets, compiles what is needed, benchmarks on every device in
/// turn (one at a time: a benchmark must not share the CPU with another).
fn bench(a: &BenchArgs) -> Result<Vec<Row>> {
    let devices: Vec<Device> = a
        .devices
        .iter()
        .map(|d| Device::parse(d))
        .collect::<Result<_>>()?;
    let opts = a.device.options()?;
    let dir = kiln_target::targets_dir()?;
    let specs = kiln_target::load_all(&dir)?;
    let mut candidates: Vec<TargetSpec> = a
        .targets
        .iter()
        .map(|t| kiln_target::find(&dir, t))
        .collect::<Result<_>>()?;
    // A `kiln compile` output folder fixes the target and the files.
    let mut builds: BTreeMap<String, Build> = BTreeMap::new();
    if a.model.is_dir() {
        let (target, build) = read_compiled(&a.model)?;
        if let Some(t) = candidates.iter().find(|c| c.name != target) {
            bail!(
                "{} was compiled for `{target}`; --target {} does not apply (compile again, or pass the ONNX model)",
                a.model.display(),
                t.name
            );
        }
        candidates = vec![kiln_target::find(&dir, &target)?];
        builds.insert(target, build);
    } else if !a.model.is_file() {
        bail!(
            "{} is neither a model file nor a `kiln compile` output folder",
            a.model.display()
        );
    }
    if let Some(i) = &a.inputs {
        if !i.is_file() {
            bail!("--inputs {} does not exist", i.display());
        }
    }

    // Which target each device gets; an unreachable device fails alone.
    let mut plan: Vec<(Device, Result<(String, TargetSpec)>)> = vec![];
    for d in devices {
        let resolved = match d.arch(&opts) {
            Err(e) => Err(e),
            Ok(arch) => {
                let spec = pick_target(&d, &arch, &candidates, &specs).with_context(|| {
                    match (a.model.is_dir(), candidates.first()) {
                        (true, Some(t)) => format!(
                            "{} holds a build for `{}`, which {d} cannot run",
                            a.model.display(),
                            t.name
                        ),
                        _ => format!("no target for {d}"),
                    }
                })?;
                Ok((arch, spec))
            }
        };
        plan.push((d, resolved));
    }

    for (_, r) in &plan {
        if let Ok((_, spec)) = r {
            if !builds.contains_key(&spec.name) {
                let out = match &a.out {
                    Some(o) => o.join(&spec.name),
                    None => scratch_dir()?.join(&spec.name),
                };
                eprintln!("compiling {} for {}", a.model.display(), spec.name);
                let report = compile(&CompileArgs {
                    model: a.model.clone(),
                    target: spec.name.clone(),
                    out: out.clone(),
                    embed: false,
                    runner: None,
                    input_shapes: a.input_shapes.clone(),
                    json: false,
                })?;
                builds.insert(
                    spec.name.clone(),
                    Build {
                        runner: out.join("kiln-runner"),
                        model: Some(out.join(file_name(&report.model_file)?)),
                    },
                );
            }
        }
    }

    let mut runner_args = vec![];
    if let Some(n) = a.iters {
        runner_args.extend(["--iters".to_string(), n.to_string()]);
    }
    if let Some(s) = a.seconds {
        runner_args.extend(["--seconds".to_string(), s.to_string()]);
    }
    if let Some(w) = a.warmup {
        runner_args.extend(["--warmup".to_string(), w.to_string()]);
    }
    let multi = indicatif::MultiProgress::new();
    let style = indicatif::ProgressStyle::with_template("{spinner} {prefix:<32} {wide_msg}")
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner());
    let bars: Vec<indicatif::ProgressBar> = plan
        .iter()
        .map(|(d, _)| {
            let b = multi.add(indicatif::ProgressBar::new_spinner());
            b.set_style(style.clone());
            b.set_prefix(d.to_string());
            b.set_message("waiting");
            b
        })
        .collect();
    let mut rows = vec![];
    for ((device, resolved), bar) in plan.into_iter().zip(bars) {
        bar.enable_steady_tick(Duration::from_millis(120));
        let target = resolved.as_ref().ok().map(|(_, s)| s.name.clone());
        let result = resolved.and_then(|(arch, spec)| {
            let build = &builds[&spec.name];
            let job = ops::BenchJob {
                runner: &build.runner,
                model: build.model.as_deref(),
                inputs: a.inputs.as_deref(),
                runner_args: runner_args.clone(),
            };
            ops::bench(&device, &arch, &spec, &opts, &job, &mut |step| {
                bar.set_message(step.to_string())
            })
        });
        match &result {
            Ok(r) => bar.finish_with_message(format!(
                "done: p50 {:.2} ms",
                r["latency_ms"]["p50"].as_f64().unwrap_or(f64::NAN)
            )),
            Err(_) => bar.finish_with_message("FAILED"),
        }
        rows.push(Row {
            device,
            target,
            result,
        });
    }
    if a.out.is_none() {
        let _ = std::fs::remove_dir_all(scratch_dir()?);
    }
    Ok(rows)
}

/// The target a device gets: the first candidate it runs, else (no candidates) the
/// baseline target of its architecture. A mismatch is an error naming both.
fn pick_target(
    device: &Device,
    arch: &str,
    candidates: &[TargetSpec],
    specs: &[TargetSpec],
) -> Result<TargetSpec> {
    if candidates.is_empty() {
        let spec = kiln_device::default_target(arch, specs)
            .with_context(|| format!("no target in targets/ is for {arch}, the CPU of {device}"))?;
        device.check_runs(arch, spec)?;
        return Ok(spec.clone());
    }
    if let [only] = candidates {
        device.check_runs(arch, only)?;
        return Ok(only.clone());
    }
    let mut first_err = None;
    for c in candidates {
        match device.check_runs(arch, c) {
            Ok(()) => return Ok(c.clone()),
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
    }
    let names: Vec<&str> = candidates.iter().map(|c| c.name.as_str()).collect();
    Err(first_err
        .unwrap_or_else(|| anyhow::anyhow!("no target"))
        .context(format!(
            "device {device} cannot run any of the targets {}",
            names.join(", ")
        )))
}

/// Target and files of a `kiln compile` output folder.
fn read_compiled(dir: &Path) -> Result<(String, Build)> {
    let path = dir.join("compile.json");
    let text = std::fs::read(&path).with_context(|| {
        format!(
            "{} is not a `kiln compile` output folder (no compile.json)",
            dir.display()
        )
    })?;
    let r: Value = serde_json::from_slice(&text)
        .with_context(|| format!("{} is not valid JSON", path.display()))?;
    let field = |k: &str| r[k].as_str().map(String::from);
    let target = field("target").with_context(|| format!("{}: no `target`", path.display()))?;
    let build = match (
        field("runner_file"),
        field("embedded_file"),
        field("model_file"),
    ) {
        (Some(_), _, Some(m)) => Build {
            runner: dir.join("kiln-runner"),
            model: Some(dir.join(file_name(&m)?)),
        },
        (None, Some(e), _) => Build {
            runner: dir.join(file_name(&e)?),
            model: None,
        },
        _ => bail!(
            "{}: names neither a runner nor a single file",
            path.display()
        ),
    };
    for f in [Some(&build.runner), build.model.as_ref()]
        .into_iter()
        .flatten()
    {
        if !f.is_file() {
            bail!("{} lacks {} (compile again)", dir.display(), f.display());
        }
    }
    Ok((target, build))
}

fn file_name(p: &str) -> Result<PathBuf> {
    Path::new(p)
        .file_name()
        .map(PathBuf::from)
        .with_context(|| format!("`{p}` names no file"))
}

/// A per-process scratch folder for compiled outputs when no --out is given.
fn scratch_dir() -> Result<PathBuf> {
    let d = std::env::temp_dir().join(format!("kiln-bench-{}", std::process::id()));
    std::fs::create_dir_all(&d).with_context(|| format!("cannot create {}", d.display()))?;
    Ok(d)
}

/// `ssh://pi@board:22` → `ssh-pi-board-22`, for file names.
fn slug(device: &str) -> String {
    let s: String = device
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    s.split('-')
        .filter(|p| !p.is_empty())
        .collect::<Vec<_>>()
        .join("-")
}

/// The `kiln.bench-run/1` summary: every device's report or error.
fn summary(model: &Path, rows: &[Row]) -> Value {
    json!({
        "schema": "kiln.bench-run/1",
        "model": model.display().to_string(),
        "devices": rows.iter().map(|r| json!({
            "device": r.device.to_string(),
            "target": r.target,
            "ok": r.result.is_ok(),
            "error": r.result.as_ref().err().map(|e| format!("{e:#}")),
            "report": r.result.as_ref().ok(),
        })).collect::<Vec<_>>(),
    })
}

/// The comparison table, one line per device.
fn print_table(rows: &[Row]) {
    println!(
        "{:<28} {:<18} {:<9} {:>9} {:>9} {:>9} {:>11} {:>10} {:>10}",
        "device",
        "target",
        "emulated",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "per second",
        "cold ms",
        "peak RSS"
    );
    for r in rows {
        let target = r.target.as_deref().unwrap_or("?");
        match &r.result {
            Ok(j) => {
                let l = |k: &str| j["latency_ms"][k].as_f64().unwrap_or(f64::NAN);
                println!(
                    "{:<28} {:<18} {:<9} {:>9.3} {:>9.3} {:>9.3} {:>11.1} {:>10.1} {:>10}",
                    r.device.to_string(),
                    target,
                    if j["emulated"].as_bool().unwrap_or(false) {
                        "yes"
                    } else {
                        "no"
                    },
                    l("p50"),
                    l("p90"),
                    l("p99"),
                    j["throughput_per_s"].as_f64().unwrap_or(f64::NAN),
                    j["cold_start_ms"]["total"].as_f64().unwrap_or(f64::NAN),
                    j["peak_rss_bytes"]
                        .as_u64()
                        .map(human_bytes)
                        .unwrap_or_else(|| "?".into()),
                );
            }
            Err(_) => println!(
                "{:<28} {:<18} FAILED (see below)",
                r.device.to_string(),
                target
            ),
        }
    }
    if rows
        .iter()
        .any(|r| r.result.as_ref().is_ok_and(|j| j["emulated"] == true))
    {
        println!("(emulated rows ran under qemu-user: correct, but their timings mean nothing)");
    }
}
