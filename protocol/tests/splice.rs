//! The zero-copy forwarder over real loopback sockets: `client ⇄ [a] splice_forward [b] ⇄
//! server`. Byte-exact transfer both ways at once, half-close each way, the forced copy
//! fallback, many connections at once, an interactive ping-pong that must not stall, and
//! cancellation with counts.
//!
//! Every test runs under a deadline, so a hang fails instead of blocking; nothing asserts
//! speed, and nothing sleeps to wait for readiness.

mod common;

use std::io;

use anyhow::{bail, ensure, Context, Result};
use common::{tcp_pair, within};
use porthole_protocol::forward::{ForwardError, ForwardStats};
use porthole_protocol::splice::{splice_forward, splice_forward_with, Path, SpliceOptions};
use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;

type Outcome = (Path, Result<ForwardStats, ForwardError>);

/// `client ⇄ [a] forwarder [b] ⇄ server`, all plain loopback TCP.
struct Tunnel {
    /// The peer of `a`.
    client: TcpStream,
    /// The peer of `b`.
    server: TcpStream,
    /// The task running the forwarder.
    forwarder: JoinHandle<Outcome>,
}

async fn tunnel_with(
    prefix: Vec<u8>,
    cancel: CancellationToken,
    options: SpliceOptions,
) -> Result<Tunnel> {
    let (client, mut a) = tcp_pair().await?;
    let (mut b, server) = tcp_pair().await?;
    for socket in [&client, &a, &b, &server] {
        socket.set_nodelay(true)?;
    }
    let forwarder = tokio::spawn(async move {
        splice_forward_with(&mut a, &mut b, &prefix, &cancel, options).await
    });
    Ok(Tunnel {
        client,
        server,
        forwarder,
    })
}

async fn tunnel(options: SpliceOptions) -> Result<Tunnel> {
    tunnel_with(Vec::new(), CancellationToken::new(), options).await
}

fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut data = vec![0u8; len];
    StdRng::seed_from_u64(seed).fill_bytes(&mut data);
    data
}

/// Writes `data` in uneven chunks, then shuts down the write side.
async fn send_all(mut w: impl AsyncWriteExt + Unpin, data: &[u8]) -> io::Result<()> {
    for chunk in data.chunks(37 * 1024 + 11) {
        w.write_all(chunk).await?;
    }
    w.shutdown().await
}

/// Reads to EOF: (byte count, SHA-256).
async fn receive_all(mut r: impl AsyncReadExt + Unpin) -> io::Result<(u64, [u8; 32])> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 50 * 1024];
    let mut total = 0u64;
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            return Ok((total, hasher.finalize().into()));
        }
        hasher.update(&buf[..n]);
        total += n as u64;
    }
}

