//! `kiln keygen`, `kiln package`, `kiln verify`: signed artifacts on the host.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use kiln_artifact::manifest::RUNNER_FILE;
use kiln_artifact::write::ZSTD_LEVEL;
use kiln_artifact::{keys, Limits, Manifest};
use kiln_graph::inspect::human_bytes;
use kiln_pipeline::package::{build_artifact, ArtifactJob};

/// `kiln keygen -o KEY`: KEY (PKCS#8 PEM, mode 0600) and KEY.pub (SPKI PEM).
pub fn keygen(out: &Path, force: bool) -> Result<ExitCode> {
    let public = pub_path(out);
    if !force && (out.exists() || public.exists()) {
        bail!(
            "{} or {} exists; refusing to overwrite a key (use --force)",
            out.display(),
            public.display()
        );
    }
    let key = keys::generate()?;
    let private = keys::private_pem(&key)?;
    kiln_io::fsutil::write_atomic_with(out, |f| {
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        }
        f.write_all(private.as_bytes())?;
        Ok(())
    })?;
    kiln_io::fsutil::write_atomic(&public, keys::public_pem(&key.verifying_key())?.as_bytes())?;
    println!(
        "wrote {} (private, mode 600) and {} (public)",
        out.display(),
        public.display()
    );
    println!("key id {}", keys::key_id(&key.verifying_key()));
    Ok(ExitCode::SUCCESS)
}

fn pub_path(key: &Path) -> PathBuf {
    let mut s = key.as_os_str().to_owned();
    s.push(".pub");
    PathBuf::from(s)
}

/// Arguments of `kiln package`.
#[derive(clap::Args)]
pub struct PackageArgs {
    /// Output folder of `kiln compile`.
    pub dir: PathBuf,
    /// Private signing key (from `kiln keygen`).
    #[arg(long)]
    pub key: PathBuf,
    /// Artifact version; devices refuse versions not newer than the installed one.
    #[arg(long)]
    pub version: u64,
    /// Artifact path (.kiln).
    #[arg(short = 'o', long = "out")]
    pub out: PathBuf,
    /// Inputs for the on-device self-test (default: deterministic synthetic inputs).
    #[arg(long)]
    pub golden_inputs: Option<PathBuf>,
    /// Ship the runner inside the artifact too.
    #[arg(long)]
    pub with_runner: bool,
    /// Expected top-1 accuracy to record in the manifest.
    #[arg(long)]
    pub accuracy: Option<f64>,
}

/// `kiln package DIR`: the `kiln compile` output signed into one artifact.
pub fn package_cmd(a: PackageArgs) -> Result<ExitCode> {
    let key = keys::read_private_key(&a.key)?;
    let compile_json = a.dir.join("compile.json");
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&compile_json).with_context(|| {
            format!(
                "{} is not a `kiln compile` output folder (no compile.json)",
                a.dir.display()
            )
        })?)
        .with_context(|| format!("{} is not valid JSON", compile_json.display()))?;
    let field = |k: &str| {
        report[k]
            .as_str()
            .map(String::from)
            .with_context(|| format!("{}: missing `{k}`", compile_json.display()))
    };
    let target = field("target")?;
    let model_path = a.dir.join(
        Path::new(&field("model_file")?)
            .file_name()
            .context("bad model_file")?,
    );
    let model_bytes = std::fs::read(&model_path)
        .with_context(|| format!("cannot read {}", model_path.display()))?;
    let runner = if a.with_runner {
        let runner = a.dir.join(RUNNER_FILE);
        Some(
            std::fs::read(&runner)
                .with_context(|| format!("--with-runner: cannot read {}", runner.display()))?,
        )
    } else {
        None
    };
    let runner_zst = match &runner {
        Some(r) => zstd::bulk::compress(r, ZSTD_LEVEL)?.len(),
        None => 0,
    };
    let name = model_path
        .file_name()
        .unwrap()
        .to_string_lossy()
        .trim_end_matches(".nnef.tar")
        .to_string();
    let (bytes, manifest) = build_artifact(
        ArtifactJob {
            name,
            version: a.version,
            target,
            model_path: &model_path,
            model_bytes: model_bytes.clone(),
            golden_inputs: a.golden_inputs.as_deref(),
            runner,
            accuracy: a.accuracy,
        },
        &key,
    )?;
    kiln_io::fsutil::write_atomic(&a.out, &bytes)?;
    let model_zst = zstd::bulk::compress(&model_bytes, ZSTD_LEVEL)?.len();
    println!(
        "packaged {} v{} for {} -> {} ({}; model {} -> {} compressed{}, overhead {} for manifest, signature and golden data)",
        manifest.name,
        manifest.version,
        manifest.target,
        a.out.display(),
        human_bytes(bytes.len() as u64),
        human_bytes(model_bytes.len() as u64),
        human_bytes(model_zst as u64),
        if runner_zst > 0 { format!(", runner {} compressed", human_bytes(runner_zst as u64)) } else { String::new() },
        human_bytes((bytes.len() - model_zst - runner_zst) as u64),
    );
    println!("signed with key {}", manifest.key_id);
    Ok(ExitCode::SUCCESS)
}

