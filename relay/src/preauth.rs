//! Limits on what unauthenticated peers can hold: pending agent handshakes relay-wide
//! ([`PendingHandshakes`], which evicts the oldest instead of refusing the newest) and per
//! source ([`PerIpLimit`]), so silent connections or stalled TLS handshakes cannot crowd out
//! real agents. [`accept_loop`] applies both to every listener that takes unauthenticated
//! connections (the agent endpoint and the `tcp` data port).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use std::future::Future;
use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::limits::{ACCEPT_ERROR_BACKOFF, MAX_PENDING_HANDSHAKES_PER_IP};
use crate::shared::Relay;

/// The address limits count against: IPv4 as is, IPv6 by /64 (one host usually holds a
/// whole /64, so per-address limits would not slow it down).
pub fn source_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let prefix = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(prefix.into())
        }
        v4 => v4,
    }
}

/// Pending handshakes per source IP.
#[derive(Debug)]
pub struct PerIpLimit {
    /// Handshakes in progress by address.
    counts: Mutex<HashMap<IpAddr, usize>>,
    /// Most allowed per address.
    max: usize,
}

/// One pending handshake of one address; released when dropped.
#[derive(Debug)]
pub struct PerIpPermit {
    /// The limit it counts against.
    owner: Arc<PerIpLimit>,
    /// The address.
    ip: IpAddr,
}

impl PerIpLimit {
    /// At most `max` pending handshakes per address.
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Self {
            counts: Mutex::new(HashMap::new()),
            max,
        })
    }

    /// A permit for `ip`, or None when it already has `max` handshakes pending.
    pub fn try_acquire(self: &Arc<Self>, ip: IpAddr) -> Option<PerIpPermit> {
        let ip = source_key(ip);
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let count = counts.entry(ip).or_insert(0);
        if *count >= self.max {
            return None;
        }
        *count += 1;
        Some(PerIpPermit {
            owner: self.clone(),
            ip,
        })
    }
}

impl Drop for PerIpPermit {
    fn drop(&mut self) {
        let mut counts = self.owner.counts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(count) = counts.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_sources_count_by_slash_64() {
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap_or(IpAddr::from([0u8; 16]));
        let b: IpAddr = "2001:db8:1:2:ffff::9"
            .parse()
            .unwrap_or(IpAddr::from([0u8; 16]));
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap_or(IpAddr::from([0u8; 16]));
        assert_eq!(source_key(a), source_key(b));
        assert_ne!(source_key(a), source_key(c));
        let v4: IpAddr = [192, 0, 2, 7].into();
        assert_eq!(source_key(v4), v4);
    }

    #[test]
    fn permits_are_counted_per_address_and_released() {
        let limit = PerIpLimit::new(2);
        let a: IpAddr = [10, 0, 0, 1].into();
        let b: IpAddr = [10, 0, 0, 2].into();
        let first = limit.try_acquire(a);
        let second = limit.try_acquire(a);
        assert!(first.is_some() && second.is_some());
        assert!(
            limit.try_acquire(a).is_none(),
            "third from the same address"
        );
        assert!(
            limit.try_acquire(b).is_some(),
            "another address is not affected"
        );
        drop(first);
        assert!(limit.try_acquire(a).is_some(), "released on drop");
        drop(second);
    }
}

/// Agent connections in the handshake phase, relay-wide. Accepting never waits on it: when
/// it is full, the oldest pending handshake is dropped for the new one. A real agent's
/// handshake takes milliseconds, so the ones dropped are almost always stalled peers, and a
/// flood of silent connections cannot shut real agents out.
#[derive(Debug)]
pub struct PendingHandshakes {
    /// Pending handshakes, oldest first.
    queue: Mutex<std::collections::VecDeque<(u64, CancellationToken)>>,
    /// Most allowed at once.
    max: usize,
    /// Next slot id.
    next: std::sync::atomic::AtomicU64,
}

/// One pending handshake; its token is cancelled if it is evicted. Leaves the queue when
/// dropped.
#[derive(Debug)]
pub struct HandshakeSlot {
    /// The queue it is in.
    owner: Arc<PendingHandshakes>,
    /// Its id there.
    id: u64,
    /// Cancelled when a newer handshake evicts it.
    pub evicted: CancellationToken,
}

impl PendingHandshakes {
    /// At most `max` pending handshakes.
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Self {
            queue: Mutex::new(Default::default()),
            max: max.max(1),
            next: Default::default(),
        })
    }

    /// A slot for a new handshake, evicting the oldest when full; also returns whether one
    /// was evicted.
    pub fn admit(self: &Arc<Self>) -> (HandshakeSlot, bool) {
        let id = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let evicted = CancellationToken::new();
        let mut queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        let mut dropped = false;
        while queue.len() >= self.max {
            if let Some((_, oldest)) = queue.pop_front() {
                oldest.cancel();
                dropped = true;
            }
        }
        queue.push_back((id, evicted.clone()));
        (
            HandshakeSlot {
                owner: self.clone(),
                id,
                evicted,
            },
            dropped,
        )
    }

    /// Handshakes pending now.
    pub fn len(&self) -> usize {
        self.queue.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Whether none is pending.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        let mut queue = self.owner.queue.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = queue.iter().position(|(id, _)| *id == self.id) {
            queue.remove(i);
        }
    }
}

