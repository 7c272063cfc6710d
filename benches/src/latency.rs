//! Latency through a tunnel: 64-byte ping-pong over one connection, connect → first echoed
//! byte over fresh connections, and ping-pong while bulk streams share the tunnel.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

use crate::bulk::download_until;
use crate::tunnel::echo_probe;

/// Size of each ping.
pub const PING_LEN: usize = 64;
/// Round trips done before recording starts (connection warm-up).
const WARMUP: usize = 200;
/// Most samples one series keeps.
const MAX_SAMPLES: usize = 2_000_000;
/// Timeout of one probe or round trip.
const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// Round trips of [`PING_LEN`] bytes over one connection for `duration`.
pub fn ping_pong(addr: SocketAddr, duration: Duration) -> anyhow::Result<Vec<Duration>> {
    let mut s = echo_probe(addr, IO_TIMEOUT).context("opening the ping-pong connection")?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    let ping = [0x42u8; PING_LEN];
    let mut pong = [0u8; PING_LEN];
    for _ in 0..WARMUP {
        s.write_all(&ping)?;
        s.read_exact(&mut pong)?;
    }
    let mut samples = Vec::with_capacity(1 << 16);
    let start = Instant::now();
    while start.elapsed() < duration && samples.len() < MAX_SAMPLES {
        let t = Instant::now();
        s.write_all(&ping)?;
        s.read_exact(&mut pong).context("ping-pong read")?;
        samples.push(t.elapsed());
    }
    if pong != ping {
        bail!("ping-pong echoed different bytes");
    }
    Ok(samples)
}

/// Fresh connections one after another for `duration` (at most `max`): each connects,
/// sends one byte, and waits for it to come back. Returns the samples and the wall time.
pub fn connect_first_byte(
    addr: SocketAddr,
    duration: Duration,
    max: usize,
) -> anyhow::Result<(Vec<Duration>, Duration)> {
    let mut samples = Vec::with_capacity(max.min(1 << 16));
    let start = Instant::now();
    while start.elapsed() < duration && samples.len() < max {
        let t = Instant::now();
        let conn = echo_probe(addr, IO_TIMEOUT)
            .with_context(|| format!("connection {} through {addr}", samples.len() + 1))?;
        samples.push(t.elapsed());
        drop(conn);
    }
    Ok((samples, start.elapsed()))
}

/// Ping-pong under load: what the user typing in SSH feels while `streams` downloads run.
#[derive(Debug)]
pub struct Loaded {
    /// Ping-pong round trips measured while the streams ran.
    pub pings: Vec<Duration>,
    /// Bytes the bulk streams moved meanwhile.
    pub bulk_bytes: u64,
    /// How long the streams ran.
    pub elapsed: Duration,
}

/// Runs `streams` downloads and, once they are flowing, ping-pong for `duration`.
pub fn ping_pong_loaded(
    addr: SocketAddr,
    duration: Duration,
    streams: usize,
) -> anyhow::Result<Loaded> {
    let stop = AtomicBool::new(false);
    let moved = AtomicU64::new(0);
    let source_time = duration + Duration::from_secs(30);
    std::thread::scope(|scope| {
        let start = Instant::now();
        let workers: Vec<_> = (0..streams)
            .map(|_| {
                scope.spawn(|| -> anyhow::Result<()> {
                    let n = download_until(addr, source_time, &stop)?;
                    moved.fetch_add(n, Ordering::Relaxed);
                    Ok(())
                })
            })
            .collect();
        // Let the streams fill the pipes before measuring.
        std::thread::sleep(Duration::from_millis(500));
        let pings = ping_pong(addr, duration);
        stop.store(true, Ordering::Relaxed);
        let elapsed = start.elapsed();
        for w in workers {
            match w.join() {
                Ok(r) => r.context("a bulk stream failed")?,
                Err(_) => bail!("a bulk stream thread panicked"),
            }
        }
        Ok(Loaded {
            pings: pings.context("ping-pong under load")?,
            bulk_bytes: moved.load(Ordering::Relaxed),
            elapsed,
        })
    })
}
