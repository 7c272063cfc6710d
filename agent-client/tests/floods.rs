//! Floods cannot fill the disk or forge log lines: a connection flood from one source on a
//! session's public port and on the agent endpoint writes a bounded number of lines to the
//! audit log and the relay's own log (refusals are aggregated with a count), and a `hello`
//! whose fields carry newlines and escape sequences cannot forge a log line.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::time::Duration;

use anyhow::ensure;
use common::raw;
use common::relay_process::RelaySetup;
use porthole_protocol::message::HelloAuth;
use porthole_protocol::{Message, Secret};

/// Connections in each flood (bounded: loopback only, a few seconds).
const FLOOD: usize = 5_000;

fn size(path: &std::path::Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

#[test]
fn a_connection_flood_writes_a_bounded_log() -> anyhow::Result<()> {
    let setup = RelaySetup::new()?;
    let log_path = setup.data.path().join("relay.log");
    let relay = setup.start_logged(&["--refusal-summary-interval", "1s"], Some(&log_path))?;
    let (id, _token, port) = setup.create_session(&relay.api, serde_json::json!({}))?;
    let audit_path = setup.data.path().join("audit.log");
    let (audit_before, log_before) = (size(&audit_path), size(&log_path));

    // Public port: connect, say we are SSH, drop; no agent is connected, and past the rate
    // limit every one is refused.
    for _ in 0..FLOOD {
        if let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) {
            let _ = s.write_all(b"SSH-2.0-flood\r\n");
        }
    }
    // Agent endpoint: garbage instead of a TLS handshake.
    for _ in 0..FLOOD {
        if let Ok(mut s) = TcpStream::connect(("127.0.0.1", setup.agent_port)) {
            let _ = s.write_all(b"\x16\x03\x01garbage\r\n");
        }
    }
    // Every refusal is accounted for: wait for the summaries to count the whole flood.
    let counted = common::wait_for(
        "the summaries to cover the flood",
        Duration::from_secs(30),
        || {
            let text = std::fs::read_to_string(&audit_path).ok()?;
            let total: u64 = text
                .lines()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .filter(|l| l["event"] == "visitor_refused" && l["session_id"] == id.as_str())
                .map(|l| l["count"].as_u64().unwrap_or(0))
                .sum();
            (total >= FLOOD as u64).then_some(total)
        },
    )?;
    ensure!(
        counted == FLOOD as u64,
        "the audit log counts {counted} refusals of {FLOOD}"
    );
    let audit_growth = size(&audit_path) - audit_before;
    let log_growth = size(&log_path) - log_before;
    let log = std::fs::read_to_string(&log_path)?;
    ensure!(
        log.contains("refused"),
        "the relay log reports the refusals:\n{log}"
    );
    // Before aggregation each refusal cost ~180 bytes of audit log and ~180 of relay log.
    ensure!(
        audit_growth < 8 * 1024,
        "audit log grew {audit_growth} bytes for {FLOOD} refusals"
    );
    ensure!(
        log_growth < 32 * 1024,
        "relay log grew {log_growth} bytes for {} refusals:\n{log}",
        2 * FLOOD
    );
    eprintln!(
        "flood of {} connections: audit log +{audit_growth} B, relay log +{log_growth} B",
        2 * FLOOD
    );
    Ok(())
}

