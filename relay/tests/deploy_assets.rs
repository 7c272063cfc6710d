//! The files in `deploy/` against the relay they deploy:
//! - every metric the alert rules and the Grafana dashboard use is one a live relay's
//!   `/metrics` exposes (family, label names, label values they select), after a scenario
//!   that makes every labelled series appear: a visitor forwarded, refusals, a failed agent
//!   handshake, an instructions request, an agent link cut and resumed, sessions deleted and
//!   expired. The whole exposition goes through a Prometheus text parser;
//! - the rules and the dashboard are well-formed (`promtool check rules` too when promtool is
//!   installed; structural checks always);
//! - the Kubernetes ConfigMap's relay.toml loads with the real loader, and the manifests,
//!   systemd unit and Containerfile agree with it and with the relay's defaults.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, bail, ensure, Context, Result};
use common::{str_field, TestRelay};
use openmetrics_parser::{prometheus::parse_prometheus, PrometheusValue};
use porthole_agent::{AgentEvent, Outcome, Resolved};
use porthole_protocol::tls::{parse_pin, RelayTrust};
use porthole_protocol::{Secret, Service};
use porthole_relay::RelayConfig;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::AbortHandle;
use tokio_util::sync::CancellationToken;

/// How long any one step of the scenario may take.
const STEP: Duration = Duration::from_secs(20);
/// Labels Prometheus adds at scrape time: never in the exposition.
const TARGET_LABELS: [&str; 3] = ["job", "instance", "le"];

fn deploy(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(rel)
}

fn read(rel: &str) -> Result<String> {
    std::fs::read_to_string(deploy(rel)).with_context(|| format!("reading deploy/{rel}"))
}

// --- the exposition ----------------------------------------------------------------------

/// One metric family as scraped: its label names and every value seen per label.
#[derive(Debug, Default)]
struct Family {
    labels: BTreeSet<String>,
    values: BTreeMap<String, BTreeSet<String>>,
    histogram: bool,
}

/// Parses a whole text exposition (any malformed line fails) into families by name.
fn parse(text: &str) -> Result<BTreeMap<String, Family>> {
    let parsed = parse_prometheus(text).map_err(|e| anyhow!("/metrics does not parse: {e:?}"))?;
    let mut out = BTreeMap::new();
    for (name, family) in parsed.families {
        let mut f = Family {
            labels: family.get_label_names().iter().cloned().collect(),
            ..Family::default()
        };
        for sample in family.iter_samples() {
            f.histogram |= matches!(sample.value, PrometheusValue::Histogram(_));
            let set = sample
                .get_labelset()
                .map_err(|e| anyhow!("{name}: {e:?}"))?;
            for (label, value) in set.iter() {
                f.values
                    .entry(label.clone())
                    .or_default()
                    .insert(value.clone());
            }
        }
        out.insert(name, f);
    }
    Ok(out)
}

// --- the scenario ------------------------------------------------------------------------

/// A TCP proxy in front of the agent endpoint whose connections can be cut.
struct Proxy {
    addr: SocketAddr,
    conns: Arc<Mutex<Vec<AbortHandle>>>,
}

impl Proxy {
    async fn start(to: SocketAddr) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let conns = Arc::new(Mutex::new(Vec::<AbortHandle>::new()));
        let list = conns.clone();
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let task = tokio::spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(to).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                list.lock().unwrap().push(task.abort_handle());
            }
        });
        Ok(Self { addr, conns })
    }

    /// Drops every connection so far: the agent's link is lost.
    fn cut(&self) {
        for conn in self.conns.lock().unwrap().drain(..) {
            conn.abort();
        }
    }
}

/// A TCP echo service on loopback.
async fn echo() -> Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = stream.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    Ok(addr)
}

/// Sends `bytes` to 127.0.0.1:`port`, half-closes, and returns everything read until EOF.
async fn visit(port: u16, bytes: &[u8]) -> Result<Vec<u8>> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await?;
    stream.write_all(bytes).await?;
    stream.shutdown().await?;
    let mut back = Vec::new();
    // A refused visitor may see a reset rather than EOF: both end the visit.
    let _ = tokio::time::timeout(STEP, stream.read_to_end(&mut back))
        .await
        .context("the relay kept a visitor connection open")?;
    Ok(back)
}

