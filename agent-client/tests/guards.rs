//! Public-port guards end to end: a source outside the session's `allow_cidrs` never
//! reaches the agent, the visitor after `max_visitors` is refused until one leaves, a burst
//! past the per-source rate limit is refused while another source still gets in; each
//! refusal is in the audit log, which holds no secret.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::{IpAddr, Ipv4Addr, Shutdown};
use std::time::Duration;

use anyhow::{ensure, Context as _};
use common::agent::Agent;
use common::echo::{closed_without_data, echo_on, Accepted};
use common::fixture::Tunnel;
use common::relay::{Created, TestRelay};
use common::wait_for;
use serde_json::{json, Value};

/// A session whose agent forwards `ssh` to a counting echo service.
/// The agent also reports an SSH password, which must never reach the audit log.
struct Guarded {
    created: Created,
    accepted: Accepted,
    password: String,
    _agent: Agent,
    _dir: tempfile::TempDir,
}

fn guarded(relay: &TestRelay, extra: Value) -> anyhow::Result<Guarded> {
    let dir = tempfile::tempdir()?;
    let password = format!("pw-{}", rand::random::<u64>());
    let password_file = dir.path().join("ssh-password");
    std::fs::write(&password_file, format!("{password}\n"))?;
    let tunnel = Tunnel::builder()
        .session_fields(extra)
        .args([
            "--ssh-user".to_owned(),
            "vagrant".to_owned(),
            "--ssh-password-file".to_owned(),
            password_file.display().to_string(),
        ])
        .start(relay)?;
    relay.wait_state(&tunnel.session.id, "active", Duration::from_secs(10))?;
    Ok(Guarded {
        accepted: tunnel.accepted()?.clone(),
        created: tunnel.session,
        password,
        _agent: tunnel.agent,
        _dir: dir,
    })
}

fn ip(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(a, b, c, d))
}

/// Waits until the API counts `n` visitors on the session.
fn wait_visitors(relay: &TestRelay, id: &str, n: u64) -> anyhow::Result<()> {
    wait_for(
        &format!("{n} visitors on session {id}"),
        Duration::from_secs(10),
        || {
            relay
                .get(id)
                .ok()
                .filter(|v| v["visitors"].as_u64() == Some(n))
        },
    )
    .map(|_| ())
}

/// Every audit line parses (checked by `audit_lines`), one `visitor_refused` line has
/// `reason` for this session, and no secret of the session appears.
fn check_audit(
    relay: &TestRelay,
    g: &Guarded,
    reason: &str,
    source_ip: &str,
) -> anyhow::Result<()> {
    let lines = relay.audit_lines()?;
    let log = relay.audit_log()?;
    let refused = lines
        .iter()
        .find(|l| {
            l["event"] == "visitor_refused"
                && l["session_id"] == g.created.id.as_str()
                && l["reason"] == reason
        })
        .with_context(|| format!("no visitor_refused line with reason {reason}:\n{log}"))?;
    assert_eq!(refused["source_ip"], source_ip, "{refused}");
    assert_eq!(refused["service"], "ssh", "{refused}");
    assert_eq!(refused["port"], g.created.port("ssh"), "{refused}");
    ensure!(
        lines.iter().any(|l| l["event"] == "visitor_connected"),
        "admitted visitors are audited too:\n{log}"
    );
    for secret in [
        g.password.clone(),
        g.created.token.clone(),
        relay.handle.admin_token().expose().to_owned(),
    ] {
        ensure!(
            !log.contains(&secret),
            "the audit log must hold no secret, found `{secret}`:\n{log}"
        );
    }
    Ok(())
}

#[test]
fn sources_outside_allow_cidrs_never_reach_the_agent() -> anyhow::Result<()> {
    let relay = TestRelay::start()?;
    let g = guarded(&relay, json!({ "allow_cidrs": ["127.0.0.1/32"] }))?;
    let port = g.created.port("ssh");
    let view = relay.get(&g.created.id)?;
    assert_eq!(view["allow_cidrs"], json!(["127.0.0.1/32"]), "{view}");

    let before = g.accepted.get();
    let mut outsider = relay.connect_from(ip(127, 0, 0, 2), port)?;
    closed_without_data(&mut outsider).context("a visitor from 127.0.0.2")?;
    assert_eq!(
        g.accepted.get(),
        before,
        "a refused visitor must never reach the service behind the agent"
    );

    // 127.0.0.1 is allowed, and reaches the service.
    let mut insider = relay.connect_from(ip(127, 0, 0, 1), port)?;
    echo_on(&mut insider, b"allowed\n")?;
    assert_eq!(g.accepted.get(), before + 1);

    // Still nothing from the outsider after the insider's connection went through.
    let mut outsider = relay.connect_from(ip(127, 0, 0, 2), port)?;
    closed_without_data(&mut outsider).context("a second visitor from 127.0.0.2")?;
    assert_eq!(g.accepted.get(), before + 1);
    check_audit(&relay, &g, "source_not_allowed", "127.0.0.2")
}

