//! Warm data connections: the agent keeps `--warm-connections` (default 2) authenticated
//! data connections parked on the relay; visitors are paired with them at once, the pool
//! refills, follows the control link across a cut and a resume, and replaces idle ones
//! (`--warm-idle`); the plain-TCP data plane has none; `--warm-connections 0` turns it off.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use anyhow::{ensure, Context as _};
use common::echo;
use common::fixture::Tunnel;
use common::proxy::Proxy;
use common::relay::TestRelay;
use common::wait_for;

/// Parked connections the relay holds now.
fn parked(relay: &TestRelay) -> i64 {
    relay.handle.relay.metrics.warm_parked.get()
}

/// Visitors paired so far, `how` = warm | cold.
fn paired(relay: &TestRelay, how: &str) -> u64 {
    relay
        .handle
        .relay
        .metrics
        .pairings
        .with_label_values(&[how])
        .get()
}

fn wait_parked(relay: &TestRelay, n: i64) -> anyhow::Result<()> {
    wait_for(
        &format!("{n} warm data connections parked"),
        Duration::from_secs(20),
        || (parked(relay) == n).then_some(()),
    )
    .map_err(|e| anyhow::anyhow!("{e:#} (parked now: {})", parked(relay)))
}

#[test]
fn visitors_are_paired_with_warm_connections_and_the_pool_refills() -> anyhow::Result<()> {
    // The burst below comes from one address: lift the per-source limits.
    let relay = TestRelay::start_with(|c| {
        c.visitor_rate_burst = 100;
        c.max_visitors_per_source = 100;
    })?;
    let tunnel = Tunnel::start(&relay)?;
    let port = tunnel.port("ssh");
    wait_parked(&relay, 2)?;

    // One visitor: paired with a parked connection, bytes both ways.
    assert_eq!(echo::roundtrip(port, b"warm hello")?, b"warm hello");
    assert_eq!(
        paired(&relay, "warm"),
        1,
        "the first visitor is paired warm"
    );
    assert_eq!(paired(&relay, "cold"), 0);
    wait_parked(&relay, 2)?;

    // A burst larger than the pool: every visitor is served, warm or cold.
    let visitors: Vec<_> = (0..12)
        .map(|i| {
            std::thread::spawn(move || {
                let msg = format!("visitor {i}");
                echo::roundtrip(port, msg.as_bytes()).map(|got| got == msg.as_bytes())
            })
        })
        .collect();
    for v in visitors {
        let ok = v
            .join()
            .map_err(|_| anyhow::anyhow!("visitor thread panicked"))??;
        ensure!(ok, "a visitor got other bytes back");
    }
    let (warm, cold) = (paired(&relay, "warm"), paired(&relay, "cold"));
    assert_eq!(
        warm + cold,
        13,
        "every visitor paired once: {warm} warm, {cold} cold"
    );
    ensure!(
        warm >= 3,
        "the pool served part of the burst: {warm} warm, {cold} cold"
    );
    // And it refills to its size, no more.
    wait_parked(&relay, 2)?;
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(parked(&relay), 2, "the pool stays at its size");
    Ok(())
}

#[test]
fn warm_connections_follow_the_control_link_across_a_cut() -> anyhow::Result<()> {
    let relay = TestRelay::start()?;
    let proxy = Proxy::start(&relay.rt, relay.agent_addr())?;
    let tunnel = Tunnel::builder().via(&proxy.addr).start(&relay)?;
    let port = tunnel.port("ssh");
    wait_parked(&relay, 2)?;

    proxy.cut();
    tunnel
        .agent
        .wait_line("resumed session", Duration::from_secs(20))?;
    relay.wait_state(&tunnel.session.id, "active", Duration::from_secs(10))?;
    // The old link's connections are gone; the new link parks its own.
    wait_parked(&relay, 2)?;
    let warm_before = paired(&relay, "warm");
    let got = wait_for(
        "the resumed session to forward",
        Duration::from_secs(10),
        || echo::roundtrip(port, b"after the cut").ok(),
    )?;
    assert_eq!(got, b"after the cut");
    ensure!(
        paired(&relay, "warm") > warm_before,
        "the resumed link's warm connections serve visitors"
    );
    Ok(())
}

/// On the plain-TCP data plane the relay hands out no park secret (it would travel in clear
/// text and stay valid for the link's lifetime): visitors are paired cold (that the data
/// port refuses `park` is checked in `ssh_tunnel.rs`).
#[test]
fn the_tcp_data_plane_has_no_warm_connections() -> anyhow::Result<()> {
    let relay = TestRelay::start_with(|c| {
        c.data_plane = porthole_protocol::DataPlane::Tcp;
        c.data_listen = "127.0.0.1:0".parse().unwrap_or(c.data_listen);
    })?;
    let tunnel = Tunnel::start(&relay)?;
    let port = tunnel.port("ssh");
    let big = vec![7u8; 1 << 20];
    assert_eq!(echo::roundtrip(port, &big)?, big);
    assert_eq!(paired(&relay, "warm"), 0);
    assert_eq!(paired(&relay, "cold"), 1);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(parked(&relay), 0);
    Ok(())
}

#[test]
fn zero_warm_connections_turns_them_off() -> anyhow::Result<()> {
    let relay = TestRelay::start()?;
    let tunnel = Tunnel::builder()
        .args(["--warm-connections", "0"])
        .start(&relay)?;
    let port = tunnel.port("ssh");
    for i in 0..3 {
        let msg = format!("cold {i}");
        assert_eq!(echo::roundtrip(port, msg.as_bytes())?, msg.as_bytes());
    }
    assert_eq!(paired(&relay, "cold"), 3);
    assert_eq!(paired(&relay, "warm"), 0);
    assert_eq!(parked(&relay), 0);
    Ok(())
}

#[test]
fn idle_warm_connections_are_retired_and_replaced() -> anyhow::Result<()> {
    let relay = TestRelay::start()?;
    let tunnel = Tunnel::builder()
        .args(["--warm-idle", "1s"])
        .start(&relay)?;
    let port = tunnel.port("ssh");
    wait_parked(&relay, 2)?;
    // Each park takes a fresh id from the session's counter: count them across idle time.
    let ids = || -> anyhow::Result<u64> {
        let session = relay
            .handle
            .relay
            .sessions
            .list()
            .into_iter()
            .next()
            .ok_or_else(|| anyhow::anyhow!("no session"))?;
        Ok(session.next_id())
    };
    let before = ids()?;
    // Two connections retired at least once each: waited for, not counted in a fixed time.
    // Every probe takes an id of its own, so those are not counted as parks.
    let (mut last, mut probes) = (before, 0);
    wait_for(
        "idle warm connections to be replaced",
        Duration::from_secs(30),
        || {
            last = ids().ok()?;
            probes += 1;
            (last - before - probes >= 2).then_some(())
        },
    )
    .with_context(|| format!("ids {before} → {last} after {probes} probes"))?;
    wait_parked(&relay, 2)?;
    assert_eq!(
        echo::roundtrip(port, b"after retirements")?,
        b"after retirements"
    );
    assert_eq!(
        paired(&relay, "warm"),
        1,
        "a replacement served the visitor"
    );
    Ok(())
}
