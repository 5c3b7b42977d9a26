//! Output formats: a human table, `kiln.check/1` JSON, JUnit XML (one test case per metric),
//! GitHub workflow annotations plus a Markdown step summary, and Markdown for a PR comment.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use serde_json::json;

use crate::compare::{Comparison, Row, Status};

/// Schema tag of the JSON verdict.
pub const CHECK_SCHEMA: &str = "kiln.check/1";

/// An output format of `kiln check`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Aligned text table (default).
    Table,
    /// `kiln.check/1` JSON.
    Json,
    /// JUnit XML.
    Junit,
    /// GitHub Actions annotations (+ step summary).
    Github,
    /// Markdown (PR comment).
    Markdown,
}

impl Format {
    /// Parses a `--format` value.
    pub fn parse(s: &str) -> Result<Format> {
        Ok(match s {
            "table" | "text" => Format::Table,
            "json" => Format::Json,
            "junit" => Format::Junit,
            "github" => Format::Github,
            "markdown" | "md" => Format::Markdown,
            other => bail!("unknown format `{other}` (table, json, junit, github, markdown)"),
        })
    }
}

/// What a report says besides the rows: where the baseline came from and how latency was
/// measured.
#[derive(Debug, Clone)]
pub struct Report<'a> {
    /// The comparison.
    pub comparison: &'a Comparison,
    /// Baseline file as given.
    pub baseline: String,
    /// Latency reference model of the current measurement, if any.
    pub reference: Option<String>,
    /// Current timings came from qemu-user.
    pub emulated: bool,
}

impl Report<'_> {
    fn verdict(&self) -> String {
        let n = self.comparison.regressions();
        let total = self.comparison.rows.len();
        if n == 0 {
            format!("passed: {total} metrics within budget")
        } else {
            format!(
                "{n} regression{} in {total} metrics",
                if n == 1 { "" } else { "s" }
            )
        }
    }

    /// Rows, regressions first, then within-noise, then the rest in name order.
    fn ordered(&self) -> Vec<&Row> {
        let rank = |s: Status| match s {
            Status::Regressed => 0,
            Status::WithinNoise => 1,
            _ => 2,
        };
        let mut rows: Vec<&Row> = self.comparison.rows.iter().collect();
        rows.sort_by_key(|r| rank(r.status));
        rows
    }

    fn notes(&self) -> Vec<String> {
        let mut notes = vec![format!(
            "a metric fails only when it is worse than its budget and than its noise band ({} sigma of the runs' spread)",
            self.comparison.noise_sigmas
        )];
        if let Some(r) = &self.reference {
            notes.push(format!(
                "latency is the ratio to reference model `{r}` timed in the same rounds"
            ));
        }
        if self.emulated {
            notes.push("timings ran under qemu-user: latency is not representative".into());
        }
        notes
    }
}

/// A metric value in its unit, human-sized.
pub fn value(unit: &str, v: f64) -> String {
    match unit {
        "bytes" => bytes(v),
        "ms" => format!("{v:.3} ms"),
        "x ref" => format!("{v:.3}x"),
        "%" => format!("{v:.2}%"),
        "cosine" => format!("{v:.5}"),
        other => format!("{v} {other}"),
    }
}

fn bytes(v: f64) -> String {
    let a = v.abs();
    if a >= 1e6 {
        format!("{:.3} MB", v / 1e6)
    } else if a >= 1e3 {
        format!("{:.2} kB", v / 1e3)
    } else {
        format!("{v:.0} B")
    }
}

/// The change: signed, in the unit, and in percent of the baseline.
pub fn change(r: &Row) -> String {
    let sign = if r.change > 0.0 { "+" } else { "" };
    let abs = match r.unit.as_str() {
        "%" => format!("{sign}{:.2} pts", r.change),
        u => format!("{sign}{}", value(u, r.change)),
    };
    match r.change_pct {
        Some(p) if r.change != 0.0 => format!("{abs} ({}{p:.1}%)", if p > 0.0 { "+" } else { "" }),
        _ => abs,
    }
}

