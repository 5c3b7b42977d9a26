//! Report-back and the collector: exactly-once storage under concurrent and repeated
//! sends, refusals of bad posts, a runner whose collector starts late or never, a corrupt
//! store, and the HTML report rendered in headless Chromium.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use kiln_collect::client::{post, Endpoint};
use kiln_collect::spool::idempotency_key;

use crate::support::*;

/// A `kiln collect` process, killed when dropped.
struct Collector {
    child: Child,
    url: String,
}

impl Drop for Collector {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `kiln collect` on `listen` and waits for its "listening on URL" line.
fn start_collector(db: &Path, listen: &str) -> Collector {
    let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["collect", "--listen", listen, "--db"])
        .arg(db)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("cannot start kiln collect");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let url = line
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap_or_else(|| panic!("kiln collect did not start: `{line}`"))
        .to_string();
    Collector { child, url }
}

/// A loopback port nothing listens on right now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A valid kiln.bench/1 report, distinct per (`model`, `device`, `n`).
fn report(model: &str, device: &str, precision: &str, p50: f64, n: usize) -> String {
    serde_json::json!({
        "schema": "kiln.bench/1", "model": model, "target": "x86_64-linux", "arch": "x86_64",
        "device": device, "precision": precision, "emulated": false, "iterations": 20,
        "latency_ms": {"min": p50 * 0.8, "p50": p50, "p90": p50 * 1.2, "p99": p50 * 1.6,
                       "max": p50 * 2.0, "mean": p50 * 1.05, "stddev": p50 * 0.1},
        "throughput_per_s": 1e3 / (p50 * 1.05),
        "cold_start_ms": {"load": 3.0, "prepare": 2.0, "first_inference": p50, "total": 5.0 + p50},
        "peak_rss_bytes": 20_000_000,
        "profile": [
            {"op": "Conv", "nodes": 4, "ms": p50 * 0.6, "share": 0.6},
            {"op": "MatMul", "nodes": 2, "ms": p50 * 0.3, "share": 0.3},
            {"op": "Add", "nodes": 3, "ms": p50 * 0.1, "share": 0.1},
        ],
        "created_at_ms": n,
    })
    .to_string()
}

