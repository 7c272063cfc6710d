//! Results of a whole run: the metrics every table, ratio and chart is built from, the text
//! table printed to stdout, and the JSON document.

use serde::Serialize;

use crate::procfs::Machine;
use crate::stats::ratio;
use crate::suite::{Measurements, SuiteOptions};
use crate::tunnel::Role;

/// One candidate's outcome.
#[derive(Clone, Debug, Serialize)]
pub struct CandidateResult {
    /// Short name (`direct`, `porthole-tls`, `rathole-tcp`, ...).
    pub name: String,
    /// What it is.
    pub description: String,
    /// Whether it could be started.
    pub available: bool,
    /// Why not, when it could not.
    pub reason: Option<String>,
    /// What was measured.
    pub results: Measurements,
}

/// A number the run reports for every candidate.
#[derive(Debug)]
pub struct Metric {
    /// Stable key (JSON, chart).
    pub key: &'static str,
    /// Row label.
    pub label: &'static str,
    /// Unit shown beside the label.
    pub unit: &'static str,
    /// Whether a larger value is better.
    pub higher_is_better: bool,
    /// Extracts the value.
    pub get: fn(&Measurements) -> Option<f64>,
}

fn mem(m: &Measurements, role: Role, f: fn(&crate::suite::ProcMemory) -> f64) -> Option<f64> {
    let memory = m.memory.as_ref()?;
    memory.procs.iter().find(|p| p.role == role).map(f)
}

/// Every reported metric, in table order.
pub const METRICS: &[Metric] = &[
    Metric {
        key: "upload_gbps",
        label: "upload (visitor→target)",
        unit: "Gbit/s",
        higher_is_better: true,
        get: |m| m.upload.as_ref().map(|b| b.gbit_per_sec),
    },
    Metric {
        key: "upload_cpu",
        label: "upload CPU, server+client",
        unit: "s/GB",
        higher_is_better: false,
        get: |m| m.upload.as_ref()?.cpu_s_per_gb,
    },
    Metric {
        key: "download_gbps",
        label: "download (target→visitor)",
        unit: "Gbit/s",
        higher_is_better: true,
        get: |m| m.download.as_ref().map(|b| b.gbit_per_sec),
    },
    Metric {
        key: "download_cpu",
        label: "download CPU, server+client",
        unit: "s/GB",
        higher_is_better: false,
        get: |m| m.download.as_ref()?.cpu_s_per_gb,
    },
    Metric {
        key: "ping_p50",
        label: "64 B ping-pong p50",
        unit: "µs",
        higher_is_better: false,
        get: |m| m.ping.map(|p| p.p50_us),
    },
    Metric {
        key: "ping_p99",
        label: "64 B ping-pong p99",
        unit: "µs",
        higher_is_better: false,
        get: |m| m.ping.map(|p| p.p99_us),
    },
    Metric {
        key: "ping_p999",
        label: "64 B ping-pong p99.9",
        unit: "µs",
        higher_is_better: false,
        get: |m| m.ping.map(|p| p.p999_us),
    },
    Metric {
        key: "connect_p50",
        label: "connect→first byte p50",
        unit: "µs",
        higher_is_better: false,
        get: |m| m.connect.as_ref().map(|c| c.latency.p50_us),
    },
    Metric {
        key: "connect_p99",
        label: "connect→first byte p99",
        unit: "µs",
        higher_is_better: false,
        get: |m| m.connect.as_ref().map(|c| c.latency.p99_us),
    },
    Metric {
        key: "connects_per_sec",
        label: "connections/s (sequential)",
        unit: "1/s",
        higher_is_better: true,
        get: |m| m.connect.as_ref().map(|c| c.per_sec),
    },
    Metric {
        key: "server_rss_idle",
        label: "server RSS idle",
        unit: "KiB",
        higher_is_better: false,
        get: |m| mem(m, Role::Server, |p| p.idle_kib as f64),
    },
    Metric {
        key: "client_rss_idle",
        label: "client RSS idle",
        unit: "KiB",
        higher_is_better: false,
        get: |m| mem(m, Role::Client, |p| p.idle_kib as f64),
    },
    Metric {
        key: "server_kib_per_conn",
        label: "server RSS per idle conn",
        unit: "KiB",
        higher_is_better: false,
        get: |m| mem(m, Role::Server, |p| p.kib_per_conn),
    },
    Metric {
        key: "client_kib_per_conn",
        label: "client RSS per idle conn",
        unit: "KiB",
        higher_is_better: false,
        get: |m| mem(m, Role::Client, |p| p.kib_per_conn),
    },
    Metric {
        key: "loaded_p99",
        label: "ping p99 under bulk load",
        unit: "µs",
        higher_is_better: false,
        get: |m| m.loaded.as_ref().map(|l| l.ping.p99_us),
    },
    Metric {
        key: "loaded_p99_ratio",
        label: "loaded p99 / unloaded p99",
        unit: "×",
        higher_is_better: false,
        get: |m| m.loaded.as_ref()?.p99_vs_unloaded,
    },
    Metric {
        key: "loaded_bulk_gbps",
        label: "bulk under load (all streams)",
        unit: "Gbit/s",
        higher_is_better: true,
        get: |m| m.loaded.as_ref().map(|l| l.bulk_gbit_per_sec),
    },
];

