//! The relay under its process signals: SIGTERM drains live visitors (public ports and the
//! agent endpoint closed, `/readyz` 503), ends with the last visitor or cuts what is left
//! when `--shutdown-grace` ends, exits 0, and the agent comes back to the restarted relay
//! with the session intact; SIGHUP reloads the TLS
//! certificate for new agent connections while existing ones stay up.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _};
use common::agent::Agent;
use common::fixture::Tunnel;
use common::peers::sshd::Sshd;
use common::relay_process::RelaySetup;
use common::{echo, wait_for};
use serde_json::json;

/// Starts `ssh` printing `tick N` every 100 ms for a minute; returns it and its lines once the
/// first arrived.
fn ticking_ssh(sshd: &Sshd, port: u16) -> anyhow::Result<(Child, mpsc::Receiver<String>)> {
    let mut live = sshd.ssh("127.0.0.1", port);
    let script = "i=0; while [ $i -lt 600 ]; do echo tick $i; i=$((i+1)); sleep 0.1; done";
    let mut live = live
        .arg(script)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let (tx, rx) = mpsc::channel();
    let out = live.stdout.take().context("stdout")?;
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    rx.recv_timeout(Duration::from_secs(20))
        .context("the live session never printed")?;
    Ok((live, rx))
}

#[test]
fn sigterm_drains_exits_zero_and_the_agent_comes_back() -> anyhow::Result<()> {
    // A grace far longer than the test: the drain is ended by its last visitor leaving.
    let sshd = Sshd::start()?;
    let setup = RelaySetup::new()?;
    let mut relay = setup.start_with(&["--shutdown-grace", "300s"])?;
    let Tunnel { session, agent, .. } = Tunnel::builder()
        .forward("ssh", sshd.port)
        .start_process(&setup, &relay)?;
    let (port, id) = (session.port("ssh"), session.id);
    let http = setup.http()?;
    let before = relay.session(&http, &id)?;
    let readyz = format!("{}/readyz", relay.api);
    let ready = http.get(&readyz).send()?;
    ensure!(
        ready.status() == 200,
        "/readyz before SIGTERM: {}",
        ready.status()
    );

    let (mut live, rx) = ticking_ssh(&sshd, port)?;
    relay.signal("TERM")?;
    // Draining: the public port and the agent endpoint stop accepting, /readyz says 503 so a
    // load balancer takes the relay out, and the live session keeps flowing.
    wait_for("the public port to close", Duration::from_secs(10), || {
        common::port_refuses(port).then_some(())
    })?;
    wait_for(
        "the agent endpoint to close",
        Duration::from_secs(10),
        || common::port_refuses(setup.agent_port).then_some(()),
    )?;
    let status = wait_for("/readyz to answer 503", Duration::from_secs(10), || {
        http.get(&readyz)
            .send()
            .ok()
            .map(|r| r.status())
            .filter(|s| *s == 503)
    })?;
    ensure!(status == 503);
    // Drain what came before, then a line printed after all of the above.
    while rx.try_recv().is_ok() {}
    let drained_line = rx
        .recv_timeout(Duration::from_secs(20))
        .context("the live session stopped at SIGTERM")?;
    ensure!(drained_line.starts_with("tick"), "{drained_line}");
    ensure!(relay.running(), "the relay must wait for its live visitor");

    // The last visitor leaves: the drain ends at once, long before its 300 s grace.
    live.kill()?;
    live.wait()?;
    let status = relay.wait_exit(Duration::from_secs(60))?;
    ensure!(
        status.success(),
        "SIGTERM must end with exit 0, got {status}"
    );
    agent.wait_line("restarting", Duration::from_secs(10))?;

    // Back up on the same data dir and ports: the agent resumes by itself, state intact.
    let _relay = setup.restart_and_check_resumed(&agent, &id, &before, &sshd, port)?;
    Ok(())
}

