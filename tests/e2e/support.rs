//! Helpers: locate fixtures, run binaries, capture their output.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The repo's `fixtures/` folder.
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

/// A fixture file: `fixture("digits", "model.onnx")`.
pub fn fixture(name: &str, file: &str) -> PathBuf {
    fixtures().join(name).join(file)
}

/// What a finished command left behind.
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    /// Asserts success and returns stdout.
    pub fn ok(&self) -> &str {
        assert_eq!(
            self.code, 0,
            "command failed\nstdout:\n{}\nstderr:\n{}",
            self.stdout, self.stderr
        );
        &self.stdout
    }

    /// Asserts a clean failure (non-zero exit, no panic) whose stderr mentions every `needle`.
    pub fn fails_with(&self, needles: &[&str]) {
        assert_ne!(
            self.code, 0,
            "expected failure\nstdout:\n{}\nstderr:\n{}",
            self.stdout, self.stderr
        );
        assert!(!self.stderr.contains("panicked"), "panic:\n{}", self.stderr);
        assert!(
            !self.stderr.contains("RUST_BACKTRACE"),
            "backtrace:\n{}",
            self.stderr
        );
        for n in needles {
            assert!(
                self.stderr.contains(n),
                "stderr lacks `{n}`:\n{}",
                self.stderr
            );
        }
    }

    /// Stdout parsed as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(self.ok())
            .unwrap_or_else(|e| panic!("bad JSON ({e}):\n{}", self.stdout))
    }
}

/// Runs `kiln ARGS`.
pub fn kiln(args: &[&dyn AsRefOsStr]) -> Run {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kiln"));
    for a in args {
        cmd.arg(a.as_os());
    }
    finish(cmd.output().expect("cannot start kiln"))
}

/// Runs a prepared command.
///
/// Retries "text file busy" (ETXTBSY): a test that just wrote an executable races with
/// other tests' forks, which briefly inherit its write descriptor.
pub fn run_cmd(mut cmd: Command) -> Run {
    let mut tries = 0;
    loop {
        match cmd.output() {
            Ok(out) => return finish(out),
            Err(e) if e.raw_os_error() == Some(26) && tries < 50 => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(e) => panic!("cannot start {cmd:?}: {e}"),
        }
    }
}

fn finish(out: Output) -> Run {
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Anything usable as a command-line argument (str, String, Path, PathBuf).
pub trait AsRefOsStr {
    fn as_os(&self) -> &std::ffi::OsStr;
}
impl<T: AsRef<std::ffi::OsStr>> AsRefOsStr for T {
    fn as_os(&self) -> &std::ffi::OsStr {
        self.as_ref()
    }
}

/// Writes an `.npz` with the given f32 arrays, via kiln-io (the same crate numpy files round-trip through).
pub fn write_npz(path: &Path, arrays: Vec<(&str, kiln_io::tract_core::prelude::Tensor)>) {
    let named: Vec<_> = arrays
        .into_iter()
        .map(|(n, t)| (n.to_string(), t))
        .collect();
    kiln_io::write_tensors(path, &named).unwrap();
}
