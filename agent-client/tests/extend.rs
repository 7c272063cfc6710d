//! `extend_while_connected` end to end: a connected visitor keeps a finished session open
//! past its grace deadline, the last visitor leaving starts a fresh grace, and the hard cap
//! still ends the session and cuts the visitor. A visitor holds the session once it has been
//! connected `extend_min_visitor_age` (1 s here; the API shows it in `visitors_holding`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::{IpAddr, Ipv4Addr, Shutdown, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _};
use common::agent::Agent;
use common::echo::{echo_on, wait_cut};
use common::fixture::Tunnel;
use common::relay::{Created, TestRelay};
use common::{time_of, wait_for};
use serde_json::{json, Value};

const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// A session with `extra` settings, its agent forwarding `ssh` to an echo service, and one
/// visitor connected through it (checked alive).
fn session_with_visitor(
    relay: &TestRelay,
    extra: Value,
) -> anyhow::Result<(Created, Agent, TcpStream)> {
    let Tunnel {
        session: created,
        agent,
        ..
    } = Tunnel::builder().session_fields(extra).start(relay)?;
    let mut visitor = relay.connect_from(LOCALHOST, created.port("ssh"))?;
    echo_on(&mut visitor, b"hello\n").context("the visitor's first echo")?;
    wait_visitors(relay, &created.id, 1)?;
    wait_for(
        "the visitor to hold the session",
        Duration::from_secs(10),
        || {
            relay
                .get(&created.id)
                .ok()
                .filter(|v| v["visitors_holding"].as_u64() == Some(1))
        },
    )?;
    Ok((created, agent, visitor))
}

/// A relay whose visitors hold sessions after 1 s.
fn relay() -> anyhow::Result<TestRelay> {
    TestRelay::start_with(|c| c.extend_min_visitor_age = Duration::from_secs(1))
}

/// Waits until the API counts `n` visitors on the session.
fn wait_visitors(relay: &TestRelay, id: &str, n: u64) -> anyhow::Result<Value> {
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
}

/// The audit log has the session's finish and its revocation with `reason`; every line parses.
fn audited_revocation(relay: &TestRelay, id: &str, reason: &str) -> anyhow::Result<()> {
    let lines = relay.audit_lines()?;
    let log = relay.audit_log()?;
    let has = |event: &str, check: &dyn Fn(&Value) -> bool| {
        lines
            .iter()
            .any(|l| l["event"] == event && l["session_id"] == id && check(l))
    };
    ensure!(
        has("session_finished", &|l| l["by"] == "api"),
        "no session_finished line:\n{log}"
    );
    ensure!(
        has("session_revoked", &|l| l["reason"] == reason),
        "no session_revoked line with reason {reason}:\n{log}"
    );
    Ok(())
}

#[test]
fn a_connected_visitor_holds_the_session_and_leaving_starts_a_fresh_grace() -> anyhow::Result<()> {
    let relay = relay()?;
    let (created, _agent, mut visitor) = session_with_visitor(
        &relay,
        json!({ "grace_secs": 2, "extend_while_connected": true }),
    )?;
    let id = &created.id;
    let view = relay.get(id)?;
    assert_eq!(view["lifetime_policy"], "extend_while_connected", "{view}");

    let view = relay.finish(id)?;
    assert_eq!(view["state"], "finishing", "{view}");
    assert_eq!(
        view["deadline"], view["expires_at"],
        "with a visitor connected only the hard cap applies: {view}"
    );
    let token = relay.user_token("u-dev", "app-7", &["developer"])?;
    let instructions = relay.instructions(id, Some(&token))?;
    assert_eq!(instructions.status, 200, "{}", instructions.body);
    assert_eq!(
        instructions.body["available_until"], view["expires_at"],
        "users are told the effective deadline: {}",
        instructions.body
    );
    assert_eq!(
        instructions.body["lifetime_policy"], "extend_while_connected",
        "{}",
        instructions.body
    );

    // Twice the grace period: the session stays open while the visitor is connected. It is
    // checked all along and once more after the 4 s (however slow the polls are, one look
    // comes after the grace would have ended).
    let held_from = Instant::now();
    loop {
        let done = held_from.elapsed() >= Duration::from_secs(4);
        let view = relay.get(id)?;
        ensure!(
            view["state"] == "finishing" && view["visitors"] == 1,
            "after {:?} the session should still be finishing with its visitor: {view}",
            held_from.elapsed()
        );
        if done {
            break;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    echo_on(&mut visitor, b"still here\n").context("the visitor after 4 s")?;

    // The visitor leaves: a fresh grace starts then, it does not end at once. Checked after the
    // fact through the audit log (a look at the state right after the leave could come after
    // the fresh grace on a slow machine).
    visitor.shutdown(Shutdown::Both)?;
    drop(visitor);
    let view = relay.wait_state(id, "revoked", Duration::from_secs(30))?;
    assert_eq!(
        view["revoke_reason"], "grace_ended",
        "after the last visitor left the grace applies again, not the hard cap: {view}"
    );
    audited_revocation(&relay, id, "grace_ended")?;
    let closed = relay.audited("visitor_closed", id)?;
    ensure!(closed.len() == 1, "one visitor closed: {closed:?}");
    let finished_at = time_of(&relay.audited("session_finished", id)?[0], "ts")?;
    let closed_at = time_of(&closed[0], "ts")?;
    let revoked_at = time_of(&relay.audited("session_revoked", id)?[0], "ts")?;
    ensure!(
        closed_at >= finished_at + Duration::from_secs(4),
        "the visitor held the session 4 s past the finish (twice the grace)"
    );
    // The visitor's audit line is written just after the fresh grace started: a little slack.
    ensure!(
        revoked_at + Duration::from_millis(100) >= closed_at + Duration::from_secs(2),
        "a fresh 2 s grace must start when the last visitor leaves; revoked {:?} after",
        revoked_at.duration_since(closed_at).unwrap_or_default()
    );
    Ok(())
}

#[test]
fn the_hard_cap_still_ends_an_extended_session_and_cuts_the_visitor() -> anyhow::Result<()> {
    let relay = relay()?;
    let (created, _agent, mut visitor) = session_with_visitor(
        &relay,
        // A hard cap long enough for the session and its visitor to be set up on a slow
        // machine before it: nothing inside the cap races the clock.
        json!({ "grace_secs": 2, "extend_while_connected": true, "max_lifetime_secs": 15 }),
    )?;
    let id = &created.id;
    let view = relay.finish(id)?;
    assert_eq!(view["state"], "finishing", "{view}");
    assert_eq!(view["lifetime_policy"], "extend_while_connected", "{view}");

    let view = relay.wait_state(id, "revoked", Duration::from_secs(40))?;
    assert_eq!(
        view["revoke_reason"], "hard_cap",
        "a connected visitor never holds a session past its hard cap: {view}"
    );
    wait_cut(&mut visitor, Duration::from_secs(10))
        .context("the visitor must be cut at the hard cap")?;
    audited_revocation(&relay, id, "hard_cap")?;
    let created_at = time_of(&relay.audited("session_created", id)?[0], "ts")?;
    let revoked_at = time_of(&relay.audited("session_revoked", id)?[0], "ts")?;
    ensure!(
        revoked_at + Duration::from_secs(1) >= created_at + Duration::from_secs(15),
        "revoked {:?} after the create, before the 15 s hard cap",
        revoked_at.duration_since(created_at).unwrap_or_default()
    );
    Ok(())
}
