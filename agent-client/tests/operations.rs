//! Relay operations promises, end to end with an in-process relay, the real agent binary and
//! a fake agent speaking the protocol: `--metrics-listen` serves `/metrics`, `/healthz` and
//! `/readyz` (without a token, the relay's own figures) and nothing of the session API; a
//! visitor whose agent never attaches a data connection is closed once `--open-timeout`
//! passed, never before, and audited `visitor_refused` / `agent_failed`; visitors of a
//! session whose agent has not joined, or whose agent is gone, are refused and audited as
//! `agent_not_connected`, and one whose service the agent cannot reach as `agent_failed`,
//! none reaching the service; the agent's warm data connections back off after failures:
//! the delays it logs between attempts grow.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::Read as _;
use std::net::{IpAddr, Ipv4Addr, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _};
use common::echo;
use common::fixture::Tunnel;
use common::launch::Launch;
use common::raw::{self, join, registered};
use common::relay::TestRelay;
use common::relay_process::refusing_port;
use common::scrape::Scrape;
use common::wait_for;
use futures_util::{SinkExt, StreamExt};
use porthole_protocol::Message;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

/// Visitors come from here.
const LOOPBACK: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// `GET http://addr/path` without a token (or with the admin token when `admin`): status,
/// `Content-Type` and body.
fn get(
    relay: &TestRelay,
    addr: std::net::SocketAddr,
    path: &str,
    admin: bool,
) -> anyhow::Result<(u16, String, String)> {
    let url = format!("http://{addr}{path}");
    let resp = if admin {
        relay.http.get(&url).send()?
    } else {
        reqwest::blocking::Client::new()
            .get(&url)
            .timeout(Duration::from_secs(20))
            .send()?
    };
    let status = resp.status().as_u16();
    let kind = resp
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    Ok((status, kind, resp.text()?))
}

/// The sample `family{label="value"}` of a Prometheus text exposition, parsed whole.
fn sample(text: &str, family: &str, label: Option<(&str, &str)>) -> anyhow::Result<f64> {
    use openmetrics_parser::PrometheusValue;
    let parsed = openmetrics_parser::prometheus::parse_prometheus(text)
        .map_err(|e| anyhow::anyhow!("not a valid exposition: {e:?}\n{text}"))?;
    let family = parsed
        .families
        .get(family)
        .with_context(|| format!("no `{family}` in the exposition"))?;
    let value = family.iter_samples().find_map(|s| {
        let set = s.get_labelset().ok()?;
        let matches = label.is_none_or(|(k, v)| set.get_label_value(k) == Some(v));
        matches.then(|| match &s.value {
            PrometheusValue::Counter(c) => c.value.as_f64(),
            PrometheusValue::Gauge(n) | PrometheusValue::Unknown(n) => n.as_f64(),
            _ => f64::NAN,
        })
    });
    value.with_context(|| format!("no sample {label:?} in the family"))
}

/// README: "`--metrics-listen ADDR`: separate listener for `/metrics`, `/healthz`,
/// `/readyz`"; "Metrics ... on the API address or `--metrics-listen`, without a token"; the
/// API "hands out join tokens" and stays private. On the metrics listener the three answer
/// without a token, `/metrics` with this relay's figures (a session created through the API
/// shows there); the session API, the instructions endpoint and the access page are not
/// there, not even with the admin token (404), while the API address still serves them.
#[test]
fn the_metrics_listener_serves_metrics_and_probes_and_nothing_of_the_api() -> anyhow::Result<()> {
    let relay = TestRelay::start_with(|c| {
        c.metrics_listen = Some(std::net::SocketAddr::from((Ipv4Addr::LOCALHOST, 0)));
    })?;
    let metrics = relay
        .handle
        .info
        .metrics_addr
        .context("--metrics-listen set, but the relay reports no metrics address")?;
    ensure!(
        metrics != relay.handle.info.api_addr,
        "the metrics listener must be its own"
    );
    let created = relay.create(&["ssh"], None)?;

    let (status, kind, body) = get(&relay, metrics, "/metrics", false)?;
    ensure!(status == 200, "/metrics on the metrics listener: {status}");
    ensure!(
        kind.starts_with("text/plain"),
        "/metrics content type: {kind}"
    );
    let sessions = sample(&body, "porthole_sessions_created_total", None)?;
    ensure!(
        sessions >= 1.0,
        "the metrics listener should show the session created through the API, \
         porthole_sessions_created_total = {sessions}"
    );
    let pending = sample(&body, "porthole_sessions", Some(("state", "pending")))?;
    ensure!(
        pending >= 1.0,
        "porthole_sessions{{state=\"pending\"}} = {pending}"
    );
    let (status, _, body) = get(&relay, metrics, "/healthz", false)?;
    ensure!(
        status == 200 && body == "ok\n",
        "/healthz on the metrics listener: {status} {body:?}"
    );
    let (status, _, body) = get(&relay, metrics, "/readyz", false)?;
    ensure!(
        status == 200 && body.starts_with("ready"),
        "/readyz on the metrics listener: {status} {body:?}"
    );

    let id = &created.id;
    let api_paths = [
        "/v1/sessions".to_owned(),
        format!("/v1/sessions/{id}"),
        format!("/v1/sessions/{id}/instructions"),
        format!("/access/{id}"),
    ];
    for path in &api_paths {
        let (status, _, body) = get(&relay, metrics, path, true)?;
        ensure!(
            status == 404,
            "GET {path} on the metrics listener (with the admin token) answered {status}, \
             not 404: {body}"
        );
        ensure!(
            !body.contains(id.as_str()) && !body.contains(&created.token),
            "GET {path} on the metrics listener leaked session data: {body}"
        );
    }
    let post = relay
        .http
        .post(format!("http://{metrics}/v1/sessions"))
        .json(&serde_json::json!({"build_id": "b", "app_id": "a", "services": ["ssh"]}))
        .send()?;
    ensure!(
        post.status().as_u16() == 404,
        "POST /v1/sessions on the metrics listener answered {}",
        post.status()
    );
    // The API address keeps the API.
    let (status, _, body) = get(&relay, relay.handle.info.api_addr, "/v1/sessions", true)?;
    ensure!(
        status == 200 && body.contains(id.as_str()),
        "the API: {status} {body}"
    );
    Ok(())
}

