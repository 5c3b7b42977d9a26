//! Report-back (`--report-to URL`): spool the report first, then send every spooled
//! report to the collector with retries; see kiln_collect::spool.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use kiln_collect::client::Endpoint;
use kiln_collect::spool::{RetryPolicy, Spool};

use crate::{usage, Opts};

/// Default retry window for one invocation, seconds.
const DEFAULT_RETRY_SECONDS: f64 = 30.0;

/// Some reports stay in the spool undelivered (exit code 3): nothing is lost.
#[derive(Debug)]
pub struct NotDelivered(pub String);

impl std::fmt::Display for NotDelivered {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for NotDelivered {}

/// Where and how to send reports, checked before any work is done.
pub struct ReportBack {
    endpoint: Endpoint,
    spool: Spool,
    retry: Duration,
}

impl ReportBack {
    /// From `--report-to`, `--spool`, `--retry-for`; None without `--report-to`.
    pub fn from_opts(o: &Opts, root: &Path) -> Result<Option<ReportBack>> {
        let Some(url) = o.get("--report-to") else {
            for flag in ["--spool", "--retry-for"] {
                if o.get(flag).is_some() {
                    return Err(usage(format!("{flag} only makes sense with --report-to")));
                }
            }
            return Ok(None);
        };
        let endpoint = Endpoint::parse(url).map_err(|e| usage(format!("--report-to: {e:#}")))?;
        let retry = match o.get("--retry-for") {
            None => DEFAULT_RETRY_SECONDS,
            Some(v) => v
                .parse::<f64>()
                .ok()
                .filter(|x| x.is_finite() && (0.0..=86400.0).contains(x))
                .ok_or_else(|| {
                    usage(format!(
                        "--retry-for `{v}` is not a number of seconds (0 to 86400)"
                    ))
                })?,
        };
        let spool = match o.get("--spool") {
            Some(dir) => Spool::open(Path::new(dir))?,
            None => default_spool(o, root)?,
        };
        Ok(Some(ReportBack {
            endpoint,
            spool,
            retry: Duration::from_secs_f64(retry),
        }))
    }

    /// Spools `report` (if any), then sends everything spooled, oldest first.
    pub fn send(&self, report: Option<&[u8]>) -> Result<()> {
        if let Some(r) = report {
            self.spool.add(r)?;
        }
        let url = self.endpoint.url();
        let outcome = self.spool.flush(
            &self.endpoint,
            &RetryPolicy::within(self.retry),
            &mut |line| eprintln!("kiln-runner: report-back to {url}: {line}"),
        )?;
        if outcome.sent + outcome.duplicates > 0 {
            eprintln!(
                "kiln-runner: delivered {} report(s) to {url}{}",
                outcome.sent + outcome.duplicates,
                if outcome.duplicates > 0 {
                    format!(" ({} the collector already had)", outcome.duplicates)
                } else {
                    String::new()
                }
            );
        }
        if outcome.remaining > 0 {
            return Err(NotDelivered(format!(
                "{} report(s) not delivered to {url} within {:.0} s ({}); kept in {}: the next --report-to run or `kiln-runner send-spool --report-to {url}` sends them",
                outcome.remaining,
                self.retry.as_secs_f64(),
                outcome.last_error.as_deref().unwrap_or("no answer"),
                self.spool.dir().display()
            ))
            .into());
        }
        if let Some((path, reason)) = outcome.rejected.first() {
            anyhow::bail!(
                "the collector refused {} report(s) ({reason}); kept in {}",
                outcome.rejected.len(),
                path.parent().unwrap_or(path).display()
            );
        }
        Ok(())
    }
}

/// `ROOT/spool`; when that cannot be created and no root was asked for explicitly (the
/// default /var/lib/kiln as a non-root user), a folder under the temp dir, with a warning.
fn default_spool(o: &Opts, root: &Path) -> Result<Spool> {
    let dir = root.join("spool");
    match Spool::open(&dir) {
        Ok(s) => Ok(s),
        Err(e) if o.get("--root").is_none() && std::env::var_os("KILN_ROOT").is_none() => {
            let fallback: PathBuf = std::env::temp_dir().join("kiln-spool");
            eprintln!(
                "warning: {e:#}; spooling in {} instead (set --spool or KILN_ROOT to keep reports across reboots)",
                fallback.display()
            );
            Spool::open(&fallback).context("no usable report spool")
        }
        Err(e) => Err(e),
    }
}
