//! Soak: 10,000 sequential visitor connect/close cycles, then 1,000 concurrent visitors,
//! through the relay, the real agent and an echo service. Afterwards the relay's open file
//! descriptors (it runs in this process) and the agent's return to their starting counts;
//! memory growth is reported, not asserted (speed and memory are for `benches/`).
//!
//! One test on purpose: the fd count of this process is only meaningful while nothing else
//! in it opens sockets.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::{IpAddr, Ipv4Addr, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _};
use common::fixture::Tunnel;
use common::relay::TestRelay;
use common::{echo, open_fds, raise_nofile, vm_rss_kib, wait_fds_back};
use serde_json::json;

/// Sequential connect/close cycles (the number the issue asks for).
const CYCLES: usize = 10_000;

/// Visitors open at the same time.
const CONCURRENT: usize = 1_000;

/// Threads opening the concurrent visitors, each from its own source address. Kept well
/// under the relay's 64 pending handshakes per source IP: every visitor makes the agent
/// dial one TLS data connection from 127.0.0.1.
const OPENERS: usize = 16;

/// How long the relay and the agent get to release a phase's connections.
const RELEASE: Duration = Duration::from_secs(10);

/// One visitor: connect, say hello like an SSH client, echo `msg`, close.
fn cycle(port: u16, msg: &[u8]) -> anyhow::Result<()> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_nodelay(true)?;
    std::io::Write::write_all(&mut s, echo::SSH_HELLO)?;
    echo::echo_on(&mut s, msg)
}

/// Opens `n` visitors from `source` and echoes once on each; returns them open.
fn open_visitors(
    relay: &TestRelay,
    source: IpAddr,
    port: u16,
    n: usize,
) -> anyhow::Result<Vec<TcpStream>> {
    let mut open = Vec::with_capacity(n);
    for i in 0..n {
        let mut s = relay
            .connect_from(source, port)
            .with_context(|| format!("visitor {i} from {source}"))?;
        echo::echo_on(&mut s, format!("hello {source} {i}\n").as_bytes())
            .with_context(|| format!("visitor {i} from {source}"))?;
        open.push(s);
    }
    Ok(open)
}

/// The open fd count of `pid` once it stops changing (three equal readings 100 ms apart).
fn settled_fds(pid: Option<u32>) -> anyhow::Result<usize> {
    let mut readings = vec![open_fds(pid)?];
    common::wait_for("the fd count to settle", RELEASE, || {
        readings.push(open_fds(pid).ok()?);
        let last = &readings[readings.len().saturating_sub(3)..];
        (last.len() == 3 && last.iter().all(|n| *n == last[0])).then_some(last[0])
    })
}

/// The relay's gauge of forwarded visitor connections open now.
fn active_visitors(relay: &TestRelay) -> i64 {
    relay
        .handle
        .relay
        .metrics
        .visitors_active
        .with_label_values(&["ssh"])
        .get()
}