/// A fake agent's control link served in the background: pings answered (so the relay keeps
/// the link and confirms the registration), every `open` reported on `opens`, and never a
/// data connection.
struct FakeAgent {
    /// `conn_id` of each `open` received.
    opens: std::sync::mpsc::Receiver<u64>,
    /// Stops serving the link (dropping it).
    stop: CancellationToken,
}

impl FakeAgent {
    /// Joins `token`'s session on `relay` and serves the link.
    fn join(relay: &TestRelay, token: &str) -> anyhow::Result<Self> {
        let (mut link, answer) =
            relay
                .rt
                .block_on(raw::hello(&relay.agent_addr(), &relay.pin(), join(token)))?;
        ensure!(
            registered(&answer).is_some(),
            "the fake agent was not registered: {answer:?}"
        );
        let (tx, opens) = std::sync::mpsc::channel();
        let stop = CancellationToken::new();
        let stopped = stop.clone();
        relay.rt.spawn(async move {
            // A first frame confirms the registration.
            if link.send(Message::Ping { seq: 1 }).await.is_err() {
                return;
            }
            loop {
                let frame = tokio::select! {
                    () = stopped.cancelled() => return,
                    frame = link.next() => frame,
                };
                match frame {
                    Some(Ok(Message::Ping { seq })) => {
                        if link.send(Message::Pong { seq }).await.is_err() {
                            return;
                        }
                    }
                    Some(Ok(Message::Open { conn_id, .. })) => {
                        let _ = tx.send(conn_id);
                    }
                    Some(Ok(_)) => {}
                    _ => return,
                }
            }
        });
        Ok(Self { opens, stop })
    }
}

impl Drop for FakeAgent {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Reads `stream` until the relay closes it (EOF or reset), within `within`; fails if any
/// byte arrives first.
fn closed_without_data(stream: &mut TcpStream, within: Duration) -> anyhow::Result<()> {
    stream.set_read_timeout(Some(within))?;
    let mut buf = [0u8; 256];
    match stream.read(&mut buf) {
        Ok(0) => Ok(()),
        Ok(n) => bail!(
            "the refused visitor got {n} bytes: {:?}",
            String::from_utf8_lossy(&buf[..n])
        ),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::ConnectionAborted
            ) =>
        {
            Ok(())
        }
        Err(e) => bail!("the visitor was not closed within {within:?}: {e}"),
    }
}

/// Waits for the session's `visitor_refused` audit line with `reason`; checks its fields.
fn wait_refused(
    relay: &TestRelay,
    session_id: &str,
    port: u16,
    reason: &str,
) -> anyhow::Result<Value> {
    let line = wait_for(
        &format!("a `visitor_refused` audit line with reason `{reason}` for {session_id}"),
        Duration::from_secs(20),
        || {
            relay
                .audited("visitor_refused", session_id)
                .ok()?
                .into_iter()
                .find(|l| l["reason"] == reason)
        },
    )
    .with_context(|| format!("audit log:\n{}", relay.audit_log().unwrap_or_default()))?;
    ensure!(
        line["service"] == "ssh"
            && line["port"] == u64::from(port)
            && line["source_ip"] == "127.0.0.1"
            && line["count"] == 1,
        "the first refusal of its kind is written in full (service, port, source, count 1): \
         {line}"
    );
    Ok(line)
}