/// `subject ÷ against` for one metric.
#[derive(Clone, Debug, Serialize)]
pub struct Ratio {
    /// The Porthole candidate.
    pub subject: String,
    /// What it is compared with.
    pub against: String,
    /// [`Metric::key`].
    pub metric: &'static str,
    /// subject / against.
    pub ratio: f64,
    /// Whether the subject is the better of the two on this metric.
    pub subject_better: bool,
}

/// The JSON document of a run.
#[derive(Debug, Serialize)]
pub struct Report {
    /// Where it ran.
    pub machine: Machine,
    /// Git revision of the workspace measured (`+dirty`: uncommitted changes).
    pub revision: String,
    /// The command line.
    pub command: String,
    /// Suite settings.
    pub options: SuiteOptions,
    /// The peers' crates and exact versions (empty without `--peers`).
    pub peers: Vec<crate::peers::Peer>,
    /// Every candidate.
    pub candidates: Vec<CandidateResult>,
    /// Porthole candidates against every other candidate.
    pub ratios: Vec<Ratio>,
}

/// Porthole candidates compared with every other available candidate, metric by metric.
pub fn ratios(candidates: &[CandidateResult]) -> Vec<Ratio> {
    let mut out = Vec::new();
    let subjects = candidates
        .iter()
        .filter(|c| c.available && c.name.starts_with("porthole"));
    for s in subjects {
        for a in candidates
            .iter()
            .filter(|a| a.available && a.name != s.name)
        {
            for m in METRICS {
                if let Some(r) = ratio((m.get)(&s.results), (m.get)(&a.results)) {
                    out.push(Ratio {
                        subject: s.name.clone(),
                        against: a.name.clone(),
                        metric: m.key,
                        ratio: r,
                        subject_better: (r > 1.0) == m.higher_is_better,
                    });
                }
            }
        }
    }
    out
}

