//! A TCP echo service on loopback (threads; lives until the process ends).
//!
//! The relay lets a visitor through an SSH port only after an SSH client's identification
//! line, so test clients send [`SSH_HELLO`] first (as `ssh` does) and the echo service
//! swallows it instead of echoing it: everything after it is echoed as usual.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _};

/// Starts an echo server; returns its port.
pub fn start() -> anyhow::Result<u16> {
    start_counting().map(|(port, _)| port)
}

/// Connections an echo server accepted.
#[derive(Debug, Clone, Default)]
pub struct Accepted(Arc<AtomicUsize>);

impl Accepted {
    /// How many so far.
    pub fn get(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}

/// Starts an echo server that counts the connections it accepts; returns its port and
/// the counter (to prove a refused visitor never reached the service).
pub fn start_counting() -> anyhow::Result<(u16, Accepted)> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    let accepted = Accepted::default();
    let counter = accepted.0.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().map_while(Result::ok) {
            counter.fetch_add(1, Ordering::SeqCst);
            std::thread::spawn(move || serve(stream));
        }
    });
    Ok((port, accepted))
}

/// The identification line test clients send first on SSH ports.
pub const SSH_HELLO: &[u8] = b"SSH-2.0-porthole-test\r\n";

/// Echoes one connection, minus a leading SSH identification line.
fn serve(mut s: TcpStream) {
    let mut buf = [0u8; 16 * 1024];
    let mut seen = Vec::new();
    let mut hello_done = false;
    while let Ok(n) = s.read(&mut buf) {
        if n == 0 {
            break;
        }
        let mut data = &buf[..n];
        if !hello_done {
            seen.extend_from_slice(data);
            let maybe_hello = seen.iter().zip(SSH_HELLO).all(|(a, b)| a == b);
            if !maybe_hello {
                hello_done = true;
                data = &seen[..];
            } else if seen.len() >= SSH_HELLO.len() {
                hello_done = true;
                data = &seen[SSH_HELLO.len()..];
            } else {
                continue;
            }
            if s.write_all(data).is_err() {
                break;
            }
            continue;
        }
        if s.write_all(data).is_err() {
            break;
        }
    }
}

/// Connects to 127.0.0.1:`port`, sends [`SSH_HELLO`] then `msg`, and returns what comes
/// back (same length as `msg`).
pub fn roundtrip(port: u16, msg: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(SSH_HELLO)?;
    s.write_all(msg)?;
    let mut got = vec![0u8; msg.len()];
    s.read_exact(&mut got)?;
    Ok(got)
}

/// Sends `msg` on an open connection and checks the same bytes come back.
pub fn echo_on(s: &mut TcpStream, msg: &[u8]) -> anyhow::Result<()> {
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(msg).context("writing to the echo connection")?;
    let mut got = vec![0u8; msg.len()];
    s.read_exact(&mut got)
        .context("reading the echo back (the connection did not echo)")?;
    if got != msg {
        bail!("echo answered {got:?} to {msg:?}");
    }
    Ok(())
}

/// Checks that the peer closes `s` without sending a single byte: a probe is written (it
/// may be refused), then the read must end (EOF or reset) within 10 s and yield no data.
pub fn closed_without_data(s: &mut TcpStream) -> anyhow::Result<()> {
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let _ = s.write_all(b"probe\n");
    let mut buf = [0u8; 256];
    match s.read(&mut buf) {
        Ok(0) => Ok(()),
        Ok(n) => bail!(
            "the connection should be closed without data, but {n} bytes came back: {:?}",
            String::from_utf8_lossy(&buf[..n])
        ),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::ConnectionAborted
            ) =>
        {
            Ok(())
        }
        Err(e) => bail!("the connection should be closed at once, but reading gave: {e}"),
    }
}

/// Checks that the peer cut `s` (EOF or reset) within `timeout`; data that still arrives
/// before the cut is ignored.
pub fn wait_cut(s: &mut TcpStream, timeout: Duration) -> anyhow::Result<()> {
    s.set_read_timeout(Some(timeout))?;
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(_) => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::ConnectionAborted
                ) =>
            {
                return Ok(())
            }
            Err(e) => bail!("the connection should have been cut within {timeout:?}: {e}"),
        }
    }
}