/// README: "`--open-timeout`: a visitor waits this long for the agent's data connection";
/// audit `visitor_refused` reasons include `agent_failed`. A fake agent joins, takes the
/// `open` for a visitor and never attaches: the visitor is closed without a byte, not before
/// the open timeout (measured from before it connected), and the refusal is audited
/// `agent_failed` and counted in `porthole_visitor_refusals_total{reason="agent_failed"}`.
#[test]
fn a_visitor_whose_agent_never_attaches_is_closed_after_the_open_timeout() -> anyhow::Result<()> {
    let open_timeout = Duration::from_secs(3);
    let relay = TestRelay::start_with(|c| c.open_timeout = open_timeout)?;
    let session = relay.create(&["ssh"], None)?;
    let port = session.port("ssh");
    let fake = FakeAgent::join(&relay, &session.token)?;
    relay.wait_state(&session.id, "active", Duration::from_secs(20))?;

    let started = Instant::now();
    let mut visitor = relay.connect_from(LOOPBACK, port)?;
    fake.opens
        .recv_timeout(Duration::from_secs(20))
        .context("the relay never sent the agent an `open` for the visitor")?;
    closed_without_data(&mut visitor, open_timeout + Duration::from_secs(60))?;
    let waited = started.elapsed();
    ensure!(
        waited >= open_timeout,
        "the visitor was closed after {waited:?}, before the open timeout of {open_timeout:?}"
    );
    wait_refused(&relay, &session.id, port, "agent_failed")?;
    let counted =
        Scrape::take(&relay)?.counter("porthole_visitor_refusals_total", "reason", "agent_failed");
    ensure!(
        counted >= 1.0,
        "porthole_visitor_refusals_total{{reason=\"agent_failed\"}} = {counted}"
    );
    ensure!(
        relay.state(&session.id)? == "active",
        "a visitor timing out must not end the session"
    );
    drop(fake);
    Ok(())
}

/// Audit `visitor_refused` with `agent_not_connected`: a visitor to a session whose agent
/// has not joined yet is closed at once without a byte; after the agent of a live session
/// is killed (`disconnected`: ports stay bound, visitors are refused), a visitor is refused
/// the same way, and the session's service never sees it.
#[test]
fn visitors_without_a_connected_agent_are_refused_and_audited_agent_not_connected(
) -> anyhow::Result<()> {
    let relay = TestRelay::start()?;

    let pending = relay.create(&["ssh"], None)?;
    ensure!(relay.state(&pending.id)? == "pending");
    let mut visitor = relay.connect_from(LOOPBACK, pending.port("ssh"))?;
    closed_without_data(&mut visitor, Duration::from_secs(20))?;
    wait_refused(
        &relay,
        &pending.id,
        pending.port("ssh"),
        "agent_not_connected",
    )?;

    let tunnel = Tunnel::start(&relay)?;
    let accepted = tunnel.accepted()?.clone();
    let port = tunnel.port("ssh");
    ensure!(echo::roundtrip(port, b"while connected")? == b"while connected");
    let reached = accepted.get();
    let Tunnel { session, agent, .. } = tunnel;
    drop(agent); // SIGKILL: the kernel closes its link.
    relay.wait_state(&session.id, "disconnected", Duration::from_secs(30))?;
    let mut visitor = relay.connect_from(LOOPBACK, port)?;
    closed_without_data(&mut visitor, Duration::from_secs(20))?;
    wait_refused(&relay, &session.id, port, "agent_not_connected")?;
    ensure!(
        accepted.get() == reached,
        "a refused visitor reached the service"
    );
    Ok(())
}

/// Audit `visitor_refused` with `agent_failed` from a real agent: its service refuses
/// connections (`--warm-connections 0`, so the visitor waits on `open`), the agent tells the
/// relay it could not reach it, and the visitor is closed without a byte.
#[test]
fn a_visitor_the_agent_cannot_serve_is_refused_and_audited_agent_failed() -> anyhow::Result<()> {
    let relay = TestRelay::start()?;
    let (_reserved, refusing) = refusing_port()?;
    let tunnel = Tunnel::builder()
        .forward("ssh", refusing)
        .args(["--warm-connections", "0"])
        .start(&relay)?;
    let port = tunnel.port("ssh");
    let mut visitor = relay.connect_from(LOOPBACK, port)?;
    closed_without_data(&mut visitor, Duration::from_secs(60))?;
    wait_refused(&relay, &tunnel.session.id, port, "agent_failed")?;
    ensure!(
        relay.state(&tunnel.session.id)? == "active",
        "an unreachable service must not end the session"
    );
    Ok(())
}

