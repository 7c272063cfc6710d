//! Lost agent links: the agent reconnects by itself and resumes its session on the same
//! public port; an agent that never comes back gets its session revoked after the resume
//! window.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use anyhow::{ensure, Context as _};
use common::fixture::Tunnel;
use common::proxy::Proxy;
use common::raw::{self, confirm, registered, wait_for_async, RawLink};
use common::relay::TestRelay;
use common::{echo, port_refuses, wait_for};
use futures_util::{SinkExt, StreamExt};
use porthole_protocol::message::HelloAuth;
use porthole_protocol::{ErrorCode, Message, Secret};

#[test]
fn cut_link_resumes_on_the_same_port() -> anyhow::Result<()> {
    let relay = TestRelay::start()?;
    let proxy = Proxy::start(&relay.rt, relay.agent_addr())?;
    let Tunnel { session, agent, .. } = Tunnel::builder().via(&proxy.addr).start(&relay)?;
    let port = session.port("ssh");
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

    // Twice more: the resume secret rotates on every registration, so each of these resumes
    // proves the agent kept the secret the last one gave it. Each must be seen to happen (an
    // audited `session_resumed`), not merely an `active` state that a look taken before the
    // relay noticed the cut would also show.
    for resumes in 2..=3 {
        proxy.cut();
        relay.wait_audited(
            "session_resumed",
            &session.id,
            resumes,
            Duration::from_secs(30),
        )?;
        relay.wait_state(&session.id, "active", Duration::from_secs(20))?;
        wait_for(
            "forwarding after another resume",
            Duration::from_secs(20),
            || echo::roundtrip(port, b"x").ok(),
        )?;
    }
    let resumed = relay.audited("session_resumed", &session.id)?;
    ensure!(resumed.len() == 3, "three cuts, three resumes: {resumed:?}");
    Ok(())
}

#[test]
fn while_the_agent_is_away_its_port_stays_bound_and_visitors_get_nothing() -> anyhow::Result<()> {
    // A resume window far longer than the test: nothing below races the clock; DELETE ends it.
    let relay = TestRelay::start_with(|c| c.resume_window = Duration::from_secs(600))?;
    let Tunnel { session, agent, .. } = Tunnel::start(&relay)?;
    let port = session.port("ssh");
    assert_eq!(echo::roundtrip(port, b"hi")?, b"hi");
    drop(agent); // SIGKILL
    relay.wait_state(&session.id, "disconnected", Duration::from_secs(10))?;
    // The port is still bound (a closed port would fail here, not pass): the connection is
    // accepted, then closed without a byte.
    let mut visitor = std::net::TcpStream::connect(("127.0.0.1", port))
        .context("the port of a disconnected session must stay bound for the agent's return")?;
    std::io::Write::write_all(&mut visitor, echo::SSH_HELLO)?;
    echo::closed_without_data(&mut visitor)
        .context("a visitor of a disconnected session must get nothing")?;
    assert_eq!(relay.state(&session.id)?, "disconnected");
    let view = relay.delete(&session.id)?;
    assert_eq!(view["revoke_reason"], "deleted");
    wait_for("the public port to close", Duration::from_secs(5), || {
        port_refuses(port).then_some(())
    })?;
    Ok(())
}

#[test]
fn an_agent_that_never_returns_loses_its_session_when_the_resume_window_ends() -> anyhow::Result<()>
{
    // Nothing has to happen inside the window: the test looks only after it, so a slow
    // machine cannot lose it.
    let window = Duration::from_secs(1);
    let relay = TestRelay::start_with(|c| c.resume_window = window)?;
    let Tunnel { session, agent, .. } = Tunnel::start(&relay)?;
    let port = session.port("ssh");
    assert_eq!(echo::roundtrip(port, b"hi")?, b"hi");
    let killed_at = std::time::SystemTime::now();
    drop(agent); // SIGKILL
    let view = relay.wait_state(&session.id, "revoked", Duration::from_secs(30))?;
    assert_eq!(view["revoke_reason"], "agent_lost");
    wait_for("the public port to close", Duration::from_secs(5), || {
        port_refuses(port).then_some(())
    })?;
    // Not before the window ended (the audit clock has millisecond resolution).
    let revoked = relay.audited("session_revoked", &session.id)?;
    ensure!(revoked.len() == 1, "one revocation: {revoked:?}");
    let at = common::time_of(&revoked[0], "ts")?;
    ensure!(
        at + Duration::from_millis(1) >= killed_at + window,
        "revoked {:?} after the kill, inside the {window:?} resume window",
        at.duration_since(killed_at).unwrap_or_default()
    );
    Ok(())
}

