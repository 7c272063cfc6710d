//! The target server every tunnel forwards to (it stands in for sshd or a VNC server).
//!
//! Every client first sends [`SSH_IDENT`], as an SSH client does (Porthole's relay holds SSH
//! visitors until that line arrives, to keep port scanners off build machines), then one
//! byte that picks the mode:
//! - [`MODE_ECHO`]: echoes every byte, the mode byte included (ping-pong, connect latency,
//!   idle connections);
//! - [`MODE_SINK`]: reads and discards until EOF, then answers with the byte count (u64, big
//!   endian) and closes (upload throughput, measured where the bytes arrive);
//! - [`MODE_SOURCE`] followed by a u64 big-endian duration in milliseconds: writes
//!   [`CHUNK`]-byte blocks for that long, then closes (download throughput).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Runtime;

/// The identification line every client sends first (RFC 4253 §4.2).
pub const SSH_IDENT: &[u8] = b"SSH-2.0-porthole-bench\r\n";
/// Longest identification line the server reads.
const IDENT_MAX: usize = 255;

/// The bytes a client sends to open `mode`: the identification line and the mode byte,
/// in one write.
pub fn opening(mode: u8) -> Vec<u8> {
    let mut v = SSH_IDENT.to_vec();
    v.push(mode);
    v
}

/// First byte: echo mode.
pub const MODE_ECHO: u8 = b'E';
/// First byte: sink mode.
pub const MODE_SINK: u8 = b'U';
/// First byte: source mode.
pub const MODE_SOURCE: u8 = b'D';
/// Size of every bulk read and write, on both sides.
pub const CHUNK: usize = 256 * 1024;

/// A running target server; stops when dropped.
#[derive(Debug)]
pub struct Target {
    /// Where it listens (loopback).
    pub addr: SocketAddr,
    /// Its runtime; dropping it stops every task.
    _rt: Runtime,
}

impl Target {
    /// Binds 127.0.0.1:0 and serves on a two-thread runtime of its own.
    pub fn start() -> anyhow::Result<Self> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("bench-target")
            .enable_all()
            .build()
            .context("starting the target server's runtime")?;
        let listener = rt
            .block_on(TcpListener::bind("127.0.0.1:0"))
            .context("binding the target server")?;
        let addr = listener.local_addr()?;
        rt.spawn(accept_loop(listener));
        Ok(Self { addr, _rt: rt })
    }
}

async fn accept_loop(listener: TcpListener) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(async move {
                    let _ = serve(stream).await;
                });
            }
            // Out of descriptors and the like: pause instead of spinning.
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

async fn serve(mut stream: TcpStream) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    skip_ident(&mut stream).await?;
    let mode = stream.read_u8().await?;
    match mode {
        MODE_ECHO => echo(stream).await,
        MODE_SINK => sink(stream).await,
        MODE_SOURCE => {
            let millis = stream.read_u64().await?;
            source(stream, Duration::from_millis(millis)).await
        }
        _ => Ok(()),
    }
}

/// Reads the identification line up to its `\n`, byte by byte (it is short and read once).
async fn skip_ident(stream: &mut TcpStream) -> std::io::Result<()> {
    for _ in 0..IDENT_MAX {
        if stream.read_u8().await? == b'\n' {
            return Ok(());
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        "identification line too long",
    ))
}

async fn echo(mut stream: TcpStream) -> std::io::Result<()> {
    stream.write_all(&[MODE_ECHO]).await?;
    // Small buffer: echo connections are many and idle; RSS is measured per connection.
    let mut buf = vec![0u8; 4096];
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return stream.shutdown().await;
        }
        stream.write_all(&buf[..n]).await?;
    }
}

async fn sink(mut stream: TcpStream) -> std::io::Result<()> {
    let mut buf = vec![0u8; CHUNK];
    let mut total = 0u64;
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        total += n as u64;
    }
    stream.write_u64(total).await?;
    stream.shutdown().await
}

async fn source(mut stream: TcpStream, duration: Duration) -> std::io::Result<()> {
    let buf = vec![0x5au8; CHUNK];
    let start = Instant::now();
    while start.elapsed() < duration {
        stream.write_all(&buf).await?;
    }
    stream.shutdown().await
}
