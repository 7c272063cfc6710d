//! Strangers on a session's public ports cannot keep users out or hold a session open:
//! visitors that have not completed their protocol's opening count toward no visitor cap
//! (16 idle VNC connections from 16 addresses while a real `ssh` logs in) and are closed
//! after the visitor handshake timeout; one source holds at most `max_visitors_per_source`
//! of a session's connections; a connection that never logs in does not hold an
//! `extend_while_connected` session past its grace.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::Read;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use anyhow::{ensure, Context as _};
use common::echo::{closed_without_data, echo_on, wait_cut};
use common::fixture::Tunnel;
use common::peers::sshd::Sshd;
use common::peers::tools::run_with_timeout;
use common::relay::TestRelay;
use common::wait_for;
use serde_json::json;

fn ip(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(a, b, c, d))
}

/// Reads the relay's RFB version announcement from a VNC port.
fn read_announcement(s: &mut std::net::TcpStream) -> anyhow::Result<()> {
    let mut got = [0u8; 12];
    s.read_exact(&mut got)
        .context("the relay's RFB announcement")?;
    ensure!(&got == b"RFB 003.008\n", "announced {got:?}");
    Ok(())
}

#[test]
fn idle_vnc_connections_do_not_keep_a_real_ssh_user_out() -> anyhow::Result<()> {
    let sshd = Sshd::start()?;
    // Long handshake timeout: the idle connections are all still pending while ssh logs in.
    let relay = TestRelay::start_with(|c| c.visitor_handshake_timeout = Duration::from_secs(120))?;
    let tunnel = Tunnel::builder()
        .forward("ssh", sshd.port)
        .service("vnc")
        .start(&relay)?;
    let session = &tunnel.session;
    let vnc = session.port("vnc");
    let mut idle = Vec::new();
    for i in 2..=17u8 {
        let mut s = relay.connect_silent_from(ip(127, 0, 0, i), vnc)?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        read_announcement(&mut s)
            .with_context(|| format!("idle VNC connection from 127.0.0.{i}"))?;
        idle.push(s);
    }
    let view = relay.get(&session.id)?;
    assert_eq!(
        view["visitors"], 0,
        "pending visitors count toward no cap: {view}"
    );
    let out = run_with_timeout(
        sshd.ssh("127.0.0.1", session.port("ssh"))
            .arg("echo logged in"),
        Duration::from_secs(60),
    )?;
    ensure!(
        out.status.success(),
        "ssh beside 16 idle VNC connections: {}",
        out.stderr
    );
    assert_eq!(out.stdout_text(), "logged in\n");
    Ok(())
}

#[test]
fn a_visitor_that_never_completes_its_opening_is_closed() -> anyhow::Result<()> {
    let relay = TestRelay::start_with(|c| c.visitor_handshake_timeout = Duration::from_secs(1))?;
    let tunnel = Tunnel::builder().service("vnc").start(&relay)?;
    let session = &tunnel.session;
    let mut vnc = relay.connect_silent_from(ip(127, 0, 0, 1), session.port("vnc"))?;
    vnc.set_read_timeout(Some(Duration::from_secs(30)))?;
    read_announcement(&mut vnc)?;
    let mut rest = [0u8; 16];
    let n = vnc
        .read(&mut rest)
        .context("a read timeout means the relay kept the idle VNC visitor")?;
    ensure!(
        n == 0,
        "the idle VNC visitor got {n} more bytes instead of being closed"
    );
    let mut ssh = relay.connect_silent_from(ip(127, 0, 0, 1), session.port("ssh"))?;
    ssh.set_read_timeout(Some(Duration::from_secs(30)))?;
    let n = ssh
        .read(&mut rest)
        .context("a read timeout means the relay kept the idle SSH visitor")?;
    ensure!(
        n == 0,
        "the idle SSH visitor got {n} bytes instead of being closed"
    );
    // Something that is not a VNC viewer's reply is refused as not_vnc.
    let mut http = relay.connect_silent_from(ip(127, 0, 0, 1), session.port("vnc"))?;
    http.set_read_timeout(Some(Duration::from_secs(30)))?;
    read_announcement(&mut http)?;
    std::io::Write::write_all(&mut http, b"GET / HTTP/1.1\r\n\r\n")?;
    closed_without_data(&mut http)?;
    let lines = relay.audit_lines()?;
    for reason in ["not_vnc", "not_ssh"] {
        ensure!(
            lines
                .iter()
                .any(|l| l["event"] == "visitor_refused" && l["reason"] == reason),
            "no {reason} refusal in the audit log:\n{}",
            relay.audit_log()?
        );
    }
    Ok(())
}

