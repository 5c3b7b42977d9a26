//! Devices: `kiln bench` and `kiln flash` on local, qemu-user and a real OpenSSH server
//! started on loopback with throwaway keys; unreachable, full, read-only and crashing
//! devices.

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use crate::support::*;

const SSHD: &str = "/usr/sbin/sshd";

/// An sshd on 127.0.0.1 at a free port, accepting one throwaway key; killed on drop.
struct Sshd {
    dir: tempfile::TempDir,
    child: Child,
    port: u16,
    user: String,
}

impl Sshd {
    /// Starts sshd, or returns None (saying so) when it is not installed.
    fn start(test: &str) -> Option<Sshd> {
        if !Path::new(SSHD).exists() {
            eprintln!("{test} did not run: {SSHD} is missing (apt-get install openssh-server; .ci/run installs it)");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        for key in ["host_key", "client_key"] {
            let st = Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-f"])
                .arg(d.join(key))
                .status()
                .expect("ssh-keygen");
            assert!(st.success());
        }
        std::fs::copy(d.join("client_key.pub"), d.join("authorized_keys")).unwrap();
        if is_root() {
            // sshd refuses to start as root without its privilege separation directory.
            std::fs::create_dir_all("/run/sshd").unwrap();
        }
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let config = format!(
            "ListenAddress 127.0.0.1:{port}\nHostKey {d}/host_key\nAuthorizedKeysFile {d}/authorized_keys\n\
             PidFile {d}/sshd.pid\nUsePAM no\nStrictModes no\nPasswordAuthentication no\n\
             KbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\nUseDNS no\n",
            d = d.display()
        );
        std::fs::write(d.join("sshd_config"), config).unwrap();
        let mut child = Command::new(SSHD)
            .args(["-D", "-e", "-f"])
            .arg(d.join("sshd_config"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(d.join("sshd.log")).unwrap())
            .spawn()
            .expect("cannot start sshd");
        // Ready when it accepts connections (or it died: show its log).
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(st) = child.try_wait().unwrap() {
                panic!(
                    "sshd exited ({st}): {}",
                    std::fs::read_to_string(d.join("sshd.log")).unwrap_or_default()
                );
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let user = String::from_utf8(Command::new("id").arg("-un").output().unwrap().stdout)
            .unwrap()
            .trim()
            .to_string();
        Some(Sshd {
            dir,
            child,
            port,
            user,
        })
    }

    fn device(&self) -> String {
        format!("ssh://{}@127.0.0.1:{}", self.user, self.port)
    }

    /// `--device D` plus the flags reaching it with the throwaway key.
    fn args(&self) -> Vec<String> {
        vec![
            "--device".into(),
            self.device(),
            "--ssh-identity".into(),
            self.dir.path().join("client_key").display().to_string(),
            "--ssh-opt".into(),
            "StrictHostKeyChecking=no".into(),
            "--ssh-opt".into(),
            "UserKnownHostsFile=/dev/null".into(),
        ]
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.starts_with(b"0\n"))
        .unwrap_or(false)
}

/// Runs `kiln` with `fixed` arguments followed by `more`.
fn kiln_with(fixed: &[&dyn AsRefOsStr], more: &[String]) -> Run {
    let mut args: Vec<&dyn AsRefOsStr> = fixed.to_vec();
    for m in more {
        args.push(m);
    }
    kiln(&args)
}

/// Compiles fixture `name` for `target` into `dir/name-target`.
fn compiled(dir: &Path, name: &str, target: &str) -> PathBuf {
    let out = dir.join(format!("{name}-{target}"));
    kiln(&[
        &"compile",
        &fixture(name, "model.onnx"),
        &"--target",
        &target,
        &"-o",
        &out,
    ])
    .ok();
    out
}

/// Checks one device's `kiln.bench/1` report inside a `kiln.bench-run/1` summary.
fn check_report(row: &serde_json::Value, device: &str, target: &str, emulated: bool) {
    assert_eq!(row["device"], device, "{row:#}");
    assert_eq!(row["ok"], true, "{row:#}");
    let r = &row["report"];
    assert_eq!(r["schema"], "kiln.bench/1");
    assert_eq!(r["device"], device);
    assert_eq!(r["target"], target);
    assert_eq!(r["emulated"], emulated);
    assert_eq!(r["iterations"], 5);
    let l = &r["latency_ms"];
    assert!(
        l["p50"].as_f64().unwrap() <= l["p99"].as_f64().unwrap(),
        "{l}"
    );
}

#[test]
fn bench_local_and_qemu_in_one_call() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("reports");
    let r = kiln(&[
        &"bench",
        &fixture("cnn", "model.onnx"),
        &"--device",
        &"local",
        &"--device",
        &"qemu-aarch64",
        &"--iters",
        &"5",
        &"--warmup",
        &"1",
        &"-o",
        &out,
        &"--json",
    ]);
    let j = r.json();
    assert_eq!(j["schema"], "kiln.bench-run/1");
    check_report(&j["devices"][0], "local", "x86_64-linux", false);
    check_report(&j["devices"][1], "qemu-aarch64", "aarch64-linux", true);
    // Each device's report and the compiled outputs per target are kept under --out.
    let local: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("bench-local.json")).unwrap()).unwrap();
    assert_eq!(local["device"], "local");
    assert!(out.join("bench-qemu-aarch64.json").is_file());
    assert!(out.join("aarch64-linux/kiln-runner").is_file());
    // The run's reports went through a collector into OUT/kiln.db.
    let listed = kiln(&[&"reports", &"list", &"--db", &out.join("kiln.db")]);
    let text = listed.ok();
    assert!(
        text.contains("local") && text.contains("qemu-aarch64"),
        "{text}"
    );
    // The table names each device and its target.
    let t = kiln(&[
        &"bench",
        &out.join("x86_64-linux"),
        &"--device",
        &"local",
        &"--iters",
        &"3",
    ]);
    let text = t.ok();
    assert!(
        text.contains("p50 ms") && text.contains("local") && text.contains("x86_64-linux"),
        "{text}"
    );
}

