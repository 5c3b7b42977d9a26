//! One use of a device: a fresh work directory on it, files staged into it, the runner run
//! there with a time limit, reports fetched back, and the directory removed.
//!
//! `local` and `qemu-*` devices share this machine's filesystem: staging a file is using
//! its host path, and the work directory is a host temporary directory. `ssh://` devices
//! get a `mktemp -d` directory that files are streamed into.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use kiln_target::TargetSpec;

use crate::device::{Device, SshAddr};
use crate::process::{self, Finished, TimedOut};
use crate::ssh::{self, quote};
use crate::DeviceOptions;

/// A work directory on a device and what runs in it.
pub struct Session<'a> {
    device: &'a Device,
    spec: &'a TargetSpec,
    opts: &'a DeviceOptions,
    work: Work,
}

enum Work {
    Host(tempfile::TempDir),
    Remote {
        addr: SshAddr,
        dir: String,
        removed: bool,
    },
}

/// A human reading of a device's error text: what went wrong in words.
fn classify(stderr: &str) -> &'static str {
    if stderr.contains("No space left") || stderr.contains("Disk quota exceeded") {
        "no space left on the device: "
    } else if stderr.contains("Permission denied") || stderr.contains("Operation not permitted") {
        "no write permission on the device: "
    } else if stderr.contains("Read-only file system") {
        "the device's file system is read-only: "
    } else if stderr.contains("No such file or directory") || stderr.contains("Not a directory") {
        "the directory does not exist on the device: "
    } else {
        ""
    }
}