#[test]
fn one_source_holds_at_most_max_visitors_per_source() -> anyhow::Result<()> {
    let relay = TestRelay::start_with(|c| c.max_visitors_per_source = 4)?;
    let tunnel = Tunnel::start(&relay)?;
    let accepted = tunnel.accepted()?;
    let port = tunnel.port("ssh");
    let mut held = Vec::new();
    for i in 1..=4 {
        let mut s = relay.connect_from(ip(127, 0, 0, 1), port)?;
        echo_on(&mut s, b"in\n").with_context(|| format!("visitor {i} of 4 from 127.0.0.1"))?;
        held.push(s);
    }
    let before = accepted.get();
    let mut fifth = relay.connect_from(ip(127, 0, 0, 1), port)?;
    closed_without_data(&mut fifth).context("the 5th visitor from one source")?;
    ensure!(
        accepted.get() == before,
        "the 5th visitor must not reach the service"
    );
    let mut other = relay.connect_from(ip(127, 0, 0, 2), port)?;
    echo_on(&mut other, b"another source\n").context("a visitor from another source")?;
    // One of the four leaves: its source may connect again.
    drop(held.remove(0));
    wait_for("the source's slot to free", Duration::from_secs(10), || {
        let mut s = relay.connect_from(ip(127, 0, 0, 1), port).ok()?;
        echo_on(&mut s, b"again\n").ok().map(|()| s)
    })?;
    let lines = relay.audit_lines()?;
    ensure!(
        lines
            .iter()
            .any(|l| l["reason"] == "too_many_from_source" && l["source_ip"] == "127.0.0.1"),
        "no too_many_from_source refusal:\n{}",
        relay.audit_log()?
    );
    Ok(())
}

#[test]
fn a_stranger_that_never_logs_in_cannot_hold_a_finished_session() -> anyhow::Result<()> {
    // A visitor holds the session only after 10 minutes here (or when the agent's embedded
    // SSH server reports it logged in): the stranger below never gets there.
    let relay = TestRelay::start_with(|c| c.extend_min_visitor_age = Duration::from_secs(600))?;
    let tunnel = Tunnel::builder()
        .session_fields(json!({ "grace_secs": 2, "extend_while_connected": true }))
        .start(&relay)?;
    let session = &tunnel.session;
    // The stranger sends an SSH identification line and nothing more.
    let mut stranger = relay.connect_from(ip(127, 0, 0, 3), session.port("ssh"))?;
    wait_for(
        "the stranger to be counted",
        Duration::from_secs(10),
        || relay.get(&session.id).ok().filter(|v| v["visitors"] == 1),
    )?;
    let view = relay.finish(&session.id)?;
    ensure!(view["state"] == "finishing", "{view}");
    ensure!(
        view["deadline"] != view["expires_at"],
        "a visitor that is not logged in must not suspend the grace deadline: {view}"
    );
    let view = relay.wait_state(&session.id, "revoked", Duration::from_secs(20))?;
    assert_eq!(view["revoke_reason"], "grace_ended", "{view}");
    wait_cut(&mut stranger, Duration::from_secs(10)).context("the stranger must be cut")?;
    Ok(())
}

/// Relay-wide, at most 4096 visitors may be in their protocol's opening at once (32 per
/// source: 128 sources here): the 4097th is closed without data and audited
/// `too_many_pending`; when one of them goes, a newcomer gets in and reaches the agent.
#[test]
fn the_relay_holds_at_most_4096_visitors_in_their_opening() -> anyhow::Result<()> {
    const CAP: usize = 4096;
    // Both ends of every connection live in this process (the relay is in-process).
    let limit = common::raise_nofile(None, 3 * CAP as u64)?;
    ensure!(
        limit >= 2 * CAP as u64 + 512,
        "the open-file limit {limit} is too low for {CAP} connections with both ends here"
    );
    // A handshake timeout longer than the test: the held visitors stay pending until dropped.
    // The per-source rate limit (10 at once by default) raised: this is about the pending cap.
    let relay = TestRelay::start_with(|c| {
        c.visitor_handshake_timeout = Duration::from_secs(600);
        c.visitor_rate_burst = 64;
    })?;
    let tunnel = Tunnel::start(&relay)?;
    let accepted = tunnel.accepted()?;
    let port = tunnel.port("ssh");
    let pending = relay.handle.relay.pending_visitors.clone();
    let mut held = Vec::with_capacity(CAP);
    for i in 0..CAP {
        // 127.1.S.1, 32 connections per source.
        let source = ip(127, 1, (i / 32) as u8, 1);
        held.push(
            relay
                .connect_silent_from(source, port)
                .with_context(|| format!("silent visitor {i} from {source}"))?,
        );
    }
    wait_for(
        "the relay to hold every silent visitor as pending",
        Duration::from_secs(60),
        || (pending.available_permits() == 0).then_some(()),
    )?;
    let before = accepted.get();
    let mut over = relay.connect_from(ip(127, 2, 0, 1), port)?;
    closed_without_data(&mut over).context("visitor 4097 (a fresh source)")?;
    ensure!(
        accepted.get() == before,
        "the refused visitor must not reach the service"
    );
    let lines = relay.audit_lines()?;
    ensure!(
        lines
            .iter()
            .any(|l| l["reason"] == "too_many_pending" && l["source_ip"] == "127.2.0.1"),
        "no too_many_pending refusal for 127.2.0.1:\n{}",
        relay.audit_log()?
    );
    // One leaves: a newcomer gets its slot and reaches the agent.
    drop(held.pop());
    wait_for("a freed pending slot", Duration::from_secs(10), || {
        (pending.available_permits() > 0).then_some(())
    })?;
    let mut newcomer = relay.connect_from(ip(127, 2, 0, 2), port)?;
    echo_on(&mut newcomer, b"got in\n").context("a visitor after one pending one left")?;
    drop(held);
    wait_for(
        "every pending slot to free",
        Duration::from_secs(30),
        || (pending.available_permits() == CAP).then_some(()),
    )?;
    Ok(())
}
