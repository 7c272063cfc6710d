//! Bulk transfers through a tunnel with [`CHUNK`]-byte writes and reads: upload (visitor →
//! target, counted where the bytes arrive) and download (target → visitor).

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;

use crate::target::{opening, CHUNK, MODE_SINK, MODE_SOURCE};

/// How long the sink may take to report its count after the upload ends.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(60);
/// Connect timeout of bulk connections.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Bytes moved and the time it took.
#[derive(Clone, Copy, Debug)]
pub struct Transfer {
    /// Bytes that reached the receiver.
    pub bytes: u64,
    /// From connect to the receiver having them all.
    pub elapsed: Duration,
}

fn connect(addr: SocketAddr) -> anyhow::Result<TcpStream> {
    let s = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)
        .with_context(|| format!("connecting to {addr}"))?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// Sends for `duration`, half-closes, and waits for the sink's count of bytes received.
pub fn upload(addr: SocketAddr, duration: Duration) -> anyhow::Result<Transfer> {
    let start = Instant::now();
    let mut s = connect(addr)?;
    s.write_all(&opening(MODE_SINK))?;
    let buf = vec![0xa5u8; CHUNK];
    while start.elapsed() < duration {
        s.write_all(&buf).context("upload write")?;
    }
    s.shutdown(Shutdown::Write)?;
    s.set_read_timeout(Some(DRAIN_TIMEOUT))?;
    let mut count = [0u8; 8];
    s.read_exact(&mut count).context(
        "the sink's byte count did not come back after the upload (is half-close forwarded?)",
    )?;
    Ok(Transfer {
        bytes: u64::from_be_bytes(count),
        elapsed: start.elapsed(),
    })
}

/// Asks the source for `duration` of data and reads until it closes.
pub fn download(addr: SocketAddr, duration: Duration) -> anyhow::Result<Transfer> {
    let start = Instant::now();
    let never = AtomicBool::new(false);
    let bytes = download_until(addr, duration, &never)?;
    Ok(Transfer {
        bytes,
        elapsed: start.elapsed(),
    })
}

/// Reads a download of `duration` until the source closes or `stop` is set; returns the
/// bytes read.
pub fn download_until(
    addr: SocketAddr,
    duration: Duration,
    stop: &AtomicBool,
) -> anyhow::Result<u64> {
    let mut s = connect(addr)?;
    let millis = u64::try_from(duration.as_millis()).unwrap_or(u64::MAX);
    let mut request = opening(MODE_SOURCE);
    request.extend_from_slice(&millis.to_be_bytes());
    s.write_all(&request)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut buf = vec![0u8; CHUNK];
    let mut total = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let n = s.read(&mut buf).context("download read")?;
        if n == 0 {
            break;
        }
        total += n as u64;
    }
    Ok(total)
}