#[test]
fn the_visitor_past_max_visitors_is_refused_until_one_leaves() -> anyhow::Result<()> {
    let relay = TestRelay::start()?;
    // Default max_visitors (16) and default rate limits: each visitor has its own source
    // address, so only the visitor cap can refuse anyone.
    let g = guarded(&relay, json!({}))?;
    let id = &g.created.id;
    let port = g.created.port("ssh");
    let mut held = Vec::new();
    for i in 1..=16u8 {
        let mut s = relay.connect_from(ip(127, 0, 1, i), port)?;
        echo_on(&mut s, format!("visitor {i}\n").as_bytes())
            .with_context(|| format!("visitor {i} of 16"))?;
        held.push(s);
    }
    wait_visitors(&relay, id, 16)?;
    let accepted = g.accepted.get();

    let mut extra = relay.connect_from(ip(127, 0, 1, 17), port)?;
    closed_without_data(&mut extra).context("the 17th concurrent visitor")?;
    assert_eq!(
        g.accepted.get(),
        accepted,
        "the 17th visitor must not reach the service"
    );
    // The 16 are unharmed.
    for (i, s) in held.iter_mut().enumerate() {
        echo_on(s, b"still here\n").with_context(|| format!("visitor {} after the 17th", i + 1))?;
    }

    // One leaves; a new one gets in.
    let gone = held.remove(0);
    gone.shutdown(Shutdown::Both)?;
    drop(gone);
    wait_visitors(&relay, id, 15)?;
    let mut next = relay.connect_from(ip(127, 0, 1, 18), port)?;
    echo_on(&mut next, b"my turn\n").context("a visitor after one left")?;

    // The one that left is audited with its bytes each way ("visitor 1\n" + "still here\n").
    let log = relay.audit_log()?;
    let closed = relay
        .audit_lines()?
        .into_iter()
        .find(|l| l["event"] == "visitor_closed" && l["source_ip"] == "127.0.1.1")
        .with_context(|| format!("no visitor_closed line for 127.0.1.1:\n{log}"))?;
    assert_eq!(closed["session_id"], id.as_str(), "{closed}");
    // In: the client's SSH identification line, then the 21 echoed bytes.
    let hello = common::echo::SSH_HELLO.len() as u64;
    assert_eq!(closed["bytes_in"], 21 + hello, "{closed}");
    assert_eq!(closed["bytes_out"], 21, "{closed}");
    ensure!(closed["duration_secs"].is_number(), "{closed}");
    check_audit(&relay, &g, "too_many_visitors", "127.0.1.17")
}

#[test]
fn a_burst_past_the_rate_limit_is_refused_while_another_source_gets_in() -> anyhow::Result<()> {
    let relay = TestRelay::start_with(|c| {
        c.visitor_rate_burst = 5;
        c.visitor_rate_per_minute = 1;
    })?;
    let g = guarded(&relay, json!({}))?;
    let port = g.created.port("ssh");
    let local = ip(127, 0, 0, 1);
    for i in 1..=5 {
        let mut s = relay.connect_from(local, port)?;
        echo_on(&mut s, format!("try {i}\n").as_bytes())
            .with_context(|| format!("connection {i} of the burst of 5"))?;
    }
    let accepted = g.accepted.get();
    let mut sixth = relay.connect_from(local, port)?;
    closed_without_data(&mut sixth).context("the 6th connection from 127.0.0.1")?;
    assert_eq!(
        g.accepted.get(),
        accepted,
        "a rate-limited visitor must not reach the service"
    );

    // Another source has its own bucket.
    let mut other = relay.connect_from(ip(127, 0, 0, 3), port)?;
    echo_on(&mut other, b"another source\n").context("a connection from 127.0.0.3")?;
    check_audit(&relay, &g, "rate_limited", "127.0.0.1")
}

#[test]
fn a_session_can_ask_for_fewer_visitors() -> anyhow::Result<()> {
    let relay = TestRelay::start()?;
    let g = guarded(&relay, json!({ "max_visitors": 2 }))?;
    let port = g.created.port("ssh");
    let mut held = Vec::new();
    for i in 1..=2u8 {
        let mut s = relay.connect_from(ip(127, 0, 2, i), port)?;
        echo_on(&mut s, b"in\n").with_context(|| format!("visitor {i} of 2"))?;
        held.push(s);
    }
    wait_visitors(&relay, &g.created.id, 2)?;
    let mut third = relay.connect_from(ip(127, 0, 2, 3), port)?;
    closed_without_data(&mut third).context("the 3rd visitor of a session allowing 2")?;
    check_audit(&relay, &g, "too_many_visitors", "127.0.2.3")
}

