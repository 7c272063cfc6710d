//! `/metrics` during a real SSH session through relay + agent (OpenSSH `sshd`/`ssh`, the
//! agent binary): the counters and gauges an operator watches move as they should: one
//! visitor, at least the bytes that crossed each way (and not twice as many), sessions by
//! state, agents connected, ports, revocation by DELETE. Every scrape is parsed whole by a
//! Prometheus text parser. `/healthz` and `/readyz` answer without a token.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use anyhow::{ensure, Context as _};
use common::agent::Agent;
use common::peers::sshd::Sshd;
use common::peers::tools::run_with_input;
use common::relay::TestRelay;
use common::scrape::Scrape;
use common::wait_for;

/// Bytes sent up (ssh's stdin) and down (the remote command's stdout), in one connection.
const PAYLOAD: usize = 1024 * 1024;

impl Scrape {
    fn sessions(&self, state: &str) -> Option<f64> {
        self.get("porthole_sessions", &[("state", state)])
    }

    fn ports(&self, status: &str) -> Option<f64> {
        self.get("porthole_public_ports", &[("status", status)])
    }

    fn bytes(&self, direction: &str) -> f64 {
        self.or_zero(
            "porthole_forwarded_bytes_total",
            &[("service", "ssh"), ("direction", direction)],
        )
    }
}

/// `GET path` on the relay's API address without a token: status and body.
fn probe(relay: &TestRelay, path: &str) -> anyhow::Result<(u16, String)> {
    let resp = reqwest::blocking::get(format!("http://{}{path}", relay.handle.info.api_addr))?;
    Ok((resp.status().as_u16(), resp.text()?))
}

/// Incompressible bytes (ssh may compress; the relay must still see them all).
fn payload() -> Vec<u8> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..PAYLOAD)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

#[test]
fn metrics_follow_a_real_ssh_session() -> anyhow::Result<()> {
    let sshd = Sshd::start()?;
    let relay = TestRelay::start()?;
    assert_eq!(probe(&relay, "/healthz")?, (200, "ok\n".to_owned()));
    let (status, _) = probe(&relay, "/readyz")?;
    assert_eq!(status, 200, "/readyz of a started relay");
    let fresh = Scrape::take(&relay)?;
    let pool = fresh
        .ports("free")
        .context("porthole_public_ports{status=\"free\"}")?;
    assert_eq!(fresh.ports("in_use"), Some(0.0));
    assert_eq!(fresh.get("porthole_sessions_created_total", &[]), Some(0.0));

    let session = relay.create(&["ssh"], None)?;
    let pending = Scrape::take(&relay)?;
    assert_eq!(pending.sessions("pending"), Some(1.0));
    assert_eq!(
        pending.get("porthole_sessions_created_total", &[]),
        Some(1.0)
    );
    assert_eq!(
        pending.ports("in_use"),
        Some(1.0),
        "one port for one service"
    );
    assert_eq!(pending.ports("free"), Some(pool - 1.0));
    assert_eq!(pending.get("porthole_agents_connected", &[]), Some(0.0));

    let mut agent = Agent::start(
        &relay,
        &session.token,
        &[format!("ssh=127.0.0.1:{}", sshd.port)],
    )?;
    agent.wait_registered()?;
    let before = Scrape::take(&relay)?;
    assert_eq!(
        before.sessions("active"),
        Some(1.0),
        "while the agent is connected"
    );
    assert_eq!(before.sessions("pending"), Some(0.0));
    assert_eq!(before.get("porthole_agents_connected", &[]), Some(1.0));
    assert_eq!(
        before.get("porthole_agent_registrations_total", &[("kind", "join")]),
        Some(1.0)
    );
    let ssh = [("service", "ssh")];
    let visitors = before.or_zero("porthole_visitor_connections_total", &ssh);
    let (bytes_in, bytes_out) = (before.bytes("in"), before.bytes("out"));

    // One SSH connection: 1 MiB up into `cat`, then 1 MiB down from `head`.
    let remote = format!("cat > /dev/null && head -c {PAYLOAD} /dev/zero");
    let out = run_with_input(
        sshd.ssh("127.0.0.1", session.port("ssh")).arg(remote),
        &payload(),
        Duration::from_secs(120),
    )?;
    ensure!(
        out.status.success(),
        "ssh failed: {}\nsshd log:\n{}",
        out.stderr,
        sshd.log()
    );
    assert_eq!(out.stdout.len(), PAYLOAD, "bytes downloaded");

    // Bytes are counted when the connection closes, just after ssh exits: wait for that,
    // then assert on a fresh scrape (a timeout still ends in the precise assertions below).
    let _ = wait_for(
        "the relay to count the closed connection",
        Duration::from_secs(10),
        || {
            Scrape::take(&relay).ok().filter(|m| {
                m.bytes("in") - bytes_in >= PAYLOAD as f64
                    && m.bytes("out") - bytes_out >= PAYLOAD as f64
                    && m.get("porthole_visitor_connections_active", &ssh) == Some(0.0)
            })
        },
    );
    let after = Scrape::take(&relay)?;
    assert_eq!(
        after.or_zero("porthole_visitor_connections_total", &ssh) - visitors,
        1.0,
        "one ssh connection is one visitor"
    );
    // SSH adds its handshake, framing and MACs; a relay counting a leg twice would show 2x.
    for (direction, before) in [("in", bytes_in), ("out", bytes_out)] {
        let moved = after.bytes(direction) - before;
        assert!(
            moved >= PAYLOAD as f64 && moved < PAYLOAD as f64 * 1.25,
            "forwarded bytes {direction}: {moved} for a {PAYLOAD}-byte payload"
        );
    }
    assert_eq!(
        after.get("porthole_time_to_first_visitor_seconds", &[]),
        Some(1.0),
        "one session had a first visitor"
    );
    assert_eq!(after.sessions("active"), Some(1.0));
    assert_eq!(after.get("porthole_agents_connected", &[]), Some(1.0));
    // Known series exist from the start at 0; a real SSH client is never refused.
    assert_eq!(
        after.get("porthole_visitor_refusals_total", &[("reason", "not_ssh")]),
        Some(0.0)
    );

    relay.delete(&session.id)?;
    let status = agent.wait_exit(Duration::from_secs(20))?;
    assert!(status.success(), "agent after DELETE: {status}");
    let _ = wait_for(
        "the revoked session to leave its gauges",
        Duration::from_secs(10),
        || {
            Scrape::take(&relay).ok().filter(|m| {
                m.get("porthole_agents_connected", &[]) == Some(0.0)
                    && m.ports("in_use") == Some(0.0)
            })
        },
    );
    let revoked = Scrape::take(&relay)?;
    assert_eq!(revoked.get("porthole_agents_connected", &[]), Some(0.0));
    assert_eq!(revoked.sessions("revoked"), Some(1.0));
    assert_eq!(revoked.sessions("active"), Some(0.0));
    assert_eq!(
        revoked.get("porthole_sessions_revoked_total", &[("reason", "deleted")]),
        Some(1.0)
    );
    assert_eq!(
        revoked.get("porthole_session_duration_seconds", &[]),
        Some(1.0),
        "one session lifetime observed"
    );
    assert_eq!(revoked.ports("in_use"), Some(0.0));
    assert_eq!(
        revoked.ports("cooling"),
        Some(1.0),
        "the port rests before reuse"
    );
    assert_eq!(
        revoked.get("porthole_visitor_connections_active", &ssh),
        Some(0.0)
    );
    assert_eq!(
        probe(&relay, "/readyz")?.0,
        200,
        "/readyz after a revocation"
    );
    Ok(())
}
