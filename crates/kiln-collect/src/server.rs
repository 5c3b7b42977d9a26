//! The HTTP collector (API in docs/collector.md): `POST /v1/reports` stores a checked
//! report once per idempotency key, `GET /v1/health` answers with the row count. tiny_http
//! accepts connections on its own threads; a pool of workers handles requests, and the
//! store serializes writes.

use std::io::Read;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use serde_json::json;
use tiny_http::{Header, Method, Request, Response, Server};

use crate::store::{Inserted, Store};

/// Collector settings.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// Largest accepted report body in bytes (HTTP 413 above).
    pub max_body: usize,
    /// Request-handling threads.
    pub workers: usize,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            max_body: 1 << 20,
            workers: 8,
        }
    }
}

/// A running collector.
pub struct Collector {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    workers: Vec<JoinHandle<()>>,
}

impl Collector {
    /// The address it listens on (the real port when started on port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The URL senders use: `http://ADDR/v1/reports`.
    pub fn url(&self) -> String {
        format!("http://{}{}", self.addr, crate::client::DEFAULT_PATH)
    }

    /// Serves until the process ends.
    pub fn wait(self) {
        for w in self.workers {
            let _ = w.join();
        }
    }

    /// Stops accepting requests and waits for the workers to finish the ones in hand.
    pub fn stop(self) {
        self.stop.store(true, Ordering::SeqCst);
        self.wait();
    }
}

/// Starts a collector on `listen` (`HOST:PORT`; port 0 picks a free one) storing into `db`.
pub fn start(listen: &str, db: &Path, opts: ServerOptions) -> Result<Collector> {
    let store = Arc::new(Mutex::new(Store::open(db)?));
    let server = Server::http(listen).map_err(|e| anyhow!("cannot listen on {listen}: {e}"))?;
    let addr = server
        .server_addr()
        .to_ip()
        .context("the collector is not listening on an IP address")?;
    let server = Arc::new(server);
    let stop = Arc::new(AtomicBool::new(false));
    let workers = (0..opts.workers.max(1))
        .map(|i| {
            let (server, store, stop, opts) =
                (server.clone(), store.clone(), stop.clone(), opts.clone());
            std::thread::Builder::new()
                .name(format!("collect-{i}"))
                .spawn(move || {
                    while !stop.load(Ordering::SeqCst) {
                        match server.recv_timeout(Duration::from_millis(200)) {
                            Ok(Some(rq)) => handle(rq, &store, &opts),
                            Ok(None) => {}
                            Err(e) => eprintln!("kiln collect: connection error: {e}"),
                        }
                    }
                })
                .context("cannot start a collector thread")
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Collector {
        addr,
        stop,
        workers,
    })
}

/// Starts a collector on an ephemeral loopback port (for `kiln bench` to collect its own
/// run, and for tests); its URL is [`Collector::url`].
pub fn start_ephemeral(db: &Path) -> Result<Collector> {
    start("127.0.0.1:0", db, ServerOptions::default())
}

fn handle(mut rq: Request, store: &Mutex<Store>, opts: &ServerOptions) {
    let path = rq.url().split('?').next().unwrap_or("").to_string();
    let (code, body) = match (rq.method(), path.as_str()) {
        (Method::Post, crate::client::DEFAULT_PATH) => ingest(&mut rq, store, opts),
        (Method::Get, "/v1/health") => match lock(store).count() {
            Ok(n) => (200, json!({"status": "ok", "reports": n})),
            Err(e) => (500, json!({"error": format!("{e:#}")})),
        },
        (_, crate::client::DEFAULT_PATH) => (
            405,
            json!({"error": "use POST /v1/reports to send a report"}),
        ),
        _ => (
            404,
            json!({"error": format!("no such endpoint `{path}`: POST /v1/reports, GET /v1/health")}),
        ),
    };
    let response = Response::from_string(body.to_string())
        .with_status_code(code)
        .with_header(
            Header::from_bytes("Content-Type", "application/json")
                .expect("a constant header is valid"),
        );
    // The sender may have given up; it retries with the same key.
    let _ = rq.respond(response);
}

fn lock(store: &Mutex<Store>) -> std::sync::MutexGuard<'_, Store> {
    store.lock().unwrap_or_else(|p| p.into_inner())
}

