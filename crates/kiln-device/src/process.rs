//! Running a process with a time limit: output captured, killed when the limit passes,
//! exit status described in words (`exit status 1`, `killed by signal 11 (SIGSEGV)`).

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// What a finished process left: exit code or signal, stdout, stderr.
#[derive(Debug, Clone)]
pub struct Finished {
    /// Exit code, when it exited.
    pub code: Option<i32>,
    /// The signal that killed it, when one did.
    pub signal: Option<i32>,
    /// Everything it wrote to stdout.
    pub stdout: Vec<u8>,
    /// Everything it wrote to stderr.
    pub stderr: Vec<u8>,
}

impl Finished {
    /// Exit code 0.
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }

    /// Stdout as (lossy) UTF-8.
    pub fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    /// The last lines of stderr (at most 12 lines / 1500 characters), `(empty)` if none.
    pub fn stderr_tail(&self) -> String {
        tail(&String::from_utf8_lossy(&self.stderr), 12, 1500)
    }

    /// `exit status 1`, `killed by signal 11 (SIGSEGV)`; an exit code above 128 from a
    /// shell (ssh) is read as a signal too.
    pub fn describe_status(&self) -> String {
        match (self.code, self.signal) {
            (_, Some(s)) => format!("killed by signal {s}{}", signal_name(s)),
            (Some(c), None) if c > 128 && c < 160 => {
                format!(
                    "exit status {c} (signal {}{})",
                    c - 128,
                    signal_name(c - 128)
                )
            }
            (Some(c), None) => format!("exit status {c}"),
            (None, None) => "unknown exit status".into(),
        }
    }
}

fn signal_name(s: i32) -> &'static str {
    match s {
        4 => " (SIGILL)",
        6 => " (SIGABRT)",
        7 => " (SIGBUS)",
        8 => " (SIGFPE)",
        9 => " (SIGKILL)",
        11 => " (SIGSEGV)",
        15 => " (SIGTERM)",
        _ => "",
    }
}

/// The last `lines` lines of `text`, at most `chars` characters, indented for messages.
pub fn tail(text: &str, lines: usize, chars: usize) -> String {
    let text = text.trim_end();
    if text.is_empty() {
        return "(empty)".into();
    }
    let all: Vec<&str> = text.lines().collect();
    let mut s = all[all.len().saturating_sub(lines)..].join("\n");
    if s.len() > chars {
        let mut cut = s.len() - chars;
        while !s.is_char_boundary(cut) {
            cut += 1;
        }
        s = format!("...{}", &s[cut..]);
    }
    s
}

/// The process outlived its time limit and was killed.
#[derive(Debug)]
pub struct TimedOut {
    /// The limit.
    pub limit: Duration,
    /// What it printed on stderr before it was killed.
    pub stderr_tail: String,
}

impl std::fmt::Display for TimedOut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "timed out after {} s and was killed (raise --timeout if it is only slow); stderr tail: {}",
            self.limit.as_secs_f64(),
            self.stderr_tail
        )
    }
}

impl std::error::Error for TimedOut {}

/// Runs `cmd` to the end or until `limit` passes (then kills it and fails with
/// [`TimedOut`]); stdin is empty, stdout and stderr are captured.
pub fn run(cmd: Command, limit: Duration) -> Result<Finished> {
    run_with_stdin(cmd, Stdio::null(), limit)
}

/// [`run`] with `stdin` (a file to stream to the process).
pub fn run_with_stdin(mut cmd: Command, stdin: Stdio, limit: Duration) -> Result<Finished> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    let mut child = cmd
        .stdin(stdin)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start `{program}`"))?;
    let mut out_pipe = child.stdout.take().context("no stdout pipe")?;
    let mut err_pipe = child.stderr.take().context("no stderr pipe")?;
    let out_reader = std::thread::spawn(move || {
        let mut v = vec![];
        let _ = out_pipe.read_to_end(&mut v);
        v
    });
    let err_reader = std::thread::spawn(move || {
        let mut v = vec![];
        let _ = err_pipe.read_to_end(&mut v);
        v
    });
    let t0 = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break Some(st);
        }
        if t0.elapsed() >= limit {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20).min(limit / 10 + Duration::from_millis(1)));
    };
    let stdout = out_reader.join().unwrap_or_default();
    let stderr = err_reader.join().unwrap_or_default();
    let Some(status) = status else {
        bail!(TimedOut {
            limit,
            stderr_tail: tail(&String::from_utf8_lossy(&stderr), 6, 800),
        });
    };
    #[cfg(unix)]
    let signal = std::os::unix::process::ExitStatusExt::signal(&status);
    #[cfg(not(unix))]
    let signal = None;
    Ok(Finished {
        code: status.code(),
        signal,
        stdout,
        stderr,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describes_exits_and_signals() {
        let f = |code, signal| Finished {
            code,
            signal,
            stdout: vec![],
            stderr: vec![],
        };
        assert_eq!(f(Some(1), None).describe_status(), "exit status 1");
        assert_eq!(
            f(None, Some(11)).describe_status(),
            "killed by signal 11 (SIGSEGV)"
        );
        assert_eq!(
            f(Some(139), None).describe_status(),
            "exit status 139 (signal 11 (SIGSEGV))"
        );
    }

    #[test]
    fn tail_keeps_the_end() {
        let text: String = (0..100).map(|i| format!("line {i}\n")).collect();
        let t = tail(&text, 3, 1000);
        assert_eq!(t, "line 97\nline 98\nline 99");
        assert_eq!(tail("  \n", 3, 10), "(empty)");
        assert!(tail(&"é".repeat(50), 1, 11).starts_with("..."));
    }

    #[test]
    fn kills_a_process_past_its_limit() {
        let mut cmd = Command::new("sleep");
        cmd.arg("30");
        let e = run(cmd, Duration::from_millis(200)).unwrap_err();
        assert!(e.downcast_ref::<TimedOut>().is_some(), "{e:#}");
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo out; echo err >&2; exit 3"]);
        let f = run(cmd, Duration::from_secs(30)).unwrap();
        assert_eq!(f.code, Some(3));
        assert_eq!(f.stdout_text(), "out\n");
        assert_eq!(f.stderr_tail(), "err");
    }
}
