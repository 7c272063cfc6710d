//! Deadlines end to end: finish starts the grace period; within it new connections work;
//! after it the port refuses, live SSH sessions are cut, the API says revoked, and the agent
//! exits 0. DELETE does the same at once. No step races the clock: a window that something
//! must happen inside is long and ended by DELETE; a short one is only looked at after it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{ensure, Context as _};
use common::agent::{binary, Agent};
use common::fixture::Tunnel;
use common::peers::sshd::Sshd;
use common::peers::tools::run_with_timeout;
use common::relay::TestRelay;
use common::{port_refuses, time_of, wait_for};
use serde_json::json;

/// How much later than the moment it records an audit line may be written (the line of a
/// finish comes after its deadline was set).
const AUDIT_SLACK: Duration = Duration::from_millis(100);

/// Starts a live SSH session that would run for two minutes; returns once it printed.
fn live_ssh(sshd: &Sshd, port: u16) -> anyhow::Result<std::process::Child> {
    let mut live = sshd.ssh("127.0.0.1", port);
    let mut live = live
        .arg("echo started; sleep 120")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let mut live_out = live.stdout.take().context("live stdout")?;
    let mut first = [0u8; 8];
    std::io::Read::read_exact(&mut live_out, &mut first)?;
    assert_eq!(&first, b"started\n");
    Ok(live)
}

/// `porthole-agent finish` signals the running agent; the session goes `finishing`.
fn finish_build(relay: &TestRelay, agent: &mut Agent, id: &str) -> anyhow::Result<()> {
    let finish = Command::new(binary())
        .arg("finish")
        .arg("--pid-file")
        .arg(&agent.pid_file)
        .output()?;
    ensure!(
        finish.status.success(),
        "finish failed: {}",
        String::from_utf8_lossy(&finish.stderr)
    );
    relay.wait_state(id, "finishing", Duration::from_secs(10))?;
    agent.wait_line("build finished", Duration::from_secs(10))?;
    Ok(())
}

#[test]
fn within_grace_new_connections_work_until_the_deadline_finish_set() -> anyhow::Result<()> {
    // A grace far longer than the test: the login below cannot lose a race with it; DELETE
    // ends the session afterwards.
    let sshd = Sshd::start()?;
    let relay = TestRelay::start()?;
    let Tunnel {
        session, mut agent, ..
    } = Tunnel::builder()
        .forward("ssh", sshd.port)
        .session_fields(json!({ "grace_secs": 600 }))
        .start(&relay)?;
    let port = session.port("ssh");
    finish_build(&relay, &mut agent, &session.id)?;

    let out = run_with_timeout(
        sshd.ssh("127.0.0.1", port).arg("echo in grace"),
        Duration::from_secs(30),
    )?;
    ensure!(
        out.status.success(),
        "ssh within grace failed: {}",
        out.stderr
    );
    assert_eq!(out.stdout_text(), "in grace\n");

    // The deadline is the finish plus the grace, to the second (the audit clock and the
    // view's deadline both come from the relay).
    let view = relay.get(&session.id)?;
    assert_eq!(view["state"], "finishing", "{view}");
    let finished =
        relay.wait_audited("session_finished", &session.id, 1, Duration::from_secs(5))?;
    assert_eq!(finished[0]["by"], "agent", "{finished:?}");
    let finished_at = time_of(&finished[0], "ts")?;
    let deadline = time_of(&view, "deadline")?;
    let grace = deadline
        .duration_since(finished_at)
        .context("the deadline lies before the finish")?;
    ensure!(
        grace.abs_diff(Duration::from_secs(600)) <= Duration::from_secs(1),
        "the grace deadline should be 600 s after the finish, it is {grace:?}: {view}"
    );
    relay.delete(&session.id)?;
    let status = agent.wait_exit(Duration::from_secs(10))?;
    ensure!(status.success(), "agent exit {status}:\n{}", agent.output());
    Ok(())
}

#[test]
fn the_grace_end_revokes_cuts_live_sessions_and_ends_the_agent() -> anyhow::Result<()> {
    // Grace of 1 s: nothing has to happen inside it (the live session is up before the
    // finish), the test only looks after it.
    let sshd = Sshd::start()?;
    let relay = TestRelay::start()?;
    let Tunnel {
        session, mut agent, ..
    } = Tunnel::builder()
        .forward("ssh", sshd.port)
        .session_fields(json!({ "grace_secs": 1 }))
        .start(&relay)?;
    let port = session.port("ssh");
    let mut live = live_ssh(&sshd, port)?;
    finish_build(&relay, &mut agent, &session.id)?;

    // After the deadline: revoked, live session cut, port closed, agent gone with status 0.
    let view = relay.wait_state(&session.id, "revoked", Duration::from_secs(30))?;
    assert_eq!(view["revoke_reason"], "grace_ended");
    let cut = wait_for(
        "the live ssh session to be cut",
        Duration::from_secs(10),
        || live.try_wait().ok().flatten(),
    )?;
    ensure!(
        !cut.success(),
        "the live ssh session should end abnormally when cut"
    );
    wait_for("the public port to close", Duration::from_secs(5), || {
        port_refuses(port).then_some(())
    })?;
    let status = agent.wait_exit(Duration::from_secs(10))?;
    ensure!(
        status.success(),
        "agent should exit 0 on revocation, got {status}:\n{}",
        agent.output()
    );
    ensure!(
        agent.output().contains("session ended"),
        "agent output:\n{}",
        agent.output()
    );
    // In order, and not before the grace ended.
    let finished = relay.audited("session_finished", &session.id)?;
    let revoked = relay.audited("session_revoked", &session.id)?;
    ensure!(
        finished.len() == 1 && revoked.len() == 1,
        "one finish, one revocation: {finished:?} {revoked:?}"
    );
    let (finished_at, revoked_at) = (time_of(&finished[0], "ts")?, time_of(&revoked[0], "ts")?);
    // The finish's audit line is written just after its deadline was set: a little slack.
    ensure!(
        revoked_at + AUDIT_SLACK >= finished_at + Duration::from_secs(1),
        "revoked {:?} after the finish, inside the 1 s grace",
        revoked_at.duration_since(finished_at).unwrap_or_default()
    );
    Ok(())
}

#[test]
fn delete_revokes_at_once_and_the_agent_exits_zero() -> anyhow::Result<()> {
    let sshd = Sshd::start()?;
    let relay = TestRelay::start()?;
    let Tunnel {
        session, mut agent, ..
    } = Tunnel::builder().forward("ssh", sshd.port).start(&relay)?;
    let port = session.port("ssh");
    let mut live = live_ssh(&sshd, port)?;

    let view = relay.delete(&session.id)?;
    assert_eq!(view["state"], "revoked");
    assert_eq!(view["revoke_reason"], "deleted");
    wait_for(
        "the live ssh session to be cut",
        Duration::from_secs(10),
        || live.try_wait().ok().flatten(),
    )?;
    wait_for("the public port to close", Duration::from_secs(5), || {
        port_refuses(port).then_some(())
    })?;
    let status = agent.wait_exit(Duration::from_secs(10))?;
    ensure!(status.success(), "agent exit {status}:\n{}", agent.output());
    ensure!(
        agent.output().contains("revoked through the API"),
        "agent output:\n{}",
        agent.output()
    );
    Ok(())
}
