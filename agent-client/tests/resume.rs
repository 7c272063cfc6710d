//! Lost agent links: the agent reconnects by itself and resumes its session on the same
//! public port; an agent that never comes back gets its session revoked after the resume
//! window.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use anyhow::{ensure, Context as _};
use common::agent::Agent;
use common::proxy::Proxy;
use common::relay::TestRelay;
use common::{echo, port_refuses, wait_for};
use futures_util::{SinkExt, StreamExt};
use porthole_protocol::codec::MessageCodec;
use porthole_protocol::limits::PROTOCOL_VERSION;
use porthole_protocol::message::HelloAuth;
use porthole_protocol::tls::{client_config, parse_pin, RelayTrust};
use porthole_protocol::{ErrorCode, Message, Secret, Service};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::TlsConnector;
use tokio_util::codec::Framed;

#[test]
fn cut_link_resumes_on_the_same_port() -> anyhow::Result<()> {
    let echo_port = echo::start()?;
    let relay = TestRelay::start()?;
    let proxy = Proxy::start(&relay.rt, relay.agent_addr())?;
    let session = relay.create(&["ssh"], None)?;
    let port = session.port("ssh");
    let agent = Agent::start_to(
        &proxy.addr,
        &relay.pin(),
        &session.token,
        &[format!("ssh=127.0.0.1:{echo_port}")],
    )?;
    agent.wait_registered()?;
    assert_eq!(echo::roundtrip(port, b"before")?, b"before");

    proxy.cut();
    agent.wait_line("reconnecting", Duration::from_secs(10))?;
    agent.wait_line("resumed session", Duration::from_secs(20))?;
    relay.wait_state(&session.id, "active", Duration::from_secs(10))?;
    // Same port, same session.
    let again = wait_for(
        "the resumed session to forward",
        Duration::from_secs(10),
        || echo::roundtrip(port, b"after").ok(),
    )?;
    assert_eq!(again, b"after");

    // Twice more: the resume secret rotates on every registration.
    for _ in 0..2 {
        proxy.cut();
        relay.wait_state(&session.id, "active", Duration::from_secs(20))?;
        wait_for(
            "forwarding after another resume",
            Duration::from_secs(20),
            || echo::roundtrip(port, b"x").ok(),
        )?;
    }
    Ok(())
}

#[test]
fn agent_killed_goes_disconnected_then_revoked_after_resume_window() -> anyhow::Result<()> {
    let echo_port = echo::start()?;
    let relay = TestRelay::start_with(|c| c.resume_window = Duration::from_secs(2))?;
    let session = relay.create(&["ssh"], None)?;
    let port = session.port("ssh");
    let agent = Agent::start(
        &relay,
        &session.token,
        &[format!("ssh=127.0.0.1:{echo_port}")],
    )?;
    agent.wait_registered()?;
    assert_eq!(echo::roundtrip(port, b"hi")?, b"hi");
    drop(agent); // SIGKILL
    relay.wait_state(&session.id, "disconnected", Duration::from_secs(10))?;
    // Disconnected: the port is still bound but visitors are closed without data.
    ensure!(
        echo::roundtrip(port, b"nobody home").is_err(),
        "visitors must be refused while disconnected"
    );
    let view = relay.wait_state(&session.id, "revoked", Duration::from_secs(10))?;
    assert_eq!(view["revoke_reason"], "agent_lost");
    wait_for("the public port to close", Duration::from_secs(5), || {
        port_refuses(port).then_some(())
    })?;
    Ok(())
}

