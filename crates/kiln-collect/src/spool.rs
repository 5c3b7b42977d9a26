//! The device-side spool: every report is written (atomically) to a folder before it is
//! sent, and removed only after the collector answered 2xx. Sending retries with bounded
//! exponential back-off; the idempotency key (SHA-256 of the exact report bytes) lets the
//! collector store a re-sent report once.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};

use crate::client::{self, Endpoint};

/// Subfolder for reports the collector refused for good (4xx): kept, no longer retried.
pub const REJECTED_DIR: &str = "rejected";

/// The idempotency key of a report: lowercase hex SHA-256 of its exact bytes.
pub fn idempotency_key(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// How long and how often to retry.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Total time budget for a flush (0: one attempt per report, no waiting).
    pub total: Duration,
    /// First pause after a failure; doubles after each further failure...
    pub first_backoff: Duration,
    /// ...up to this.
    pub max_backoff: Duration,
    /// Bound on connecting and on each read or write of one request.
    pub request_timeout: Duration,
}

impl RetryPolicy {
    /// The runner's default back-off (200 ms doubling to 5 s) within `total`.
    pub fn within(total: Duration) -> RetryPolicy {
        RetryPolicy {
            total,
            first_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(5),
            request_timeout: Duration::from_secs(10),
        }
    }
}

/// What a flush did.
#[derive(Debug, Default)]
pub struct FlushReport {
    /// Reports the collector stored now.
    pub sent: usize,
    /// Reports the collector already had (a retry after a lost answer): removed too.
    pub duplicates: usize,
    /// Reports refused for good (4xx), moved to `rejected/`, with the collector's reason.
    pub rejected: Vec<(PathBuf, String)>,
    /// Reports still in the spool (collector unreachable until the time budget ran out).
    pub remaining: usize,
    /// The last delivery error, when some report remains.
    pub last_error: Option<String>,
}

/// A spool folder.
#[derive(Debug, Clone)]
pub struct Spool {
    dir: PathBuf,
}

impl Spool {
    /// Opens (creating it if needed) the spool folder `dir`.
    pub fn open(dir: &Path) -> Result<Spool> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create the report spool {}", dir.display()))?;
        Ok(Spool {
            dir: dir.to_path_buf(),
        })
    }

    /// The folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Writes a report into the spool (atomically: a crash leaves it whole or absent) and
    /// returns its path. Names sort by creation time, so older reports are sent first.
    pub fn add(&self, report: &[u8]) -> Result<PathBuf> {
        let key = idempotency_key(report);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let path = self.dir.join(format!("{nanos:020}-{}.json", &key[..16]));
        write_atomic(&path, report)
            .with_context(|| format!("cannot spool the report in {}", self.dir.display()))?;
        Ok(path)
    }

    /// Spooled reports waiting to be sent, oldest first (temp files and `rejected/` left out).
    pub fn entries(&self) -> Result<Vec<PathBuf>> {
        let mut out = vec![];
        for e in std::fs::read_dir(&self.dir)
            .with_context(|| format!("cannot list the report spool {}", self.dir.display()))?
        {
            let e = e?;
            let name = e.file_name().to_string_lossy().into_owned();
            if !name.starts_with('.') && name.ends_with(".json") && e.file_type()?.is_file() {
                out.push(e.path());
            }
        }
        out.sort();
        Ok(out)
    }

    /// Sends every spooled report, oldest first, retrying within `policy`; `log` hears
    /// about each failure and refusal. Unsent reports stay for the next flush.
    pub fn flush(
        &self,
        endpoint: &Endpoint,
        policy: &RetryPolicy,
        log: &mut dyn FnMut(&str),
    ) -> Result<FlushReport> {
        let deadline = Instant::now() + policy.total;
        let mut report = FlushReport::default();
        let entries = self.entries()?;
        for (i, path) in entries.iter().enumerate() {
            let bytes = match std::fs::read(path) {
                Ok(b) => b,
                // Another flush (a concurrent runner) delivered it meanwhile.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
            };
            let key = idempotency_key(&bytes);
            let mut backoff = policy.first_backoff;
            let mut attempt = 0u32;
            loop {
                attempt += 1;
                let left = deadline.saturating_duration_since(Instant::now());
                let timeout = policy
                    .request_timeout
                    .min(left)
                    .max(Duration::from_millis(500));
                let failure = match client::post(endpoint, &bytes, &key, timeout) {
                    Ok(r) if r.delivered() => {
                        remove(path)?;
                        if r.body.contains("\"duplicate\"") {
                            report.duplicates += 1;
                        } else {
                            report.sent += 1;
                        }
                        break;
                    }
                    // Refused for good: retrying the same bytes cannot help.
                    Ok(r) if (400..500).contains(&r.status) && ![408, 429].contains(&r.status) => {
                        let reason = format!("HTTP {}: {}", r.status, r.body.trim());
                        log(&format!(
                            "collector refused {} ({reason}); moved to {}/",
                            path.display(),
                            REJECTED_DIR
                        ));
                        let dest = self.reject(path)?;
                        report.rejected.push((dest, reason));
                        break;
                    }
                    Ok(r) => format!(
                        "HTTP {} from {}: {}",
                        r.status,
                        endpoint.url(),
                        r.body.trim()
                    ),
                    Err(e) => format!("{e:#}"),
                };
                let pause = jitter(backoff);
                if Instant::now() + pause > deadline {
                    log(&format!(
                        "attempt {attempt} failed: {failure}; giving up for now"
                    ));
                    report.remaining = entries[i..].iter().filter(|p| p.exists()).count();
                    report.last_error = Some(failure);
                    return Ok(report);
                }
                log(&format!(
                    "attempt {attempt} failed: {failure}; retrying in {} ms",
                    pause.as_millis()
                ));
                std::thread::sleep(pause);
                backoff = (backoff * 2).min(policy.max_backoff);
            }
        }
        Ok(report)
    }

    /// Moves a refused report into `rejected/`.
    fn reject(&self, path: &Path) -> Result<PathBuf> {
        let dir = self.dir.join(REJECTED_DIR);
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let dest = dir.join(path.file_name().context("spool entry without a name")?);
        std::fs::rename(path, &dest)
            .with_context(|| format!("cannot move {} to {}", path.display(), dest.display()))?;
        sync_dir(&self.dir);
        Ok(dest)
    }
}

