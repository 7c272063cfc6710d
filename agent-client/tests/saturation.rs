//! A full global cap of pending agent handshakes must not keep real agents waiting for the
//! flood's deadline (issue 5: "a slow or silent peer ... never delays a real agent").
//!
//! Silent connections from a few addresses, each under the per-address cap, fill the
//! global cap (`max_pending_handshakes`, lowered here so the flood stays small). The
//! handshake deadline is long (60 s), so a relay that makes new connections wait for a free
//! permit lets nobody in for a minute: neither a new agent registering nor the data
//! connection a live agent dials for each visitor.
//!
//! The per-address cap (64 pending handshakes) must not refuse the agent's own data
//! connections either: a burst of visitors that the session's `max_visitors` and rate
//! limits admit makes the agent dial that many TLS data connections from one address at
//! once, and every visitor must be served.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use anyhow::{ensure, Context as _};
use common::agent::Agent;
use common::echo;
use common::fixture::Tunnel;
use common::relay::TestRelay;
use serde_json::json;
use tokio::net::TcpSocket;

/// Pending handshakes the relay allows at once (lowered from 1,024).
const GLOBAL_CAP: usize = 100;

/// The relay's handshake deadline: long, so waiting for it is unmistakable.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(60);

/// Silent connections per source address (under the 64 allowed per address).
const PER_SOURCE: usize = 50;

/// Source addresses of the flood.
const SOURCES: u8 = 3;

/// A relay with the small global cap and the long deadline.
fn relay() -> anyhow::Result<TestRelay> {
    TestRelay::start_with(|c| {
        c.handshake_timeout = HANDSHAKE_TIMEOUT;
        c.max_pending_handshakes = GLOBAL_CAP;
    })
}

/// Fills `relay`'s global handshake cap with silent connections; returns them open.
fn flood(relay: &TestRelay) -> anyhow::Result<Vec<std::net::TcpStream>> {
    let target: SocketAddr = relay.agent_addr().parse()?;
    let mut flood = Vec::new();
    for s in 1..=SOURCES {
        let source = Ipv4Addr::new(127, 0, 4, s);
        for _ in 0..PER_SOURCE {
            let tcp = relay.rt.block_on(async {
                let socket = TcpSocket::new_v4()?;
                socket.bind((source, 0).into())?;
                tokio::time::timeout(Duration::from_secs(10), socket.connect(target))
                    .await
                    .context("connect timed out")?
                    .context("connect")
            })?;
            flood.push(tcp.into_std()?);
        }
    }
    ensure!(flood.len() > GLOBAL_CAP);
    Ok(flood)
}

#[test]
fn a_full_handshake_cap_does_not_hold_a_new_agent_until_the_flood_deadline() -> anyhow::Result<()> {
    let echo_port = echo::start()?;
    let relay = relay()?;
    let session = relay.create(&["ssh"], None)?;
    let silent = flood(&relay)?;
    let agent = Agent::start(
        &relay,
        &session.token,
        &[format!("ssh=127.0.0.1:{echo_port}")],
    )?;
    agent.wait_registered().with_context(|| {
        format!(
            "a real agent must register while {} silent connections fill the cap of {GLOBAL_CAP} \
             pending handshakes, not after their {HANDSHAKE_TIMEOUT:?} deadline",
            silent.len()
        )
    })?;
    ensure!(echo::roundtrip(session.port("ssh"), b"in")? == b"in");
    Ok(())
}

#[test]
fn a_full_handshake_cap_does_not_fail_visitors_of_a_live_session() -> anyhow::Result<()> {
    let relay = relay()?;
    let tunnel = Tunnel::start(&relay)?;
    let port = tunnel.port("ssh");
    ensure!(echo::roundtrip(port, b"before")? == b"before");
    let silent = flood(&relay)?;
    // Each visitor makes the agent dial a data connection, itself a new handshake.
    let got = echo::roundtrip(port, b"during").with_context(|| {
        format!(
            "a visitor of a live session must be served while {} silent connections fill the \
             cap of {GLOBAL_CAP} pending handshakes (the agent's data connection waited for a \
             permit past the relay's open timeout)",
            silent.len()
        )
    })?;
    ensure!(got == b"during", "echo answered {got:?}");
    Ok(())
}

/// Visitors arriving at the same instant (more than the 64 pending handshakes the relay
/// allows one address, fewer than the session's `max_visitors`).
const BURST: usize = 200;

#[test]
fn a_burst_of_admitted_visitors_is_not_refused_by_the_per_address_handshake_cap(
) -> anyhow::Result<()> {
    // Every visitor comes from 127.0.0.1: lift the per-source limits, this test is about the
    // agent's data connections.
    let relay = TestRelay::start_with(|c| {
        c.visitor_rate_burst = 10_000;
        c.visitor_rate_per_minute = 10_000;
        c.max_visitors_per_source = 1000;
    })?;
    let tunnel = Tunnel::builder()
        .session_fields(json!({ "max_visitors": 1000 }))
        .start(&relay)?;
    let port = tunnel.port("ssh");
    let start = std::sync::Arc::new(std::sync::Barrier::new(BURST));
    let visitors: Vec<_> = (0..BURST)
        .map(|i| {
            let start = start.clone();
            std::thread::spawn(move || {
                start.wait();
                let msg = format!("visitor {i}\n");
                echo::roundtrip(port, msg.as_bytes()).is_ok_and(|got| got == msg.as_bytes())
            })
        })
        .collect();
    let mut served = 0;
    for v in visitors {
        served += usize::from(v.join().map_err(|_| anyhow::anyhow!("visitor panicked"))?);
    }
    let m = &relay.handle.relay.metrics;
    let refusals: Vec<String> = porthole_relay::edge::visitor::guards::VisitorRefusal::ALL
        .iter()
        .map(|r| {
            (
                r.as_str(),
                m.refusals.with_label_values(&[r.as_str()]).get(),
            )
        })
        .filter(|(_, n)| *n > 0)
        .map(|(r, n)| format!("{r}: {n}"))
        .collect();
    ensure!(
        served == BURST,
        "{served} of {BURST} simultaneous visitors were served; visitor refusals {refusals:?}; \
         the relay refused {} as agent_failed after refusing {} of the agent's data connections \
         at the cap of 64 pending handshakes per address",
        m.refusals.with_label_values(&["agent_failed"]).get(),
        m.handshake_failures
            .with_label_values(&["per_ip_limit"])
            .get()
    );
    Ok(())
}