/// Reads, checks and stores one report: (HTTP status, JSON answer).
fn ingest(
    rq: &mut Request,
    store: &Mutex<Store>,
    opts: &ServerOptions,
) -> (u16, serde_json::Value) {
    let too_big = |n: usize| {
        (
            413,
            json!({"error": format!("report is {n} bytes or more; the limit is {} bytes", opts.max_body)}),
        )
    };
    if let Some(n) = rq.body_length().filter(|n| *n > opts.max_body) {
        return too_big(n);
    }
    let key_header = rq
        .headers()
        .iter()
        .find(|h| h.field.equiv("Idempotency-Key"))
        .map(|h| h.value.as_str().trim().to_string());
    let mut body = Vec::new();
    if let Err(e) = rq
        .as_reader()
        .take(opts.max_body as u64 + 1)
        .read_to_end(&mut body)
    {
        return (
            400,
            json!({"error": format!("cannot read the request body: {e}")}),
        );
    }
    if body.len() > opts.max_body {
        return too_big(body.len());
    }
    let key = match key_header {
        Some(k) if valid_key(&k) => k,
        Some(k) => {
            return (
                400,
                json!({"error": format!("bad Idempotency-Key `{}`: 1 to 128 characters of A-Z a-z 0-9 . _ : -", k.chars().take(140).collect::<String>())}),
            )
        }
        None => crate::spool::idempotency_key(&body),
    };
    let summary = match crate::validate::check(&body) {
        Ok((_, s)) => s,
        Err(reason) => return (400, json!({"error": reason})),
    };
    let Ok(text) = std::str::from_utf8(&body) else {
        return (400, json!({"error": "the report is not UTF-8"}));
    };
    match lock(store).insert(&key, text, &summary) {
        Ok(Inserted::Stored(id)) => (201, json!({"status": "stored", "id": id})),
        Ok(Inserted::Duplicate(id)) => (200, json!({"status": "duplicate", "id": id})),
        Ok(Inserted::Conflict(id)) => (
            409,
            json!({"error": format!("Idempotency-Key `{key}` was already used for a different report (id {id})"), "id": id}),
        ),
        Err(e) => {
            eprintln!("kiln collect: storing a report failed: {e:#}");
            (500, json!({"error": format!("storing failed: {e:#}")}))
        }
    }
}

/// Idempotency keys: 1 to 128 characters of `[A-Za-z0-9._:-]`.
fn valid_key(k: &str) -> bool {
    (1..=128).contains(&k.len())
        && k.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._:-".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::{post, Endpoint};

    const REPORT: &[u8] = br#"{"schema":"kiln.bench/1","model":"m","target":"t","latency_ms":{"p50":1,"p90":2,"p99":3,"mean":1.5}}"#;

    #[test]
    fn stores_once_and_refuses_bad_reports() {
        let d = tempfile::tempdir().unwrap();
        let db = d.path().join("c.db");
        let c = start(
            "127.0.0.1:0",
            &db,
            ServerOptions {
                max_body: 4096,
                workers: 2,
            },
        )
        .unwrap();
        let e = Endpoint::parse(&c.url()).unwrap();
        let t = Duration::from_secs(10);
        let r = post(&e, REPORT, "key-1", t).unwrap();
        assert_eq!(r.status, 201, "{}", r.body);
        let r = post(&e, REPORT, "key-1", t).unwrap();
        assert_eq!(r.status, 200);
        assert!(r.body.contains("\"duplicate\""), "{}", r.body);
        let other_body = String::from_utf8_lossy(REPORT).replace("\"m\"", "\"m2\"");
        let r = post(&e, other_body.as_bytes(), "key-1", t).unwrap();
        assert!(
            r.status == 409,
            "same key, other body: {} {}",
            r.status,
            r.body
        );
        let r = post(&e, b"{not json", "key-3", t).unwrap();
        assert_eq!(r.status, 400);
        assert!(r.body.contains("malformed JSON"), "{}", r.body);
        let r = post(&e, b"{}", "bad key!", t).unwrap();
        assert_eq!(r.status, 400);
        let big = vec![b' '; 5000];
        let r = post(&e, &big, "key-4", t).unwrap();
        assert_eq!(r.status, 413, "{}", r.body);
        let other = Endpoint::parse(&format!("http://{}/elsewhere", c.addr())).unwrap();
        assert_eq!(post(&other, REPORT, "key-5", t).unwrap().status, 404);
        c.stop();
        assert_eq!(Store::open(&db).unwrap().keys().unwrap(), vec!["key-1"]);
    }
}
