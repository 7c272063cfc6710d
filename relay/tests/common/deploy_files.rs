//! Reading the files under deploy/ (shared by the deploy asset tests).

#![allow(dead_code)]

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde_json::Value;

pub fn deploy(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(rel)
}

pub fn read(rel: &str) -> Result<String> {
    std::fs::read_to_string(deploy(rel)).with_context(|| format!("reading deploy/{rel}"))
}

/// The alert rules (each `alert`, `expr`, `annotations` as given).
pub fn alert_rules() -> Result<Vec<serde_yaml::Value>> {
    let doc: serde_yaml::Value = serde_yaml::from_str(&read("prometheus/porthole-alerts.yml")?)
        .context("porthole-alerts.yml is not YAML")?;
    let groups = doc["groups"].as_sequence().context("no `groups` list")?;
    Ok(groups
        .iter()
        .flat_map(|g| g["rules"].as_sequence().cloned().unwrap_or_default())
        .collect())
}

pub fn dashboard() -> Result<Value> {
    serde_json::from_str(&read("grafana/porthole-dashboard.json")?)
        .context("porthole-dashboard.json is not JSON")
}

/// Every string in a JSON document with its path, e.g. `panels[3].targets[0].expr`.
pub fn json_strings(v: &Value, path: &str, out: &mut Vec<(String, String)>) {
    match v {
        Value::String(s) => out.push((path.to_owned(), s.clone())),
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                json_strings(item, &format!("{path}[{i}]"), out);
            }
        }
        Value::Object(map) => {
            for (k, item) in map {
                json_strings(item, &format!("{path}.{k}"), out);
            }
        }
        _ => {}
    }
}

/// The label lists of every `by (...)` / `without (...)` in `expr`.
pub fn groupings(expr: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    for keyword in ["by", "without"] {
        let mut rest = expr;
        while let Some(at) = rest.find(keyword) {
            let before = rest[..at].chars().last();
            let after = rest[at + keyword.len()..].trim_start();
            rest = &rest[at + keyword.len()..];
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_') || !after.starts_with('(') {
                continue;
            }
            let close = after.find(')').unwrap_or(after.len());
            out.push(
                after[1..close]
                    .split(',')
                    .map(|l| l.trim().to_owned())
                    .collect(),
            );
        }
    }
    out
}
