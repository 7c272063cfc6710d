//! Lost agent links: the agent reconnects by itself and resumes its session on the same
//! public port; an agent that never comes back gets its session revoked after the resume
//! window.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use anyhow::ensure;
use common::agent::Agent;
use common::proxy::Proxy;
use common::relay::TestRelay;
use common::{echo, port_refuses, wait_for};

#[test]
fn cut_link_resumes_on_the_same_port() -> anyhow::Result<()> {
    let echo_port = echo::start()?;
    let relay = TestRelay::start()?;
    let proxy = Proxy::start(&relay.rt, relay.agent_addr())?;
    let session = relay.create(&["ssh"], None)?;
    let port = session.port("ssh");
    let agent = Agent::start_to(
        &proxy.addr,
        &relay.pin(),
        &session.token,
        &[format!("ssh=127.0.0.1:{echo_port}")],
    )?;
    agent.wait_registered()?;
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

    // Twice more: the resume secret rotates on every registration.
    for _ in 0..2 {
        proxy.cut();
        relay.wait_state(&session.id, "active", Duration::from_secs(20))?;
        wait_for(
            "forwarding after another resume",
            Duration::from_secs(20),
            || echo::roundtrip(port, b"x").ok(),
        )?;
    }
    Ok(())
}

#[test]
fn agent_killed_goes_disconnected_then_revoked_after_resume_window() -> anyhow::Result<()> {
    let echo_port = echo::start()?;
    let relay = TestRelay::start_with(|c| c.resume_window = Duration::from_secs(2))?;
    let session = relay.create(&["ssh"], None)?;
    let port = session.port("ssh");
    let agent = Agent::start(
        &relay,
        &session.token,
        &[format!("ssh=127.0.0.1:{echo_port}")],
    )?;
    agent.wait_registered()?;
    assert_eq!(echo::roundtrip(port, b"hi")?, b"hi");
    drop(agent); // SIGKILL
    relay.wait_state(&session.id, "disconnected", Duration::from_secs(10))?;
    // Disconnected: the port is still bound but visitors are closed without data.
    ensure!(
        echo::roundtrip(port, b"nobody home").is_err(),
        "visitors must be refused while disconnected"
    );
    let view = relay.wait_state(&session.id, "revoked", Duration::from_secs(10))?;
    assert_eq!(view["revoke_reason"], "agent_lost");
    wait_for("the public port to close", Duration::from_secs(5), || {
        port_refuses(port).then_some(())
    })?;
    Ok(())
}