fn stored_keys(db: &Path) -> Vec<String> {
    let rows = kiln(&[&"reports", &"list", &"--db", &db, &"--json"]).json();
    rows.as_array()
        .unwrap()
        .iter()
        .map(|r| r["idempotency_key"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn concurrent_and_repeated_sends_are_stored_exactly_once() {
    const SENDERS: usize = 8;
    const PER_SENDER: usize = 63; // 504 reports
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("kiln.db");
    let c = start_collector(&db, "127.0.0.1:0");
    let endpoint = Endpoint::parse(&c.url).unwrap();
    let results: Vec<(Vec<String>, usize, usize)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..SENDERS)
            .map(|t| {
                let endpoint = endpoint.clone();
                s.spawn(move || {
                    let (mut keys, mut stored, mut dups) = (vec![], 0, 0);
                    for i in 0..PER_SENDER {
                        let body = report("m", &format!("dev{t}"), "f32", 1.0, i);
                        let key = idempotency_key(body.as_bytes());
                        // Every 5th report is sent twice more: a retry after a lost answer.
                        let sends = if i % 5 == 0 { 3 } else { 1 };
                        for _ in 0..sends {
                            let r = post(&endpoint, body.as_bytes(), &key, Duration::from_secs(30))
                                .unwrap();
                            match r.status {
                                201 => stored += 1,
                                200 if r.body.contains("\"duplicate\"") => dups += 1,
                                other => panic!("unexpected answer {other}: {}", r.body),
                            }
                        }
                        keys.push(key);
                    }
                    (keys, stored, dups)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut sent: Vec<String> = results.iter().flat_map(|r| r.0.clone()).collect();
    let stored: usize = results.iter().map(|r| r.1).sum();
    let dups: usize = results.iter().map(|r| r.2).sum();
    assert_eq!(stored, SENDERS * PER_SENDER);
    assert_eq!(dups, SENDERS * PER_SENDER.div_ceil(5) * 2);
    let mut keys = stored_keys(&db);
    assert_eq!(keys.len(), SENDERS * PER_SENDER, "one row per report");
    keys.sort();
    sent.sort();
    assert_eq!(keys, sent, "exactly the sent keys, each once");

    // Export: CSV has a header and one line per report; JSON lines carry the full report.
    let csv = kiln(&[&"reports", &"export", &"--db", &db, &"--format", &"csv"]);
    let lines: Vec<&str> = csv.ok().lines().collect();
    assert!(lines[0].starts_with("id,idempotency_key,"));
    assert_eq!(lines.len(), 1 + SENDERS * PER_SENDER);
    let out = dir.path().join("dev3.jsonl");
    kiln(&[
        &"reports",
        &"export",
        &"--db",
        &db,
        &"--device",
        &"dev3",
        &"-o",
        &out,
    ])
    .ok();
    let text = std::fs::read_to_string(&out).unwrap();
    assert_eq!(text.lines().count(), PER_SENDER);
    for l in text.lines() {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        assert_eq!(v["report"]["device"], "dev3");
        assert_eq!(v["report"]["profile"][0]["op"], "Conv");
    }
    let show = kiln(&[&"reports", &"show", &"1", &"--db", &db]).json();
    assert_eq!(show["report"]["schema"], "kiln.bench/1");
    kiln(&[&"reports", &"show", &"999999", &"--db", &db]).fails_with(&["no report with id 999999"]);
    kiln(&[&"reports", &"export", &"--db", &db, &"--format", &"xml"])
        .fails_with(&["--format `xml`"]);
}

#[test]
fn bad_posts_are_refused_and_nothing_is_stored() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("kiln.db");
    let c = start_collector(&db, "127.0.0.1:0");
    let e = Endpoint::parse(&c.url).unwrap();
    let t = Duration::from_secs(30);
    let cases: Vec<(Vec<u8>, u16, &str)> = vec![
        (
            b"{\"schema\": \"kiln.bench/1\", ".to_vec(),
            400,
            "malformed JSON",
        ),
        (
            b"{\"schema\": \"kiln.run/1\"}".to_vec(),
            400,
            "unsupported schema",
        ),
        (
            b"{\"schema\": \"kiln.bench/1\", \"model\": \"m\", \"target\": \"t\"}".to_vec(),
            400,
            "latency_ms",
        ),
        // 2 MiB: above the default 1 MiB limit.
        (
            format!(
                "{{\"schema\":\"kiln.bench/1\",\"pad\":\"{}\"}}",
                "x".repeat(2 << 20)
            )
            .into_bytes(),
            413,
            "limit is 1048576 bytes",
        ),
    ];
    for (body, status, reason) in cases {
        let r = post(&e, &body, &idempotency_key(&body), t).unwrap();
        assert_eq!(r.status, status, "{}", r.body);
        assert!(r.body.contains(reason), "{} lacks {reason}", r.body);
    }
    let good = report("m", "d", "f32", 1.0, 0);
    let r = post(&e, good.as_bytes(), "not a valid key!", t).unwrap();
    assert_eq!(r.status, 400);
    assert!(r.body.contains("Idempotency-Key"), "{}", r.body);
    assert!(stored_keys(&db).is_empty(), "nothing stored");
    // The collector still works after all that.
    let r = post(&e, good.as_bytes(), &idempotency_key(good.as_bytes()), t).unwrap();
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(stored_keys(&db).len(), 1);
}

#[test]
fn corrupt_or_missing_store_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.db");
    std::fs::write(&junk, vec![0x42u8; 10_000]).unwrap();
    kiln(&[&"collect", &"--listen", &"127.0.0.1:0", &"--db", &junk])
        .fails_with(&["junk.db", "not a usable kiln report database"]);
    kiln(&[&"reports", &"list", &"--db", &junk]).fails_with(&["not a usable kiln report database"]);
    let missing = dir.path().join("missing.db");
    kiln(&[&"reports", &"list", &"--db", &missing]).fails_with(&["no report database at"]);
    assert!(!missing.exists(), "reading does not create a store");
    kiln(&[
        &"report",
        &"--db",
        &missing,
        &"--html",
        &dir.path().join("r.html"),
    ])
    .fails_with(&["no report database at"]);
}

/// The x86_64 runner and the cnn fixture compiled for it (model path).
fn runner_and_model(dir: &Path) -> (PathBuf, PathBuf) {
    let out = dir.join("build");
    kiln(&[
        &"compile",
        &fixture("cnn", "model.onnx"),
        &"--target",
        &"x86_64-linux",
        &"-o",
        &out,
    ])
    .ok();
    (out.join("kiln-runner"), out.join("cnn.nnef.tar"))
}

fn bench_cmd(runner: &Path, model: &Path, url: &str, spool: &Path, retry: &str) -> Command {
    let mut cmd = Command::new(runner);
    cmd.arg("bench")
        .arg("--model")
        .arg(model)
        .args([
            "--iters",
            "3",
            "--warmup",
            "0",
            "--report-to",
            url,
            "--retry-for",
            retry,
        ])
        .arg("--spool")
        .arg(spool);
    cmd
}

fn spooled(spool: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(spool)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    v.sort();
    v
}

#[test]
fn runner_report_arrives_once_when_the_collector_starts_late() {
    let dir = tempfile::tempdir().unwrap();
    let (runner, model) = runner_and_model(dir.path());
    let db = dir.path().join("kiln.db");
    let spool = dir.path().join("spool");
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let child = bench_cmd(&runner, &model, &url, &spool, "120")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The runner finds nobody listening and retries; the collector comes up later.
    std::thread::sleep(Duration::from_secs(1));
    let c = start_collector(&db, &format!("127.0.0.1:{port}"));
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let printed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(printed["schema"], "kiln.bench/1");
    assert!(stderr.contains("delivered 1 report(s)"), "{stderr}");
    assert!(
        spooled(&spool).is_empty(),
        "delivered reports leave the spool"
    );
    let rows = kiln(&[&"reports", &"list", &"--db", &db, &"--json"]).json();
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 1, "stored exactly once");
    assert_eq!(rows[0]["model"], "cnn");
    assert_eq!(rows[0]["target"], "x86_64-linux");
    // The stored report is byte for byte what the runner printed.
    let shown = kiln(&[&"reports", &"show", &"1", &"--db", &db]).json();
    assert_eq!(shown["report"], printed);
    drop(c);
}

#[test]
fn runner_keeps_the_report_when_the_collector_never_comes_up() {
    let dir = tempfile::tempdir().unwrap();
    let (runner, model) = runner_and_model(dir.path());
    let spool = dir.path().join("spool");
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let r = run_cmd(bench_cmd(&runner, &model, &url, &spool, "1"));
    assert_eq!(r.code, 3, "not delivered: exit 3\n{}", r.stderr);
    assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
    for needle in ["not delivered", "kept in", "send-spool"] {
        assert!(
            r.stderr.contains(needle),
            "stderr lacks {needle}:\n{}",
            r.stderr
        );
    }
    // The bench output is still printed, and it is what waits in the spool.
    let printed: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    let waiting = spooled(&spool);
    assert_eq!(waiting.len(), 1);
    let bytes = std::fs::read(&waiting[0]).unwrap();
    let spooled_report: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(spooled_report, printed);

    // Later, with a collector up: send-spool delivers it, once, even when asked twice.
    let db = dir.path().join("kiln.db");
    let c = start_collector(&db, "127.0.0.1:0");
    for _ in 0..2 {
        let mut cmd = Command::new(&runner);
        cmd.args(["send-spool", "--report-to", &c.url, "--spool"])
            .arg(&spool);
        run_cmd(cmd).ok();
    }
    assert!(spooled(&spool).is_empty());
    assert_eq!(stored_keys(&db), vec![idempotency_key(&bytes)]);
    drop(c);
}

/// Chromium's path, when installed (Debian's `chromium`; .ci/run installs it).
fn chromium() -> Option<PathBuf> {
    ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

/// Headless Chromium with a fresh profile and no background networking.
fn chromium_cmd(bin: &Path, profile: &Path) -> Command {
    let mut cmd = Command::new(bin);
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
    ])
    .arg(format!("--user-data-dir={}", profile.display()));
    cmd
}

#[test]
fn html_report_renders_charts_and_table_in_chromium() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("kiln.db");
    {
        let mut store = kiln_collect::Store::open(&db).unwrap();
        let runs = [
            ("mobilenet", "pi5", "f32", 9.0),
            ("mobilenet", "pi5", "int8", 6.5),
            ("mobilenet", "nuc", "f32", 2.0),
            ("cnn", "pi5", "f32", 0.4),
            ("cnn", "nuc", "f32", 0.1),
        ];
        for (n, (model, device, precision, p50)) in runs.iter().enumerate() {
            for run in 0..2 {
                let body = report(
                    model,
                    device,
                    precision,
                    p50 * (1.0 + run as f64 * 0.05),
                    n * 10 + run,
                );
                let (_, s) = kiln_collect::validate::check(body.as_bytes()).unwrap();
                store
                    .insert(&idempotency_key(body.as_bytes()), &body, &s)
                    .unwrap();
            }
        }
        let install = r#"{"schema":"kiln.install/1","outcome":"installed","detail":"self-test ok","name":"mobilenet","version":2,"active_slot":"b","active_version":2}"#;
        let (_, s) = kiln_collect::validate::check(install.as_bytes()).unwrap();
        store.insert("install-1", install, &s).unwrap();
    }
    let page = dir.path().join("report.html");
    let out = kiln(&[&"report", &"--db", &db, &"--html", &page]);
    assert!(out.ok().contains("11 report(s)"), "{}", out.stdout);
    let html = std::fs::read_to_string(&page).unwrap();
    assert!(!html.contains(" src=") && !html.contains("<link") && !html.contains("<script"));
    // 2 CDFs (one per model) + 5 op charts (one per model/device/precision).
    assert_eq!(html.matches("<svg").count(), 7);

    let Some(bin) = chromium() else {
        eprintln!("chromium is not installed: the in-browser rendering check did not run");
        return;
    };
    let profile = tempfile::tempdir().unwrap();
    let url = format!("file://{}", page.display());
    let mut dump = chromium_cmd(&bin, profile.path());
    dump.args(["--dump-dom", &url]);
    let dom = run_cmd(dump);
    let dom = dom.ok();
    assert_eq!(dom.matches("<svg").count(), 7, "charts in the rendered DOM");
    assert!(dom.contains("latency CDF") && dom.contains("time per op"));
    assert!(dom.contains("id=\"comparison\""));
    // 5 groups in the comparison table; the fastest mobilenet (nuc) is highlighted.
    let table = &dom[dom.find("id=\"comparison\"").unwrap()..];
    let table = &table[..table.find("</table>").unwrap()];
    assert_eq!(table.matches("<tr").count(), 1 + 5, "{table}");
    assert_eq!(
        table.matches("class=\"best\"").count(),
        2,
        "one fastest per model"
    );
    assert!(dom.contains("id=\"installs\""));

    let artifacts = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/test-artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    let shot = artifacts.join("collect-report.png");
    let _ = std::fs::remove_file(&shot);
    let mut cmd = chromium_cmd(&bin, profile.path());
    cmd.arg(format!("--screenshot={}", shot.display()))
        .args(["--window-size=1280,2000", &url]);
    run_cmd(cmd).ok();
    let png = std::fs::read(&shot).unwrap();
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 20_000,
        "screenshot {} bytes",
        png.len()
    );
    eprintln!("screenshot: {}", shot.display());
}