/// A number with about three significant digits.
pub fn fmt_num(v: f64) -> String {
    let a = v.abs();
    if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

/// A plain text table: first column left-aligned, the others right-aligned.
pub fn render_table(header: &[String], rows: &[Vec<String>]) -> String {
    let cols = header.len();
    let width = |i: usize| {
        rows.iter()
            .map(|r| r.get(i).map_or(0, |c| c.chars().count()))
            .chain([header[i].chars().count()])
            .max()
            .unwrap_or(0)
    };
    let widths: Vec<usize> = (0..cols).map(width).collect();
    let line = |cells: &[String]| {
        let parts: Vec<String> = cells
            .iter()
            .zip(&widths)
            .enumerate()
            .map(|(i, (c, w))| {
                if i == 0 {
                    format!("{c:<w$}")
                } else {
                    format!("{c:>w$}")
                }
            })
            .collect();
        format!("| {} |\n", parts.join(" | "))
    };
    let mut out = line(header);
    let rule: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
    out.push_str(&format!(
        "|{}|\n",
        rule.iter()
            .map(|r| format!("-{r}-"))
            .collect::<Vec<_>>()
            .join("|")
    ));
    for r in rows {
        out.push_str(&line(r));
    }
    out
}

/// The results table: one row per metric, one column per candidate.
pub fn results_table(candidates: &[CandidateResult]) -> String {
    let mut header = vec!["metric".to_owned()];
    header.extend(candidates.iter().map(|c| c.name.clone()));
    let rows: Vec<Vec<String>> = METRICS
        .iter()
        .map(|m| {
            let mut row = vec![format!("{} ({})", m.label, m.unit)];
            row.extend(
                candidates
                    .iter()
                    .map(|c| match (c.available, (m.get)(&c.results)) {
                        (false, _) => "n/a".to_owned(),
                        (true, Some(v)) => fmt_num(v),
                        (true, None) => "–".to_owned(),
                    }),
            );
            row
        })
        .collect();
    render_table(&header, &rows)
}

/// The ratio table: one row per metric, one column per (Porthole candidate, other) pair;
/// `*` marks where Porthole is the better of the two.
pub fn ratio_table(candidates: &[CandidateResult], ratios: &[Ratio]) -> String {
    let mut pairs: Vec<(String, String)> = Vec::new();
    for r in ratios {
        let p = (r.subject.clone(), r.against.clone());
        if !pairs.contains(&p) {
            pairs.push(p);
        }
    }
    if pairs.is_empty() || candidates.is_empty() {
        return String::new();
    }
    let mut header = vec!["metric (better)".to_owned()];
    header.extend(pairs.iter().map(|(s, a)| format!("{s} ÷ {a}")));
    let rows: Vec<Vec<String>> = METRICS
        .iter()
        .map(|m| {
            let better = if m.higher_is_better {
                "higher"
            } else {
                "lower"
            };
            let mut row = vec![format!("{} ({better})", m.label)];
            row.extend(pairs.iter().map(|(s, a)| {
                ratios
                    .iter()
                    .find(|r| &r.subject == s && &r.against == a && r.metric == m.key)
                    .map_or_else(
                        || "–".to_owned(),
                        |r| {
                            format!(
                                "{}×{}",
                                fmt_num(r.ratio),
                                if r.subject_better { "*" } else { "" }
                            )
                        },
                    )
            }));
            row
        })
        .collect();
    render_table(&header, &rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::Percentiles;

    fn candidate(name: &str, p50: f64) -> CandidateResult {
        let results = Measurements {
            ping: Some(Percentiles {
                count: 1,
                p50_us: p50,
                p99_us: p50,
                p999_us: p50,
            }),
            ..Measurements::default()
        };
        CandidateResult {
            name: name.into(),
            description: String::new(),
            available: true,
            reason: None,
            results,
        }
    }

    #[test]
    fn ratios_compare_porthole_with_the_others() {
        let cs = [candidate("direct", 10.0), candidate("porthole-tls", 30.0)];
        let rs = ratios(&cs);
        let p50 = rs.iter().find(|r| r.metric == "ping_p50");
        assert!(p50.is_some_and(|r| r.against == "direct"
            && (r.ratio - 3.0).abs() < 1e-9
            && !r.subject_better));
        assert!(rs.iter().all(|r| r.subject == "porthole-tls"));
        assert!(ratio_table(&cs, &rs).contains("3.00×"));
        assert!(results_table(&cs).contains("porthole-tls"));
    }

    #[test]
    fn numbers_keep_three_digits() {
        assert_eq!(fmt_num(1234.4), "1234");
        assert_eq!(fmt_num(12.345), "12.3");
        assert_eq!(fmt_num(1.2345), "1.23");
        assert_eq!(fmt_num(0.12345), "0.123");
    }
}