/// The noise band, `±x.x%` (`-` for exact quantities).
pub fn noise(r: &Row) -> String {
    if r.noise_pct > 0.0 {
        format!("±{:.1}%", r.noise_pct)
    } else {
        "-".into()
    }
}

/// One line on a failing (or within-noise) metric: both numbers, budget and noise.
pub fn message(r: &Row) -> String {
    let what = match r.status {
        Status::Regressed => "regressed",
        Status::WithinNoise => "moved past its budget but within the measured noise",
        Status::Improved => "improved",
        Status::Ok => "within budget",
        Status::Ungated => "not gated",
    };
    format!(
        "{} {what}: {} -> {} ({}); budget {} ({}), noise {}",
        r.metric,
        value(&r.unit, r.baseline),
        value(&r.unit, r.current),
        change(r),
        r.budget,
        r.budget_key,
        noise(r)
    )
}

/// Renders `report` in `format` (for `Github`, the annotations; see [`markdown`]).
pub fn render(report: &Report, format: Format) -> String {
    match format {
        Format::Table => table(report),
        Format::Json => json(report),
        Format::Junit => junit(report),
        Format::Github => github(report),
        Format::Markdown => markdown(report),
    }
}

/// The human table.
pub fn table(report: &Report) -> String {
    let header = [
        "metric", "baseline", "current", "change", "budget", "noise", "status",
    ];
    let mut cells: Vec<[String; 7]> = vec![header.map(String::from)];
    for r in report.ordered() {
        cells.push([
            r.metric.clone(),
            value(&r.unit, r.baseline),
            value(&r.unit, r.current),
            change(r),
            r.budget.clone(),
            noise(r),
            r.status.label().to_string(),
        ]);
    }
    let mut width = [0usize; 7];
    for row in &cells {
        for (w, c) in width.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = format!(
        "kiln check against {}: {}\n",
        report.baseline,
        report.verdict()
    );
    for row in &cells {
        let mut line = String::new();
        for (i, (c, w)) in row.iter().zip(width).enumerate() {
            let pad = w - c.chars().count();
            if i == 0 || i == 6 {
                line.push_str(c);
                line.push_str(&" ".repeat(pad));
            } else {
                line.push_str(&" ".repeat(pad));
                line.push_str(c);
            }
            line.push_str("  ");
        }
        out.push_str("  ");
        out.push_str(line.trim_end());
        out.push('\n');
    }
    for r in report.ordered() {
        if matches!(r.status, Status::Regressed | Status::WithinNoise) {
            out.push_str(&format!("  {}\n", message(r)));
        }
    }
    for n in report.notes() {
        out.push_str(&format!("  note: {n}\n"));
    }
    out
}

/// The `kiln.check/1` document.
pub fn json(report: &Report) -> String {
    let c = report.comparison;
    let doc = json!({
        "schema": CHECK_SCHEMA,
        "baseline": report.baseline,
        "passed": c.regressions() == 0,
        "regressions": c.regressions(),
        "noise_sigmas": c.noise_sigmas,
        "reference": report.reference,
        "emulated": report.emulated,
        "metrics": c.rows,
    });
    serde_json::to_string_pretty(&doc).unwrap_or_default() + "\n"
}

/// Escapes text for XML content and attribute values; drops characters XML 1.0 cannot hold.
pub fn xml_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for ch in s.chars() {
        match ch {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            '\t' | '\n' | '\r' => out.push(ch),
            c if (c as u32) < 0x20 || c == '\u{FFFE}' || c == '\u{FFFF}' => {}
            c => out.push(c),
        }
    }
    out
}