/// A TCP proxy to `target` that forwards its first connection (the agent's control link)
/// and closes every later one as soon as it is accepted; returns its address and how many
/// it closed.
fn first_connection_only(
    rt: &tokio::runtime::Runtime,
    target: String,
    stop: CancellationToken,
) -> anyhow::Result<(String, Arc<AtomicUsize>)> {
    let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
    let addr = listener.local_addr()?.to_string();
    let closed = Arc::new(AtomicUsize::new(0));
    let counter = closed.clone();
    rt.spawn(async move {
        let mut first = true;
        loop {
            let accepted = tokio::select! {
                () = stop.cancelled() => return,
                a = listener.accept() => a,
            };
            let Ok((mut inbound, _)) = accepted else {
                continue;
            };
            if !first {
                counter.fetch_add(1, Ordering::SeqCst);
                drop(inbound);
                continue;
            }
            first = false;
            let (target, stop) = (target.clone(), stop.clone());
            tokio::spawn(async move {
                let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await else {
                    return;
                };
                tokio::select! {
                    _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                    () = stop.cancelled() => {}
                }
            });
        }
    });
    Ok((addr, closed))
}

/// The `delay=` of a `warm data connection failed; retrying later` log line (a `Duration`
/// printed with `Debug`: `500ms`, `1s`, `1.5s`).
fn logged_delay(line: &str) -> Option<Duration> {
    let text = line.split("delay=").nth(1)?.split_whitespace().next()?;
    let (number, unit) = text.split_at(text.find(|c: char| c.is_ascii_alphabetic() || c == 'µ')?);
    let number: f64 = number.parse().ok()?;
    let secs = match unit {
        "s" => number,
        "ms" => number / 1e3,
        "µs" | "us" => number / 1e6,
        "ns" => number / 1e9,
        _ => return None,
    };
    Some(Duration::from_secs_f64(secs))
}

/// README: the agent "backs off after failures" of its warm data connections. The agent
/// reaches the relay through a proxy that lets its control link through and closes every
/// later connection: every warm data connection fails at once. The agent stays registered,
/// and the delays it logs before each new attempt grow from one failure to the next (a
/// tight loop would log the same short delay, or none).
#[test]
fn failing_warm_connections_are_retried_with_growing_delays() -> anyhow::Result<()> {
    let relay = TestRelay::start()?;
    let echo_port = echo::start()?;
    let session = relay.create(&["ssh"], None)?;
    let stop = CancellationToken::new();
    let (proxy, closed) = first_connection_only(&relay.rt, relay.agent_addr(), stop.clone())?;
    let agent = Launch::new([
        "--relay".to_owned(),
        proxy,
        "--pin-sha256".into(),
        relay.pin(),
        "--service".into(),
        format!("ssh=127.0.0.1:{echo_port}"),
        "--warm-connections".into(),
        "1".into(),
    ])
    .env("PORTHOLE_TOKEN", &session.token)
    .env("RUST_LOG", "info,porthole_agent::warm=debug")
    .start()?;
    agent.wait_registered()?;

    const WANTED: usize = 4;
    let delays = wait_for(
        &format!("{WANTED} warm-connection retry delays in the agent's log"),
        Duration::from_secs(120),
        || {
            let delays: Vec<(String, Option<Duration>)> = agent
                .lines()
                .into_iter()
                .filter(|l| l.contains("warm data connection failed; retrying later"))
                .map(|l| {
                    let delay = logged_delay(&l);
                    (l, delay)
                })
                .collect();
            (delays.len() >= WANTED).then_some(delays)
        },
    )
    .with_context(|| format!("agent output:\n{}", agent.output()))?;
    let mut previous: Option<Duration> = None;
    for (line, delay) in &delays {
        let delay = delay.with_context(|| format!("no delay in the log line {line:?}"))?;
        if let Some(previous) = previous {
            ensure!(
                delay > previous,
                "the retry delay did not grow: {previous:?} then {delay:?}; lines:\n{}",
                delays
                    .iter()
                    .map(|(l, _)| l.as_str())
                    .collect::<Vec<_>>()
                    .join("\n")
            );
        }
        previous = Some(delay);
    }
    ensure!(
        closed.load(Ordering::SeqCst) >= WANTED,
        "the proxy closed {} data connections",
        closed.load(Ordering::SeqCst)
    );
    ensure!(
        relay.state(&session.id)? == "active",
        "failing warm connections must not cost the session its agent"
    );
    stop.cancel();
    Ok(())
}
