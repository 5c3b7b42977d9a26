//! The collector's SQLite store (schema in docs/collector.md): one row per report, the
//! idempotency key UNIQUE so a re-sent report is stored once, indexed facts beside the
//! exact body. Every insert is one transaction, durable (synchronous=FULL) before the
//! sender is told 2xx and deletes its spooled copy.

use std::path::Path;

use anyhow::{bail, Context, Result};
use rusqlite::{params, Connection, OptionalExtension};
use serde::Serialize;
use serde_json::Value;

use crate::validate::Summary;

/// `PRAGMA application_id` of a kiln collector database ("kiln" in ASCII).
pub const APPLICATION_ID: i64 = 0x6b69_6c6e;
/// `PRAGMA user_version`: the schema version this code reads and writes.
pub const SCHEMA_VERSION: i64 = 1;

const SCHEMA: &str = "
CREATE TABLE reports (
    id               INTEGER PRIMARY KEY,
    idempotency_key  TEXT    NOT NULL UNIQUE,
    body_sha256      TEXT    NOT NULL,
    received_at_ms   INTEGER NOT NULL,
    schema           TEXT    NOT NULL,
    model            TEXT,
    device           TEXT,
    target           TEXT,
    arch             TEXT,
    precision        TEXT,
    emulated         INTEGER,
    p50_ms           REAL,
    p90_ms           REAL,
    p99_ms           REAL,
    mean_ms          REAL,
    throughput_per_s REAL,
    cold_start_ms    REAL,
    peak_rss_bytes   INTEGER,
    outcome          TEXT,
    body             TEXT    NOT NULL
);
CREATE INDEX reports_by_model ON reports (model, device, received_at_ms);
";

/// What an insert did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inserted {
    /// Stored as a new row with this id.
    Stored(i64),
    /// The key was already stored with the same body: nothing written.
    Duplicate(i64),
    /// The key was already stored with a different body: nothing written.
    Conflict(i64),
}

/// One stored report.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// Row id (`kiln reports show ID`).
    pub id: i64,
    /// The sender's idempotency key.
    pub idempotency_key: String,
    /// When the collector stored it (Unix time, ms).
    pub received_at_ms: i64,
    /// The indexed facts (schema, model, device, latencies, ...), flattened in JSON.
    #[serde(flatten)]
    pub summary: Summary,
    /// The report as received (left out of listings).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub report: Option<Value>,
}

/// Which rows a query returns.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Only this model.
    pub model: Option<String>,
    /// Only this device.
    pub device: Option<String>,
    /// Only this schema.
    pub schema: Option<String>,
    /// At most this many, newest first (all, oldest first, when None).
    pub limit: Option<u64>,
    /// Include each row's full report.
    pub with_body: bool,
}

/// An open store.
pub struct Store {
    conn: Connection,
}

impl Store {
    /// Opens `path`, creating the schema in a new or empty file. A file that is not SQLite,
    /// or a SQLite database that is not kiln's, is an error naming the file.
    pub fn open(path: &Path) -> Result<Store> {
        let conn = Connection::open(path)
            .with_context(|| format!("cannot open the report database {}", path.display()))?;
        let not_ours = |e: rusqlite::Error| {
            anyhow::anyhow!(
                "{} is not a usable kiln report database ({e}); point --db at a new file or a store `kiln collect` created",
                path.display()
            )
        };
        conn.busy_timeout(std::time::Duration::from_secs(10))
            .map_err(not_ours)?;
        let app: i64 = conn
            .query_row("PRAGMA application_id", [], |r| r.get(0))
            .map_err(not_ours)?;
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(not_ours)?;
        let tables: i64 = conn
            .query_row("SELECT count(*) FROM sqlite_master", [], |r| r.get(0))
            .map_err(not_ours)?;
        if app == 0 && tables == 0 {
            conn.execute_batch(&format!(
                "PRAGMA journal_mode = WAL; BEGIN; {SCHEMA} PRAGMA application_id = {APPLICATION_ID}; PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;"
            ))
            .map_err(not_ours)?;
        } else if app != APPLICATION_ID {
            bail!(
                "{} is a SQLite database but not a kiln report store (application_id {app:#x}); point --db at a new file",
                path.display()
            );
        } else if version != SCHEMA_VERSION {
            bail!(
                "{} has report store schema version {version}; this kiln reads version {SCHEMA_VERSION}",
                path.display()
            );
        }
        // WAL: readers (kiln reports) do not block the collector; FULL: a 2xx means on disk.
        conn.execute_batch("PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL;")
            .map_err(not_ours)?;
        Ok(Store { conn })
    }

