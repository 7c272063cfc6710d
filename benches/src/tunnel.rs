//! A running candidate: where visitors connect and the processes that carry the bytes, plus
//! the helpers every candidate uses to start processes and wait for them to be ready.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

use crate::target::{opening, MODE_ECHO};

/// How long a candidate may take to become ready.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Pause between readiness polls.
const POLL: Duration = Duration::from_millis(50);

/// What part of the tunnel a process plays.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// The public side (Porthole relay, rathole server, bore server).
    Server,
    /// The side next to the target (Porthole agent, rathole client, `bore local`).
    Client,
}

impl Role {
    /// `server` or `client`.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Server => "server",
            Role::Client => "client",
        }
    }
}

/// One child process of a tunnel; killed when dropped.
#[derive(Debug)]
pub struct Proc {
    /// Its part in the tunnel.
    pub role: Role,
    /// The process.
    pub child: Child,
    /// Where its stdout and stderr go.
    pub log: PathBuf,
}

impl Proc {
    /// Starts `cmd` with stdout and stderr appended to `log`.
    pub fn spawn(role: Role, mut cmd: Command, log: &Path) -> anyhow::Result<Self> {
        let out = File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone()?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("starting {cmd:?}"))?;
        Ok(Self {
            role,
            child,
            log: log.to_owned(),
        })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits until the log holds every one of `needles`; fails early if the process exits.
    pub fn wait_log(&mut self, needles: &[&str]) -> anyhow::Result<String> {
        let start = Instant::now();
        loop {
            let text = std::fs::read_to_string(&self.log).unwrap_or_default();
            if needles.iter().all(|n| text.contains(n)) {
                return Ok(text);
            }
            if let Some(status) = self.child.try_wait()? {
                bail!("exited ({status}) before printing {needles:?}; log:\n{text}");
            }
            if start.elapsed() > READY_TIMEOUT {
                bail!("did not print {needles:?} within {READY_TIMEOUT:?}; log:\n{text}");
            }
            std::thread::sleep(POLL);
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls until something accepts TCP connections on `addr`; fails early if `proc` exits.
pub fn wait_listening(proc: &mut Proc, addr: SocketAddr) -> anyhow::Result<()> {
    let start = Instant::now();
    while TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_err() {
        if let Some(status) = proc.child.try_wait()? {
            let log = std::fs::read_to_string(&proc.log).unwrap_or_default();
            bail!("exited ({status}) before listening on {addr}; log:\n{log}");
        }
        if start.elapsed() > READY_TIMEOUT {
            bail!("nothing listens on {addr} after {READY_TIMEOUT:?}");
        }
        std::thread::sleep(POLL);
    }
    Ok(())
}

/// A candidate ready for visitors.
#[derive(Debug)]
pub struct Tunnel {
    /// Where visitors connect.
    pub visitor: SocketAddr,
    /// Processes of the tunnel (none for direct loopback).
    pub procs: Vec<Proc>,
}

impl Tunnel {
    /// Pids with roles, for CPU and RSS sampling.
    pub fn pids(&self) -> Vec<(Role, u32)> {
        self.procs.iter().map(|p| (p.role, p.pid())).collect()
    }

    /// Fails with the process's log when one of the tunnel's processes has exited.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        for p in &mut self.procs {
            if let Some(status) = p.child.try_wait()? {
                let log = std::fs::read_to_string(&p.log).unwrap_or_default();
                bail!("{} process exited ({status}); log:\n{log}", p.role.as_str());
            }
        }
        Ok(())
    }
}

/// A loopback port nothing listens on right now (bound, then released).
pub fn free_port() -> anyhow::Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(l.local_addr()?.port())
}

/// One echo round trip through `addr`: connect, send the identification line and the echo
/// mode byte, read the mode byte back.
pub fn echo_probe(addr: SocketAddr, timeout: Duration) -> anyhow::Result<TcpStream> {
    let mut s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(timeout))?;
    s.write_all(&opening(MODE_ECHO))?;
    let mut b = [0u8; 1];
    s.read_exact(&mut b)?;
    if b[0] != MODE_ECHO {
        bail!("echo answered {:#04x} instead of the mode byte", b[0]);
    }
    s.set_read_timeout(None)?;
    Ok(s)
}

/// Polls [`echo_probe`] until the tunnel carries bytes end to end.
pub fn wait_ready(tunnel: &mut Tunnel) -> anyhow::Result<()> {
    let start = Instant::now();
    loop {
        match echo_probe(tunnel.visitor, Duration::from_secs(2)) {
            Ok(_) => return Ok(()),
            Err(e) if start.elapsed() > READY_TIMEOUT => {
                return Err(e).context(format!(
                    "no echo through {} within {READY_TIMEOUT:?}",
                    tunnel.visitor
                ))
            }
            Err(_) => {
                tunnel.check_alive()?;
                std::thread::sleep(POLL);
            }
        }
    }
}
