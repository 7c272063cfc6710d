//! Faults and hostile agents: an agent killed mid-transfer, an `attach` for another
//! session's visitor, a replayed join token. Visitors are cut promptly, refusals are typed
//! and counted, and healthy sessions keep forwarding through all of it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read, Write};
use std::net::TcpStream as StdTcpStream;
use std::time::Duration;

use anyhow::{bail, ensure, Context as _};
use common::agent::Agent;
use common::fixture::Tunnel;
use common::relay::{Created, TestRelay};
use common::{echo, port_refuses, wait_for};
use futures_util::{SinkExt, StreamExt};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use porthole_protocol::codec::MessageCodec;
use porthole_protocol::limits::PROTOCOL_VERSION;
use porthole_protocol::message::HelloAuth;
use porthole_protocol::tls::{client_config, parse_pin, RelayTrust};
use porthole_protocol::{ErrorCode, Message, Secret, Service};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::TlsConnector;
use tokio_util::codec::Framed;

/// A raw connection to the agent endpoint, speaking frames.
type RawConn = Framed<TlsStream<TcpStream>, MessageCodec>;

/// How long a visitor of a killed agent may stay open: the relay sees the agent's sockets
/// close at once (no heartbeat timeout involved), so this is "promptly" with slack.
const CUT_WITHIN: Duration = Duration::from_secs(5);

/// A TLS connection to the relay's agent endpoint (ALPN `porthole/1`, pinned certificate).
async fn raw(relay: &TestRelay) -> anyhow::Result<RawConn> {
    let config = client_config(&RelayTrust::Pin(parse_pin(&relay.pin())?))?;
    let tcp = TcpStream::connect(relay.agent_addr()).await?;
    let tls = TlsConnector::from(config)
        .connect(ServerName::try_from("localhost")?, tcp)
        .await?;
    Ok(Framed::new(tls, MessageCodec))
}

/// The next frame from the relay, within 10 s.
async fn next_frame(conn: &mut RawConn) -> anyhow::Result<Message> {
    let frame = tokio::time::timeout(Duration::from_secs(10), conn.next())
        .await
        .context("the relay did not answer within 10 s")?;
    Ok(frame.context("the relay closed without a frame")??)
}

/// Sends `first` on a fresh connection and returns the relay's answer.
async fn answer_to(relay: &TestRelay, first: Message) -> anyhow::Result<Message> {
    let mut conn = raw(relay).await?;
    conn.send(first).await?;
    next_frame(&mut conn).await
}

/// A `hello` offering SSH.
fn hello(auth: HelloAuth) -> Message {
    Message::Hello {
        protocol_version: PROTOCOL_VERSION,
        agent_version: "faults-test".into(),
        auth,
        services: vec![Service::Ssh],
        credentials: vec![],
        host_keys: vec![],
        visitor_reports: false,
        attach_elsewhere: false,
    }
}

/// Checks `msg` is an error frame with `want`.
fn expect_error(msg: &Message, want: ErrorCode) -> anyhow::Result<()> {
    match msg {
        Message::Error { code, .. } if *code == want => Ok(()),
        other => bail!("expected an error frame `{}`, got {other:?}", want.as_str()),
    }
}

/// A relay handshake-failure counter.
fn failures(relay: &TestRelay, reason: &str) -> u64 {
    relay
        .handle
        .relay
        .metrics
        .handshake_failures
        .with_label_values(&[reason])
        .get()
}

/// A session served by the real agent in front of an echo service.
fn echo_session(relay: &TestRelay) -> anyhow::Result<(Agent, Created)> {
    let Tunnel { session, agent, .. } = Tunnel::start(relay)?;
    ensure!(echo::roundtrip(session.port("ssh"), b"healthy")? == b"healthy");
    Ok((agent, session))
}

/// Checks the session on `port` still forwards.
fn still_forwards(port: u16, what: &str) -> anyhow::Result<()> {
    let got = echo::roundtrip(port, what.as_bytes())
        .with_context(|| format!("{what}: the session stopped forwarding"))?;
    ensure!(got == what.as_bytes(), "{what}: echo answered {got:?}");
    Ok(())
}