#[test]
fn sigterm_cuts_the_visitors_left_when_the_shutdown_grace_ends() -> anyhow::Result<()> {
    let sshd = Sshd::start()?;
    let setup = RelaySetup::new()?;
    let mut relay = setup.start_with(&["--shutdown-grace", "2s"])?;
    let Tunnel {
        session,
        agent: _agent,
        ..
    } = Tunnel::builder()
        .forward("ssh", sshd.port)
        .start_process(&setup, &relay)?;
    let (mut live, _rx) = ticking_ssh(&sshd, session.port("ssh"))?;
    let signalled = Instant::now();
    relay.signal("TERM")?;
    // The live session would run a minute: it is cut when the grace ends, not before.
    let cut = wait_for("the live ssh to be cut", Duration::from_secs(40), || {
        live.try_wait().ok().flatten()
    })?;
    let after = signalled.elapsed();
    ensure!(!cut.success(), "the cut ssh should fail, it exited {cut}");
    ensure!(
        after >= Duration::from_secs(2),
        "the live ssh was cut {after:?} after SIGTERM, inside the 2 s shutdown grace"
    );
    let status = relay.wait_exit(Duration::from_secs(30))?;
    ensure!(
        status.success(),
        "SIGTERM must end with exit 0, got {status}"
    );
    Ok(())
}

/// Without visitors there is nothing to drain: the relay cancels everything right after it
/// starts stopping. Every agent must still get the shutdown notice (not a bare TLS close), so
/// it knows the relay is coming back. A bare close was what most agents saw before the control
/// loop told apart a link cancelled by the shutdown (found by `porthole-bench restart`: 164 of 200).
#[test]
fn sigterm_without_visitors_still_tells_every_agent() -> anyhow::Result<()> {
    let setup = RelaySetup::new()?;
    let mut relay = setup.start()?;
    let tunnels = (0..4)
        .map(|_| Tunnel::builder().start_process(&setup, &relay))
        .collect::<anyhow::Result<Vec<_>>>()?;
    relay.signal("TERM")?;
    let status = relay.wait_exit(Duration::from_secs(20))?;
    ensure!(
        status.success(),
        "SIGTERM must end with exit 0, got {status}"
    );
    for tunnel in &tunnels {
        tunnel
            .agent
            .wait_line("restarting", Duration::from_secs(10))
            .with_context(|| format!("agent output:\n{}", tunnel.agent.output()))?;
    }
    Ok(())
}

#[test]
fn sighup_reloads_the_certificate_for_new_connections_only() -> anyhow::Result<()> {
    let setup = RelaySetup::new()?;
    let relay = setup.start()?;
    let agent_addr = format!("127.0.0.1:{}", setup.agent_port);
    let old_pin = relay.pin.clone();
    let tunnel = Tunnel::builder().start_process(&setup, &relay)?;
    let (echo_port, port) = (tunnel.echo_port()?, tunnel.port("ssh"));
    let first = &tunnel.agent;

    // Rotate: a new certificate and key in place of the self-signed ones, then SIGHUP.
    let fresh = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()])?;
    let tls = setup.data.path().join("tls");
    std::fs::write(tls.join("cert.pem"), fresh.cert.pem())?;
    std::fs::write(tls.join("key.pem"), fresh.key_pair.serialize_pem())?;
    let new_pin = porthole_protocol::tls::fingerprint_sha256(fresh.cert.der());
    ensure!(new_pin != old_pin);
    relay.signal("HUP")?;

    // New connections see the new certificate: an agent pinning it registers ...
    let (_, token2, _) = setup.create_session(&relay.api, json!({}))?;
    let second = wait_for(
        "an agent pinning the new certificate",
        Duration::from_secs(20),
        || {
            let a = Agent::start_to(
                &agent_addr,
                &new_pin,
                &token2,
                &[format!("ssh=127.0.0.1:{echo_port}")],
            )
            .ok()?;
            a.wait_registered().ok().map(|()| a)
        },
    )?;
    drop(second);
    // ... and one pinning the old certificate is refused.
    let (_, token3, _) = setup.create_session(&relay.api, json!({}))?;
    let mut stale = Agent::start_to(
        &agent_addr,
        &old_pin,
        &token3,
        &[format!("ssh=127.0.0.1:{echo_port}")],
    )?;
    let status = stale.wait_exit(Duration::from_secs(20))?;
    ensure!(
        !status.success() && stale.output().contains("pinned"),
        "old pin:\n{}",
        stale.output()
    );
    // The existing agent link stayed up: its session still forwards, no reconnect happened.
    assert_eq!(echo::roundtrip(port, b"still up")?, b"still up");
    ensure!(
        !first.output().contains("reconnecting"),
        "the first agent lost its link:\n{}",
        first.output()
    );
    Ok(())
}
