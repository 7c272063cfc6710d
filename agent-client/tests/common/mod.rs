//! Shared harness for the end-to-end tests: an in-process relay ([`relay`]), the real agent
//! binary ([`agent`]), a TCP proxy that can cut the agent's link ([`proxy`]), a TCP echo
//! service ([`echo`]), and real OpenSSH / TigerVNC peers ([`peers`]).

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod agent;
pub mod echo;
pub mod peers;
pub mod proxy;
pub mod relay;
pub mod relay_process;

use std::time::{Duration, Instant};

/// Polls `check` until it returns `Some`, or fails after `timeout` with `what`.
pub fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> Option<T>,
) -> anyhow::Result<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = check() {
            return Ok(v);
        }
        if start.elapsed() > timeout {
            anyhow::bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Whether a TCP connection to 127.0.0.1:`port` is refused (nothing listens).
pub fn port_refuses(port: u16) -> bool {
    matches!(
        std::net::TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_secs(2)),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused
    )
}
