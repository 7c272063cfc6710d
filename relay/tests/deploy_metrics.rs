//! The metrics the deploy/ assets use against a live relay: every metric the alert rules
//! and the Grafana dashboard use is one `/metrics` exposes (family, label names, label
//! values they select), after a scenario that makes every labelled series appear: a visitor
//! forwarded, refusals, a failed agent handshake, an instructions request, an agent link cut
//! and resumed, sessions deleted and expired. The whole exposition goes through a Prometheus
//! text parser.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, bail, ensure, Context, Result};
use common::deploy_files::{alert_rules, dashboard, groupings, json_strings, read};
use common::{str_field, TestRelay};
use openmetrics_parser::{prometheus::parse_prometheus, PrometheusValue};
use porthole_agent::config::Target;
use porthole_agent::{AgentEvent, Outcome, Resolved};
use porthole_protocol::tls::{parse_pin, RelayTrust};
use porthole_protocol::{Secret, Service};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::AbortHandle;
use tokio_util::sync::CancellationToken;

/// How long any one step of the scenario may take.
const STEP: Duration = Duration::from_secs(20);
/// Labels Prometheus adds at scrape time: never in the exposition.
const TARGET_LABELS: [&str; 3] = ["job", "instance", "le"];

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
        relays: vec![proxy.addr.to_string()],
        server_name: "localhost".into(),
        token: Secret::new(str_field(&session, "join_token")?),
        services: BTreeMap::from([(Service::Ssh, Target::Dial(echo().await?.to_string()))]),
        trust: RelayTrust::Pin(parse_pin(&relay.handle.info.fingerprint)?),
        connect_timeout: Duration::from_secs(5),
        credentials: Vec::new(),
        host_keys: Vec::new(),
        embedded_ssh: None,
        warm_connections: 2,
        warm_idle: Duration::from_secs(60),
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