#[test]
fn an_agent_killed_mid_transfer_cuts_its_visitor_then_the_session_is_revoked() -> anyhow::Result<()>
{
    // A resume window longer than the test (the window's end is resume.rs's subject): the
    // `disconnected` look below cannot miss it; DELETE ends the session.
    let relay = TestRelay::start_with(|c| c.resume_window = Duration::from_secs(600))?;
    let (agent, session) = echo_session(&relay)?;
    let (port, session_id) = (session.port("ssh"), session.id);

    // A visitor streaming through the tunnel: one thread writes, this one reads the echo.
    let mut visitor = StdTcpStream::connect(("127.0.0.1", port))?;
    visitor.write_all(echo::SSH_HELLO)?;
    let mut writer = visitor.try_clone()?;
    writer.set_write_timeout(Some(Duration::from_secs(20)))?;
    let streaming = std::thread::spawn(move || {
        let chunk = [b'z'; 16 * 1024];
        let mut sent = 0u64;
        while writer.write_all(&chunk).is_ok() {
            sent += chunk.len() as u64;
        }
        sent
    });
    visitor.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut buf = vec![0u8; 64 * 1024];
    let mut echoed = 0usize;
    while echoed < 4 << 20 {
        let n = visitor.read(&mut buf).context("reading the echo stream")?;
        ensure!(n > 0, "the tunnel closed before the agent was killed");
        echoed += n;
    }

    kill(Pid::from_raw(agent.pid() as i32), Signal::SIGKILL)?;
    echo::wait_cut(&mut visitor, CUT_WITHIN)
        .context("the visitor of a killed agent must be cut promptly")?;
    // Inside the resume window the session shows `disconnected`.
    relay
        .wait_state(&session_id, "disconnected", Duration::from_secs(10))
        .context("the session of a killed agent goes disconnected")?;
    let sent = streaming
        .join()
        .map_err(|_| anyhow::anyhow!("writer panicked"))?;
    println!("visitor cut after {echoed} bytes echoed ({sent} sent)");
    let view = relay.delete(&session_id)?;
    assert_eq!(view["revoke_reason"], "deleted");
    wait_for("the public port to close", Duration::from_secs(5), || {
        port_refuses(port).then_some(())
    })?;
    let active = relay
        .handle
        .relay
        .metrics
        .visitors_active
        .with_label_values(&["ssh"])
        .get();
    ensure!(active == 0, "the relay still counts {active} open visitors");
    drop(agent);
    Ok(())
}

/// A raw agent's control link: answers heartbeats and hands every `open` to `opens`.
async fn serve_control(mut link: RawConn, opens: mpsc::Sender<(u64, Secret)>) {
    while let Some(Ok(msg)) = link.next().await {
        let alive = match msg {
            Message::Ping { seq } => link.send(Message::Pong { seq }).await.is_ok(),
            Message::Open {
                conn_id, secret, ..
            } => opens.send((conn_id, secret)).await.is_ok(),
            _ => true,
        };
        if !alive {
            return;
        }
    }
}

