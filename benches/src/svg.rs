//! A hand-written SVG chart of a run: one panel of horizontal bars per key metric, one bar
//! per candidate, so the comparison reads at a glance in a browser or on GitHub.

use std::fmt::Write as _;

use crate::procfs::Machine;
use crate::report::{fmt_num, CandidateResult, METRICS};

/// Metrics that get a panel, in order.
const CHARTED: &[&str] = &[
    "upload_gbps",
    "download_gbps",
    "upload_cpu",
    "download_cpu",
    "ping_p50",
    "ping_p99",
    "connect_p50",
    "connects_per_sec",
    "server_kib_per_conn",
    "loaded_p99",
];
/// Bar colours, by candidate index.
const COLOURS: &[&str] = &[
    "#7f7f7f", "#1f77b4", "#ff7f0e", "#d62728", "#2ca02c", "#9467bd", "#8c564b",
];
const PANEL_W: usize = 460;
const LABEL_W: usize = 110;
const BAR_H: usize = 18;
const GAP: usize = 4;
const COLUMNS: usize = 2;

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn colour(i: usize) -> &'static str {
    COLOURS.get(i % COLOURS.len()).copied().unwrap_or("#000")
}

/// Renders the chart.
pub fn render(candidates: &[CandidateResult], machine: &Machine) -> String {
    let shown: Vec<(usize, &CandidateResult)> = candidates
        .iter()
        .enumerate()
        .filter(|(_, c)| c.available)
        .collect();
    let panel_h = 34 + shown.len() * (BAR_H + GAP) + 8;
    let metrics: Vec<_> = CHARTED
        .iter()
        .filter_map(|k| METRICS.iter().find(|m| m.key == *k))
        .collect();
    let rows = metrics.len().div_ceil(COLUMNS);
    let top = 56;
    let width = PANEL_W * COLUMNS + 20;
    let height = top + rows * panel_h + 10;
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" \
         viewBox=\"0 0 {width} {height}\" font-family=\"sans-serif\" font-size=\"11\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>"
    );
    let _ = writeln!(
        svg,
        "<text x=\"10\" y=\"20\" font-size=\"15\" font-weight=\"bold\">Porthole vs direct loopback \
         and peers</text>\n<text x=\"10\" y=\"38\" fill=\"#555\">{} · {} CPUs · kernel {} · {}</text>",
        escape(&machine.cpu_model),
        machine.nproc,
        escape(&machine.kernel),
        escape(&machine.date)
    );
    for (n, m) in metrics.iter().enumerate() {
        let x = 10 + (n % COLUMNS) * PANEL_W;
        let y = top + (n / COLUMNS) * panel_h;
        panel(&mut svg, x, y, m, &shown);
    }
    svg.push_str("</svg>\n");
    svg
}

fn panel(
    svg: &mut String,
    x: usize,
    y: usize,
    m: &crate::report::Metric,
    shown: &[(usize, &CandidateResult)],
) {
    let better = if m.higher_is_better {
        "higher is better"
    } else {
        "lower is better"
    };
    let _ = writeln!(
        svg,
        "<text x=\"{x}\" y=\"{}\" font-weight=\"bold\">{} ({}) <tspan fill=\"#777\" \
         font-weight=\"normal\">{better}</tspan></text>",
        y + 14,
        escape(m.label),
        escape(m.unit)
    );
    let values: Vec<Option<f64>> = shown.iter().map(|(_, c)| (m.get)(&c.results)).collect();
    let max = values.iter().flatten().fold(0.0f64, |a, &b| a.max(b));
    let bar_room = (PANEL_W - LABEL_W - 70) as f64;
    for (row, ((i, c), v)) in shown.iter().zip(&values).enumerate() {
        let by = y + 24 + row * (BAR_H + GAP);
        let _ = writeln!(
            svg,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{}</text>",
            x + LABEL_W - 6,
            by + BAR_H - 5,
            escape(&c.name)
        );
        let (w, label) = match v {
            Some(v) if max > 0.0 => ((v.max(0.0) / max * bar_room).max(1.0), fmt_num(*v)),
            Some(v) => (1.0, fmt_num(*v)),
            None => (0.0, "–".to_owned()),
        };
        let _ = writeln!(
            svg,
            "<rect x=\"{}\" y=\"{by}\" width=\"{w:.1}\" height=\"{BAR_H}\" fill=\"{}\"/>\
             <text x=\"{:.1}\" y=\"{}\">{label}</text>",
            x + LABEL_W,
            colour(*i),
            x as f64 + LABEL_W as f64 + w + 4.0,
            by + BAR_H - 5
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::suite::Measurements;

    #[test]
    fn chart_is_well_formed_svg_with_every_candidate() {
        let c = |name: &str, available| CandidateResult {
            name: name.into(),
            description: String::new(),
            available,
            reason: None,
            results: Measurements::default(),
        };
        let machine = Machine::detect();
        let svg = render(
            &[c("direct", true), c("a<b", true), c("gone", false)],
            &machine,
        );
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("a&lt;b"));
        assert!(!svg.contains(">gone<"));
        assert_eq!(svg.matches("<svg").count(), 1);
    }
}
