//! Limits on what unauthenticated peers can hold: pending agent handshakes relay-wide
//! ([`PendingHandshakes`], which evicts the oldest instead of refusing the newest) and per
//! source ([`crate::edge::source::PerIpLimit`]), so silent connections or stalled TLS handshakes cannot crowd out
//! real agents. [`accept_loop`] applies both to every listener that takes unauthenticated
//! connections (the agent endpoint and the `tcp` data port).

use std::sync::{Arc, Mutex};

use std::future::Future;
use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::edge::source::{PerIpLimit, PerIpPermit};
use crate::limits::{ACCEPT_ERROR_BACKOFF, MAX_PENDING_HANDSHAKES_PER_IP};
use crate::shared::Relay;

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