fn digest(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

/// Sends `up` client → server and `down` server → client at the same time, each side
/// shutting down after sending, and checks both arrive byte-exact and the counts. Returns
/// the path the forwarder took.
async fn exchange(t: Tunnel, up: &[u8], down: &[u8]) -> Result<Path> {
    let Tunnel {
        mut client,
        mut server,
        forwarder,
    } = t;
    let (cr, cw) = client.split();
    let (sr, sw) = server.split();
    let (sent_up, sent_down, got_down, got_up) = tokio::join!(
        send_all(cw, up),
        send_all(sw, down),
        receive_all(cr),
        receive_all(sr),
    );
    sent_up.context("client sending")?;
    sent_down.context("server sending")?;
    let got_up = got_up.context("server receiving")?;
    let got_down = got_down.context("client receiving")?;
    ensure!(
        got_up == (up.len() as u64, digest(up)),
        "upstream bytes differ"
    );
    ensure!(
        got_down == (down.len() as u64, digest(down)),
        "downstream bytes differ"
    );
    let (path, result) = forwarder.await?;
    let stats = result.context("forwarder")?;
    ensure!(
        stats
            == ForwardStats {
                a_to_b: up.len() as u64,
                b_to_a: down.len() as u64,
            },
        "counts {stats:?} for {} up, {} down",
        up.len(),
        down.len()
    );
    Ok(path)
}

#[tokio::test]
async fn random_megabytes_both_ways_at_once() -> Result<()> {
    within(async {
        let up = random_bytes(1, 6 * 1024 * 1024 + 123);
        let down = random_bytes(2, 5 * 1024 * 1024 + 7);
        let path = exchange(tunnel(SpliceOptions::default()).await?, &up, &down).await?;
        ensure!(path == Path::Splice, "took {path:?}, expected splice");
        Ok(())
    })
    .await
}

#[tokio::test]
async fn small_pipes_still_byte_exact() -> Result<()> {
    within(async {
        let options = SpliceOptions {
            pipe_size: Some(4096),
            ..SpliceOptions::default()
        };
        let up = random_bytes(3, 3 * 1024 * 1024 + 5);
        let down = random_bytes(4, 2 * 1024 * 1024 + 999);
        let path = exchange(tunnel(options).await?, &up, &down).await?;
        ensure!(path == Path::Splice, "took {path:?}, expected splice");
        Ok(())
    })
    .await
}

#[tokio::test]
async fn forced_fallback_gives_the_same_result_and_says_copy() -> Result<()> {
    within(async {
        let options = SpliceOptions {
            force_copy: true,
            ..SpliceOptions::default()
        };
        let up = random_bytes(5, 3 * 1024 * 1024 + 1);
        let down = random_bytes(6, 4 * 1024 * 1024 + 3);
        let path = exchange(tunnel(options).await?, &up, &down).await?;
        ensure!(
            path == Path::Copy,
            "took {path:?}, expected the copy fallback"
        );
        Ok(())
    })
    .await
}

/// One side shuts down writing first; the other still sends back a reply that arrives in
/// full, then closes; the forwarder ends cleanly with both counts.
async fn half_close(client_closes_first: bool) -> Result<()> {
    let Tunnel {
        mut client,
        mut server,
        forwarder,
    } = tunnel(SpliceOptions::default()).await?;
    let (first, second) = if client_closes_first {
        (&mut client, &mut server)
    } else {
        (&mut server, &mut client)
    };
    let request = random_bytes(7, 100_000);
    let reply = random_bytes(8, 300_000);
    first.write_all(&request).await?;
    first.shutdown().await?;
    let mut got = Vec::new();
    second.read_to_end(&mut got).await?;
    ensure!(got == request, "request differs after half-close");
    // `first` can no longer write, but must still receive.
    second.write_all(&reply).await?;
    second.shutdown().await?;
    let mut got = Vec::new();
    first.read_to_end(&mut got).await?;
    ensure!(got == reply, "reply after half-close differs");
    let (path, result) = forwarder.await?;
    ensure!(path == Path::Splice, "took {path:?}");
    let stats = result.context("forwarder")?;
    let (up, down) = if client_closes_first {
        (request.len(), reply.len())
    } else {
        (reply.len(), request.len())
    };
    ensure!(
        stats
            == ForwardStats {
                a_to_b: up as u64,
                b_to_a: down as u64
            },
        "counts {stats:?}"
    );
    Ok(())
}

#[tokio::test]
async fn half_close_from_the_client_side() -> Result<()> {
    within(half_close(true)).await
}

#[tokio::test]
async fn half_close_from_the_server_side() -> Result<()> {
    within(half_close(false)).await
}

#[tokio::test]
async fn two_hundred_connections_at_once() -> Result<()> {
    within(async {
        let mut set = JoinSet::new();
        for i in 0..200u64 {
            set.spawn(async move {
                let up = random_bytes(1000 + i, 64 * 1024);
                let down = random_bytes(5000 + i, 64 * 1024);
                exchange(tunnel(SpliceOptions::default()).await?, &up, &down).await
            });
        }
        let mut spliced = 0;
        while let Some(joined) = set.join_next().await {
            // Under a tight pipe or fd limit some may fall back to copy: still byte-exact.
            if joined?? == Path::Splice {
                spliced += 1;
            }
        }
        ensure!(spliced > 0, "no connection took the splice path");
        Ok(())
    })
    .await
}

#[tokio::test]
async fn one_byte_ping_pong_does_not_stall() -> Result<()> {
    within(async {
        let Tunnel {
            mut client,
            mut server,
            forwarder,
        } = tunnel(SpliceOptions::default()).await?;
        let echo = tokio::spawn(async move {
            let mut byte = [0u8; 1];
            loop {
                if server.read(&mut byte).await? == 0 {
                    server.shutdown().await?;
                    return io::Result::Ok(());
                }
                server.write_all(&byte).await?;
            }
        });
        for i in 0..1000u32 {
            let sent = [(i % 251) as u8];
            client.write_all(&sent).await?;
            let mut got = [0u8; 1];
            client.read_exact(&mut got).await?;
            ensure!(got == sent, "round trip {i}: sent {sent:?}, got {got:?}");
        }
        client.shutdown().await?;
        ensure!(client.read(&mut [0u8; 1]).await? == 0, "expected EOF");
        echo.await??;
        let (path, result) = forwarder.await?;
        ensure!(path == Path::Splice, "took {path:?}");
        let stats = result.context("forwarder")?;
        ensure!(
            stats
                == ForwardStats {
                    a_to_b: 1000,
                    b_to_a: 1000
                },
            "counts {stats:?}"
        );
        Ok(())
    })
    .await
}

#[tokio::test]
async fn cancellation_returns_the_bytes_moved_so_far() -> Result<()> {
    within(async {
        let cancel = CancellationToken::new();
        let Tunnel {
            mut client,
            mut server,
            forwarder,
        } = tunnel_with(Vec::new(), cancel.clone(), SpliceOptions::default()).await?;
        let up = random_bytes(9, 200_000);
        let down = random_bytes(10, 30_000);
        client.write_all(&up).await?;
        let mut got = vec![0u8; up.len()];
        server.read_exact(&mut got).await?;
        ensure!(got == up, "upstream bytes differ");
        server.write_all(&down).await?;
        let mut got = vec![0u8; down.len()];
        client.read_exact(&mut got).await?;
        ensure!(got == down, "downstream bytes differ");
        cancel.cancel();
        let (path, result) = forwarder.await?;
        ensure!(path == Path::Splice, "took {path:?}");
        let Err(error) = result else {
            bail!("forwarder ended cleanly although cancelled");
        };
        ensure!(
            error.source.kind() == io::ErrorKind::Interrupted,
            "error kind {:?}",
            error.source.kind()
        );
        ensure!(
            error.stats
                == ForwardStats {
                    a_to_b: up.len() as u64,
                    b_to_a: down.len() as u64
                },
            "counts {:?}",
            error.stats
        );
        // Both sockets of the forwarder are closed: the peers see EOF.
        ensure!(client.read(&mut [0u8; 1]).await? == 0, "client still open");
        ensure!(server.read(&mut [0u8; 1]).await? == 0, "server still open");
        Ok(())
    })
    .await
}

#[tokio::test]
async fn prefix_is_delivered_first_and_counted() -> Result<()> {
    within(async {
        let prefix = b"already read past the attach frame".to_vec();
        let t = tunnel_with(
            prefix.clone(),
            CancellationToken::new(),
            SpliceOptions::default(),
        )
        .await?;
        let Tunnel {
            mut client,
            mut server,
            forwarder,
        } = t;
        let down = random_bytes(11, 70_000);
        server.write_all(&down).await?;
        server.shutdown().await?;
        client.shutdown().await?;
        let mut got = Vec::new();
        client.read_to_end(&mut got).await?;
        ensure!(got[..prefix.len()] == prefix[..], "prefix not first");
        ensure!(
            got[prefix.len()..] == down[..],
            "bytes after the prefix differ"
        );
        let (_, result) = forwarder.await?;
        let stats = result.context("forwarder")?;
        ensure!(
            stats.b_to_a == (prefix.len() + down.len()) as u64 && stats.a_to_b == 0,
            "counts {stats:?}"
        );
        Ok(())
    })
    .await
}

#[tokio::test]
async fn default_entry_point_splices() -> Result<()> {
    within(async {
        let (mut client, mut a) = tcp_pair().await?;
        let (mut b, mut server) = tcp_pair().await?;
        let forwarder =
            tokio::spawn(
                async move { splice_forward(&mut a, &mut b, &CancellationToken::new()).await },
            );
        client.write_all(b"hello").await?;
        client.shutdown().await?;
        let mut got = Vec::new();
        server.read_to_end(&mut got).await?;
        ensure!(got == b"hello", "got {got:?}");
        server.shutdown().await?;
        ensure!(client.read(&mut [0u8; 1]).await? == 0, "expected EOF");
        let (path, result) = forwarder.await?;
        ensure!(path == Path::Splice, "took {path:?}");
        ensure!(result.context("forwarder")?.a_to_b == 5, "a_to_b");
        Ok(())
    })
    .await
}

#[tokio::test]
async fn reset_ends_with_an_error_and_the_counts() -> Result<()> {
    within(async {
        let Tunnel {
            mut client,
            mut server,
            forwarder,
        } = tunnel(SpliceOptions::default()).await?;
        let up = random_bytes(12, 10_000);
        client.write_all(&up).await?;
        let mut got = vec![0u8; up.len()];
        server.read_exact(&mut got).await?;
        ensure!(got == up, "upstream bytes differ");
        // The server vanishes with a reset, not a FIN.
        server.set_zero_linger()?;
        drop(server);
        let (path, result) = forwarder.await?;
        ensure!(path == Path::Splice, "took {path:?}");
        let Err(error) = result else {
            bail!("forwarder ended cleanly after a reset");
        };
        ensure!(
            error.stats
                == ForwardStats {
                    a_to_b: up.len() as u64,
                    b_to_a: 0
                },
            "counts {:?} ({})",
            error.stats,
            error.source
        );
        drop(client);
        Ok(())
    })
    .await
}