/// Writes `bytes` to `path` through a temp file in the same folder, fsync, rename, fsync
/// of the folder: the steps of `kiln_io::fsutil::write_atomic`, repeated here so that this
/// crate (and xtask, which sends reports) does not link tract through kiln-io.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let dir = path.parent().context("spool entry without a folder")?;
    let name = path.file_name().context("spool entry without a name")?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)?;
        sync_dir(dir);
        Ok(())
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("cannot write {}", path.display()));
    }
    Ok(())
}

/// Fsyncs a folder so a rename or removal inside it is durable (best effort).
fn sync_dir(dir: &Path) {
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

/// Removes a delivered entry (already gone is fine: a concurrent flush delivered it too).
fn remove(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("cannot remove the sent report {}", path.display()))
        }
        _ => {
            if let Some(d) = path.parent() {
                sync_dir(d);
            }
            Ok(())
        }
    }
}

/// `d` scaled by a pseudo-random factor in [0.75, 1.25): many devices coming back at once
/// do not retry in lockstep.
fn jitter(d: Duration) -> Duration {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|t| t.subsec_nanos())
        .unwrap_or(0);
    let f = 0.75 + (nanos % 1000) as f64 / 2000.0;
    d.mul_f64(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_is_sha256_hex() {
        assert_eq!(
            idempotency_key(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn entries_are_oldest_first_and_skip_temp_files() {
        let d = tempfile::tempdir().unwrap();
        let s = Spool::open(&d.path().join("spool")).unwrap();
        let a = s.add(b"{\"n\":1}").unwrap();
        let b = s.add(b"{\"n\":2}").unwrap();
        std::fs::write(s.dir().join(".x.json.tmp-1"), b"partial").unwrap();
        assert_eq!(s.entries().unwrap(), vec![a, b]);
    }

    #[test]
    fn unreachable_collector_keeps_everything() {
        let d = tempfile::tempdir().unwrap();
        let s = Spool::open(d.path()).unwrap();
        s.add(b"{}").unwrap();
        s.add(b"{\"x\":1}").unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let e = Endpoint::parse(&format!("http://127.0.0.1:{port}")).unwrap();
        let mut lines = vec![];
        let r = s
            .flush(&e, &RetryPolicy::within(Duration::ZERO), &mut |l| {
                lines.push(l.to_string())
            })
            .unwrap();
        assert_eq!((r.sent, r.remaining), (0, 2));
        assert!(r.last_error.unwrap().contains("cannot connect"));
        assert_eq!(s.entries().unwrap().len(), 2);
        assert_eq!(lines.len(), 1, "{lines:?}");
    }
}
