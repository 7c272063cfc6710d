//! Deadlines end to end: finish starts the grace period; within it new connections work;
//! after it the port refuses, live SSH sessions are cut, the API says revoked, and the agent
//! exits 0. DELETE does the same at once.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{ensure, Context as _};
use common::agent::binary;
use common::fixture::Tunnel;
use common::peers::sshd::Sshd;
use common::peers::tools::run_with_timeout;
use common::relay::TestRelay;
use common::{port_refuses, wait_for};
use serde_json::json;

#[test]
fn finish_then_grace_then_revocation_cuts_everything() -> anyhow::Result<()> {
    let sshd = Sshd::start()?;
    let relay = TestRelay::start()?;
    let Tunnel {
        session, mut agent, ..
    } = Tunnel::builder()
        .forward("ssh", sshd.port)
        .session_fields(json!({ "grace_secs": 3 }))
        .start(&relay)?;
    let port = session.port("ssh");

    // A live SSH session that would run for two minutes.
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

    // The build finishes: `porthole-agent finish` signals the running agent.
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
    relay.wait_state(&session.id, "finishing", Duration::from_secs(10))?;
    agent.wait_line("build finished", Duration::from_secs(10))?;

    // Within grace, a new connection still works.
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

    // After the deadline: revoked, live session cut, port closed, agent gone with status 0.
    let view = relay.wait_state(&session.id, "revoked", Duration::from_secs(15))?;
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
    let mut live = sshd.ssh("127.0.0.1", port);
    let mut live = live
        .arg("echo started; sleep 120")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let mut first = [0u8; 8];
    std::io::Read::read_exact(&mut live.stdout.take().context("live stdout")?, &mut first)?;
    assert_eq!(&first, b"started\n");

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
