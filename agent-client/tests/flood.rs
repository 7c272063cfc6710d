//! A flood on the agent endpoint: 1,000 silent TCP connections and 1,000 stalled TLS
//! handshakes (half a ClientHello, then nothing) from twenty other source addresses. A real
//! agent still registers and forwards meanwhile, every flood connection is closed by its
//! deadline, and the relay's file descriptors return to their starting count.
//!
//! Each source opens 100 connections, more than the 64 pending handshakes one address may
//! hold, so the per-address cap refuses some at once; twenty sources together would hold
//! 1,280 pending handshakes, more than the global cap of 1,024, so the rest wait in the
//! listen backlog for a permit (and get their own deadline once accepted).
//!
//! One test on purpose: the fd count of this process is only meaningful while nothing else
//! in it opens sockets.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _};
use common::agent::Agent;
use common::relay::TestRelay;
use common::{echo, open_fds, raise_nofile, wait_fds_back, wait_for};
use porthole_protocol::tls::{client_config, parse_pin, RelayTrust};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::Mutex;
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::rustls::ClientConnection;

/// The relay's deadline for a TLS handshake and first frame, shortened for the test.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(2);

/// Source addresses per kind of flood connection.
const SOURCES: u8 = 10;

/// Connections per source address (above the relay's 64 pending handshakes per address).
const PER_SOURCE: usize = 100;

/// By when a flood connection must be closed after it was opened: its own deadline, plus
/// one more for a connection that waited in the backlog behind a full global cap, plus
/// slack for a loaded machine.
const CLOSED_WITHIN: Duration = Duration::from_secs(2 * HANDSHAKE_TIMEOUT.as_secs() + 5);

/// What became of one flood connection.
#[derive(Debug)]
struct Outcome {
    /// Source address.
    source: Ipv4Addr,
    /// Closed by the relay (EOF or reset) this long after it was opened; `None` when it was
    /// still open at [`CLOSED_WITHIN`].
    closed_after: Option<Duration>,
}

/// Opens a TCP connection to `target` from `source`.
async fn connect_from(source: Ipv4Addr, target: SocketAddr) -> anyhow::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind((source, 0).into())?;
    let tcp = tokio::time::timeout(Duration::from_secs(10), socket.connect(target))
        .await
        .context("connect timed out")??;
    Ok(tcp)
}

/// Waits until the relay closes `tcp` (EOF or reset), at most until `opened + CLOSED_WITHIN`.
async fn watch(mut tcp: TcpStream, source: Ipv4Addr, opened: Instant) -> Outcome {
    let mut buf = [0u8; 1024];
    let closed = tokio::time::timeout_at((opened + CLOSED_WITHIN).into(), async {
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                // The relay never answers half a ClientHello; ignore anything anyway.
                Ok(_) => {}
            }
        }
    })
    .await;
    Outcome {
        source,
        closed_after: closed.ok().map(|()| opened.elapsed()),
    }
}

/// The first half of a real ClientHello for the relay: a TLS handshake that stalls.
fn half_client_hello(relay: &TestRelay) -> anyhow::Result<Vec<u8>> {
    let config = client_config(&RelayTrust::Pin(parse_pin(&relay.pin())?))?;
    let mut conn = ClientConnection::new(config, ServerName::try_from("localhost")?.to_owned())?;
    let mut hello = Vec::new();
    conn.write_tls(&mut hello)?;
    ensure!(hello.len() > 100, "ClientHello of {} bytes", hello.len());
    hello.truncate(hello.len() / 2);
    Ok(hello)
}

/// A relay handshake-failure counter.
fn failures(relay: &TestRelay, reason: &str) -> u64 {
    relay
        .handle
        .relay
        .metrics
        .handshake_failures
        .with_label_values(&[reason])
        .get()
}

