//! `kiln report --html`: one self-contained page (inline SVG drawn by plotters, inline CSS,
//! no scripts, no external resources) with a latency CDF per model (one line per device
//! and precision), a per-op time chart per model and device, and comparison tables.

use std::collections::BTreeMap;

use anyhow::{anyhow, Result};
use plotters::prelude::*;
use serde_json::Value;

use crate::store::Row;

/// Chart size in pixels.
const CHART: (u32, u32) = (760, 380);

/// A `YYYY-MM-DD HH:MM:SS` UTC rendering of a Unix time in ms.
pub fn utc(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Howard Hinnant's civil-from-days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Escapes text for HTML content and attributes.
pub fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// One (model, device, target, precision) group of bench reports.
struct Group<'a> {
    model: String,
    label: String,
    rows: Vec<&'a Row>,
}

impl Group<'_> {
    /// The newest report of the group.
    fn latest(&self) -> &Row {
        self.rows[self.rows.len() - 1]
    }
}

/// Renders the page for `rows` (with bodies) read from `source` (named in the header).
pub fn render(rows: &[Row], source: &str) -> Result<String> {
    let mut groups: BTreeMap<(String, String), Group> = BTreeMap::new();
    for r in rows.iter().filter(|r| r.summary.schema == "kiln.bench/1") {
        let model = r.summary.model.clone().unwrap_or_else(|| "?".into());
        let label = format!(
            "{} · {} · {}",
            r.summary.device.as_deref().unwrap_or("?"),
            r.summary.target.as_deref().unwrap_or("?"),
            r.summary.precision.as_deref().unwrap_or("?")
        );
        groups
            .entry((model.clone(), label.clone()))
            .or_insert_with(|| Group {
                model,
                label,
                rows: vec![],
            })
            .rows
            .push(r);
    }
    let mut by_model: BTreeMap<&str, Vec<&Group>> = BTreeMap::new();
    for g in groups.values() {
        by_model.entry(g.model.as_str()).or_default().push(g);
    }

    let mut h = String::new();
    h.push_str("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\n<title>kiln benchmark report</title>\n<style>\nbody{font-family:sans-serif;margin:24px;color:#222}\ntable{border-collapse:collapse;margin:8px 0 24px}\nth,td{border:1px solid #ccc;padding:4px 8px;text-align:right}\nth{background:#f0f0f0}td.l,th.l{text-align:left}\ntr.best td{background:#e8f6e8}\n.emu{color:#a60}\nsection{margin-bottom:32px}\nfigure{margin:8px 0}\n</style></head><body>\n");
    h.push_str(&format!(
        "<h1>kiln benchmark report</h1>\n<p>{} report(s) from <code>{}</code>: {} benchmark(s) of {} model(s) on {} device/precision group(s).</p>\n",
        rows.len(),
        escape(source),
        rows.iter().filter(|r| r.summary.schema == "kiln.bench/1").count(),
        by_model.len(),
        groups.len()
    ));
    if by_model.is_empty() {
        h.push_str("<p>No benchmark reports stored yet: run <code>kiln-runner bench --report-to URL</code> against <code>kiln collect</code>.</p>\n");
    }

    h.push_str("<h2>Devices and precisions compared</h2>\n<p>Newest report per model, device, target and precision; <em>runs</em> counts all of them. The fastest median per model is highlighted. Emulated runs (qemu-user) do not measure the device.</p>\n<table id=\"comparison\">\n<tr><th class=\"l\">model</th><th class=\"l\">device</th><th class=\"l\">target</th><th class=\"l\">precision</th><th>runs</th><th>p50 ms</th><th>p90 ms</th><th>p99 ms</th><th>× fastest</th><th>inferences/s</th><th>cold start ms</th><th>peak RSS MB</th></tr>\n");
    for (model, gs) in &by_model {
        let best = gs
            .iter()
            .filter_map(|g| g.latest().summary.p50_ms)
            .fold(f64::INFINITY, f64::min);
        for g in gs {
            let r = g.latest();
            let f = |x: Option<f64>, p: usize| x.map_or("-".into(), |v| format!("{v:.p$}"));
            let ratio = r.summary.p50_ms.map(|p| p / best);
            let emulated = r.summary.emulated == Some(true);
            h.push_str(&format!(
                "<tr{}><td class=\"l\">{}</td><td class=\"l\">{}{}</td><td class=\"l\">{}</td><td class=\"l\">{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>\n",
                if ratio == Some(1.0) { " class=\"best\"" } else { "" },
                escape(model),
                escape(r.summary.device.as_deref().unwrap_or("?")),
                if emulated { " <span class=\"emu\">(emulated)</span>" } else { "" },
                escape(r.summary.target.as_deref().unwrap_or("?")),
                escape(r.summary.precision.as_deref().unwrap_or("?")),
                g.rows.len(),
                f(r.summary.p50_ms, 3),
                f(r.summary.p90_ms, 3),
                f(r.summary.p99_ms, 3),
                f(ratio, 2),
                f(r.summary.throughput_per_s, 1),
                f(r.summary.cold_start_ms, 1),
                f(r.summary.peak_rss_bytes.map(|b| b as f64 / 1e6), 1),
            ));
        }
    }
    h.push_str("</table>\n");

    for (model, gs) in &by_model {
        h.push_str(&format!(
            "<section class=\"model\"><h2>{}</h2>\n<figure class=\"cdf\">{}<figcaption>Latency CDF of one inference (from each newest report's min, p50, p90, p99, max), one line per device · target · precision.</figcaption></figure>\n",
            escape(model),
            cdf_chart(model, gs)?
        ));
        for g in gs {
            let ops = profile(g.latest());
            if ops.is_empty() {
                continue;
            }
            h.push_str(&format!(
                "<figure class=\"ops\">{}<figcaption>Time per op type in one profiled run: {} on {}.</figcaption></figure>\n",
                ops_chart(&format!("{model} on {}", g.label), &ops)?,
                escape(model),
                escape(&g.label)
            ));
        }
        h.push_str("</section>\n");
    }

    let installs: Vec<&Row> = rows
        .iter()
        .filter(|r| r.summary.schema == "kiln.install/1")
        .collect();
    if !installs.is_empty() {
        h.push_str("<h2>Installs</h2>\n<table id=\"installs\"><tr><th class=\"l\">received (UTC)</th><th class=\"l\">model</th><th class=\"l\">device</th><th class=\"l\">outcome</th><th class=\"l\">detail</th></tr>\n");
        for r in installs {
            let detail = r
                .report
                .as_ref()
                .and_then(|v| v.get("detail"))
                .and_then(Value::as_str)
                .unwrap_or("");
            h.push_str(&format!(
                "<tr><td class=\"l\">{}</td><td class=\"l\">{}</td><td class=\"l\">{}</td><td class=\"l\">{}</td><td class=\"l\">{}</td></tr>\n",
                utc(r.received_at_ms),
                escape(r.summary.model.as_deref().unwrap_or("?")),
                escape(r.summary.device.as_deref().unwrap_or("?")),
                escape(r.summary.outcome.as_deref().unwrap_or("?")),
                escape(detail)
            ));
        }
        h.push_str("</table>\n");
    }
    h.push_str("</body></html>\n");
    Ok(h)
}

