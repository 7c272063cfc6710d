//! Bad agents and bad bytes are refused with clear errors, and a healthy session on the same
//! relay keeps working through all of it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use anyhow::{ensure, Context as _};
use bytes::{BufMut, BytesMut};
use common::agent::Agent;
use common::fixture::Tunnel;
use common::relay::TestRelay;
use common::{echo, wait_for};
use futures_util::{SinkExt, StreamExt};
use porthole_protocol::codec::MessageCodec;
use porthole_protocol::message::HelloAuth;
use porthole_protocol::tls::{client_config, parse_pin, RelayTrust};
use porthole_protocol::{ErrorCode, Message, Secret, Service};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::TlsConnector;
use tokio_util::codec::Framed;

/// A relay with one healthy session that forwards to an echo service.
struct Healthy {
    relay: TestRelay,
    _agent: Agent,
    port: u16,
    session_id: String,
}

impl Healthy {
    fn start() -> anyhow::Result<Self> {
        let relay = TestRelay::start()?;
        let Tunnel { session, agent, .. } = Tunnel::start(&relay)?;
        let h = Self {
            relay,
            _agent: agent,
            port: session.port("ssh"),
            session_id: session.id.clone(),
        };
        h.check()?;
        Ok(h)
    }

    /// The healthy session still forwards.
    fn check(&self) -> anyhow::Result<()> {
        let got = echo::roundtrip(self.port, b"still healthy").context("healthy session broke")?;
        ensure!(got == b"still healthy", "healthy session returned {got:?}");
        Ok(())
    }

    /// Runs an agent with `token` (and optionally another pin) and returns its exit output.
    fn refused_agent(&self, token: &str, pin: Option<&str>) -> anyhow::Result<String> {
        refused_agent(&self.relay, token, pin)
    }

    /// Opens a raw TLS connection to the agent endpoint.
    async fn raw(&self) -> anyhow::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let config = client_config(&RelayTrust::Pin(parse_pin(&self.relay.pin())?))?;
        let tcp = TcpStream::connect(self.relay.agent_addr()).await?;
        Ok(TlsConnector::from(config)
            .connect(ServerName::try_from("localhost")?, tcp)
            .await?)
    }

    /// Sends raw bytes as the first thing on a TLS connection and returns the relay's answer.
    fn answer_to_bytes(&self, bytes: Vec<u8>) -> anyhow::Result<Message> {
        self.relay.rt.block_on(async {
            let mut tls = self.raw().await?;
            tls.write_all(&bytes).await?;
            let mut framed = Framed::new(tls, MessageCodec);
            let answer = tokio::time::timeout(Duration::from_secs(10), framed.next()).await?;
            answer
                .context("relay closed without an answer")?
                .map_err(Into::into)
        })
    }

    /// Sends one message first and returns the relay's answer.
    fn answer_to(&self, msg: Message) -> anyhow::Result<Message> {
        self.relay.rt.block_on(async {
            let mut framed = Framed::new(self.raw().await?, MessageCodec);
            framed.send(msg).await?;
            let answer = tokio::time::timeout(Duration::from_secs(10), framed.next()).await?;
            answer
                .context("relay closed without an answer")?
                .map_err(Into::into)
        })
    }
}

/// Runs an agent against `relay` with `token` (and optionally another pin); it must exit
/// non-zero; returns its output.
fn refused_agent(relay: &TestRelay, token: &str, pin: Option<&str>) -> anyhow::Result<String> {
    let pin = pin.map(str::to_owned).unwrap_or_else(|| relay.pin());
    let mut agent = Agent::start_to(
        &relay.agent_addr(),
        &pin,
        token,
        &["ssh=127.0.0.1:9".to_owned()],
    )?;
    let status = agent.wait_exit(Duration::from_secs(20))?;
    ensure!(
        !status.success(),
        "a refused agent must exit non-zero:\n{}",
        agent.output()
    );
    Ok(agent.output())
}

fn expect_error(msg: Message, want: ErrorCode, needle: &str) -> anyhow::Result<()> {
    match msg {
        Message::Error { code, message } => {
            ensure!(code == want, "expected {want:?}, got {code:?}: {message}");
            ensure!(
                message.contains(needle),
                "message should mention `{needle}`: {message}"
            );
            Ok(())
        }
        other => anyhow::bail!("expected an error frame, got {other:?}"),
    }
}

#[test]
fn bad_agents_are_refused_and_the_healthy_session_keeps_working() -> anyhow::Result<()> {
    let h = Healthy::start()?;

    let out = h.refused_agent("phj_0000000000000000", None)?;
    ensure!(
        out.contains("unknown join token"),
        "wrong token output:\n{out}"
    );
    h.check()?;

    // The healthy session's own token, a second time.
    let Tunnel {
        session: reused,
        agent: _first,
        ..
    } = Tunnel::builder().forward("ssh", 9).start(&h.relay)?;
    let out = h.refused_agent(&reused.token, None)?;
    ensure!(out.contains("already used"), "reused token output:\n{out}");
    h.check()?;

    // The wrong certificate pin: the agent refuses the relay.
    let wrong_pin = "00".repeat(32);
    let out = h.refused_agent(&reused.token, Some(&wrong_pin))?;
    ensure!(
        out.contains("cannot verify the relay") && out.contains("pinned"),
        "wrong pin output:\n{out}"
    );
    h.check()?;
    Ok(())
}

