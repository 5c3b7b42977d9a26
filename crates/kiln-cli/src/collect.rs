//! `kiln collect` (the report collector), `kiln reports list|show|export` and
//! `kiln report --html`: thin wrappers over kiln-collect.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use kiln_collect::store::{Filter, Row, Store};

/// `kiln collect` arguments.
#[derive(clap::Args)]
pub struct CollectArgs {
    /// Address to listen on (port 0 picks a free port; the URL is printed).
    #[arg(long, default_value = "127.0.0.1:7878")]
    listen: String,
    /// SQLite database to store reports in (created if missing).
    #[arg(long)]
    db: PathBuf,
    /// Largest accepted report, bytes (HTTP 413 above).
    #[arg(long, default_value_t = 1 << 20)]
    max_body: usize,
    /// Request-handling threads.
    #[arg(long, default_value_t = 8)]
    workers: usize,
}

/// Runs the collector until the process is stopped.
pub fn collect(a: CollectArgs) -> Result<ExitCode> {
    let c = kiln_collect::start(
        &a.listen,
        &a.db,
        kiln_collect::ServerOptions {
            max_body: a.max_body,
            workers: a.workers,
        },
    )?;
    // One line a script (or test) can read to learn the port.
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "kiln collect: listening on {} (db {})",
        c.url(),
        a.db.display()
    )?;
    out.flush()?;
    drop(out);
    c.wait();
    Ok(ExitCode::SUCCESS)
}

/// `kiln reports` arguments.
#[derive(clap::Args)]
pub struct ReportsArgs {
    #[command(subcommand)]
    cmd: ReportsCmd,
}