#[test]
fn peer_text_cannot_forge_a_log_line() -> anyhow::Result<()> {
    let setup = RelaySetup::new()?;
    let log_path = setup.data.path().join("relay.log");
    let relay = setup.start_logged(&[], Some(&log_path))?;
    let forged = "2026-01-01T00:00:00.000000Z  INFO porthole_relay: session revoked";
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let addr = format!("127.0.0.1:{}", setup.agent_port);
        // A protocol mismatch quotes the agent's version; a bad resume quotes the session id.
        let config =
            porthole_protocol::tls::client_config(&porthole_protocol::tls::RelayTrust::Pin(
                porthole_protocol::tls::parse_pin(&relay.pin)?,
            ))?;
        let tcp = tokio::net::TcpStream::connect(&addr).await?;
        let tls = tokio_rustls::TlsConnector::from(config)
            .connect(rustls_pki_types_name()?, tcp)
            .await?;
        let mut framed =
            tokio_util::codec::Framed::new(tls, porthole_protocol::codec::MessageCodec);
        use futures_util::{SinkExt, StreamExt};
        framed
            .send(Message::Hello {
                protocol_version: 999,
                agent_version: format!("1.0\n{forged}\x1b[2J"),
                auth: HelloAuth::Join {
                    token: Secret::new("phj_x"),
                },
                services: vec![],
                credentials: vec![],
                host_keys: vec![],
                visitor_reports: false,
                attach_elsewhere: false,
            })
            .await?;
        let answer = tokio::time::timeout(Duration::from_secs(10), framed.next()).await?;
        ensure!(
            matches!(answer, Some(Ok(Message::Error { .. }))),
            "{answer:?}"
        );
        let (_, answer) = raw::hello(
            &addr,
            &relay.pin,
            HelloAuth::Resume {
                session_id: format!("s_x\n{forged}"),
                secret: Secret::new("phr_x"),
            },
        )
        .await?;
        ensure!(matches!(answer, Message::Error { .. }), "{answer:?}");
        anyhow::Ok(())
    })?;
    let log = common::wait_for(
        "the refusals in the relay log",
        Duration::from_secs(10),
        || {
            let log = std::fs::read_to_string(&log_path).ok()?;
            (log.matches("agent connection refused").count() >= 2).then_some(log)
        },
    )?;
    ensure!(
        !log.lines().any(|l| l.starts_with(forged)),
        "a peer forged a log line:\n{log}"
    );
    ensure!(
        !log.contains('\x1b'),
        "an escape sequence reached the log:\n{log}"
    );
    ensure!(
        log.contains("\\n2026-01-01"),
        "the version is logged escaped:\n{log}"
    );
    Ok(())
}

fn rustls_pki_types_name() -> anyhow::Result<tokio_rustls::rustls::pki_types::ServerName<'static>> {
    Ok(tokio_rustls::rustls::pki_types::ServerName::try_from(
        "localhost",
    )?)
}

#[test]
fn a_flood_of_unauthenticated_instructions_requests_writes_a_bounded_audit_log(
) -> anyhow::Result<()> {
    let setup = RelaySetup::new()?;
    let relay = setup.start_with(&["--refusal-summary-interval", "1s"])?;
    let (id, _token, _port) = setup.create_session(&relay.api, serde_json::json!({}))?;
    let audit_path = setup.data.path().join("audit.log");
    let before = size(&audit_path);
    let client = reqwest::blocking::Client::new();
    const REQUESTS: u64 = 500;
    for i in 0..REQUESTS {
        let req = client.get(format!("{}/v1/sessions/{id}/instructions", relay.api));
        // Half without a token, half with a forged one.
        let req = if i % 2 == 0 {
            req
        } else {
            req.bearer_auth("not.a.jwt")
        };
        let status = req.send()?.status();
        ensure!(status == 401, "request {i}: {status}");
    }
    // Every refusal is accounted for: the first of each kind in full, the rest in summaries.
    let counted = common::wait_for(
        "the summaries to cover the flood",
        Duration::from_secs(30),
        || {
            let text = std::fs::read_to_string(&audit_path).ok()?;
            let lines: Vec<serde_json::Value> = text
                .lines()
                .filter_map(|l| serde_json::from_str(l).ok())
                .filter(|l: &serde_json::Value| l["event"] == "instructions_denied")
                .collect();
            let first = lines
                .iter()
                .filter(|l| l["session_id"] == id.as_str())
                .count() as u64;
            let summarised: u64 = lines
                .iter()
                .filter(|l| l["session_id"] == "(aggregated)")
                .filter_map(|l| l["reason"].as_str()?.split(' ').next()?.parse::<u64>().ok())
                .sum();
            (first + summarised >= REQUESTS).then_some(first + summarised)
        },
    )?;
    ensure!(
        counted == REQUESTS,
        "the audit log accounts for {counted} of {REQUESTS}"
    );
    let growth = size(&audit_path) - before;
    ensure!(
        growth < 4 * 1024,
        "audit log grew {growth} bytes for {REQUESTS} refused requests"
    );
    Ok(())
}
