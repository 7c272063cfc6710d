//! Sessions survive a relay restart, even `kill -9`: the agent resumes by itself, the same
//! port serves SSH again, and deadlines are kept (one that passed while the relay was down
//! revokes at once).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Stdio;
use std::time::Duration;

use anyhow::{ensure, Context as _};
use common::fixture::Tunnel;
use common::peers::sshd::Sshd;
use common::relay_process::RelaySetup;
use common::{port_refuses, wait_for};
use serde_json::json;

#[test]
fn kill9_mid_transfer_then_restart_resumes_on_the_same_port() -> anyhow::Result<()> {
    let sshd = Sshd::start()?;
    let setup = RelaySetup::new()?;
    let mut relay = setup.start()?;
    let Tunnel { session, agent, .. } = Tunnel::builder()
        .forward("ssh", sshd.port)
        .start_process(&setup, &relay)?;
    let (port, id) = (session.port("ssh"), session.id);
    let http = setup.http()?;
    let before = relay.session(&http, &id)?;
    assert_eq!(before["state"], "active");

    // A visitor in the middle of a long transfer when the relay dies.
    let mut transfer = sshd.ssh("127.0.0.1", port);
    let mut transfer = transfer
        .arg("head -c 2000000000 /dev/zero")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut out = transfer.stdout.take().context("stdout")?;
    let mut first = vec![0u8; 1 << 20];
    if let Err(e) = std::io::Read::read_exact(&mut out, &mut first) {
        let _ = transfer.kill();
        let mut err = String::new();
        if let Some(mut stderr) = transfer.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut stderr, &mut err);
        }
        anyhow::bail!(
            "transfer did not start ({e}): ssh said: {err}\nagent:\n{}",
            agent.output()
        );
    }
    relay.kill9()?;
    drop(out);
    let _ = transfer.kill();

    let _relay = setup.restart_and_check_resumed(&agent, &id, &before, &sshd, port)?;
    Ok(())
}

#[test]
fn deadline_passed_while_down_revokes_on_start() -> anyhow::Result<()> {
    let sshd = Sshd::start()?;
    let setup = RelaySetup::new()?;
    let mut relay = setup.start()?;
    let Tunnel {
        session, mut agent, ..
    } = Tunnel::builder()
        .forward("ssh", sshd.port)
        .session_fields(json!({"max_lifetime_secs": 3}))
        .start_process(&setup, &relay)?;
    let (port, id) = (session.port("ssh"), session.id);
    relay.kill9()?;
    // The hard cap passes while the relay is down.
    std::thread::sleep(Duration::from_secs(4));
    let relay = setup.start()?;
    let http = setup.http()?;
    let view = wait_for("the session to be revoked", Duration::from_secs(10), || {
        relay
            .session(&http, &id)
            .ok()
            .filter(|v| v["state"] == "revoked")
    })?;
    assert_eq!(view["revoke_reason"], "hard_cap");
    ensure!(
        port_refuses(port),
        "the port of a revoked session must refuse connections"
    );
    let status = agent.wait_exit(Duration::from_secs(30))?;
    ensure!(
        status.success(),
        "agent exits 0 once it learns the session is over:\n{}",
        agent.output()
    );
    Ok(())
}