impl<'a> Session<'a> {
    /// Checks that `device` (whose CPU is `arch`) runs `spec`'s runners, then creates the
    /// work directory on it.
    pub fn open(
        device: &'a Device,
        spec: &'a TargetSpec,
        arch: &str,
        opts: &'a DeviceOptions,
    ) -> Result<Session<'a>> {
        device.check_runs(arch, spec)?;
        let work = match device {
            Device::Local | Device::Qemu(_) => {
                let parent = opts
                    .work_parent
                    .as_ref()
                    .map(PathBuf::from)
                    .unwrap_or_else(std::env::temp_dir);
                let dir = tempfile::Builder::new()
                    .prefix("kiln.")
                    .tempdir_in(&parent)
                    .map_err(|e| {
                        let text = e.to_string();
                        anyhow::anyhow!(
                            "cannot create a work directory under {} on {device}: {}{text}",
                            parent.display(),
                            classify(&text)
                        )
                    })?;
                Work::Host(dir)
            }
            Device::Ssh(addr) => {
                let parent = match &opts.work_parent {
                    Some(p) => quote(p),
                    None => "\"${TMPDIR:-/tmp}\"".into(),
                };
                let f = ssh::run_remote(
                    addr,
                    &opts.ssh,
                    &format!("mktemp -d {parent}/kiln.XXXXXX"),
                    opts.timeout,
                )
                .with_context(|| format!("cannot reach {device}"))?;
                let dir = f.stdout_text().trim().to_string();
                if !f.success() || !dir.starts_with('/') {
                    let tail = f.stderr_tail();
                    bail!(
                        "cannot create a work directory under {} on {device} ({}): {}{tail}",
                        opts.work_parent.as_deref().unwrap_or("$TMPDIR or /tmp"),
                        f.describe_status(),
                        classify(&tail)
                    );
                }
                Work::Remote {
                    addr: addr.clone(),
                    dir,
                    removed: false,
                }
            }
        };
        Ok(Session {
            device,
            spec,
            opts,
            work,
        })
    }

    /// The work directory's path on the device.
    pub fn work_dir(&self) -> String {
        match &self.work {
            Work::Host(d) => d.path().display().to_string(),
            Work::Remote { dir, .. } => dir.clone(),
        }
    }

    /// Path on the device of `name` inside the work directory.
    pub fn work_path(&self, name: &str) -> String {
        format!("{}/{name}", self.work_dir())
    }

    /// Makes the host file `host` available on the device and returns its device path:
    /// the host path itself on local/qemu devices, a copy in the work directory on ssh
    /// devices (mode 755 when `executable`).
    pub fn stage(&self, host: &Path, executable: bool) -> Result<String> {
        let size = std::fs::metadata(host)
            .with_context(|| format!("cannot read {}", host.display()))?
            .len();
        match &self.work {
            Work::Host(_) => Ok(std::path::absolute(host)
                .unwrap_or_else(|_| host.to_path_buf())
                .display()
                .to_string()),
            Work::Remote { addr, dir, .. } => {
                let name = host
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_else(|| "file".into());
                let dest = format!("{dir}/{name}");
                let mode = if executable { "755" } else { "644" };
                let f = ssh::upload(addr, &self.opts.ssh, host, &dest, mode, self.opts.timeout)
                    .with_context(|| {
                        format!("copying {} to {}:{dest}", host.display(), self.device)
                    })?;
                if !f.success() {
                    let tail = f.stderr_tail();
                    bail!(
                        "cannot copy {} ({size} bytes) to {}:{dest}: {}{tail}",
                        host.display(),
                        self.device,
                        classify(&tail)
                    );
                }
                Ok(dest)
            }
        }
    }

    /// Runs `program` (a staged runner) with `args` in the work directory, within the time
    /// limit. A non-zero exit is returned, not an error: see [`Session::check`].
    pub fn run(&self, program: &str, args: &[String]) -> Result<Finished> {
        let limit = self.opts.timeout;
        let what = || format!("kiln-runner on {}", self.device);
        match &self.work {
            Work::Host(_) => {
                let mut cmd = kiln_target::emulate::command(self.spec, Path::new(program))?;
                cmd.args(args);
                process::run(cmd, limit).with_context(what)
            }
            Work::Remote { addr, dir, .. } => {
                let mut line = quote(program);
                for a in args {
                    line.push(' ');
                    line.push_str(&quote(a));
                }
                // The device's own `timeout` kills the runner there; ours (a little later)
                // kills ssh when the link itself hangs.
                let secs = limit.as_secs().max(1);
                let script = format!(
                    "cd {} || exit 1; if command -v timeout >/dev/null 2>&1; then timeout -k 5 {secs} {line}; else {line}; fi; st=$?; exit $st",
                    quote(dir)
                );
                let f = ssh::run_remote(
                    addr,
                    &self.opts.ssh,
                    &script,
                    limit + Duration::from_secs(15),
                )
                .with_context(what)?;
                if f.code == Some(124) {
                    return Err(anyhow::Error::new(TimedOut {
                        limit,
                        stderr_tail: f.stderr_tail(),
                    }))
                    .with_context(what);
                }
                Ok(f)
            }
        }
    }

    /// Fails, naming the device, the exit status and the stderr tail, unless `f` succeeded.
    pub fn check(&self, f: &Finished) -> Result<()> {
        if !f.success() {
            bail!(
                "kiln-runner failed on {} with {}; stderr tail:\n{}",
                self.device,
                f.describe_status(),
                f.stderr_tail()
            );
        }
        Ok(())
    }

    /// Reads the file at `path` on the device.
    pub fn fetch(&self, path: &str) -> Result<Vec<u8>> {
        match &self.work {
            Work::Host(_) => std::fs::read(path)
                .with_context(|| format!("cannot read {path} written on {}", self.device)),
            Work::Remote { addr, .. } => {
                let f = ssh::run_remote(
                    addr,
                    &self.opts.ssh,
                    &format!("cat {}", quote(path)),
                    self.opts.timeout,
                )
                .with_context(|| format!("fetching {path} from {}", self.device))?;
                if !f.success() {
                    bail!(
                        "cannot fetch {path} from {}: {}",
                        self.device,
                        f.stderr_tail()
                    );
                }
                Ok(f.stdout)
            }
        }
    }

    /// Removes the work directory (also done, best effort, when the session is dropped).
    pub fn close(mut self) -> Result<()> {
        self.remove(self.opts.timeout)
    }

    fn remove(&mut self, limit: Duration) -> Result<()> {
        if let Work::Remote { addr, dir, removed } = &mut self.work {
            if !*removed {
                *removed = true;
                let f = ssh::run_remote(
                    addr,
                    &self.opts.ssh,
                    &format!("rm -rf -- {}", quote(dir)),
                    limit,
                )?;
                if !f.success() {
                    bail!(
                        "cannot remove the work directory {dir} on {}: {}",
                        self.device,
                        f.stderr_tail()
                    );
                }
            }
        }
        Ok(())
    }
}

impl Drop for Session<'_> {
    fn drop(&mut self) {
        let _ = self.remove(Duration::from_secs(10));
    }
}