/// JUnit XML: one test suite, one test case per metric (class name `kiln.check.<kind>`); a
/// regression is a `<failure>`, an ungated metric `<skipped>`.
pub fn junit(report: &Report) -> String {
    let c = report.comparison;
    let n = c.rows.len();
    let failures = c.regressions();
    let skipped = c
        .rows
        .iter()
        .filter(|r| r.status == Status::Ungated)
        .count();
    let mut out = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    out.push_str(&format!(
        "<testsuites name=\"kiln check\" tests=\"{n}\" failures=\"{failures}\" errors=\"0\" skipped=\"{skipped}\">\n"
    ));
    out.push_str(&format!(
        "  <testsuite name=\"kiln check: {}\" tests=\"{n}\" failures=\"{failures}\" errors=\"0\" skipped=\"{skipped}\">\n",
        xml_escape(&report.baseline)
    ));
    for r in &c.rows {
        out.push_str(&format!(
            "    <testcase classname=\"kiln.check.{}\" name=\"{}\">",
            r.kind.name(),
            xml_escape(&r.metric)
        ));
        let msg = xml_escape(&message(r));
        match r.status {
            Status::Regressed => out.push_str(&format!(
                "\n      <failure type=\"regression\" message=\"{msg}\">{msg}</failure>\n    "
            )),
            Status::Ungated => out.push_str(&format!(
                "\n      <skipped message=\"budget off\"/>\n      <system-out>{msg}</system-out>\n    "
            )),
            _ => out.push_str(&format!("\n      <system-out>{msg}</system-out>\n    ")),
        }
        out.push_str("</testcase>\n");
    }
    out.push_str("  </testsuite>\n</testsuites>\n");
    out
}

/// Escapes a GitHub workflow command's message.
fn gh_data(s: &str) -> String {
    s.replace('%', "%25")
        .replace('\r', "%0D")
        .replace('\n', "%0A")
}

/// Escapes a GitHub workflow command's property value.
fn gh_property(s: &str) -> String {
    gh_data(s).replace(':', "%3A").replace(',', "%2C")
}

/// GitHub Actions annotations: `::error` per regression, `::warning` per metric past its
/// budget but within noise, and a `::notice` with the verdict.
pub fn github(report: &Report) -> String {
    let mut out = String::new();
    for r in report.ordered() {
        let level = match r.status {
            Status::Regressed => "error",
            Status::WithinNoise => "warning",
            _ => continue,
        };
        out.push_str(&format!(
            "::{level} title={}::{}\n",
            gh_property(&format!("kiln check: {}", r.metric)),
            gh_data(&message(r))
        ));
    }
    let level = if report.comparison.regressions() == 0 {
        "notice"
    } else {
        "error"
    };
    out.push_str(&format!(
        "::{level} title=kiln check::{}\n",
        gh_data(&format!(
            "{} (baseline {})",
            report.verdict(),
            report.baseline
        ))
    ));
    out
}

/// Escapes a Markdown table cell.
fn md_cell(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('|', "\\|")
        .replace('\n', " ")
}

/// Markdown: verdict, the table (regressions first), notes. For PR comments and the GitHub
/// step summary.
pub fn markdown(report: &Report) -> String {
    let icon = if report.comparison.regressions() == 0 {
        "✅"
    } else {
        "❌"
    };
    let mut out = format!(
        "### {icon} kiln check: {}\n\nBaseline `{}`.\n\n",
        report.verdict(),
        md_cell(&report.baseline)
    );
    out.push_str("| metric | baseline | current | change | budget | noise | status |\n");
    out.push_str("|---|---:|---:|---:|---:|---:|---|\n");
    for r in report.ordered() {
        let status = match r.status {
            Status::Regressed => "**REGRESSED**".to_string(),
            s => s.label().to_string(),
        };
        out.push_str(&format!(
            "| `{}` | {} | {} | {} | {} | {} | {} |\n",
            md_cell(&r.metric),
            md_cell(&value(&r.unit, r.baseline)),
            md_cell(&value(&r.unit, r.current)),
            md_cell(&change(r)),
            md_cell(&r.budget),
            md_cell(&noise(r)),
            status
        ));
    }
    out.push('\n');
    for n in report.notes() {
        out.push_str(&format!("- {n}\n"));
    }
    out
}

