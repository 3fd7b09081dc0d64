//! Charts drawn on the server as SVG: no script, nothing fetched, readable without JavaScript.

use crate::store::pages::Hour;
use std::fmt::Write;

const W: f64 = 840.0;
const H: f64 = 160.0;
const PAD: f64 = 28.0;

/// Applied and failed runs per hour, as stacked bars, with the hours' count beneath.
pub fn runs_per_hour(hours: &[Hour]) -> String {
    let top = hours.iter().map(|h| h.applied + h.failed).max().unwrap_or(0).max(1) as f64;
    let step = (W - PAD) / hours.len().max(1) as f64;
    let mut out = open("Applied and failed runs per hour", top);
    for (i, h) in hours.iter().enumerate() {
        let x = PAD + i as f64 * step;
        let (a, f) = (h.applied as f64 / top * (H - PAD), h.failed as f64 / top * (H - PAD));
        let base = H - PAD;
        if h.applied > 0 {
            let _ = write!(
                out,
                r#"<rect class="applied" x="{x:.1}" y="{:.1}" width="{:.1}" height="{a:.1}"><title>{}: {} applied</title></rect>"#,
                base - a,
                (step - 0.5).max(0.5),
                h.hour,
                h.applied
            );
        }
        if h.failed > 0 {
            let _ = write!(
                out,
                r#"<rect class="failed" x="{x:.1}" y="{:.1}" width="{:.1}" height="{f:.1}"><title>{}: {} failed or refused</title></rect>"#,
                base - a - f,
                (step - 0.5).max(0.5),
                h.hour,
                h.failed
            );
        }
    }
    close(out, hours)
}

/// Drifted tenants at each hour's last drift report, as a line (hours without a report are gaps).
pub fn drift_per_hour(hours: &[Hour]) -> String {
    let top = hours.iter().filter_map(|h| h.drifted).max().unwrap_or(0).max(1) as f64;
    let step = (W - PAD) / hours.len().max(1) as f64;
    let mut out = open("Drifted tenants per hour", top);
    let mut points = String::new();
    for (i, h) in hours.iter().enumerate() {
        let Some(n) = h.drifted else { continue };
        let (x, y) = (PAD + (i as f64 + 0.5) * step, H - PAD - n as f64 / top * (H - PAD));
        let _ = write!(points, "{x:.1},{y:.1} ");
        let _ = write!(
            out,
            r#"<circle class="drift" cx="{x:.1}" cy="{y:.1}" r="2"><title>{}: {n} drifted</title></circle>"#,
            h.hour
        );
    }
    if !points.is_empty() {
        let _ = write!(out, r#"<polyline class="drift" points="{}"/>"#, points.trim_end());
    }
    close(out, hours)
}

fn open(label: &str, top: f64) -> String {
    format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {W} {H}" role="img" aria-label="{label}"><line class="axis" x1="{PAD}" y1="{b}" x2="{W}" y2="{b}"/><text class="tick" x="2" y="12">{top}</text><text class="tick" x="2" y="{b}">0</text>"#,
        b = H - PAD
    )
}

fn close(mut out: String, hours: &[Hour]) -> String {
    if let (Some(first), Some(last)) = (hours.first(), hours.last()) {
        let _ = write!(
            out,
            r#"<text class="tick" x="{PAD}" y="{}">{}</text><text class="tick end" x="{W}" y="{}">{}</text>"#,
            H - 8.0,
            &first.hour[..13.min(first.hour.len())],
            H - 8.0,
            &last.hour[..13.min(last.hour.len())]
        );
    }
    out.push_str("</svg>");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hour(i: usize, applied: i64, failed: i64, drifted: Option<i64>) -> Hour {
        Hour {
            hour: format!("2026-12-08T{i:02}:00:00Z"),
            applied,
            failed,
            drifted,
        }
    }

    #[test]
    fn bars_and_points_follow_the_counts() {
        let hours = [hour(0, 2, 0, Some(3)), hour(1, 0, 0, None), hour(2, 1, 1, Some(0))];
        let runs = runs_per_hour(&hours);
        assert_eq!(runs.matches("class=\"applied\"").count(), 2);
        assert_eq!(runs.matches("class=\"failed\"").count(), 1);
        assert!(runs.contains("2026-12-08T02:00:00Z: 1 failed or refused"));
        let drift = drift_per_hour(&hours);
        assert_eq!(drift.matches("<circle").count(), 2, "the hour without a report is a gap");
        assert!(drift.starts_with("<svg") && drift.ends_with("</svg>"));
    }
}