#[test]
fn ssh_device_bench_and_flash() {
    let Some(sshd) = Sshd::start("ssh_device_bench_and_flash") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let build = compiled(dir.path(), "cnn", "x86_64-linux");
    // Work directories go here, to check that none is left behind.
    let work = dir.path().join("device-tmp");
    std::fs::create_dir(&work).unwrap();
    let mut args = sshd.args();
    args.extend(["--device-dir".into(), work.display().to_string()]);
    // The target comes from the device (`uname -m`) when none is given.
    let r = kiln_with(
        &[
            &"bench",
            &fixture("cnn", "model.onnx"),
            &"--iters",
            &"5",
            &"--json",
        ],
        &args,
    );
    check_report(
        &r.json()["devices"][0],
        &sshd.device(),
        "x86_64-linux",
        false,
    );

    // Flash v1 then v2 through ssh; refuse v1 again; the device's status shows v2.
    kiln(&[&"keygen", &"-o", &dir.path().join("k.pem")]).ok();
    let keys = dir.path().join("trusted");
    std::fs::create_dir(&keys).unwrap();
    std::fs::copy(dir.path().join("k.pem.pub"), keys.join("k.pub")).unwrap();
    let root = dir.path().join("device-root");
    let flash = |version: &str| {
        let art = dir.path().join(format!("cnn-v{version}.kiln"));
        kiln(&[
            &"package",
            &build,
            &"--key",
            &dir.path().join("k.pem"),
            &"--version",
            &version,
            &"-o",
            &art,
        ])
        .ok();
        kiln_with(&[&"flash", &art, &"--keys", &keys, &"--root", &root], &args)
    };
    let v1 = flash("1");
    assert!(
        v1.ok()
            .contains(&format!("to {}: cnn v1 active in slot a", sshd.device())),
        "{}",
        v1.stdout
    );
    flash("2").ok();
    flash("1").fails_with(&["refused by", "not newer"]);
    let status = Command::new(build.join("kiln-runner"))
        .args(["status", "--root"])
        .arg(&root)
        .output()
        .unwrap();
    let s: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(s["active"]["manifest"]["version"], 2, "{s:#}");
    // Relative device paths would land in the throwaway work directory: refused.
    kiln_with(
        &[
            &"flash",
            &dir.path().join("cnn-v2.kiln"),
            &"--keys",
            &"trusted",
            &"--root",
            &root,
        ],
        &sshd.args(),
    )
    .fails_with(&["--keys trusted must be an absolute path"]);
    // No work directory is left behind on the device.
    let left: Vec<_> = std::fs::read_dir(&work).unwrap().collect();
    assert!(left.is_empty(), "work directories left: {left:?}");
}