/// `(op, ms)` of a bench report's per-op profile, largest first.
fn profile(r: &Row) -> Vec<(String, f64)> {
    let mut ops: Vec<(String, f64)> = r
        .report
        .as_ref()
        .and_then(|v| v.get("profile"))
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|p| {
                    Some((
                        p.get("op")?.as_str()?.to_string(),
                        p.get("ms")?
                            .as_f64()
                            .filter(|x| x.is_finite() && *x >= 0.0)?,
                    ))
                })
                .collect()
        })
        .unwrap_or_default();
    ops.sort_by(|a, b| b.1.total_cmp(&a.1));
    ops.truncate(12);
    ops
}

fn plot_err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow!("drawing a chart failed: {e:?}")
}

/// The latency CDF of each group's newest report, as inline SVG.
fn cdf_chart(model: &str, groups: &[&Group]) -> Result<String> {
    let series: Vec<(String, Vec<(f64, f64)>)> = groups
        .iter()
        .filter_map(|g| {
            let r = g.latest();
            let lat = r.report.as_ref()?.get("latency_ms")?;
            let q = |k: &str| lat.get(k).and_then(Value::as_f64);
            let pts = vec![
                (q("min").or(r.summary.p50_ms)?, 0.0),
                (r.summary.p50_ms?, 0.5),
                (r.summary.p90_ms?, 0.9),
                (r.summary.p99_ms?, 0.99),
                (q("max").or(r.summary.p99_ms)?, 1.0),
            ];
            Some((g.label.clone(), pts))
        })
        .collect();
    let x_max = series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|(x, _)| *x))
        .fold(0.0f64, f64::max)
        .max(1e-3)
        * 1.05;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, CHART).into_drawing_area();
        root.fill(&WHITE).map_err(plot_err)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(format!("{model}: latency CDF"), ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(50)
            .build_cartesian_2d(0.0..x_max, 0.0..1.0)
            .map_err(plot_err)?;
        chart
            .configure_mesh()
            .x_desc("latency of one inference (ms)")
            .y_desc("fraction of runs")
            .draw()
            .map_err(plot_err)?;
        for (i, (label, pts)) in series.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            chart
                .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
                .map_err(plot_err)?
                .label(label.clone())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
                });
            chart
                .draw_series(pts.iter().map(|p| Circle::new(*p, 3, color.filled())))
                .map_err(plot_err)?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(plot_err)?;
        root.present().map_err(plot_err)?;
    }
    Ok(svg)
}