/// `kiln verify app.kiln --pubkey PUB`: signature, hashes, structure, limits.
pub fn verify_cmd(artifact: &Path, pubkey: &Path, json: bool) -> Result<ExitCode> {
    let key = keys::read_public_key(pubkey)?;
    let file = std::fs::File::open(artifact)
        .with_context(|| format!("cannot open {}", artifact.display()))?;
    let t0 = std::time::Instant::now();
    let v = kiln_artifact::verify_only(std::io::BufReader::new(file), &[key], &Limits::default())
        .with_context(|| format!("{} failed verification", artifact.display()))?;
    let m: &Manifest = &v.manifest;
    if json {
        println!("{}", serde_json::to_string_pretty(m)?);
    } else {
        println!(
            "{}: OK — {} v{} for {} ({}), signed by key {}, {} files, {} unpacked, verified in {:.0} ms",
            artifact.display(),
            m.name,
            m.version,
            m.target,
            m.precision,
            m.key_id,
            m.files.len(),
            human_bytes(m.payload_bytes()),
            t0.elapsed().as_secs_f64() * 1e3
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Arguments of `kiln flash`.
#[derive(clap::Args)]
pub struct FlashArgs {
    /// The .kiln artifact.
    pub artifact: PathBuf,
    /// Device: local, qemu-aarch64, qemu-armv7, ssh://[user@]host[:port].
    #[arg(long)]
    pub device: String,
    /// Trusted public keys on the device (a folder of .pub files; a path on the device).
    #[arg(long)]
    pub keys: PathBuf,
    /// Install root on the device.
    #[arg(long, default_value = "/var/lib/kiln")]
    pub root: PathBuf,
    /// Accept a version not newer than the installed one.
    #[arg(long)]
    pub allow_downgrade: bool,
    /// How to reach the device.
    #[command(flatten)]
    pub device_args: crate::bench::DeviceArgs,
}

/// `kiln flash app.kiln --device D`: deploy the artifact's runner and the artifact to a
/// device, install there (verify, self-test, switch slots), print the outcome.
pub fn flash_cmd(a: &FlashArgs) -> Result<ExitCode> {
    let device = kiln_device::Device::parse(&a.device)?;
    let opts = a.device_args.options()?;
    // The manifest says which target (and so which runner) the artifact is for; reading it
    // here needs no trust: the device verifies everything itself.
    let target = peek_target(&a.artifact)?;
    let spec = kiln_target::find(&kiln_target::targets_dir()?, &target)?;
    let arch = device.arch(&opts)?;
    device
        .check_runs(&arch, &spec)
        .with_context(|| format!("artifact {} is for `{target}`", a.artifact.display()))?;
    let runner = crate::compile::runner_for(&spec, None)?;
    let device_path = |p: &Path, flag: &str| -> Result<String> {
        let p = match device {
            kiln_device::Device::Ssh(_) if !p.is_absolute() => {
                bail!(
                    "--{flag} {} must be an absolute path on {device}",
                    p.display()
                )
            }
            kiln_device::Device::Ssh(_) => p.to_path_buf(),
            _ => std::path::absolute(p)?,
        };
        p.to_str()
            .map(String::from)
            .with_context(|| format!("--{flag} {} is not UTF-8", p.display()))
    };
    let (keys, root) = (device_path(&a.keys, "keys")?, device_path(&a.root, "root")?);
    let outcome = kiln_device::ops::install(
        &device,
        &arch,
        &spec,
        &opts,
        &kiln_device::ops::InstallJob {
            runner: &runner,
            artifact: &a.artifact,
            keys: &keys,
            root: &root,
            allow_downgrade: a.allow_downgrade,
        },
    )?;
    let name = a.artifact.display();
    match &outcome.report {
        Some(r) if outcome.installed => println!(
            "   flashed {name} to {device}: {} v{} active in slot {} ({})",
            r["name"].as_str().unwrap_or("?"),
            r["version"],
            r["active_slot"].as_str().unwrap_or("?"),
            r["detail"].as_str().unwrap_or("")
        ),
        Some(r) => eprintln!(
            "   {name} refused by {device} ({}): {}; active stays v{}",
            r["outcome"].as_str().unwrap_or("?"),
            r["detail"].as_str().unwrap_or("?"),
            r["active_version"]
        ),
        None => eprintln!("{}", outcome.finished.stderr_tail()),
    }
    Ok(if outcome.installed {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// The `target` field of an artifact's manifest, without verifying anything.
fn peek_target(artifact: &Path) -> Result<String> {
    let file = std::fs::File::open(artifact)
        .with_context(|| format!("cannot open {}", artifact.display()))?;
    let decoder = zstd::stream::read::Decoder::new(file)?;
    let mut tar = tar::Archive::new(decoder);
    let mut entries = tar
        .entries()
        .with_context(|| format!("{} is not a kiln artifact", artifact.display()))?;
    let mut first = entries
        .next()
        .with_context(|| format!("{} is empty", artifact.display()))??;
    let mut bytes = vec![];
    std::io::Read::take(&mut first, kiln_artifact::manifest::MAX_MANIFEST_BYTES)
        .read_to_end(&mut bytes)?;
    let v: serde_json::Value = serde_json::from_slice(&bytes)
        .with_context(|| format!("{} has no readable manifest", artifact.display()))?;
    v["target"]
        .as_str()
        .map(String::from)
        .with_context(|| format!("{}: manifest names no target", artifact.display()))
}
