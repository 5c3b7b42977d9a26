//! The system's OpenSSH client: options (`KILN_SSH_OPTS`, `--ssh-opt`, identity file),
//! remote commands with time limits, shell quoting, and files streamed over the
//! connection (`cat > FILE`, which needs no sftp-server on the board and reports the
//! device's own error, such as "No space left on device").

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::device::SshAddr;
use crate::process::{self, Finished};

/// Environment variable with extra `Key=Value` ssh options, whitespace-separated
/// (`StrictHostKeyChecking=accept-new UserKnownHostsFile=/tmp/kh`).
pub const ENV_OPTS: &str = "KILN_SSH_OPTS";

/// How kiln calls `ssh`.
#[derive(Debug, Clone)]
pub struct SshOptions {
    /// `Key=Value` options passed as `-o`, before kiln's defaults (ssh keeps the first
    /// value it sees for each key, so these win).
    pub options: Vec<String>,
    /// Private key file (`-i`).
    pub identity: Option<PathBuf>,
    /// `ConnectTimeout` in seconds unless set in `options`.
    pub connect_timeout_secs: u64,
}

impl Default for SshOptions {
    fn default() -> Self {
        SshOptions {
            options: vec![],
            identity: None,
            connect_timeout_secs: 10,
        }
    }
}

impl SshOptions {
    /// Options from `$KILN_SSH_OPTS` followed by `extra` (`--ssh-opt`), checked to be
    /// `Key=Value`.
    pub fn from_env_and(extra: &[String], identity: Option<PathBuf>) -> Result<SshOptions> {
        let mut options: Vec<String> = std::env::var(ENV_OPTS)
            .unwrap_or_default()
            .split_whitespace()
            .map(String::from)
            .collect();
        options.extend(extra.iter().cloned());
        for o in &options {
            let ok = o.split_once('=').is_some_and(|(k, _)| {
                !k.is_empty() && k.chars().all(|c| c.is_ascii_alphanumeric())
            });
            if !ok {
                bail!("ssh option `{o}` is not Key=Value (as in ssh -o, e.g. StrictHostKeyChecking=accept-new; from --ssh-opt or ${ENV_OPTS})");
            }
        }
        if let Some(i) = &identity {
            if !i.is_file() {
                bail!("ssh identity file {} does not exist", i.display());
            }
        }
        Ok(SshOptions {
            options,
            identity,
            ..Default::default()
        })
    }

    /// `ssh` arguments before the destination: the user's options, then kiln's defaults
    /// (never prompt, bounded connect, detect a dead link).
    fn args(&self, port: Option<u16>) -> Vec<String> {
        let mut a = vec![];
        for o in &self.options {
            a.push("-o".into());
            a.push(o.clone());
        }
        if let Some(i) = &self.identity {
            a.push("-i".into());
            a.push(i.display().to_string());
        }
        for d in [
            "BatchMode=yes".to_string(),
            format!("ConnectTimeout={}", self.connect_timeout_secs),
            "ServerAliveInterval=5".into(),
            "ServerAliveCountMax=3".into(),
            "LogLevel=ERROR".into(),
        ] {
            a.push("-o".into());
            a.push(d);
        }
        if let Some(p) = port {
            a.push("-p".into());
            a.push(p.to_string());
        }
        a
    }
}

/// `ssh [options] -- DEST SCRIPT`: SCRIPT runs in the login shell on the device.
fn command(addr: &SshAddr, opts: &SshOptions, script: &str) -> Command {
    let mut cmd = Command::new("ssh");
    cmd.args(opts.args(addr.port))
        .arg("--")
        .arg(addr.destination())
        .arg(script);
    cmd
}

/// The ssh connection failed (exit 255): unreachable host, refused connection, refused
/// key, unknown host key.
#[derive(Debug)]
pub struct Unreachable {
    /// ssh's message.
    pub detail: String,
}

impl std::fmt::Display for Unreachable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ssh failed to connect or lost the connection: {}",
            self.detail
        )
    }
}

impl std::error::Error for Unreachable {}

/// Runs `script` on the device within `limit`; fails with [`Unreachable`] when ssh
/// itself fails (exit 255) and with [`process::TimedOut`] past the limit.
pub fn run_remote(
    addr: &SshAddr,
    opts: &SshOptions,
    script: &str,
    limit: Duration,
) -> Result<Finished> {
    finish(process::run(command(addr, opts, script), limit)?)
}

/// Streams the host file `from` into `to` on the device (`cat > TO`) within `limit`.
pub fn upload(
    addr: &SshAddr,
    opts: &SshOptions,
    from: &Path,
    to: &str,
    mode: &str,
    limit: Duration,
) -> Result<Finished> {
    let file =
        std::fs::File::open(from).with_context(|| format!("cannot read {}", from.display()))?;
    let script = format!("cat > {q} && chmod {mode} {q}", q = quote(to));
    finish(process::run_with_stdin(
        command(addr, opts, &script),
        Stdio::from(file),
        limit,
    )?)
}

fn finish(f: Finished) -> Result<Finished> {
    if f.code == Some(255) {
        bail!(Unreachable {
            detail: f.stderr_tail()
        });
    }
    Ok(f)
}

/// Quotes `s` for a POSIX shell: `'it'\''s'`.
pub fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_for_the_shell() {
        assert_eq!(quote("a b"), "'a b'");
        assert_eq!(quote("it's"), r"'it'\''s'");
    }

    #[test]
    fn user_options_come_first_and_are_checked() {
        let o = SshOptions {
            options: vec!["ConnectTimeout=2".into()],
            ..Default::default()
        };
        let a = o.args(Some(2222));
        assert_eq!(a[..2], ["-o", "ConnectTimeout=2"]);
        assert!(a.ends_with(&["-p".to_string(), "2222".to_string()]));
        let e = SshOptions::from_env_and(&["-oProxyCommand=x".into()], None).unwrap_err();
        assert!(format!("{e}").contains("not Key=Value"), "{e}");
    }
}