#[derive(clap::Subcommand)]
enum ReportsCmd {
    /// List stored reports (oldest first; --limit N shows the newest N).
    List {
        /// The collector's database.
        #[arg(long)]
        db: PathBuf,
        #[command(flatten)]
        filter: FilterArgs,
        /// Print JSON (an array of rows) instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Print one report as received, with what the collector recorded about it.
    Show {
        /// Report id (from `kiln reports list`).
        id: i64,
        /// The collector's database.
        #[arg(long)]
        db: PathBuf,
    },
    /// Export reports as JSON lines (full reports) or CSV (indexed fields).
    Export {
        /// The collector's database.
        #[arg(long)]
        db: PathBuf,
        /// jsonl or csv.
        #[arg(long, default_value = "jsonl")]
        format: String,
        /// Output file (default: stdout).
        #[arg(short = 'o', long = "out")]
        out: Option<PathBuf>,
        #[command(flatten)]
        filter: FilterArgs,
    },
}

#[derive(clap::Args)]
struct FilterArgs {
    /// Only this model.
    #[arg(long)]
    model: Option<String>,
    /// Only this device.
    #[arg(long)]
    device: Option<String>,
    /// Only this schema (kiln.bench/1, kiln.install/1).
    #[arg(long)]
    schema: Option<String>,
    /// Only the newest N.
    #[arg(long)]
    limit: Option<u64>,
}

impl FilterArgs {
    fn filter(self, with_body: bool) -> Filter {
        Filter {
            model: self.model,
            device: self.device,
            schema: self.schema,
            limit: self.limit,
            with_body,
        }
    }
}

/// `kiln reports list|show|export`.
pub fn reports(a: ReportsArgs) -> Result<ExitCode> {
    match a.cmd {
        ReportsCmd::List { db, filter, json } => {
            let rows = Store::open_existing(&db)?.list(&filter.filter(false))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                print_table(&rows);
            }
        }
        ReportsCmd::Show { id, db } => {
            let row = Store::open_existing(&db)?
                .get(id)?
                .with_context(|| format!("no report with id {id} in {}", db.display()))?;
            println!("{}", serde_json::to_string_pretty(&row)?);
        }
        ReportsCmd::Export {
            db,
            format,
            out,
            filter,
        } => {
            let rows = Store::open_existing(&db)?.list(&filter.filter(format == "jsonl"))?;
            let text = match format.as_str() {
                "jsonl" => jsonl(&rows)?,
                "csv" => csv(&rows),
                other => bail!("--format `{other}`: use jsonl or csv"),
            };
            match out {
                Some(p) => {
                    kiln_io::fsutil::write_atomic(&p, text.as_bytes())?;
                    eprintln!("exported {} report(s) to {}", rows.len(), p.display());
                }
                None => std::io::stdout().lock().write_all(text.as_bytes())?,
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `kiln report` arguments.
#[derive(clap::Args)]
pub struct ReportArgs {
    /// The collector's database.
    #[arg(long)]
    db: PathBuf,
    /// Write a self-contained HTML page (inline SVG charts, no external resources).
    #[arg(long)]
    html: PathBuf,
}

/// `kiln report --db DB --html OUT`.
pub fn report(a: ReportArgs) -> Result<ExitCode> {
    let store = Store::open_existing(&a.db)?;
    let rows = store.list(&Filter {
        with_body: true,
        ..Filter::default()
    })?;
    let page = kiln_collect::html::render(&rows, &a.db.display().to_string())?;
    kiln_io::fsutil::write_atomic(&a.html, page.as_bytes())?;
    println!(
        "wrote {} ({} report(s), {:.1} kB)",
        a.html.display(),
        rows.len(),
        page.len() as f64 / 1e3
    );
    Ok(ExitCode::SUCCESS)
}

fn print_table(rows: &[Row]) {
    let o = |s: &Option<String>| s.clone().unwrap_or_else(|| "-".into());
    let f = |x: Option<f64>| x.map_or("-".into(), |v| format!("{v:.3}"));
    println!(
        "{:>5}  {:<20} {:<14} {:<22} {:<16} {:<6} {:>10} {:>10}  note",
        "id", "received (UTC)", "schema", "model", "device", "prec", "p50 ms", "p99 ms"
    );
    for r in rows {
        let note = match (&r.summary.outcome, r.summary.emulated) {
            (Some(out), _) => out.clone(),
            (None, Some(true)) => "emulated".into(),
            _ => String::new(),
        };
        println!(
            "{:>5}  {:<20} {:<14} {:<22} {:<16} {:<6} {:>10} {:>10}  {note}",
            r.id,
            kiln_collect::html::utc(r.received_at_ms),
            r.summary.schema,
            o(&r.summary.model),
            o(&r.summary.device),
            o(&r.summary.precision),
            f(r.summary.p50_ms),
            f(r.summary.p99_ms),
        );
    }
    println!("{} report(s)", rows.len());
}

fn jsonl(rows: &[Row]) -> Result<String> {
    let mut s = String::new();
    for r in rows {
        s.push_str(&serde_json::to_string(r)?);
        s.push('\n');
    }
    Ok(s)
}

/// CSV (RFC 4180 quoting) of the indexed fields.
fn csv(rows: &[Row]) -> String {
    const HEAD: &str = "id,idempotency_key,received_at_ms,schema,model,device,target,arch,precision,emulated,p50_ms,p90_ms,p99_ms,mean_ms,throughput_per_s,cold_start_ms,peak_rss_bytes,outcome";
    let q = |s: &Option<String>| match s {
        None => String::new(),
        Some(s) if s.contains([',', '"', '\n', '\r']) => format!("\"{}\"", s.replace('"', "\"\"")),
        Some(s) => s.clone(),
    };
    let n = |x: Option<f64>| x.map(|v| v.to_string()).unwrap_or_default();
    let mut out = format!("{HEAD}\n");
    for r in rows {
        let fields = [
            r.id.to_string(),
            q(&Some(r.idempotency_key.clone())),
            r.received_at_ms.to_string(),
            q(&Some(r.summary.schema.clone())),
            q(&r.summary.model),
            q(&r.summary.device),
            q(&r.summary.target),
            q(&r.summary.arch),
            q(&r.summary.precision),
            r.summary
                .emulated
                .map(|b| b.to_string())
                .unwrap_or_default(),
            n(r.summary.p50_ms),
            n(r.summary.p90_ms),
            n(r.summary.p99_ms),
            n(r.summary.mean_ms),
            n(r.summary.throughput_per_s),
            n(r.summary.cold_start_ms),
            r.summary
                .peak_rss_bytes
                .map(|b| b.to_string())
                .unwrap_or_default(),
            q(&r.summary.outcome),
        ];
        out.push_str(&fields.join(","));
        out.push('\n');
    }
    out
}