/// Horizontal bars of time per op type, as inline SVG.
fn ops_chart(title: &str, ops: &[(String, f64)]) -> Result<String> {
    let total: f64 = ops.iter().map(|(_, ms)| ms).sum();
    let x_max = ops
        .iter()
        .map(|(_, ms)| *ms)
        .fold(0.0f64, f64::max)
        .max(1e-6)
        * 1.6;
    let n = ops.len() as f64;
    let height = 90 + 26 * ops.len() as u32;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (CHART.0, height)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_err)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(format!("{title}: time per op"), ("sans-serif", 16))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(10)
            .build_cartesian_2d(0.0..x_max, 0.0..n)
            .map_err(plot_err)?;
        chart
            .configure_mesh()
            .disable_y_mesh()
            .disable_y_axis()
            .x_desc("ms in one profiled run")
            .draw()
            .map_err(plot_err)?;
        let color = Palette99::pick(0).to_rgba();
        chart
            .draw_series(ops.iter().enumerate().map(|(i, (_, ms))| {
                let y = n - i as f64;
                Rectangle::new([(0.0, y - 0.85), (*ms, y - 0.15)], color.filled())
            }))
            .map_err(plot_err)?;
        chart
            .draw_series(ops.iter().enumerate().map(|(i, (op, ms))| {
                let y = n - i as f64 - 0.35;
                Text::new(
                    format!("{op} {ms:.3} ms ({:.0}%)", ms * 100.0 / total.max(1e-12)),
                    (*ms + x_max * 0.01, y),
                    ("sans-serif", 13).into_font(),
                )
            }))
            .map_err(plot_err)?;
        root.present().map_err(plot_err)?;
    }
    Ok(svg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_matches_known_dates() {
        assert_eq!(utc(0), "1970-01-01 00:00:00");
        assert_eq!(utc(1_700_000_000_123), "2023-11-14 22:13:20");
        assert_eq!(utc(951_782_400_000), "2000-02-29 00:00:00");
    }

    #[test]
    fn escapes_markup() {
        assert_eq!(
            escape("<a href=\"x\">&</a>"),
            "&lt;a href=&quot;x&quot;&gt;&amp;&lt;/a&gt;"
        );
    }
}

#[cfg(test)]
mod render_tests {
    use super::*;
    use crate::store::{Filter, Store};

    #[test]
    fn page_has_charts_and_table_and_escapes_names() {
        let d = tempfile::tempdir().unwrap();
        let mut s = Store::open(&d.path().join("r.db")).unwrap();
        for (i, (device, p50)) in [("pi<5>", 4.0), ("nuc", 1.0), ("nuc", 1.2)]
            .iter()
            .enumerate()
        {
            let body = serde_json::json!({
                "schema": "kiln.bench/1", "model": "net<script>", "target": "t", "device": device,
                "precision": "f32", "emulated": false,
                "latency_ms": {"min": p50 * 0.9, "p50": p50, "p90": p50 * 1.1, "p99": p50 * 1.3, "max": p50 * 1.5, "mean": p50},
                "profile": [{"op": "Conv", "nodes": 3, "ms": p50 * 0.7, "share": 0.7}, {"op": "Add", "nodes": 1, "ms": p50 * 0.3, "share": 0.3}],
                "n": i,
            })
            .to_string();
            let (_, sum) = crate::validate::check(body.as_bytes()).unwrap();
            s.insert(&format!("k{i}"), &body, &sum).unwrap();
        }
        let rows = s
            .list(&Filter {
                with_body: true,
                ..Filter::default()
            })
            .unwrap();
        let page = render(&rows, "r.db").unwrap();
        assert!(!page.contains("<script>"), "names are escaped");
        // One CDF for the model, one op chart per device group.
        assert_eq!(page.matches("<svg").count(), 3, "{page}");
        assert!(page.contains("id=\"comparison\""));
        // nuc's newest report (p50 1.2) is compared: pi<5> is 3.33x slower.
        assert!(page.contains("<td>3.33</td>"), "{page}");
        // Self-contained: nothing loaded from elsewhere.
        assert!(!page.contains(" src=") && !page.contains("<link") && !page.contains("url("));
    }
}