#[test]
fn an_attach_for_another_sessions_connection_is_refused_and_counted() -> anyhow::Result<()> {
    let relay = TestRelay::start()?;
    // Session A: the real agent.
    let (_agent_a, a) = echo_session(&relay)?;
    let port_a = a.port("ssh");
    // Session B: an agent spoken by hand, so the test sees B's `open` frames and secrets.
    let b = relay.create(&["ssh"], None)?;
    let (opens_tx, mut opens) = mpsc::channel(4);
    relay.rt.block_on(async {
        let mut link = raw(&relay).await?;
        link.send(hello(HelloAuth::Join {
            token: Secret::new(b.token.clone()),
        }))
        .await?;
        let registered = next_frame(&mut link).await?;
        ensure!(
            matches!(registered, Message::Registered { .. }),
            "B's hand-made agent got {registered:?}"
        );
        tokio::spawn(serve_control(link, opens_tx));
        anyhow::Ok(())
    })?;

    // A visitor of B is waiting for a data connection: B's agent got its id and secret.
    let mut visitor = StdTcpStream::connect(("127.0.0.1", b.port("ssh")))?;
    visitor.set_read_timeout(Some(Duration::from_secs(10)))?;
    visitor.write_all(echo::SSH_HELLO)?;
    let (conn_id, secret) = relay
        .rt
        .block_on(async { tokio::time::timeout(Duration::from_secs(10), opens.recv()).await })
        .context("B's agent got no `open` for its visitor")?
        .context("B's control link ended")?;

    let bad_attach0 = failures(&relay, "bad_attach");
    // B's connection claimed under session A's id, with B's real one-time secret.
    let cross = relay.rt.block_on(answer_to(
        &relay,
        Message::Attach {
            session_id: a.id.clone(),
            conn_id,
            secret: secret.clone(),
        },
    ))?;
    expect_error(&cross, ErrorCode::BadAttach)
        .context("an attach naming session A with B's connection")?;
    // B's connection with a made-up secret.
    let guessed = relay.rt.block_on(answer_to(
        &relay,
        Message::Attach {
            session_id: b.id.clone(),
            conn_id,
            secret: Secret::generate("phc_"),
        },
    ))?;
    expect_error(&guessed, ErrorCode::BadAttach)
        .context("an attach for B's connection without its secret")?;
    let counted = failures(&relay, "bad_attach") - bad_attach0;
    ensure!(
        counted == 2,
        "porthole_agent_handshake_failures_total{{reason=\"bad_attach\"}} rose by {counted}, expected 2"
    );

    // Both sessions still forward: A through its agent, B's waiting visitor through the
    // genuine attach (the refusals did not take its connection away).
    still_forwards(port_a, "A after the refused attaches")?;
    relay.rt.block_on(async {
        let mut data = raw(&relay).await?;
        data.send(Message::Attach {
            session_id: b.id.clone(),
            conn_id,
            secret,
        })
        .await?;
        let parts = data.into_parts();
        let mut tls = parts.io;
        let mut got = parts.read_buf.to_vec();
        let want = [echo::SSH_HELLO, b"for B\n"].concat();
        // The visitor's bytes come after its hello; echo them back by hand.
        visitor.write_all(b"for B\n")?;
        let mut buf = [0u8; 1024];
        while got.len() < want.len() {
            let n = tokio::time::timeout(Duration::from_secs(10), tls.read(&mut buf))
                .await
                .context("B's data connection got nothing")??;
            ensure!(n > 0, "B's data connection closed");
            got.extend_from_slice(&buf[..n]);
        }
        ensure!(got == want, "B's data connection got {got:?}");
        tls.write_all(b"for B\n").await?;
        tls.flush().await?;
        let mut back = [0u8; 6];
        visitor.read_exact(&mut back)?;
        ensure!(&back == b"for B\n", "B's visitor got {back:?}");
        anyhow::Ok(())
    })?;
    Ok(())
}

#[test]
fn a_replayed_join_token_is_refused_and_the_live_agent_keeps_forwarding() -> anyhow::Result<()> {
    let relay = TestRelay::start()?;
    let Tunnel { session, agent, .. } = Tunnel::start(&relay)?;
    let port = session.port("ssh");
    still_forwards(port, "before the replay")?;
    let token_used0 = failures(&relay, "token_used");

    let answer = relay.rt.block_on(answer_to(
        &relay,
        hello(HelloAuth::Join {
            token: Secret::new(session.token.clone()),
        }),
    ))?;
    expect_error(&answer, ErrorCode::TokenUsed).context("a replayed join token")?;
    let counted = failures(&relay, "token_used") - token_used0;
    ensure!(
        counted == 1,
        "token_used failures rose by {counted}, expected 1"
    );

    // The live agent was not displaced.
    still_forwards(port, "after the replay")?;
    ensure!(relay.state(&session.id)? == "active");
    let joins = relay
        .audit_lines()?
        .iter()
        .filter(|l| l["event"] == "session_joined" && l["session_id"] == session.id.as_str())
        .count();
    ensure!(
        joins == 1,
        "{joins} `session_joined` audit lines, expected 1"
    );
    ensure!(
        !agent.output().contains("reconnecting"),
        "the live agent lost its link:\n{}",
        agent.output()
    );
    Ok(())
}