#[test]
fn ssh_device_failures_are_clear() {
    let Some(sshd) = Sshd::start("ssh_device_failures_are_clear") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let build = compiled(dir.path(), "cnn", "x86_64-linux");

    // A runner that crashes on the device (truncated in transfer: SIGSEGV at start).
    let crashing = dir.path().join("crashing");
    std::fs::create_dir(&crashing).unwrap();
    for f in ["compile.json", "cnn.nnef.tar", "kiln-runner"] {
        std::fs::copy(build.join(f), crashing.join(f)).unwrap();
    }
    let runner = std::fs::read(build.join("kiln-runner")).unwrap();
    std::fs::write(
        crashing.join("kiln-runner"),
        &runner[..runner.len() * 6 / 10],
    )
    .unwrap();
    kiln_with(&[&"bench", &crashing], &sshd.args()).fails_with(&[
        &format!("kiln-runner failed on {}", sshd.device()),
        "signal 11 (SIGSEGV)",
        "stderr tail",
    ]);

    // A hung run is killed after --timeout and said so.
    let mut args = sshd.args();
    args.extend([
        "--timeout".into(),
        "2".into(),
        "--seconds".into(),
        "600".into(),
    ]);
    kiln_with(&[&"bench", &build], &args).fails_with(&[
        &format!("kiln-runner on {}", sshd.device()),
        "timed out after 2 s and was killed",
    ]);

    if !is_root() {
        // Not root: a folder without write permission.
        let ro = dir.path().join("no-write");
        std::fs::create_dir(&ro).unwrap();
        let st = Command::new("chmod").arg("555").arg(&ro).status().unwrap();
        assert!(st.success());
        let mut args = sshd.args();
        args.extend(["--device-dir".into(), ro.display().to_string()]);
        kiln_with(&[&"bench", &build], &args).fails_with(&[
            "cannot create a work directory under",
            "no write permission on the device",
        ]);
        eprintln!(
            "no-space and read-only device tests need root to mount a tmpfs; CI runs them as root"
        );
        return;
    }
    // Root writes anywhere: a read-only file system, then a full one (a small tmpfs).
    for (opts, expect) in [
        ("ro,size=400k", "the device's file system is read-only"),
        ("size=400k", "no space left on the device"),
    ] {
        let mnt = dir.path().join(format!("mnt-{}", opts.len()));
        std::fs::create_dir(&mnt).unwrap();
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", opts, "tmpfs"])
            .arg(&mnt)
            .status()
            .unwrap();
        assert!(st.success(), "mount tmpfs failed although running as root");
        let mut args = sshd.args();
        args.extend(["--device-dir".into(), mnt.display().to_string()]);
        let r = kiln_with(&[&"bench", &build], &args);
        Command::new("umount").arg(&mnt).status().unwrap();
        r.fails_with(&[expect, &mnt.display().to_string(), &sshd.device()]);
    }
}

#[test]
fn unreachable_devices_fail_fast_and_name_the_host() {
    let dir = tempfile::tempdir().unwrap();
    let build = compiled(dir.path(), "cnn", "x86_64-linux");
    // A closed port on loopback.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let device = format!("ssh://nobody@127.0.0.1:{port}");
    kiln(&[&"bench", &build, &"--device", &device])
        .fails_with(&[&format!("cannot reach {device}"), "Connection refused"]);
    // A blackhole address (TEST-NET-1, never routed): ssh gives up after --connect-timeout.
    kiln(&[
        &"bench",
        &build,
        &"--device",
        &"ssh://192.0.2.1",
        &"--connect-timeout",
        &"1",
    ])
    .fails_with(&["cannot reach ssh://192.0.2.1", "ssh failed to connect"]);
}

#[test]
fn bad_devices_and_mismatched_targets_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let build = compiled(dir.path(), "cnn", "x86_64-linux");
    kiln(&[&"bench", &build, &"--device", &"raspberrypi"]).fails_with(&[
        "unknown device `raspberrypi`",
        "local, qemu-aarch64, qemu-armv7",
        "ssh://[user@]host[:port]",
    ]);
    kiln(&[&"bench", &build, &"--device", &"ssh://pi@board:99999"])
        .fails_with(&["bad ssh device", "port `99999`"]);
    // An x86_64 build on an aarch64 device, an aarch64 target on the local x86_64 host.
    kiln(&[&"bench", &build, &"--device", &"qemu-aarch64"]).fails_with(&[
        "holds a build for `x86_64-linux`",
        "device qemu-aarch64 runs aarch64",
    ]);
    kiln(&[
        &"bench",
        &fixture("cnn", "model.onnx"),
        &"--target",
        &"aarch64-linux",
        &"--device",
        &"local",
    ])
    .fails_with(&["device local runs x86_64", "`aarch64-linux` is for aarch64"]);
    kiln(&[
        &"bench",
        &build,
        &"--device",
        &"local",
        &"--target",
        &"armv7-linux",
    ])
    .fails_with(&["was compiled for `x86_64-linux`"]);
}

#[test]
fn local_runner_failures_show_status_and_stderr() {
    let dir = tempfile::tempdir().unwrap();
    let build = compiled(dir.path(), "cnn", "x86_64-linux");
    // A model the runner cannot load: its exit status and its own error message.
    std::fs::write(build.join("cnn.nnef.tar"), b"not a tar").unwrap();
    kiln(&[&"bench", &build, &"--device", &"local"]).fails_with(&[
        "kiln-runner failed on local with exit status 1",
        "not a loadable kiln model",
    ]);
    // A runner that crashes.
    let runner = std::fs::read(build.join("kiln-runner")).unwrap();
    std::fs::write(build.join("kiln-runner"), &runner[..runner.len() * 6 / 10]).unwrap();
    kiln(&[&"bench", &build, &"--device", &"local"]).fails_with(&[
        "kiln-runner failed on local",
        "killed by signal 11 (SIGSEGV)",
    ]);
}