#[test]
fn a_token_past_its_join_ttl_is_refused_as_such() -> anyhow::Result<()> {
    // A join TTL of 1 s on a relay with no other session: nothing has to join in time, so a
    // slow machine cannot lose this; the test only looks after the TTL.
    let relay = TestRelay::start_with(|c| c.join_ttl = Duration::from_secs(1))?;
    let expired = relay.create(&["ssh"], None)?;
    let view = relay.wait_state(&expired.id, "revoked", Duration::from_secs(30))?;
    assert_eq!(view["revoke_reason"], "join_ttl_expired");
    let out = refused_agent(&relay, &expired.token, None)?;
    ensure!(
        out.contains("was revoked") && out.contains("join TTL"),
        "expired token output:\n{out}"
    );
    Ok(())
}

#[test]
fn bad_first_frames_get_typed_errors() -> anyhow::Result<()> {
    let h = Healthy::start()?;

    // Larger than the 64 KiB frame limit: refused from the header alone.
    let mut big = BytesMut::new();
    big.put_u32(1 << 20);
    big.put_slice(&[b'x'; 1024]);
    expect_error(
        h.answer_to_bytes(big.to_vec())?,
        ErrorCode::FrameTooLarge,
        "larger than",
    )?;
    h.check()?;

    // A well-sized frame of garbage.
    let mut garbage = BytesMut::new();
    garbage.put_u32(11);
    garbage.put_slice(b"not json!!!");
    expect_error(
        h.answer_to_bytes(garbage.to_vec())?,
        ErrorCode::BadFrame,
        "malformed",
    )?;
    h.check()?;

    // Another protocol version.
    let hello = Message::Hello {
        protocol_version: 99,
        agent_version: "9.9.9".into(),
        auth: HelloAuth::Join {
            token: Secret::new("phj_x"),
        },
        services: vec![Service::Ssh],
        credentials: vec![],
        host_keys: vec![],
        visitor_reports: false,
        attach_elsewhere: false,
    };
    expect_error(
        h.answer_to(hello)?,
        ErrorCode::VersionMismatch,
        "protocol 99",
    )?;
    h.check()?;

    // A frame that may not come first.
    expect_error(
        h.answer_to(Message::Ping { seq: 1 })?,
        ErrorCode::UnexpectedMessage,
        "ping",
    )?;

    // An attach for a connection nobody waits for.
    let attach = Message::Attach {
        session_id: "s_nope".into(),
        conn_id: 1,
        secret: Secret::new("phc_x"),
    };
    expect_error(h.answer_to(attach)?, ErrorCode::BadAttach, "attach refused")?;
    h.check()?;

    // A warm data connection with a secret no link gave out, or for no session.
    let session_id = h.session_id.clone();
    let park = Message::Park {
        session_id,
        secret: Secret::new("php_forged"),
    };
    expect_error(h.answer_to(park)?, ErrorCode::BadToken, "park refused")?;
    let park = Message::Park {
        session_id: "s_nope".into(),
        secret: Secret::new("php_x"),
    };
    expect_error(h.answer_to(park)?, ErrorCode::BadToken, "park refused")?;
    h.check()?;

    // Not TLS at all: the connection is closed, nothing else is disturbed.
    let closed = h.relay.rt.block_on(async {
        let mut tcp = TcpStream::connect(h.relay.agent_addr()).await?;
        tcp.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await?;
        let mut buf = vec![0u8; 4096];
        let read = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match tcp.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        });
        anyhow::Ok(read.await.is_ok())
    })?;
    ensure!(closed, "a plain-text peer must be disconnected");

    // TLS without the porthole/1 ALPN: closed before any frame is read.
    let answered = h.relay.rt.block_on(async {
        let pin = parse_pin(&h.relay.pin())?;
        let mut config = (*client_config(&RelayTrust::Pin(pin))?).clone();
        config.alpn_protocols.clear();
        let tcp = TcpStream::connect(h.relay.agent_addr()).await?;
        let tls = TlsConnector::from(std::sync::Arc::new(config))
            .connect(ServerName::try_from("localhost")?, tcp)
            .await?;
        let mut framed = Framed::new(tls, MessageCodec);
        let hello = Message::Hello {
            protocol_version: porthole_protocol::limits::PROTOCOL_VERSION,
            agent_version: "0".into(),
            auth: HelloAuth::Join {
                token: Secret::new("phj_x"),
            },
            services: vec![Service::Ssh],
            credentials: vec![],
            host_keys: vec![],
            visitor_reports: false,
            attach_elsewhere: false,
        };
        let _ = framed.send(hello).await;
        let answer = tokio::time::timeout(Duration::from_secs(10), framed.next()).await?;
        anyhow::Ok(matches!(answer, Some(Ok(_))))
    })?;
    ensure!(
        !answered,
        "a TLS client without ALPN porthole/1 must get no answer"
    );
    wait_for(
        "healthy session after all refusals",
        Duration::from_secs(5),
        || h.check().ok(),
    )?;
    Ok(())
}