    /// Opens an existing store for reading: a missing file is an error, not a new store.
    pub fn open_existing(path: &Path) -> Result<Store> {
        if !path.is_file() {
            bail!(
                "no report database at {} (`kiln collect --db {}` creates it)",
                path.display(),
                path.display()
            );
        }
        Store::open(path)
    }

    /// Stores a checked report under `key` unless that key is already stored.
    pub fn insert(&mut self, key: &str, body: &str, s: &Summary) -> Result<Inserted> {
        let sha = crate::spool::idempotency_key(body.as_bytes());
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        let tx = self
            .conn
            .transaction()
            .context("cannot start a transaction")?;
        let existing: Option<(i64, String)> = tx
            .query_row(
                "SELECT id, body_sha256 FROM reports WHERE idempotency_key = ?1",
                [key],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .context("cannot look up the idempotency key")?;
        let out = match existing {
            Some((id, old)) if old == sha => Inserted::Duplicate(id),
            Some((id, _)) => Inserted::Conflict(id),
            None => {
                tx.execute(
                    "INSERT INTO reports (idempotency_key, body_sha256, received_at_ms, schema, model, device, target, arch, precision, emulated, p50_ms, p90_ms, p99_ms, mean_ms, throughput_per_s, cold_start_ms, peak_rss_bytes, outcome, body)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19)",
                    params![
                        key, sha, now, s.schema, s.model, s.device, s.target, s.arch, s.precision,
                        s.emulated, s.p50_ms, s.p90_ms, s.p99_ms, s.mean_ms, s.throughput_per_s,
                        s.cold_start_ms, s.peak_rss_bytes, s.outcome, body
                    ],
                )
                .context("cannot insert the report")?;
                Inserted::Stored(tx.last_insert_rowid())
            }
        };
        tx.commit().context("cannot commit the report")?;
        Ok(out)
    }

    /// Number of stored reports.
    pub fn count(&self) -> Result<u64> {
        let n: i64 = self
            .conn
            .query_row("SELECT count(*) FROM reports", [], |r| r.get(0))
            .context("cannot count reports")?;
        Ok(n as u64)
    }

    /// Every stored idempotency key, in insertion order.
    pub fn keys(&self) -> Result<Vec<String>> {
        let mut st = self
            .conn
            .prepare("SELECT idempotency_key FROM reports ORDER BY id")?;
        let keys = st
            .query_map([], |r| r.get(0))?
            .collect::<rusqlite::Result<Vec<String>>>()
            .context("cannot read keys")?;
        Ok(keys)
    }

    /// Reports matching `f`.
    pub fn list(&self, f: &Filter) -> Result<Vec<Row>> {
        let mut sql = format!("{SELECT_ROWS} WHERE 1=1");
        let mut args: Vec<&dyn rusqlite::ToSql> = vec![];
        for (col, v) in [
            ("model", &f.model),
            ("device", &f.device),
            ("schema", &f.schema),
        ] {
            if let Some(v) = v {
                sql.push_str(&format!(" AND {col} = ?{}", args.len() + 1));
                args.push(v);
            }
        }
        match f.limit {
            Some(n) => sql.push_str(&format!(" ORDER BY id DESC LIMIT {n}")),
            None => sql.push_str(" ORDER BY id"),
        }
        let mut st = self.conn.prepare(&sql).context("cannot query reports")?;
        let rows = st
            .query_map(args.as_slice(), |r| row(r, f.with_body))?
            .collect::<rusqlite::Result<Vec<Row>>>()
            .context("cannot read reports")?;
        Ok(rows)
    }

    /// One report with its body.
    pub fn get(&self, id: i64) -> Result<Option<Row>> {
        self.conn
            .query_row(&format!("{SELECT_ROWS} WHERE id = ?1"), [id], |r| {
                row(r, true)
            })
            .optional()
            .with_context(|| format!("cannot read report {id}"))
    }
}

/// The columns [`row`] reads, in its order.
const SELECT_ROWS: &str = "SELECT id, idempotency_key, received_at_ms, schema, model, device, target, arch, precision, emulated, p50_ms, p90_ms, p99_ms, mean_ms, throughput_per_s, cold_start_ms, peak_rss_bytes, outcome, body FROM reports";

fn row(r: &rusqlite::Row, with_body: bool) -> rusqlite::Result<Row> {
    let body: String = r.get(18)?;
    Ok(Row {
        id: r.get(0)?,
        idempotency_key: r.get(1)?,
        received_at_ms: r.get(2)?,
        summary: Summary {
            schema: r.get(3)?,
            model: r.get(4)?,
            device: r.get(5)?,
            target: r.get(6)?,
            arch: r.get(7)?,
            precision: r.get(8)?,
            emulated: r.get(9)?,
            p50_ms: r.get(10)?,
            p90_ms: r.get(11)?,
            p99_ms: r.get(12)?,
            mean_ms: r.get(13)?,
            throughput_per_s: r.get(14)?,
            cold_start_ms: r.get(15)?,
            peak_rss_bytes: r.get(16)?,
            outcome: r.get(17)?,
        },
        // The body was valid JSON when stored; a hand-edited row shows as a string.
        report: with_body.then(|| serde_json::from_str(&body).unwrap_or(Value::String(body))),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary() -> Summary {
        crate::validate::check(
            br#"{"schema":"kiln.bench/1","model":"m","target":"t","latency_ms":{"p50":1,"p90":2,"p99":3,"mean":1.5}}"#,
        )
        .unwrap()
        .1
    }

    #[test]
    fn a_key_is_stored_once() {
        let d = tempfile::tempdir().unwrap();
        let mut s = Store::open(&d.path().join("k.db")).unwrap();
        let a = s.insert("k1", "{\"a\":1}", &summary()).unwrap();
        let Inserted::Stored(id) = a else {
            panic!("{a:?}")
        };
        assert_eq!(
            s.insert("k1", "{\"a\":1}", &summary()).unwrap(),
            Inserted::Duplicate(id)
        );
        assert_eq!(
            s.insert("k1", "{\"a\":2}", &summary()).unwrap(),
            Inserted::Conflict(id)
        );
        assert_eq!(s.count().unwrap(), 1);
        // Reopening keeps it, and the schema check passes.
        drop(s);
        let s = Store::open(&d.path().join("k.db")).unwrap();
        assert_eq!(s.keys().unwrap(), vec!["k1"]);
        assert_eq!(s.get(id).unwrap().unwrap().report.unwrap()["a"], 1);
        let only_m = Filter {
            model: Some("m".into()),
            ..Filter::default()
        };
        assert_eq!(s.list(&only_m).unwrap().len(), 1);
        let only_x = Filter {
            model: Some("x".into()),
            ..Filter::default()
        };
        assert!(s.list(&only_x).unwrap().is_empty());
    }

    #[test]
    fn refuses_foreign_and_corrupt_files() {
        let d = tempfile::tempdir().unwrap();
        let junk = d.path().join("junk.db");
        std::fs::write(&junk, vec![0x5a; 8192]).unwrap();
        let e = format!("{:#}", Store::open(&junk).err().unwrap());
        assert!(
            e.contains("junk.db") && e.contains("not a usable kiln report database"),
            "{e}"
        );
        let other = d.path().join("other.db");
        Connection::open(&other)
            .unwrap()
            .execute_batch("CREATE TABLE t (x)")
            .unwrap();
        let e = format!("{:#}", Store::open(&other).err().unwrap());
        assert!(e.contains("not a kiln report store"), "{e}");
    }
}
