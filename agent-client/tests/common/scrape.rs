//! One parsed `GET /metrics` scrape of the in-process relay, and lookups in it.

use anyhow::{anyhow, ensure};
use openmetrics_parser::{prometheus::parse_prometheus, PrometheusValue};

use super::relay::TestRelay;

/// One parsed scrape.
pub struct Scrape(
    pub openmetrics_parser::MetricsExposition<openmetrics_parser::PrometheusType, PrometheusValue>,
);

impl Scrape {
    /// `GET /metrics` without any token, parsed whole.
    pub fn take(relay: &TestRelay) -> anyhow::Result<Self> {
        let url = format!("http://{}/metrics", relay.handle.info.api_addr);
        let resp = reqwest::blocking::get(&url)?;
        ensure!(resp.status() == 200, "/metrics answered {}", resp.status());
        let text = resp.text()?;
        let parsed = parse_prometheus(&text)
            .map_err(|e| anyhow!("/metrics is not a valid exposition: {e:?}\n{text}"))?;
        Ok(Self(parsed))
    }

    /// The counter `family{label="value"}` (0 when the series does not exist yet).
    pub fn counter(&self, family: &str, label: &str, value: &str) -> f64 {
        let Some(family) = self.0.families.get(family) else {
            return 0.0;
        };
        family
            .iter_samples()
            .find_map(|sample| {
                let set = sample.get_labelset().ok()?;
                (set.get_label_value(label) == Some(value)).then(|| match &sample.value {
                    PrometheusValue::Counter(c) => c.value.as_f64(),
                    _ => f64::NAN,
                })
            })
            .unwrap_or(0.0)
    }

    /// Every `(series, label, value)` of the scrape.
    pub fn labels(&self) -> anyhow::Result<Vec<(String, String, String)>> {
        let mut out = Vec::new();
        for (name, family) in &self.0.families {
            for sample in family.iter_samples() {
                let set = sample
                    .get_labelset()
                    .map_err(|e| anyhow!("{name}: {e:?}"))?;
                for (label, value) in set.iter() {
                    out.push((name.clone(), label.clone(), value.clone()));
                }
            }
        }
        Ok(out)
    }

    /// The sample of `family` whose labels are exactly `labels`: a counter's or gauge's
    /// value, a histogram's count. `None` when the series does not exist (yet).
    pub fn get(&self, family: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let family = self.0.families.get(family)?;
        if family.get_label_names().len() != labels.len() {
            return None;
        }
        family.iter_samples().find_map(|sample| {
            let set = sample.get_labelset().ok()?;
            labels
                .iter()
                .all(|(k, v)| set.get_label_value(k) == Some(*v))
                .then(|| match &sample.value {
                    PrometheusValue::Counter(c) => Some(c.value.as_f64()),
                    PrometheusValue::Gauge(n) | PrometheusValue::Unknown(n) => Some(n.as_f64()),
                    PrometheusValue::Histogram(h) => h.count.map(|c| c as f64),
                    PrometheusValue::Summary(s) => s.count.map(|c| c as f64),
                })?
        })
    }

    /// Like [`Scrape::get`], 0 for a series not created yet (labelled counters appear on
    /// first use).
    pub fn or_zero(&self, family: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(family, labels).unwrap_or(0.0)
    }
}