/// Appends `markdown` to the file `$GITHUB_STEP_SUMMARY` names (read, append, written
/// atomically); `None` when the variable is unset.
pub fn write_step_summary(markdown: &str) -> Result<Option<PathBuf>> {
    let Some(path) = std::env::var_os("GITHUB_STEP_SUMMARY").filter(|p| !p.is_empty()) else {
        return Ok(None);
    };
    let path = PathBuf::from(path);
    let mut text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => {
            return Err(e)
                .with_context(|| format!("cannot read $GITHUB_STEP_SUMMARY {}", path.display()))
        }
    };
    if !text.is_empty() && !text.ends_with('\n') {
        text.push('\n');
    }
    text.push_str(markdown);
    kiln_io::fsutil::write_atomic(&path, text.as_bytes())
        .with_context(|| format!("cannot write $GITHUB_STEP_SUMMARY {}", path.display()))?;
    Ok(Some(path))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::budget::Budgets;
    use crate::compare::compare;
    use crate::measure::{Kind, Measurement, Metric};

    /// Renders a fixed comparison (one regression `a&b/<x>`, one ok size) in `format` and
    /// checks the output contains every `expected` piece, in order.
    fn check(format: Format, expected: &[&str]) {
        let mut b = Measurement::default();
        let mut c = Measurement::default();
        b.insert("a&b", "<x>", Metric::exact(Kind::Size, "bytes", 1000.0));
        c.insert("a&b", "<x>", Metric::exact(Kind::Size, "bytes", 2000.0));
        b.insert(
            "n",
            "latency_p50",
            Metric::series(Kind::Latency, "x ref", vec![1.0, 1.1, 0.9]),
        );
        c.insert(
            "n",
            "latency_p50",
            Metric::series(Kind::Latency, "x ref", vec![1.0, 1.1, 0.9]),
        );
        let budgets = Budgets::new(&BTreeMap::new(), 3.0, "t").unwrap();
        let cmp = compare(&b, &c, &budgets);
        let report = Report {
            comparison: &cmp,
            baseline: "base|line.json".into(),
            reference: Some("ref".into()),
            emulated: false,
        };
        let out = render(&report, format);
        let mut at = 0;
        for e in expected {
            match out[at..].find(e) {
                Some(i) => at += i + e.len(),
                None => panic!("{format:?} output lacks `{e}` after byte {at}:\n{out}"),
            }
        }
    }

    #[test]
    fn formats() {
        check(
            Format::Table,
            &[
                "1 regression in 2 metrics",
                "a&b/<x>",
                "1.00 kB",
                "2.00 kB",
                "+1.00 kB (+100.0%)",
                "+2%",
                "REGRESSED",
                "n/latency_p50",
                "±",
                "ok",
                "ratio to reference model `ref`",
            ],
        );
        check(
            Format::Junit,
            &[
                "<testsuites name=\"kiln check\" tests=\"2\" failures=\"1\"",
                "base|line.json",
                "<testcase classname=\"kiln.check.size\" name=\"a&amp;b/&lt;x&gt;\">",
                "<failure type=\"regression\"",
                "budget +2% (size)",
                "</failure>",
                "<testcase classname=\"kiln.check.latency\" name=\"n/latency_p50\">",
                "<system-out>",
                "</testsuites>",
            ],
        );
        check(
            Format::Github,
            &[
                "::error title=kiln check%3A a&b/<x>::a&b/<x> regressed: 1.00 kB -> 2.00 kB (+1.00 kB (+100.0%25))",
                "::error title=kiln check::1 regression in 2 metrics",
            ],
        );
        check(
            Format::Markdown,
            &[
                "### ❌ kiln check: 1 regression",
                "`base\\|line.json`",
                "| `a&b/<x>` | 1.00 kB | 2.00 kB |",
                "**REGRESSED**",
                "| `n/latency_p50` |",
            ],
        );
        check(
            Format::Json,
            &[
                "\"status\": \"regressed\"",
                "\"status\": \"ok\"",
                "\"passed\": false",
                "\"schema\": \"kiln.check/1\"",
            ],
        );
    }

    #[test]
    fn escapes() {
        assert_eq!(xml_escape("a<b>&\"'\u{1}c"), "a&lt;b&gt;&amp;&quot;&apos;c");
        assert_eq!(gh_property("a:b,c%\n"), "a%3Ab%2Cc%25%0A");
        assert_eq!(md_cell("a|b\nc"), "a\\|b c");
        assert!(Format::parse("xml")
            .unwrap_err()
            .to_string()
            .contains("unknown format `xml`"));
        assert_eq!(Format::parse("junit").unwrap(), Format::Junit);
    }
}