#[test]
fn a_flood_of_silent_and_stalled_connections_keeps_no_real_agent_out() -> anyhow::Result<()> {
    let flood_size = 2 * SOURCES as usize * PER_SOURCE;
    // The flood's client sockets and the relay's sockets both live in this process.
    let needed = (2 * flood_size + 1024) as u64;
    let soft = raise_nofile(None, needed)?;
    ensure!(
        soft >= needed,
        "this test needs {needed} open files but the limit is {soft}: raise it, e.g. \
         `ulimit -n {needed}`, before running it"
    );
    let echo_port = echo::start()?;
    let relay = TestRelay::start_with(|c| c.handshake_timeout = HANDSHAKE_TIMEOUT)?;
    let session = relay.create(&["ssh"], None)?;
    let target: SocketAddr = relay.agent_addr().parse()?;
    let stalled_hello = half_client_hello(&relay)?;
    let flood_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let fds0 = open_fds(None)?;
    let (timeouts0, per_ip0, evicted0) = (
        failures(&relay, "timeout"),
        failures(&relay, "per_ip_limit"),
        failures(&relay, "evicted"),
    );

    // The flood: source by source, so each source's connections reach the relay together.
    let started = Instant::now();
    let outcomes = Arc::new(Mutex::new(Vec::with_capacity(flood_size)));
    let mut watchers = Vec::with_capacity(flood_size);
    flood_rt.block_on(async {
        for (kind, first_bytes) in [(2u8, &[][..]), (3u8, &stalled_hello[..])] {
            for s in 1..=SOURCES {
                let source = Ipv4Addr::new(127, 0, kind, s);
                // This source's connections all at once; the next source after them.
                let mut group = tokio::task::JoinSet::new();
                for _ in 0..PER_SOURCE {
                    let first_bytes = first_bytes.to_vec();
                    group.spawn(async move {
                        let mut tcp = connect_from(source, target).await?;
                        let opened = Instant::now();
                        // A refused connection may be reset before this write; that is fine.
                        let _ = tcp.write_all(&first_bytes).await;
                        anyhow::Ok((tcp, opened))
                    });
                }
                while let Some(joined) = group.join_next().await {
                    let (tcp, opened) =
                        joined?.with_context(|| format!("flood connection from {source}"))?;
                    let outcomes = outcomes.clone();
                    watchers.push(tokio::spawn(async move {
                        let outcome = watch(tcp, source, opened).await;
                        outcomes.lock().await.push(outcome);
                    }));
                }
            }
        }
        anyhow::Ok(())
    })?;
    println!(
        "opened {flood_size} flood connections in {:.2} s",
        started.elapsed().as_secs_f64()
    );

    // A real agent from 127.0.0.1 registers and forwards while the flood is pending.
    let agent = Agent::start(
        &relay,
        &session.token,
        &[format!("ssh=127.0.0.1:{echo_port}")],
    )?;
    agent.wait_registered()?;
    let closed_at_registration = flood_rt.block_on(async { outcomes.lock().await.len() });
    println!(
        "the agent registered {:.2} s after the flood started, with {} of {flood_size} flood connections still open",
        started.elapsed().as_secs_f64(),
        flood_size - closed_at_registration
    );
    let got = wait_for(
        "the agent's session to forward during the flood",
        Duration::from_secs(20),
        || echo::roundtrip(session.port("ssh"), b"through the flood").ok(),
    )?;
    ensure!(got == b"through the flood", "echo answered {got:?}");

    // Every flood connection is closed by its deadline.
    flood_rt.block_on(async {
        for w in watchers {
            w.await?;
        }
        anyhow::Ok(())
    })?;
    let outcomes = std::mem::take(&mut *flood_rt.block_on(outcomes.lock()));
    ensure!(outcomes.len() == flood_size, "{} outcomes", outcomes.len());
    let open: Vec<_> = outcomes
        .iter()
        .filter(|o| o.closed_after.is_none())
        .collect();
    ensure!(
        open.is_empty(),
        "{} flood connections were still open {CLOSED_WITHIN:?} after they were opened \
         (relay handshake timeout {HANDSHAKE_TIMEOUT:?}), e.g. from {}",
        open.len(),
        open[0].source
    );
    let mut latencies: Vec<_> = outcomes.iter().filter_map(|o| o.closed_after).collect();
    latencies.sort();
    let (timeouts, per_ip, evicted) = (
        failures(&relay, "timeout") - timeouts0,
        failures(&relay, "per_ip_limit") - per_ip0,
        failures(&relay, "evicted") - evicted0,
    );
    println!(
        "flood connections closed after: min {:?}, median {:?}, max {:?}; relay counted {per_ip} refused by the per-address cap, {evicted} evicted by newer handshakes, {timeouts} timed out",
        latencies[0],
        latencies[latencies.len() / 2],
        latencies[latencies.len() - 1]
    );
    ensure!(
        per_ip > 0,
        "100 connections per source must hit the cap of 64 pending handshakes per address"
    );
    ensure!(
        per_ip + evicted + timeouts == flood_size as u64,
        "every flood connection is refused by the per-address cap, evicted by a newer \
         handshake, or timed out: {per_ip} + {evicted} + {timeouts} != {flood_size}"
    );
    // The agent still forwards after the flood.
    ensure!(echo::roundtrip(session.port("ssh"), b"after")? == b"after");

    // With the agent gone too, the relay holds no more descriptors than before the flood.
    drop(agent);
    let fds = wait_fds_back("relay after the flood", None, fds0, Duration::from_secs(10))?;
    println!("relay fds: {fds0} before the flood, {fds} after");
    Ok(())
}