/// Waits for the agent event `pick` accepts.
async fn wait_event(
    events: &mut mpsc::UnboundedReceiver<AgentEvent>,
    what: &str,
    pick: impl Fn(&AgentEvent) -> bool,
) -> Result<()> {
    tokio::time::timeout(STEP, async {
        while let Some(event) = events.recv().await {
            if pick(&event) {
                return Ok(());
            }
        }
        bail!("the agent stopped before {what}")
    })
    .await
    .with_context(|| format!("waiting for {what}"))?
}

/// Runs every path that makes a labelled series appear, then scrapes `/metrics`.
async fn scrape_after_scenario() -> Result<BTreeMap<String, Family>> {
    let relay = TestRelay::start_with(10, |c| c.join_ttl = Duration::from_secs(4)).await?;
    let body = json!({"build_id": "b1", "app_id": "a1", "services": ["ssh"]});
    // A session no agent joins: a visitor is refused, then the join TTL revokes it.
    let lonely = relay.create_ok(&body).await?;
    let lonely_port = common::ports(&lonely)?[0];
    visit(lonely_port, b"SSH-2.0-deploy-assets\r\n").await?;

    let session = relay.create_ok(&body).await?;
    let id = str_field(&session, "session_id")?.to_owned();
    let port = common::ports(&session)?[0];
    let proxy = Proxy::start(relay.handle.info.agent_addr).await?;
    let config = Resolved {
        relay: proxy.addr.to_string(),
        server_name: "localhost".into(),
        token: Secret::new(str_field(&session, "join_token")?),
        services: BTreeMap::from([(Service::Ssh, echo().await?.to_string())]),
        trust: RelayTrust::Pin(parse_pin(&relay.handle.info.fingerprint)?),
        connect_timeout: Duration::from_secs(5),
        credentials: Vec::new(),
        host_keys: Vec::new(),
    };
    let (tx, mut events) = mpsc::unbounded_channel();
    let reporter = move |e: &AgentEvent| drop(tx.send(e.clone()));
    let (_finish, finished) = tokio::sync::watch::channel(false);
    let cancel = CancellationToken::new();
    let agent = tokio::spawn(porthole_agent::run(
        config,
        Box::new(reporter),
        finished,
        cancel.clone(),
    ));
    let _stop_agent = cancel.drop_guard();
    wait_event(&mut events, "the agent's registration", |e| {
        matches!(e, AgentEvent::Registered { resumed: false, .. })
    })
    .await?;

    // A visitor forwarded both ways (bytes, visitors, time to first visitor).
    let sent = b"SSH-2.0-deploy-assets\r\nsome bytes for the build machine";
    let back = visit(port, sent).await?;
    ensure!(
        back == sent,
        "the echo through the tunnel differs: {back:?}"
    );
    // A scanner on the SSH port (refusal not_ssh).
    visit(port, b"GET / HTTP/1.0\r\n\r\n").await?;
    // Not TLS on the agent endpoint (handshake failure).
    let mut junk = TcpStream::connect(relay.handle.info.agent_addr).await?;
    junk.write_all(b"hello relay\r\n\r\n").await?;
    let _ = tokio::time::timeout(STEP, junk.read_to_end(&mut Vec::new())).await;
    // A forged user token (instructions outcome).
    let denied = reqwest::Client::new()
        .get(relay.url(&format!("/v1/sessions/{id}/instructions")))
        .bearer_auth("not-a-token")
        .send()
        .await?;
    ensure!(
        denied.status() == 401,
        "forged token answered {}",
        denied.status()
    );
    // The agent's link is cut; it resumes.
    proxy.cut();
    wait_event(&mut events, "the agent's resume", |e| {
        matches!(e, AgentEvent::Registered { resumed: true, .. })
    })
    .await?;
    // DELETE (revoked, session duration).
    let (status, _) = relay.delete(&format!("/v1/sessions/{id}")).await?;
    ensure!(status.is_success(), "DELETE answered {status}");
    let outcome = tokio::time::timeout(STEP, agent).await???;
    ensure!(
        matches!(outcome, Outcome::Revoked(_)),
        "agent ended with {outcome:?}"
    );
    // The lonely session's join TTL runs out.
    let lonely_id = str_field(&lonely, "session_id")?;
    tokio::time::timeout(STEP, async {
        while relay.session(lonely_id).await?["state"] != "revoked" {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok::<_, anyhow::Error>(())
    })
    .await
    .context("the join TTL did not revoke the session without agent")??;

    // No token: scrapers carry none.
    let text = reqwest::get(relay.url("/metrics")).await?.text().await?;
    let families = parse(&text)?;
    ensure!(
        parse(&format!("{text}porthole_sessions{{state=\"active\" 1\n")).is_err(),
        "the exposition parser accepts a malformed line: it would not catch a broken /metrics"
    );
    Ok(families)
}

// --- metric references in the assets ------------------------------------------------------

/// A metric used in an expression, with the matchers of its selector (`label`, `op`, `value`).
#[derive(Debug)]
struct Reference {
    name: String,
    matchers: Vec<(String, String, String)>,
}

/// Every `porthole_*` identifier in `text`, with its selector when one follows.
fn references(text: &str) -> Vec<Reference> {
    let bytes = text.as_bytes();
    let ident = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let mut out = Vec::new();
    let mut i = 0;
    while let Some(found) = text[i..].find("porthole_") {
        let start = i + found;
        let mut end = start;
        while end < bytes.len() && ident(bytes[end]) {
            end += 1;
        }
        i = end;
        if start > 0 && ident(bytes[start - 1]) {
            continue;
        }
        let mut matchers = Vec::new();
        if bytes.get(end) == Some(&b'{') {
            let close = text[end..].find('}').map_or(text.len(), |c| end + c);
            matchers = parse_matchers(&text[end + 1..close]);
            i = close;
        }
        out.push(Reference {
            name: text[start..end].to_owned(),
            matchers,
        });
    }
    out
}

/// `a="x", b!~"y"` → `[(a, =, x), (b, !~, y)]`.
fn parse_matchers(body: &str) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    for part in body.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let Some(op_at) = part.find(['=', '!']) else {
            continue;
        };
        let (label, rest) = part.split_at(op_at);
        let op_len = rest.find('"').unwrap_or(rest.len());
        let value = rest[op_len..].trim_matches('"');
        out.push((
            label.trim().into(),
            rest[..op_len].trim().into(),
            value.into(),
        ));
    }
    out
}

