//! The `cluster` mode's table: one row per measurement, the median of the rounds with their
//! min–max spread, rendered from the recorded rounds (so RESULTS.md carries no hand-typed
//! figures).

use crate::cluster::ClusterRound;
use crate::stats::median;
use std::fmt::Write as _;

/// `median (min–max)` of `values`, with `digits` decimals; "–" when there are none.
fn spread(values: &[f64], digits: usize) -> String {
    let finite: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
    if finite.is_empty() {
        return "–".into();
    }
    let lo = finite.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = finite.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!(
        "{:.digits$} ({:.digits$}–{:.digits$})",
        median(&finite),
        lo,
        hi
    )
}

/// The markdown table of `rounds`: what was measured, its unit, median (min–max).
pub fn markdown(rounds: &[ClusterRound]) -> String {
    let col = |f: fn(&ClusterRound) -> f64| rounds.iter().map(f).collect::<Vec<f64>>();
    let rows: [(&str, Vec<f64>, usize); 10] = [
        (
            "sessions created per second, through node 1 only",
            col(|r| r.creates_per_sec_one_node),
            0,
        ),
        (
            "sessions created per second, through the three nodes",
            col(|r| r.creates_per_sec_three_nodes),
            0,
        ),
        (
            "DELETE sent → port refusing on all three nodes, p50 (ms)",
            col(|r| r.delete_to_closed_everywhere.p50_us / 1e3),
            1,
        ),
        (
            "DELETE sent → port refusing on all three nodes, p99 (ms)",
            col(|r| r.delete_to_closed_everywhere.p99_us / 1e3),
            1,
        ),
        (
            "upload through the owner (Gbit/s)",
            col(|r| r.upload_owner_gbps),
            2,
        ),
        (
            "upload through another node (Gbit/s)",
            col(|r| r.upload_other_gbps),
            2,
        ),
        (
            "download through the owner (Gbit/s)",
            col(|r| r.download_owner_gbps),
            2,
        ),
        (
            "download through another node (Gbit/s)",
            col(|r| r.download_other_gbps),
            2,
        ),
        (
            "`kill -9` of the owner → a connection through a surviving node works (ms)",
            col(|r| r.failover_ms),
            0,
        ),
        (
            "DELETEs timed per round",
            col(|r| r.delete_to_closed_everywhere.count as f64),
            0,
        ),
    ];
    let mut out = format!(
        "| | median of {} rounds (min–max) |\n|---|---|\n",
        rounds.len()
    );
    for (what, values, digits) in rows {
        let _ = writeln!(out, "| {what} | {} |", spread(&values, digits));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::Percentiles;

    fn round(creates: f64, p50_us: f64) -> ClusterRound {
        ClusterRound {
            creates_per_sec_one_node: creates,
            creates_per_sec_three_nodes: creates * 2.0,
            delete_to_closed_everywhere: Percentiles {
                count: 30,
                p50_us,
                p99_us: p50_us * 3.0,
                p999_us: p50_us * 3.0,
            },
            upload_owner_gbps: 5.0,
            upload_other_gbps: 4.0,
            download_owner_gbps: 6.0,
            download_other_gbps: f64::NAN,
            failover_ms: 4000.0,
        }
    }

    #[test]
    fn rows_show_the_median_and_the_spread_of_the_rounds() {
        let table = markdown(&[
            round(900.0, 1000.0),
            round(700.0, 3000.0),
            round(800.0, 2000.0),
        ]);
        assert!(
            table.starts_with("| | median of 3 rounds (min–max) |\n|---|---|\n"),
            "{table}"
        );
        assert!(
            table.contains("| sessions created per second, through node 1 only | 800 (700–900) |"),
            "{table}"
        );
        assert!(
            table.contains(
                "| sessions created per second, through the three nodes | 1600 (1400–1800) |"
            ),
            "{table}"
        );
        assert!(table.contains("p50 (ms) | 2.0 (1.0–3.0) |"), "{table}");
        assert!(table.contains("p99 (ms) | 6.0 (3.0–9.0) |"), "{table}");
        // A value that was not measured is a dash, never a zero.
        assert!(
            table.contains("| download through another node (Gbit/s) | – |"),
            "{table}"
        );
    }

    #[test]
    fn an_even_number_of_rounds_takes_the_mean_of_the_middle_two() {
        let table = markdown(&[round(600.0, 1000.0), round(1000.0, 1000.0)]);
        assert!(table.contains("node 1 only | 800 (600–1000) |"), "{table}");
    }
}