#[test]
fn install_reports_go_to_the_collector_too() {
    let dir = tempfile::tempdir().unwrap();
    let (runner, _) = runner_and_model(dir.path());
    let key = dir.path().join("signer.pem");
    kiln(&[&"keygen", &"-o", &key]).ok();
    let keys = dir.path().join("trusted");
    std::fs::create_dir(&keys).unwrap();
    std::fs::copy(dir.path().join("signer.pem.pub"), keys.join("signer.pub")).unwrap();
    let art = dir.path().join("cnn.kiln");
    kiln(&[
        &"package",
        &dir.path().join("build"),
        &"--key",
        &key,
        &"--version",
        &"1",
        &"-o",
        &art,
        &"--golden-inputs",
        &fixture("cnn", "sample.npz"),
    ])
    .ok();
    let db = dir.path().join("kiln.db");
    let c = start_collector(&db, "127.0.0.1:0");
    let install = || {
        let mut cmd = Command::new(&runner);
        cmd.arg("install")
            .arg(&art)
            .arg("--keys")
            .arg(&keys)
            .arg("--root")
            .arg(dir.path().join("root"))
            .args(["--report-to", &c.url]);
        run_cmd(cmd)
    };
    install().ok();
    // The same version again is refused (not newer): the refusal is reported as well.
    install().fails_with(&["not installed"]);
    let rows = kiln(&[
        &"reports",
        &"list",
        &"--db",
        &db,
        &"--schema",
        &"kiln.install/1",
        &"--json",
    ])
    .json();
    let outcomes: Vec<&str> = rows
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(outcomes, ["installed", "rejected"]);
    assert!(!dir.path().join("root/spool").read_dir().unwrap().any(|e| e
        .unwrap()
        .path()
        .extension()
        .is_some_and(|x| x == "json")));
}