#[cfg(test)]
mod eviction_tests {
    use super::*;

    #[test]
    fn the_oldest_pending_handshake_makes_room() {
        let pending = PendingHandshakes::new(2);
        let (a, _) = pending.admit();
        let (b, _) = pending.admit();
        let (c, evicted) = pending.admit();
        assert!(evicted && a.evicted.is_cancelled(), "the oldest goes");
        assert!(!b.evicted.is_cancelled() && !c.evicted.is_cancelled());
        assert_eq!(pending.len(), 2);
        drop(b);
        assert_eq!(pending.len(), 1, "a finished handshake leaves the queue");
        drop((a, c));
        assert!(pending.is_empty());
    }
}

/// What an unauthenticated connection holds until its first frame: a relay-wide slot
/// (which a newer handshake may evict) and a per-source permit. Handlers drop it once the
/// peer has identified itself, so established links hold neither.
#[derive(Debug)]
pub struct PendingGuard {
    /// The relay-wide slot.
    slot: HandshakeSlot,
    /// The per-source permit.
    _per_ip: PerIpPermit,
}

impl PendingGuard {
    /// Resolves when a newer handshake took this one's slot.
    pub async fn evicted(&self) {
        self.slot.evicted.cancelled().await
    }
}

/// Accepts unauthenticated connections on `listener` until shutdown starts, admits each
/// under the pending-handshake limits (relay-wide with eviction, per source), and runs
/// `handle` for it in its own task. Accepting never waits on a limit: a full queue of
/// strangers' handshakes must not keep real agents in the kernel's backlog.
pub async fn accept_loop<F, Fut>(
    relay: Arc<Relay>,
    listener: TcpListener,
    kind: &'static str,
    mut handle: F,
) where
    F: FnMut(TcpStream, SocketAddr, PendingGuard) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let pending = PendingHandshakes::new(relay.config.max_pending_handshakes);
    let per_ip = PerIpLimit::new(MAX_PENDING_HANDSHAKES_PER_IP);
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, kind, "accept failed; backing off");
                    tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                    continue;
                }
            },
            () = relay.stopping.cancelled() => break,
        };
        let Some(per_ip_permit) = per_ip.try_acquire(peer.ip()) else {
            relay.metrics.handshake_failed("per_ip_limit");
            tracing::debug!(%peer, kind, "connection refused: too many pending handshakes from this address");
            continue;
        };
        let (slot, evicted) = pending.admit();
        if evicted {
            relay.metrics.handshake_failed("evicted");
        }
        let _ = tcp.set_nodelay(true);
        let guard = PendingGuard {
            slot,
            _per_ip: per_ip_permit,
        };
        let span = tracing::info_span!("conn", kind, %peer);
        relay.tasks.spawn(handle(tcp, peer, guard).instrument(span));
    }
}