#[test]
fn ten_thousand_cycles_and_a_thousand_concurrent_visitors_leak_no_fds() -> anyhow::Result<()> {
    // Per concurrent visitor this process holds the visitor's socket, the relay's public
    // and data sockets and the echo service's socket; the agent holds two.
    let needed = (CONCURRENT * 4 + 1024) as u64;
    let soft = raise_nofile(None, needed)?;
    ensure!(
        soft >= needed,
        "this test needs {needed} open files but the limit is {soft} (hard limit {:?}): \
         raise it, e.g. `ulimit -n {needed}`, before running the soak",
        common::nofile_limits(None)?.1
    );
    let relay = TestRelay::start_with(|c| {
        c.visitor_rate_burst = 1_000_000;
        c.visitor_rate_per_minute = 1_000_000;
        c.max_visitors_per_source = CONCURRENT;
    })?;
    let tunnel = Tunnel::builder()
        .session_fields(json!({ "max_visitors": CONCURRENT }))
        .start(&relay)?;
    let port = tunnel.port("ssh");
    let agent_pid = Some(tunnel.agent.pid());
    let agent_needed = (CONCURRENT * 2 + 512) as u64;
    let agent_soft = raise_nofile(agent_pid, agent_needed)?;
    ensure!(
        agent_soft >= agent_needed,
        "the agent needs {agent_needed} open files but its limit is {agent_soft}"
    );

    // Warm up (lazily opened things: thread pools, the API connection) before counting.
    for i in 0..10 {
        cycle(port, format!("warm-up {i}\n").as_bytes()).context("warm-up visitor")?;
    }
    common::wait_for("the warm-up visitors to close", RELEASE, || {
        (active_visitors(&relay) == 0).then_some(())
    })?;
    let (fds0, agent_fds0) = (settled_fds(None)?, settled_fds(agent_pid)?);
    let (rss0, agent_rss0) = (vm_rss_kib(None)?, vm_rss_kib(agent_pid)?);
    println!("start: {fds0} fds in the test process (relay), {agent_fds0} in the agent; VmRSS {rss0} KiB / agent {agent_rss0} KiB");

    // 1. Sequential cycles.
    let forwarded0 = relay
        .handle
        .relay
        .metrics
        .visitors_total
        .with_label_values(&["ssh"])
        .get();
    let started = Instant::now();
    for i in 0..CYCLES {
        cycle(port, format!("cycle {i}\n").as_bytes())
            .with_context(|| format!("cycle {i} of {CYCLES}"))?;
    }
    let took = started.elapsed();
    println!(
        "{CYCLES} sequential cycles in {:.1} s ({:.0} cycles/s)",
        took.as_secs_f64(),
        CYCLES as f64 / took.as_secs_f64()
    );
    let forwarded = relay
        .handle
        .relay
        .metrics
        .visitors_total
        .with_label_values(&["ssh"])
        .get()
        - forwarded0;
    ensure!(
        forwarded == CYCLES as u64,
        "the relay counted {forwarded} forwarded visitors for {CYCLES} cycles"
    );
    let fds1 = wait_fds_back("relay after the cycles", None, fds0, RELEASE)?;
    let agent_fds1 = wait_fds_back("agent after the cycles", agent_pid, agent_fds0, RELEASE)?;
    let (rss1, agent_rss1) = (vm_rss_kib(None)?, vm_rss_kib(agent_pid)?);
    println!("after the cycles: {fds1} fds (relay), {agent_fds1} (agent); VmRSS {rss1} KiB (+{} KiB) / agent {agent_rss1} KiB (+{} KiB)",
        rss1 as i64 - rss0 as i64, agent_rss1 as i64 - agent_rss0 as i64);

    // 2. Concurrent visitors, all open at once, from several source addresses.
    let started = Instant::now();
    let per_opener = CONCURRENT / OPENERS;
    let extra = CONCURRENT % OPENERS;
    let mut visitors = Vec::with_capacity(CONCURRENT);
    std::thread::scope(|scope| -> anyhow::Result<()> {
        let openers: Vec<_> = (0..OPENERS)
            .map(|t| {
                let source = IpAddr::V4(Ipv4Addr::new(127, 0, 1, t as u8 + 1));
                let n = per_opener + usize::from(t < extra);
                let relay = &relay;
                scope.spawn(move || open_visitors(relay, source, port, n))
            })
            .collect();
        for opener in openers {
            let opened = opener
                .join()
                .map_err(|_| anyhow::anyhow!("an opener thread panicked"))??;
            visitors.extend(opened);
        }
        Ok(())
    })?;
    ensure!(visitors.len() == CONCURRENT, "opened {}", visitors.len());
    let active = active_visitors(&relay);
    ensure!(
        active == CONCURRENT as i64,
        "the relay forwards {active} visitors, expected {CONCURRENT} at once"
    );
    // Every one of them still works while all are open.
    for (i, s) in visitors.iter_mut().enumerate() {
        echo::echo_on(s, format!("still here {i}\n").as_bytes())
            .with_context(|| format!("concurrent visitor {i} while {CONCURRENT} are open"))?;
    }
    let agent_fds_peak = open_fds(agent_pid)?;
    let fds_peak = open_fds(None)?;
    println!(
        "{CONCURRENT} concurrent visitors opened and echoed in {:.1} s; peak {fds_peak} fds (relay), {agent_fds_peak} (agent)",
        started.elapsed().as_secs_f64()
    );
    drop(visitors);
    common::wait_for("the relay to count no open visitor", RELEASE, || {
        (active_visitors(&relay) == 0).then_some(())
    })?;
    let fds2 = wait_fds_back("relay after the concurrent visitors", None, fds0, RELEASE)?;
    let agent_fds2 = wait_fds_back(
        "agent after the concurrent visitors",
        agent_pid,
        agent_fds0,
        RELEASE,
    )?;
    let (rss2, agent_rss2) = (vm_rss_kib(None)?, vm_rss_kib(agent_pid)?);
    println!("end: {fds2} fds (relay, start {fds0}), {agent_fds2} (agent, start {agent_fds0}); VmRSS {rss2} KiB (+{} KiB since start) / agent {agent_rss2} KiB (+{} KiB)",
        rss2 as i64 - rss0 as i64, agent_rss2 as i64 - agent_rss0 as i64);

    // The session still serves after all of it.
    let mut s = relay.connect_from(IpAddr::V4(Ipv4Addr::LOCALHOST), port)?;
    echo::echo_on(&mut s, b"after the soak\n")?;
    Ok(())
}