/// SSH ports wait for an SSH client's identification line: an HTTP probe, garbage, or a
/// silent connection never reaches the build machine, while a client that sends
/// `SSH-2.0-...` is forwarded with those bytes intact.
#[test]
fn ssh_ports_turn_away_scanners_before_the_agent_hears_of_them() -> anyhow::Result<()> {
    let relay = TestRelay::start_with(|c| {
        c.visitor_handshake_timeout = Duration::from_secs(1);
        c.refusal_summary_interval = Duration::from_secs(1);
    })?;
    let g = guarded(&relay, json!({}))?;
    let port = g.created.port("ssh");
    let before = g.accepted.get();
    for probe in [
        &b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..],
        b"\x16\x03\x01\x02\x00garbage",
        b"SSH-1.5-ancient\r\n",
    ] {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
        std::io::Write::write_all(&mut s, probe)?;
        closed_without_data(&mut s)
            .with_context(|| format!("probe {:?}", String::from_utf8_lossy(probe)))?;
    }
    // Silent: closed when the banner deadline (1 s here) passes.
    let mut silent = std::net::TcpStream::connect(("127.0.0.1", port))?;
    silent.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut buf = [0u8; 16];
    let n = std::io::Read::read(&mut silent, &mut buf).unwrap_or(0);
    ensure!(n == 0, "a silent visitor must be closed without data");
    ensure!(
        g.accepted.get() == before,
        "no scanner may reach the service behind the agent"
    );
    // A real SSH identification passes, and the bytes after it arrive.
    let mut client = relay.connect_from(ip(127, 0, 0, 1), port)?;
    echo_on(&mut client, b"after the banner\n")?;
    ensure!(g.accepted.get() == before + 1);
    // Refusals of one kind are aggregated: the first is written at once, the repeats in a
    // summary line with their count.
    let refused = |relay: &TestRelay| -> u64 {
        relay
            .audit_lines()
            .unwrap_or_default()
            .into_iter()
            .filter(|l| l["reason"] == "not_ssh")
            .map(|l| l["count"].as_u64().unwrap_or(0))
            .sum()
    };
    let counted = wait_for(
        "four not_ssh refusals counted",
        Duration::from_secs(10),
        || (refused(&relay) >= 4).then(|| refused(&relay)),
    );
    ensure!(
        counted.as_ref().is_ok_and(|n| *n == 4),
        "four not_ssh refusals in the audit log, got {counted:?}:\n{}",
        relay.audit_log()?
    );
    Ok(())
}

/// Visitors that have not shown they are SSH clients hold bounded slots: 32 per source at
/// most (relay-wide), so silent connections from one address cannot pile up; the next one
/// is closed at once while another source still gets in.
#[test]
fn silent_visitors_from_one_source_are_capped() -> anyhow::Result<()> {
    let relay = TestRelay::start_with(|c| {
        c.visitor_handshake_timeout = Duration::from_secs(30);
        c.visitor_rate_burst = 1000;
        c.visitor_rate_per_minute = 1000;
    })?;
    let g = guarded(&relay, json!({"max_visitors": 100}))?;
    let port = g.created.port("ssh");
    // 32 silent connections from 127.0.0.1 (they never send an SSH line).
    let silent: Vec<std::net::TcpStream> = (0..32)
        .map(|_| std::net::TcpStream::connect(("127.0.0.1", port)))
        .collect::<Result<_, _>>()?;
    // Let the relay take all 32 into the banner wait before the 33rd arrives.
    wait_for(
        "32 visitors waiting for their SSH line",
        Duration::from_secs(10),
        || {
            let pending = relay.handle.relay.pending_visitors_per_ip.clone();
            let probe = pending.try_acquire(ip(127, 0, 0, 1));
            probe.is_none().then_some(())
        },
    )?;
    let mut extra = std::net::TcpStream::connect(("127.0.0.1", port))?;
    extra.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut buf = [0u8; 8];
    let n = std::io::Read::read(&mut extra, &mut buf).unwrap_or(0);
    ensure!(n == 0, "the 33rd silent visitor must be closed at once");
    // Another source is not affected.
    let mut other = relay.connect_from(ip(127, 0, 0, 9), port)?;
    echo_on(&mut other, b"different source\n")?;
    drop(silent);
    let refused = relay
        .audit_lines()?
        .into_iter()
        .filter(|l| l["reason"] == "too_many_pending")
        .count();
    ensure!(refused >= 1, "a too_many_pending refusal in the audit log");
    Ok(())
}
