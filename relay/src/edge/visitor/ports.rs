//! The public port pool: a random free port per service per session from the configured
//! range; ports that fail to bind are skipped; released ports cool down before reuse so a
//! user holding an old command never lands on another build's machine.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rand::seq::SliceRandom;
use tokio::net::{TcpListener, TcpSocket};

use crate::config::PortRange;
use crate::error::RelayError;
use crate::limits::PUBLIC_LISTEN_BACKLOG;

/// Hands out public ports, each with its bound listener.
#[derive(Debug)]
pub struct PortPool {
    /// The configured range.
    range: PortRange,
    /// Address the listeners bind to.
    bind_ip: IpAddr,
    /// How long a released port rests.
    cooldown: Duration,
    /// Ports taken and cooling.
    inner: Mutex<PoolInner>,
}

#[derive(Debug, Default)]
struct PoolInner {
    /// Ports held by live sessions.
    in_use: HashSet<u16>,
    /// Released ports and when they may be handed out again.
    cooling: HashMap<u16, Instant>,
}

/// Counts for errors and metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolCounts {
    /// Ports held by sessions.
    pub in_use: usize,
    /// Ports resting after revocation.
    pub cooling: usize,
    /// Ports that can be handed out.
    pub free: usize,
}

impl PortPool {
    /// A pool over `range`, binding on `bind_ip`.
    pub fn new(range: PortRange, bind_ip: IpAddr, cooldown: Duration) -> Self {
        Self {
            range,
            bind_ip,
            cooldown,
            inner: Mutex::new(PoolInner::default()),
        }
    }

    /// Binds `count` distinct ports, picked at random among free ones. Ports that fail to
    /// bind (another program holds them) are skipped. All or nothing.
    pub fn allocate(&self, count: usize) -> Result<Vec<(u16, TcpListener)>, RelayError> {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        inner.cooling.retain(|_, until| *until > now);
        let mut candidates: Vec<u16> = (self.range.lo..=self.range.hi)
            .filter(|p| !inner.in_use.contains(p) && !inner.cooling.contains_key(p))
            .collect();
        candidates.shuffle(&mut rand::thread_rng());
        let mut got = Vec::with_capacity(count);
        for port in candidates {
            if got.len() == count {
                break;
            }
            match self.bind(port) {
                Ok(listener) => got.push((port, listener)),
                Err(e) => tracing::debug!(port, error = %e, "public port not bindable, skipping"),
            }
        }
        if got.len() < count {
            return Err(RelayError::PoolExhausted {
                range: self.range.to_string(),
                in_use: inner.in_use.len(),
                cooling: inner.cooling.len(),
            });
        }
        inner.in_use.extend(got.iter().map(|(p, _)| *p));
        Ok(got)
    }

    /// Binds exactly these ports (a restarted relay taking back its sessions' ports). All
    /// or nothing; the error names the port that failed.
    pub fn claim(&self, ports: &[u16]) -> Result<Vec<(u16, TcpListener)>, (u16, std::io::Error)> {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let mut got = Vec::with_capacity(ports.len());
        for &port in ports {
            if inner.in_use.contains(&port) {
                let e =
                    std::io::Error::new(std::io::ErrorKind::AddrInUse, "held by another session");
                return Err((port, e));
            }
            got.push((port, self.bind(port).map_err(|e| (port, e))?));
        }
        inner.in_use.extend(ports.iter().copied());
        Ok(got)
    }

    /// Marks ports as cooling until `until` (revoked sessions restored after a restart).
    pub fn cool(&self, ports: &[u16], until: Instant) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        for port in ports {
            inner.cooling.insert(*port, until);
        }
    }

    /// Returns ports that were never handed to anyone (a failed create): no cooldown.
    pub fn release_now(&self, ports: &[u16]) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        for port in ports {
            inner.in_use.remove(port);
        }
    }

    /// Returns ports to the pool; they cool down before reuse.
    pub fn release(&self, ports: &[u16]) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let until = Instant::now() + self.cooldown;
        // Always cool, also ports this run never bound (a session revoked while being
        // restored): a user holding an old command must not land on another build.
        for port in ports {
            inner.in_use.remove(port);
            inner.cooling.insert(*port, until);
        }
    }

    /// Current counts.
    pub fn counts(&self) -> PoolCounts {
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let cooling = inner.cooling.values().filter(|until| **until > now).count();
        let in_use = inner.in_use.len();
        PoolCounts {
            in_use,
            cooling,
            free: self.range.len().saturating_sub(in_use + cooling),
        }
    }

    fn bind(&self, port: u16) -> std::io::Result<TcpListener> {
        let addr = SocketAddr::new(self.bind_ip, port);
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        // Lets a port be bound again after cooldown even while old connections sit in
        // TIME_WAIT; it does not allow two live listeners on one port.
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        socket.listen(PUBLIC_LISTEN_BACKLOG)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn pool(lo: u16, hi: u16, cooldown: Duration) -> PortPool {
        PortPool::new(
            PortRange { lo, hi },
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            cooldown,
        )
    }

    /// The first port of 20 consecutive ports that are free on loopback right now: other
    /// test binaries and relays on a busy machine hold ports too, and a test that asserts
    /// exhaustion must not meet one of theirs.
    fn range_base() -> u16 {
        let pid = std::process::id();
        for attempt in 0..2000u32 {
            let base =
                20000 + ((pid.wrapping_mul(7919).wrapping_add(attempt * 97)) % 2000) as u16 * 20;
            let held: Vec<_> = (base..base + 20)
                .map_while(|p| std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, p)).ok())
                .collect();
            if held.len() == 20 {
                return base;
            }
        }
        unreachable!("no 20 consecutive free ports on loopback between 20000 and 60000")
    }

    #[tokio::test]
    async fn allocates_distinct_ports_and_reports_exhaustion() {
        let base = range_base();
        let p = pool(base, base + 3, Duration::from_secs(60));
        let a = p.allocate(2).unwrap_or_else(|e| unreachable!("{e}"));
        let b = p.allocate(2).unwrap_or_else(|e| unreachable!("{e}"));
        let mut ports: Vec<u16> = a.iter().chain(b.iter()).map(|(p, _)| *p).collect();
        ports.sort_unstable();
        ports.dedup();
        assert_eq!(ports.len(), 4);
        let err = p
            .allocate(1)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("no free public port"), "{err}");
        // Released ports cool down: still exhausted.
        p.release(&ports[..1]);
        assert_eq!(
            p.counts(),
            PoolCounts {
                in_use: 3,
                cooling: 1,
                free: 0
            }
        );
        assert!(p.allocate(1).is_err());
    }

    #[tokio::test]
    async fn ports_held_by_others_are_skipped() {
        let base = range_base() + 10;
        let held = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, base));
        let p = pool(base, base + 1, Duration::ZERO);
        let got = p.allocate(1).unwrap_or_else(|e| unreachable!("{e}"));
        if held.is_ok() {
            assert_eq!(got[0].0, base + 1);
        }
    }

    #[tokio::test]
    async fn zero_cooldown_frees_at_once() {
        let base = range_base() + 15;
        let p = pool(base, base, Duration::ZERO);
        let (port, listener) = p
            .allocate(1)
            .unwrap_or_else(|e| unreachable!("{e}"))
            .remove(0);
        drop(listener);
        p.release(&[port]);
        assert!(p.allocate(1).is_ok());
    }
}
