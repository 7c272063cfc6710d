//! The forwarder over real sockets: `client ⇄ [a] forward() [b] ⇄ server`, where the
//! forwarder task holds the accepted socket of the client's connection as `a` and the
//! connecting socket (plain TCP, or TLS in either role) of a second connection as `b`.
//!
//! Every test runs under a deadline, so a hang fails instead of blocking; nothing asserts
//! speed, and nothing sleeps to wait for readiness.

mod common;

use std::io;

use anyhow::{bail, ensure, Context, Result};
use common::{pinned_tls_pair, tcp_pair, within};
use porthole_protocol::forward::{forward, ForwardStats};
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::{JoinHandle, JoinSet};

/// Anything the tests push bytes through.
trait Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Stream for T {}

type Forwarder = JoinHandle<Result<ForwardStats, porthole_protocol::forward::ForwardError>>;

/// What `b` is, and so what the far end (`server`) speaks.
#[derive(Clone, Copy, Debug)]
enum BSide {
    /// Plain TCP.
    Plain,
    /// `b` is the client end of a TLS connection (the agent's view of the relay).
    TlsClient,
    /// `b` is the server end of a TLS connection (the relay's view of an agent).
    TlsServer,
}

/// `client ⇄ [a] forwarder [b] ⇄ server`.
struct Tunnel {
    /// The peer of `a`: plain TCP.
    client: TcpStream,
    /// The peer of `b`: plain TCP or TLS, as chosen.
    server: Box<dyn Stream>,
    /// The task running `forward(a, b, prefix)`.
    forwarder: Forwarder,
}

fn spawn_forward(mut a: impl Stream, mut b: impl Stream, prefix: Vec<u8>) -> Forwarder {
    tokio::spawn(async move { forward(&mut a, &mut b, &prefix).await })
}

async fn tunnel(kind: BSide, prefix: Vec<u8>) -> Result<Tunnel> {
    let (client, a) = tcp_pair().await?;
    for socket in [&client, &a] {
        socket.set_nodelay(true)?;
    }
    let (server, forwarder): (Box<dyn Stream>, _) = match kind {
        BSide::Plain => {
            let (b, server) = tcp_pair().await?;
            b.set_nodelay(true)?;
            server.set_nodelay(true)?;
            (Box::new(server), spawn_forward(a, b, prefix))
        }
        BSide::TlsClient => {
            let (b, server) = pinned_tls_pair().await?;
            b.get_ref().0.set_nodelay(true)?;
            server.get_ref().0.set_nodelay(true)?;
            (Box::new(server), spawn_forward(a, b, prefix))
        }
        BSide::TlsServer => {
            let (server, b) = pinned_tls_pair().await?;
            b.get_ref().0.set_nodelay(true)?;
            server.get_ref().0.set_nodelay(true)?;
            (Box::new(server), spawn_forward(a, b, prefix))
        }
    };
    Ok(Tunnel {
        client,
        server,
        forwarder,
    })
}

/// Waits for the forwarder and returns its counts.
async fn finished(forwarder: Forwarder) -> Result<ForwardStats> {
    forwarder
        .await
        .context("forwarder task panicked")?
        .context("forward() returned an error")
}

fn random_bytes(rng: &mut StdRng, len: usize) -> Vec<u8> {
    let mut data = vec![0; len];
    rng.fill_bytes(&mut data);
    data
}

/// A write or read size: mostly large, sometimes tiny, so frames and TLS records of every
/// size cross the forwarder.
fn chunk_len(rng: &mut StdRng) -> usize {
    if rng.gen_bool(0.25) {
        rng.gen_range(1..=64)
    } else {
        rng.gen_range(1..=128 * 1024)
    }
}

fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// Checks that `got` is exactly `sent`, by length and SHA-256.
fn check_same(got: &[u8], sent: &[u8], what: &str, seed: u64) -> Result<()> {
    ensure!(
        got.len() == sent.len() && sha256_hex(got) == sha256_hex(sent),
        "{what}: received {} bytes (sha256 {}), sent {} bytes (sha256 {}); seed {seed}",
        got.len(),
        sha256_hex(got),
        sent.len(),
        sha256_hex(sent),
    );
    Ok(())
}

/// Writes `data` in random chunks, flushing after each.
async fn send_chunked(w: &mut (impl AsyncWrite + Unpin), data: &[u8], seed: u64) -> Result<()> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut rest = data;
    while !rest.is_empty() {
        let (chunk, tail) = rest.split_at(chunk_len(&mut rng).min(rest.len()));
        w.write_all(chunk).await?;
        w.flush().await?;
        rest = tail;
    }
    Ok(())
}

/// Reads until EOF with reads of random sizes.
async fn recv_to_eof(r: &mut (impl AsyncRead + Unpin), seed: u64) -> Result<Vec<u8>> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut got = Vec::new();
    let mut buf = vec![0; 128 * 1024];
    loop {
        let want = chunk_len(&mut rng);
        let n = r.read(&mut buf[..want]).await?;
        if n == 0 {
            return Ok(got);
        }
        got.extend_from_slice(&buf[..n]);
    }
}

/// Sends `data` then shuts down the write side, while reading everything the other end
/// sends until EOF; returns what was read.
async fn exchange(stream: impl Stream, data: &[u8], seed: u64) -> Result<Vec<u8>> {
    let (mut reader, mut writer) = tokio::io::split(stream);
    let send = async {
        send_chunked(&mut writer, data, seed).await?;
        writer.shutdown().await?;
        Ok::<_, anyhow::Error>(())
    };
    let (got, ()) = tokio::try_join!(recv_to_eof(&mut reader, seed ^ 0x5eed), send)?;
    Ok(got)
}