#[test]
fn a_silent_link_is_noticed_by_both_sides_and_the_agent_resumes() -> anyhow::Result<()> {
    let echo_port = echo::start()?;
    // Heartbeats every second: both sides give up on a link silent for three of them.
    let relay = TestRelay::start()?;
    let proxy = Proxy::start(&relay.rt, relay.agent_addr())?;
    let session = relay.create(&["ssh"], None)?;
    let port = session.port("ssh");
    let agent = Agent::start_to(
        &proxy.addr,
        &relay.pin(),
        &session.token,
        &[format!("ssh=127.0.0.1:{echo_port}")],
    )?;
    agent.wait_registered()?;
    assert_eq!(echo::roundtrip(port, b"before")?, b"before");

    proxy.freeze();
    // The relay notices: the session goes disconnected (no FIN or RST ever arrives).
    relay.wait_state(&session.id, "disconnected", Duration::from_secs(10))?;
    // The agent notices too, reconnects (the proxy passes new connections) and resumes.
    agent.wait_line("three heartbeat intervals", Duration::from_secs(10))?;
    agent.wait_line("resumed session", Duration::from_secs(20))?;
    relay.wait_state(&session.id, "active", Duration::from_secs(10))?;
    let again = wait_for(
        "forwarding after the resume",
        Duration::from_secs(10),
        || echo::roundtrip(port, b"after").ok(),
    )?;
    assert_eq!(again, b"after");
    Ok(())
}

/// A raw control connection, speaking the protocol directly.
async fn raw_hello(
    relay: &TestRelay,
    auth: HelloAuth,
) -> anyhow::Result<(Framed<TlsStream<TcpStream>, MessageCodec>, Message)> {
    let config = client_config(&RelayTrust::Pin(parse_pin(&relay.pin())?))?;
    let tcp = TcpStream::connect(relay.agent_addr()).await?;
    let tls = TlsConnector::from(config)
        .connect(ServerName::try_from("localhost")?, tcp)
        .await?;
    let mut framed = Framed::new(tls, MessageCodec);
    let hello = Message::Hello {
        protocol_version: PROTOCOL_VERSION,
        agent_version: "test".into(),
        auth,
        services: vec![Service::Ssh],
        credentials: vec![],
        host_keys: vec![],
    };
    framed.send(hello).await?;
    let answer = tokio::time::timeout(Duration::from_secs(10), framed.next()).await?;
    Ok((framed, answer.context("closed without an answer")??))
}

#[test]
fn a_live_agent_is_not_displaced_by_a_second_one_with_its_resume_secret() -> anyhow::Result<()> {
    // The rule: while a session's agent link is alive, a second `hello` resuming the same
    // session, even with the right resume secret, is refused with `session_busy`; the live
    // agent keeps serving. Once the old link is gone a resume succeeds.
    let relay = TestRelay::start()?;
    let session = relay.create(&["ssh"], None)?;
    relay.rt.block_on(async {
        let join = HelloAuth::Join {
            token: Secret::new(session.token.clone()),
        };
        let (first, answer) = raw_hello(&relay, join).await?;
        let Message::Registered {
            session_id,
            resume_secret,
            ..
        } = answer
        else {
            anyhow::bail!("join answered {answer:?}");
        };
        let resume = || HelloAuth::Resume {
            session_id: session_id.clone(),
            secret: resume_secret.clone(),
        };
        let (_, second) = raw_hello(&relay, resume()).await?;
        let Message::Error { code, message } = second else {
            anyhow::bail!("resume answered {second:?}")
        };
        assert_eq!(code, ErrorCode::SessionBusy, "{message}");
        ensure!(
            message.contains("already has a connected agent"),
            "{message}"
        );
        // The first link is untouched: it still answers pings.
        let mut first = first;
        first.send(Message::Ping { seq: 42 }).await?;
        let pong = loop {
            match tokio::time::timeout(Duration::from_secs(5), first.next()).await? {
                Some(Ok(Message::Pong { seq })) => break seq,
                Some(Ok(_)) => continue,
                other => anyhow::bail!("the live link broke: {other:?}"),
            }
        };
        assert_eq!(pong, 42);
        // The first agent goes away; now the resume is accepted.
        drop(first);
        let resumed = wait_for_async(|| async { raw_hello(&relay, resume()).await.ok() }).await?;
        ensure!(
            matches!(resumed.1, Message::Registered { resumed: true, .. }),
            "{:?}",
            resumed.1
        );
        anyhow::Ok(())
    })
}

/// Polls `f` for up to 10 s until it yields a value.
async fn wait_for_async<T, F: std::future::Future<Output = Option<T>>>(
    mut f: impl FnMut() -> F,
) -> anyhow::Result<T> {
    for _ in 0..100 {
        if let Some(v) = f().await {
            return Ok(v);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::bail!("timed out after 10 s")
}