/// The family a referenced name belongs to (`x_bucket` → `x` when `x` is a histogram).
fn family_of<'a>(name: &'a str, families: &BTreeMap<String, Family>) -> &'a str {
    if families.contains_key(name) {
        return name;
    }
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = name.strip_suffix(suffix) {
            if families.get(base).is_some_and(|f| f.histogram) {
                return base;
            }
        }
    }
    name
}

/// The label lists of every `by (...)` / `without (...)` in `expr`.
fn groupings(expr: &str) -> Vec<Vec<String>> {
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

/// Checks one expression (or any text that names metrics) against the exposition.
fn check_expr(origin: &str, expr: &str, families: &BTreeMap<String, Family>) -> Vec<String> {
    let mut problems = Vec::new();
    let refs = references(expr);
    let mut labels_here = BTreeSet::new();
    for r in &refs {
        let family_name = family_of(&r.name, families);
        let Some(family) = families.get(family_name) else {
            problems.push(format!("{origin}: `{}` is not exposed at /metrics", r.name));
            continue;
        };
        labels_here.extend(family.labels.iter().cloned());
        for (label, op, value) in &r.matchers {
            if TARGET_LABELS.contains(&label.as_str()) {
                continue;
            }
            if !family.labels.contains(label) {
                problems.push(format!("{origin}: `{}` has no label `{label}`", r.name));
            } else if (op == "=" || op == "!=") && !value.contains('$') {
                let seen = family.values.get(label).cloned().unwrap_or_default();
                if !seen.contains(value) {
                    problems.push(format!(
                        "{origin}: `{}{{{label}{op}\"{value}\"}}`: the relay exposes {label} = {seen:?}",
                        r.name
                    ));
                }
            }
        }
    }
    if !refs.is_empty() {
        for label in groupings(expr).into_iter().flatten() {
            if !TARGET_LABELS.contains(&label.as_str()) && !labels_here.contains(&label) {
                problems.push(format!(
                    "{origin}: groups by `{label}`, which no metric in it has"
                ));
            }
        }
    }
    problems
}

/// The alert rules (each `alert`, `expr`, `annotations` as given).
fn alert_rules() -> Result<Vec<serde_yaml::Value>> {
    let doc: serde_yaml::Value = serde_yaml::from_str(&read("prometheus/porthole-alerts.yml")?)
        .context("porthole-alerts.yml is not YAML")?;
    let groups = doc["groups"].as_sequence().context("no `groups` list")?;
    Ok(groups
        .iter()
        .flat_map(|g| g["rules"].as_sequence().cloned().unwrap_or_default())
        .collect())
}

/// Every string in a JSON document with its path, e.g. `panels[3].targets[0].expr`.
fn json_strings(v: &Value, path: &str, out: &mut Vec<(String, String)>) {
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

fn dashboard() -> Result<Value> {
    serde_json::from_str(&read("grafana/porthole-dashboard.json")?)
        .context("porthole-dashboard.json is not JSON")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alerts_and_dashboard_use_only_what_metrics_exposes() -> Result<()> {
    let families = scrape_after_scenario().await?;
    let mut problems = Vec::new();
    let mut used = BTreeSet::new();
    // Every identifier anywhere in either file, comments and descriptions included.
    for file in [
        "prometheus/porthole-alerts.yml",
        "grafana/porthole-dashboard.json",
    ] {
        let text = read(file)?;
        for r in references(&text) {
            used.insert(family_of(&r.name, &families).to_owned());
            if !families.contains_key(family_of(&r.name, &families)) {
                problems.push(format!(
                    "deploy/{file}: `{}` is not exposed at /metrics",
                    r.name
                ));
            }
        }
    }
    // Selectors and groupings, expression by expression.
    for rule in alert_rules()? {
        let name = rule["alert"].as_str().unwrap_or("?").to_owned();
        let expr = rule["expr"].as_str().unwrap_or_default();
        problems.extend(check_expr(&format!("alert {name}"), expr, &families));
    }
    let mut strings = Vec::new();
    json_strings(&dashboard()?, "dashboard", &mut strings);
    for (path, text) in &strings {
        problems.extend(check_expr(path, text, &families));
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    // The assets cover what the relay measures (a new metric gets a panel).
    let unused: Vec<_> = families
        .keys()
        .filter(|f| f.starts_with("porthole_") && !used.contains(*f))
        .collect();
    assert!(
        unused.is_empty(),
        "metrics in neither dashboard nor alerts: {unused:?}"
    );
    Ok(())
}

// --- well-formed rules and dashboard -----------------------------------------------------

/// `(`/`)`, `[`/`]`, `{`/`}` and double quotes balanced (quotes hide brackets).
fn balanced(expr: &str) -> bool {
    let mut stack = Vec::new();
    let mut quoted = false;
    let mut escaped = false;
    for c in expr.chars() {
        match (quoted, c) {
            (true, _) if escaped => escaped = false,
            (true, '\\') => escaped = true,
            (_, '"') => quoted = !quoted,
            (false, '(' | '[' | '{') => stack.push(c),
            (false, ')' | ']' | '}') => {
                let open = stack.pop();
                if open
                    != Some(match c {
                        ')' => '(',
                        ']' => '[',
                        _ => '{',
                    })
                {
                    return false;
                }
            }
            _ => {}
        }
    }
    stack.is_empty() && !quoted
}

/// `promtool`, when installed.
fn promtool() -> Option<PathBuf> {
    let ok = std::process::Command::new("promtool")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    ok.then(|| PathBuf::from("promtool"))
}

fn promtool_check_rules(promtool: &Path, file: &Path) {
    let out = std::process::Command::new(promtool)
        .args(["check", "rules"])
        .arg(file)
        .output()
        .expect("running promtool");
    assert!(
        out.status.success(),
        "promtool check rules {}:\n{}{}",
        file.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn alert_rules_are_well_formed() -> Result<()> {
    let rules = alert_rules()?;
    ensure!(
        rules.len() >= 5,
        "expected the five alerts of issue 6, found {}",
        rules.len()
    );
    let mut names = BTreeSet::new();
    for rule in &rules {
        let name = rule["alert"].as_str().context("a rule without `alert`")?;
        ensure!(
            names.insert(name.to_owned()),
            "alert {name} is defined twice"
        );
        ensure!(
            name.starts_with("Porthole") && name.chars().all(|c| c.is_ascii_alphanumeric()),
            "alert name `{name}`: expected PortholeSomething"
        );
        let expr = rule["expr"].as_str().context("no `expr`")?;
        ensure!(
            !expr.trim().is_empty() && balanced(expr),
            "{name}: unbalanced expr {expr}"
        );
        let pending = rule["for"]
            .as_str()
            .with_context(|| format!("{name}: no `for`"))?;
        ensure!(
            humantime::parse_duration(pending).is_ok(),
            "{name}: `for: {pending}` is not a duration"
        );
        let severity = rule["labels"]["severity"].as_str();
        ensure!(
            matches!(severity, Some("critical" | "warning" | "info")),
            "{name}: labels.severity must be critical, warning or info, not {severity:?}"
        );
        for key in ["summary", "description"] {
            let text = rule["annotations"][key].as_str().unwrap_or_default();
            ensure!(!text.trim().is_empty(), "{name}: no annotations.{key}");
            ensure!(
                text.matches("{{").count() == text.matches("}}").count(),
                "{name}: unbalanced template in annotations.{key}"
            );
            // A label the aggregation drops renders empty.
            for used in text.split("$labels.").skip(1) {
                let label: String = used
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                for kept in groupings(expr) {
                    ensure!(
                        kept.contains(&label),
                        "{name}: annotations.{key} uses $labels.{label}, which `by ({})` drops",
                        kept.join(", ")
                    );
                }
            }
        }
    }
    match promtool() {
        Some(promtool) => {
            promtool_check_rules(&promtool, &deploy("prometheus/porthole-alerts.yml"))
        }
        None => eprintln!(
            "promtool is not installed: deploy/prometheus/porthole-alerts.yml got the structural \
             checks only (apt-get install prometheus adds promtool)"
        ),
    }
    Ok(())
}

#[test]
fn dashboard_is_well_formed() -> Result<()> {
    let d = dashboard()?;
    ensure!(
        d["schemaVersion"].as_u64().is_some_and(|v| v >= 36),
        "schemaVersion"
    );
    ensure!(d["uid"].as_str().is_some_and(|u| !u.is_empty()), "no uid");
    let vars = d["templating"]["list"]
        .as_array()
        .context("no templating.list")?;
    ensure!(
        vars.iter()
            .any(|v| v["name"] == "datasource" && v["type"] == "datasource"),
        "no `datasource` variable: panels would be tied to one Prometheus"
    );
    let panels = d["panels"].as_array().context("no panels")?;
    let mut ids = BTreeSet::new();
    let mut boxes: Vec<(String, [u64; 4])> = Vec::new();
    let mut exprs = Vec::new();
    for p in panels {
        let title = p["title"]
            .as_str()
            .context("a panel without title")?
            .to_owned();
        ensure!(
            ids.insert(p["id"].as_u64().context("panel id")?),
            "{title}: id reused"
        );
        let g = &p["gridPos"];
        let [x, y, w, h] = ["x", "y", "w", "h"].map(|k| g[k].as_u64().unwrap_or(0));
        ensure!(
            w >= 1 && h >= 1 && x + w <= 24,
            "{title}: gridPos {g} is off the 24 columns"
        );
        for (other, [ox, oy, ow, oh]) in &boxes {
            let overlap = x < ox + ow && *ox < x + w && y < oy + oh && *oy < y + h;
            ensure!(!overlap, "panels `{title}` and `{other}` overlap");
        }
        boxes.push((title.clone(), [x, y, w, h]));
        if p["type"] == "row" {
            continue;
        }
        ensure!(
            p["datasource"]["uid"] == "${datasource}",
            "{title}: datasource"
        );
        let targets = p["targets"].as_array().context("no targets")?;
        ensure!(!targets.is_empty(), "{title}: no targets");
        let mut refs = BTreeSet::new();
        for t in targets {
            let expr = t["expr"].as_str().context("target without expr")?;
            ensure!(balanced(expr), "{title}: unbalanced expr {expr}");
            ensure!(refs.insert(t["refId"].to_string()), "{title}: refId reused");
            exprs.push(expr.to_owned());
        }
    }
    // promtool parses the queries too, as recording rules with Grafana's variables filled in.
    if let Some(promtool) = promtool() {
        let rules: Vec<Value> = exprs
            .iter()
            .enumerate()
            .map(|(i, e)| {
                let e = e
                    .replace("$__rate_interval", "5m")
                    .replace("$job", ".*")
                    .replace("$instance", ".*");
                json!({"record": format!("dashboard:query_{i}"), "expr": e})
            })
            .collect();
        let dir = tempfile::tempdir()?;
        let file = dir.path().join("dashboard-queries.yml");
        // JSON is YAML.
        std::fs::write(
            &file,
            json!({"groups": [{"name": "dashboard", "rules": rules}]}).to_string(),
        )?;
        promtool_check_rules(&promtool, &file);
    }
    Ok(())
}

// --- manifests, unit and image agree with the relay --------------------------------------

/// Every YAML document of a file.
fn yaml_docs(rel: &str) -> Result<Vec<serde_yaml::Value>> {
    let text = read(rel)?;
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).with_context(|| format!("deploy/{rel}")))
        .collect()
}

/// The relay's drain: `shutdown_grace`, then up to `FINAL_SHUTDOWN_WAIT` for its tasks.
fn stop_takes(config: &RelayConfig) -> Duration {
    config.shutdown_grace + porthole_relay::limits::FINAL_SHUTDOWN_WAIT
}

#[test]
fn kubernetes_manifests_match_their_relay_toml() -> Result<()> {
    let mut by_kind: BTreeMap<String, Vec<serde_yaml::Value>> = BTreeMap::new();
    for file in [
        "configmap.yaml",
        "secret.yaml",
        "services.yaml",
        "statefulset.yaml",
    ] {
        for doc in yaml_docs(&format!("kubernetes/{file}"))? {
            ensure!(
                doc["metadata"]["namespace"].is_null(),
                "{file}: names a namespace"
            );
            let kind = doc["kind"].as_str().context("a document without kind")?;
            by_kind
                .entry(kind.to_owned())
                .or_default()
                .push(doc.clone());
        }
    }
    for rel in [
        "kubernetes/kustomization.yaml",
        "kubernetes/hostnetwork-patch.yaml",
    ] {
        yaml_docs(rel)?;
    }
    let toml = by_kind["ConfigMap"][0]["data"]["relay.toml"]
        .as_str()
        .context("ConfigMap without relay.toml")?;
    let config = porthole_relay::config_file::parse_str(toml)
        .map_err(|e| anyhow!("the ConfigMap's relay.toml: {e}"))?;
    config
        .validate()
        .map_err(|e| anyhow!("the ConfigMap's relay.toml: {e}"))?;

    let set = &by_kind["StatefulSet"][0];
    assert_eq!(
        set["spec"]["replicas"].as_u64(),
        Some(1),
        "one relay per volume"
    );
    let pod = &set["spec"]["template"]["spec"];
    let grace = pod["terminationGracePeriodSeconds"]
        .as_u64()
        .context("no grace period")?;
    assert!(
        Duration::from_secs(grace) > stop_takes(&config),
        "terminationGracePeriodSeconds {grace} does not cover the drain ({:?})",
        stop_takes(&config)
    );
    assert_eq!(pod["securityContext"]["runAsNonRoot"].as_bool(), Some(true));
    let c = &pod["containers"][0];
    assert_eq!(
        c["securityContext"]["readOnlyRootFilesystem"].as_bool(),
        Some(true)
    );
    let port_of = |name: &str| {
        c["ports"].as_sequence().and_then(|ports| {
            ports
                .iter()
                .find(|p| p["name"] == name)
                .and_then(|p| p["containerPort"].as_u64())
        })
    };
    assert_eq!(
        port_of("agents"),
        Some(u64::from(config.agent_listen.port()))
    );
    assert_eq!(port_of("api"), Some(u64::from(config.api_listen.port())));
    assert!(
        config.metrics_listen.is_none(),
        "probes expect /healthz on the API port"
    );
    for (probe, path) in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")] {
        assert_eq!(c[probe]["httpGet"]["path"].as_str(), Some(path), "{probe}");
        assert_eq!(c[probe]["httpGet"]["port"].as_str(), Some("api"), "{probe}");
    }
    let args: Vec<&str> = c["args"]
        .as_sequence()
        .context("args")?
        .iter()
        .filter_map(|a| a.as_str())
        .collect();
    let mounts = c["volumeMounts"].as_sequence().context("volumeMounts")?;
    let mounted = |path: &Path| {
        mounts
            .iter()
            .any(|m| m["mountPath"].as_str().is_some_and(|p| path.starts_with(p)))
    };
    let config_path = args
        .iter()
        .skip_while(|a| **a != "--config")
        .nth(1)
        .context("--config")?;
    assert!(
        mounted(Path::new(config_path)),
        "--config {config_path} is not mounted"
    );
    assert!(
        mounted(&config.data_dir),
        "data_dir {:?} is not mounted",
        config.data_dir
    );
    assert!(
        mounted(&config.user_token_secret_file()),
        "the user token secret is not mounted"
    );
    let claim = &set["spec"]["volumeClaimTemplates"][0]["metadata"]["name"];
    assert!(
        mounts.iter().any(|m| m["name"] == *claim
            && Path::new(m["mountPath"].as_str().unwrap_or("")) == config.data_dir),
        "the volumeClaimTemplate is not the data dir"
    );
    // Services point at named container ports; the agent port is public, the API is not.
    for svc in &by_kind["Service"] {
        let spec = &svc["spec"];
        for p in spec["ports"].as_sequence().context("ports")? {
            let target = p["targetPort"].as_str().context("targetPort by name")?;
            assert!(
                port_of(target).is_some(),
                "Service targetPort {target} is no container port"
            );
            if target == "api" {
                assert_ne!(
                    spec["type"].as_str(),
                    Some("LoadBalancer"),
                    "the API must stay internal"
                );
            }
        }
    }
    assert!(
        by_kind["Service"]
            .iter()
            .any(|s| s["spec"]["type"] == "LoadBalancer"
                && s["spec"]["ports"][0]["targetPort"] == "agents"),
        "no LoadBalancer for the agent port"
    );
    let secret = by_kind["Secret"][0]["stringData"]
        .as_mapping()
        .context("Secret stringData")?;
    let file_name = config
        .user_token_secret_file()
        .file_name()
        .map(|f| f.to_string_lossy().into_owned());
    assert!(
        secret.keys().any(|k| k.as_str() == file_name.as_deref()),
        "the Secret has no key {file_name:?}"
    );
    Ok(())
}

/// `Key=value` lines of a unit file (repeated keys keep every value).
fn unit(rel: &str) -> Result<BTreeMap<String, Vec<String>>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in read(rel)?.lines().map(str::trim) {
        if line.starts_with(['#', ';', '[']) || line.is_empty() {
            continue;
        }
        let (k, v) = line
            .split_once('=')
            .with_context(|| format!("{rel}: `{line}`"))?;
        out.entry(k.to_owned()).or_default().push(v.to_owned());
    }
    Ok(out)
}

#[test]
fn systemd_units_and_containerfile_match_the_relay() -> Result<()> {
    let relay = unit("porthole-relay.service")?;
    let one = |k: &str| relay.get(k).and_then(|v| v.last()).map(String::as_str);
    for (key, want) in [
        ("DynamicUser", "yes"),
        ("StateDirectory", "porthole"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("NoNewPrivileges", "yes"),
        ("CapabilityBoundingSet", ""),
        ("LimitNOFILE", "1048576"),
        ("KillSignal", "SIGTERM"),
        ("Restart", "on-failure"),
    ] {
        assert_eq!(one(key), Some(want), "porthole-relay.service: {key}");
    }
    assert!(relay["Environment"].contains(&"PORTHOLE_DATA_DIR=/var/lib/porthole".to_owned()));
    let stop = humantime::parse_duration(one("TimeoutStopSec").context("TimeoutStopSec")?)?;
    let defaults = RelayConfig::default();
    assert!(
        stop > stop_takes(&defaults),
        "TimeoutStopSec {stop:?} cuts the drain short"
    );

    let agent = unit("porthole-agent.service")?;
    assert_eq!(agent["Restart"], ["no"], "the agent reconnects by itself");
    assert_eq!(agent["EnvironmentFile"], ["/etc/porthole/agent.env"]);

    let image = read("Containerfile")?;
    let expose: Vec<&str> = image
        .lines()
        .filter_map(|l| l.strip_prefix("EXPOSE "))
        .flat_map(str::split_whitespace)
        .collect();
    for port in [
        defaults.agent_listen.port().to_string(),
        defaults.api_listen.port().to_string(),
        defaults.port_range.to_string(),
    ] {
        assert!(
            expose.contains(&port.as_str()),
            "Containerfile does not EXPOSE {port}"
        );
    }
    assert!(image.contains("cargo build --release --locked -p porthole-relay -p porthole-agent"));
    assert!(
        image.contains("USER 10001"),
        "the image must not run as root"
    );
    // Cargo loads every workspace member: the build stage must copy each one.
    let root: toml::Table = std::fs::read_to_string(deploy("../Cargo.toml"))?.parse()?;
    for member in root["workspace"]["members"].as_array().context("members")? {
        let m = member.as_str().context("member")?;
        assert!(
            image.contains(&format!("COPY {m} {m}")),
            "Containerfile does not copy member {m}"
        );
    }
    Ok(())
}

/// The `PORTHOLE_*` variables a clap command reads.
fn env_names(command: clap::Command) -> BTreeSet<String> {
    command
        .get_arguments()
        .filter_map(|a| a.get_env())
        .map(|e| e.to_string_lossy().into_owned())
        .collect()
}

/// Every `PORTHOLE_[A-Z0-9_]+` in `text`.
fn env_refs(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for (at, _) in text.match_indices("PORTHOLE_") {
        let name: String = text[at..]
            .chars()
            .take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_')
            .collect();
        // `PORTHOLE_*` in prose names them all.
        if !name.ends_with('_') {
            out.insert(name);
        }
    }
    out
}

#[test]
fn environment_variables_in_deploy_files_exist() -> Result<()> {
    use clap::{Args, Command};
    // `--config` is the binary's own flag, beside the settings.
    let mut relay = env_names(RelayConfig::augment_args(Command::new("porthole-relay")));
    relay.insert("PORTHOLE_CONFIG".into());
    let agent = env_names(porthole_agent::AgentConfig::augment_args(Command::new(
        "porthole-agent",
    )));
    ensure!(relay.contains("PORTHOLE_DATA_DIR") && agent.contains("PORTHOLE_TOKEN"));
    let both: BTreeSet<String> = relay.union(&agent).cloned().collect();
    let mut problems = Vec::new();
    for (file, known) in [
        ("porthole-relay.service", &relay),
        ("Containerfile", &relay),
        ("kubernetes/statefulset.yaml", &relay),
        ("kubernetes/hostnetwork-patch.yaml", &relay),
        ("porthole-agent.service", &agent),
        ("README.md", &both),
    ] {
        for name in env_refs(&read(file)?) {
            if !known.contains(&name) {
                problems.push(format!("deploy/{file}: {name} is read by neither binary"));
            }
        }
    }
    ensure!(problems.is_empty(), "{}", problems.join("\n"));
    Ok(())
}