/// Several MiB of random data each way at the same time, random write and read sizes,
/// verified by SHA-256 and by the forwarder's counts.
async fn byte_exact_both_ways(kind: BSide, mib: usize) -> Result<()> {
    let seed: u64 = rand::random();
    eprintln!("{kind:?}: seed {seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    let up_len = mib * 1024 * 1024 + rng.gen_range(0..4096);
    let down_len = mib * 1024 * 1024 + rng.gen_range(0..4096);
    let up = random_bytes(&mut rng, up_len);
    let down = random_bytes(&mut rng, down_len);

    let t = tunnel(kind, Vec::new()).await?;
    let (got_down, got_up) = tokio::try_join!(
        exchange(t.client, &up, seed ^ 1),
        exchange(t.server, &down, seed ^ 2),
    )?;
    check_same(&got_up, &up, "client → server", seed)?;
    check_same(&got_down, &down, "server → client", seed)?;
    let stats = finished(t.forwarder).await?;
    ensure!(
        stats
            == ForwardStats {
                a_to_b: up.len() as u64,
                b_to_a: down.len() as u64
            },
        "forwarder counted {stats:?}, moved {} up and {} down",
        up.len(),
        down.len()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_random_data_both_ways_at_once_arrives_byte_exact() -> Result<()> {
    within(byte_exact_both_ways(BSide::Plain, 8)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_client_b_random_data_both_ways_at_once_arrives_byte_exact() -> Result<()> {
    within(byte_exact_both_ways(BSide::TlsClient, 4)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_server_b_random_data_both_ways_at_once_arrives_byte_exact() -> Result<()> {
    within(byte_exact_both_ways(BSide::TlsServer, 4)).await
}

/// Which end of the tunnel shuts down its write side first.
#[derive(Clone, Copy, Debug)]
enum First {
    /// The peer of `a`.
    Client,
    /// The peer of `b`.
    Server,
}

/// One end sends a little and shuts down its write side; the other end reads EOF, then keeps
/// sending for many rounds, each of which arrives; then it closes too and forward() returns.
async fn half_close(kind: BSide, first: First) -> Result<()> {
    let seed: u64 = rand::random();
    eprintln!("{kind:?}, {first:?} closes first: seed {seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    let t = tunnel(kind, Vec::new()).await?;
    let forwarder = t.forwarder;
    let (mut closer, mut talker): (Box<dyn Stream>, Box<dyn Stream>) = match first {
        First::Client => (Box::new(t.client), t.server),
        First::Server => (t.server, Box::new(t.client)),
    };

    let last_words = random_bytes(&mut rng, 100 * 1024);
    send_chunked(&mut closer, &last_words, seed).await?;
    closer.shutdown().await?;
    let heard = recv_to_eof(&mut talker, seed).await?;
    check_same(&heard, &last_words, "data before the half-close", seed)?;
    ensure!(
        !forwarder.is_finished(),
        "forwarder ended after one direction closed: {:?}",
        finished(forwarder).await
    );

    let mut after = 0usize;
    for round in 0..50 {
        let len = chunk_len(&mut rng);
        let chunk = random_bytes(&mut rng, len);
        talker.write_all(&chunk).await?;
        talker.flush().await?;
        let mut got = vec![0; len];
        closer
            .read_exact(&mut got)
            .await
            .with_context(|| format!("round {round} after the half-close; seed {seed}"))?;
        check_same(&got, &chunk, "data after the half-close", seed)?;
        after += len;
    }
    talker.shutdown().await?;
    let mut rest = Vec::new();
    closer.read_to_end(&mut rest).await?;
    ensure!(
        rest.is_empty(),
        "{} unexpected bytes before EOF",
        rest.len()
    );

    let stats = finished(forwarder).await?;
    let (closer_sent, talker_sent) = (last_words.len() as u64, after as u64);
    let expected = match first {
        First::Client => ForwardStats {
            a_to_b: closer_sent,
            b_to_a: talker_sent,
        },
        First::Server => ForwardStats {
            a_to_b: talker_sent,
            b_to_a: closer_sent,
        },
    };
    ensure!(
        stats == expected,
        "forwarder counted {stats:?}, expected {expected:?}"
    );
    Ok(())
}

#[tokio::test]
async fn plain_half_close_by_client_keeps_server_to_client_flowing() -> Result<()> {
    within(half_close(BSide::Plain, First::Client)).await
}

#[tokio::test]
async fn plain_half_close_by_server_keeps_client_to_server_flowing() -> Result<()> {
    within(half_close(BSide::Plain, First::Server)).await
}

#[tokio::test]
async fn tls_client_b_half_close_by_client_sends_close_notify_and_keeps_flowing() -> Result<()> {
    within(half_close(BSide::TlsClient, First::Client)).await
}

#[tokio::test]
async fn tls_client_b_close_notify_from_server_keeps_client_to_server_flowing() -> Result<()> {
    within(half_close(BSide::TlsClient, First::Server)).await
}

#[tokio::test]
async fn tls_server_b_half_close_by_client_sends_close_notify_and_keeps_flowing() -> Result<()> {
    within(half_close(BSide::TlsServer, First::Client)).await
}

#[tokio::test]
async fn tls_server_b_close_notify_from_agent_keeps_client_to_agent_flowing() -> Result<()> {
    within(half_close(BSide::TlsServer, First::Server)).await
}

#[tokio::test]
async fn prefix_reaches_client_before_bytes_already_waiting_on_b_and_is_counted() -> Result<()> {
    within(async {
        let seed: u64 = rand::random();
        let mut rng = StdRng::seed_from_u64(seed);
        let prefix = random_bytes(&mut rng, 10 * 1024 + 7);
        let waiting = random_bytes(&mut rng, 4 * 1024);
        let later = random_bytes(&mut rng, 1024 * 1024);
        let up = random_bytes(&mut rng, 20 * 1024);

        let (client, a) = tcp_pair().await?;
        let (b, mut server) = tcp_pair().await?;
        // Bytes from the server are already readable on `b` before the forwarder starts, so
        // a forwarder that copied before writing the prefix would deliver them first.
        server.write_all(&waiting).await?;
        let mut peeked = [0u8; 1];
        b.peek(&mut peeked).await?;
        let forwarder = spawn_forward(a, b, prefix.clone());

        let mut down = Vec::new();
        down.extend_from_slice(&waiting);
        down.extend_from_slice(&later);
        let (got_down, got_up) = tokio::try_join!(
            exchange(client, &up, seed ^ 1),
            exchange(server, &later, seed ^ 2),
        )?;
        ensure!(
            got_down.starts_with(&prefix),
            "the client did not get the prefix first; seed {seed}"
        );
        check_same(
            &got_down[prefix.len()..],
            &down,
            "server → client after the prefix",
            seed,
        )?;
        check_same(&got_up, &up, "client → server", seed)?;

        let stats = finished(forwarder).await?;
        let expected = ForwardStats {
            a_to_b: up.len() as u64,
            b_to_a: (prefix.len() + down.len()) as u64,
        };
        ensure!(
            stats == expected,
            "forwarder counted {stats:?}, expected {expected:?}"
        );
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_forwarders_each_move_64_kib_both_ways_exactly() -> Result<()> {
    const CONNECTIONS: u64 = 200;
    const LEN: usize = 64 * 1024;
    within(async {
        let seed: u64 = rand::random();
        eprintln!("seed {seed}");
        let mut set = JoinSet::new();
        for i in 0..CONNECTIONS {
            let seed = seed.wrapping_add(i * 7919);
            set.spawn(async move {
                let mut rng = StdRng::seed_from_u64(seed);
                let up = random_bytes(&mut rng, LEN);
                let down = random_bytes(&mut rng, LEN);
                let t = tunnel(BSide::Plain, Vec::new()).await?;
                let (got_down, got_up) = tokio::try_join!(
                    exchange(t.client, &up, seed ^ 1),
                    exchange(t.server, &down, seed ^ 2),
                )?;
                check_same(&got_up, &up, "client → server", seed)?;
                check_same(&got_down, &down, "server → client", seed)?;
                let stats = finished(t.forwarder).await?;
                let expected = ForwardStats {
                    a_to_b: LEN as u64,
                    b_to_a: LEN as u64,
                };
                ensure!(stats == expected, "connection {i}: counted {stats:?}");
                Ok::<_, anyhow::Error>(())
            });
        }
        let mut done = 0;
        while let Some(joined) = set.join_next().await {
            joined.context("connection task panicked")??;
            done += 1;
        }
        ensure!(
            done == CONNECTIONS,
            "{done} of {CONNECTIONS} connections finished"
        );
        Ok(())
    })
    .await
}

/// Sends `msg` from `from` and reads exactly it at `to`.
async fn one_way(
    from: &mut (impl AsyncWrite + Unpin),
    to: &mut (impl AsyncRead + Unpin),
    msg: &[u8],
) -> Result<()> {
    from.write_all(msg).await?;
    from.flush().await?;
    let mut got = vec![0; msg.len()];
    to.read_exact(&mut got).await?;
    ensure!(got == msg, "got {got:?}, sent {msg:?}");
    Ok(())
}

#[tokio::test]
async fn idle_connection_still_carries_data_after_two_seconds_of_silence() -> Result<()> {
    within(async {
        let mut t = tunnel(BSide::Plain, Vec::new()).await?;
        one_way(&mut t.client, &mut t.server, b"before").await?;
        one_way(&mut t.server, &mut t.client, b"before, back").await?;

        // Silence on purpose (the point of the test), not a wait for readiness.
        tokio::time::sleep(std::time::Duration::from_secs(2)).await;
        ensure!(!t.forwarder.is_finished(), "forwarder ended while idle");

        one_way(&mut t.client, &mut t.server, b"after").await?;
        one_way(&mut t.server, &mut t.client, b"after, back").await?;
        t.client.shutdown().await?;
        t.server.shutdown().await?;
        let stats = finished(t.forwarder).await?;
        ensure!(
            stats
                == ForwardStats {
                    a_to_b: 11,
                    b_to_a: 23
                },
            "forwarder counted {stats:?}"
        );
        Ok(())
    })
    .await
}

/// 1,000 round trips of one byte each: every byte must be passed on without waiting for more
/// (no corking in the forwarder or, over TLS, in the TLS writer).
async fn ping_pong(kind: BSide) -> Result<()> {
    const ROUNDS: usize = 1000;
    let mut t = tunnel(kind, Vec::new()).await?;
    let mut server = t.server;
    let echo = async move {
        let mut byte = [0u8; 1];
        for _ in 0..ROUNDS {
            server.read_exact(&mut byte).await?;
            byte[0] = byte[0].wrapping_add(1);
            server.write_all(&byte).await?;
            server.flush().await?;
        }
        server.shutdown().await?;
        Ok::<_, anyhow::Error>(())
    };
    let ping = async {
        for round in 0..ROUNDS {
            let sent = (round % 251) as u8;
            t.client.write_all(&[sent]).await?;
            let mut byte = [0u8; 1];
            t.client
                .read_exact(&mut byte)
                .await
                .with_context(|| format!("round {round}"))?;
            if byte[0] != sent.wrapping_add(1) {
                bail!("round {round}: sent {sent}, got back {}", byte[0]);
            }
        }
        t.client.shutdown().await?;
        Ok(())
    };
    tokio::try_join!(ping, echo)?;
    let stats = finished(t.forwarder).await?;
    ensure!(
        stats
            == ForwardStats {
                a_to_b: ROUNDS as u64,
                b_to_a: ROUNDS as u64
            },
        "forwarder counted {stats:?}"
    );
    Ok(())
}

#[tokio::test]
async fn plain_one_byte_ping_pong_completes_1000_round_trips() -> Result<()> {
    within(ping_pong(BSide::Plain)).await
}

#[tokio::test]
async fn tls_one_byte_ping_pong_completes_1000_round_trips() -> Result<()> {
    within(ping_pong(BSide::TlsClient)).await
}

/// Cancellation ends forwarding at once and still reports what moved (audit and metrics
/// need the counts of cut connections too).
#[tokio::test]
async fn cancelled_forwarding_reports_the_bytes_moved_so_far() -> Result<()> {
    within(async {
        let (mut client, mut a) = tcp_pair().await?;
        let (mut b, mut server) = tcp_pair().await?;
        let cancel = tokio_util::sync::CancellationToken::new();
        let stop = cancel.clone();
        let task = tokio::spawn(async move {
            porthole_protocol::forward::forward_until(&mut a, &mut b, b"pre", &stop).await
        });
        client.write_all(&[7u8; 1000]).await?;
        let mut got = vec![0u8; 1000];
        server.read_exact(&mut got).await?;
        server.write_all(&[9u8; 200]).await?;
        let mut back = vec![0u8; 203];
        client.read_exact(&mut back).await?;
        ensure!(back.starts_with(b"pre"), "prefix first");
        cancel.cancel();
        let err = match task.await? {
            Ok(stats) => bail!("forwarding should have been cancelled, ended with {stats:?}"),
            Err(e) => e,
        };
        ensure!(
            err.source.kind() == io::ErrorKind::Interrupted,
            "kind {:?}",
            err.source.kind()
        );
        ensure!(
            err.stats
                == ForwardStats {
                    a_to_b: 1000,
                    b_to_a: 203
                },
            "stats {:?}",
            err.stats
        );
        // Both sockets of the forwarder are closed: the client sees EOF.
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await?;
        ensure!(rest.is_empty());
        Ok(())
    })
    .await
}