#[test]
fn a_silent_link_is_noticed_by_both_sides_and_the_agent_resumes() -> anyhow::Result<()> {
    // Heartbeats every second: both sides give up on a link silent for three of them.
    let relay = TestRelay::start()?;
    let proxy = Proxy::start(&relay.rt, relay.agent_addr())?;
    let Tunnel { session, agent, .. } = Tunnel::builder().via(&proxy.addr).start(&relay)?;
    let port = session.port("ssh");
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

/// A raw control connection to `relay`.
async fn raw_hello(relay: &TestRelay, auth: HelloAuth) -> anyhow::Result<(RawLink, Message)> {
    raw::hello(&relay.agent_addr(), &relay.pin(), auth).await
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

#[test]
fn a_lost_registered_answer_never_locks_the_agent_out() -> anyhow::Result<()> {
    let relay = TestRelay::start()?;
    let session = relay.create(&["ssh"], None)?;
    relay.rt.block_on(async {
        let join = || HelloAuth::Join {
            token: Secret::new(session.token.clone()),
        };
        // The first `registered` is "lost": the agent never acts on it and the link drops.
        let (lost, answer) = raw_hello(&relay, join()).await?;
        let (session_id, first_secret) = registered(&answer).context("first join")?;
        drop(lost);
        // The agent, still holding only its join token, joins again: allowed.
        let (mut link, answer) = wait_for_async(|| async {
            raw_hello(&relay, join())
                .await
                .ok()
                .filter(|(_, a)| registered(a).is_some())
        })
        .await?;
        let (_, second_secret) = registered(&answer).context("second join")?;
        confirm(&mut link).await?;
        drop(link);
        // Confirmed: now the join token is spent for good.
        let refused = wait_for_async(|| async {
            let (_, a) = raw_hello(&relay, join()).await.ok()?;
            matches!(
                a,
                Message::Error {
                    code: ErrorCode::TokenUsed,
                    ..
                }
            )
            .then_some(())
        })
        .await;
        ensure!(
            refused.is_ok(),
            "after a confirmed join the token must be refused with token_used"
        );
        // The unconfirmed first secret was never confirmed, so it is not valid.
        let resume = |s: &Secret| HelloAuth::Resume {
            session_id: session_id.clone(),
            secret: s.clone(),
        };
        let (_, a) = raw_hello(&relay, resume(&first_secret)).await?;
        ensure!(
            matches!(
                a,
                Message::Error {
                    code: ErrorCode::BadToken,
                    ..
                }
            ),
            "stale secret: {a:?}"
        );
        // A resume whose answer is lost: the secret used stays valid until the agent confirms.
        let (lost, a) = raw_hello(&relay, resume(&second_secret)).await?;
        let (_, third_secret) = registered(&a).context("resume")?;
        drop(lost);
        let (mut link, _) = wait_for_async(|| async {
            raw_hello(&relay, resume(&second_secret))
                .await
                .ok()
                .filter(|(_, a)| registered(a).is_some())
        })
        .await?;
        confirm(&mut link).await?;
        drop(link);
        // Both older secrets are now spent.
        for stale in [&second_secret, &third_secret] {
            let answer = wait_for_async(|| async {
                let (_, a) = raw_hello(&relay, resume(stale)).await.ok()?;
                (!matches!(
                    a,
                    Message::Error {
                        code: ErrorCode::SessionBusy,
                        ..
                    }
                ))
                .then_some(a)
            })
            .await?;
            ensure!(
                matches!(
                    answer,
                    Message::Error {
                        code: ErrorCode::BadToken,
                        ..
                    }
                ),
                "stale secret accepted: {answer:?}"
            );
        }
        anyhow::Ok(())
    })
}
