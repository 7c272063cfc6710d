//! [`WarmPool`]: one session's queue of warm data connections parked by its agent, oldest
//! first, bounded, per link. Plain data shared by the session and the task serving each
//! parked connection ([`crate::edge::agent::park`]).

use std::collections::VecDeque;
use std::sync::{Mutex, MutexGuard};

use porthole_protocol::Service;
use tokio::sync::oneshot;

use crate::session::data_conn::DataConn;

/// Warm data connections one session may hold (agents keep at most 8; this leaves room for
/// connections of a link that just ended, and bounds a misbehaving agent).
pub const MAX_PARKED: usize = 16;
/// A visitor handed to a parked data connection.
#[derive(Debug)]
pub struct Assignment {
    /// The visitor's connection id.
    pub conn_id: u64,
    /// Its service.
    pub service: Service,
    /// Where the parked connection goes once `assign` is sent on it.
    pub reply: oneshot::Sender<DataConn>,
}

/// Why a `park` was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParkRefusal {
    /// No agent link, or the secret is not the current link's.
    BadSecret,
    /// The session holds [`MAX_PARKED`] already.
    Full,
}

#[derive(Debug)]
struct Parked {
    id: u64,
    link_id: u64,
    tx: oneshot::Sender<Assignment>,
}

/// One session's parked data connections, oldest first.
#[derive(Debug, Default)]
pub struct WarmPool {
    queue: Mutex<VecDeque<Parked>>,
}

impl WarmPool {
    fn queue(&self) -> MutexGuard<'_, VecDeque<Parked>> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds connection `id` of link `link_id`; its visitor arrives on the receiver.
    pub fn park(
        &self,
        id: u64,
        link_id: u64,
    ) -> Result<(u64, oneshot::Receiver<Assignment>), ParkRefusal> {
        let mut queue = self.queue();
        if queue.len() >= MAX_PARKED {
            return Err(ParkRefusal::Full);
        }
        let (tx, rx) = oneshot::channel();
        queue.push_back(Parked { id, link_id, tx });
        Ok((id, rx))
    }

    /// Forgets connection `id` (it closed).
    pub fn unpark(&self, id: u64) {
        self.queue().retain(|p| p.id != id);
    }

    /// Takes the oldest live connection of link `link_id`.
    pub fn take(&self, link_id: u64) -> Option<oneshot::Sender<Assignment>> {
        let mut queue = self.queue();
        while let Some(p) = queue.pop_front() {
            if p.link_id == link_id && !p.tx.is_closed() {
                return Some(p.tx);
            }
        }
        None
    }

    /// Forgets every connection of link `link_id` (the link ended).
    pub fn drop_link(&self, link_id: u64) {
        self.queue().retain(|p| p.link_id != link_id);
    }

    /// How many connections wait.
    pub fn len(&self) -> usize {
        self.queue().len()
    }

    /// Whether none waits.
    pub fn is_empty(&self) -> bool {
        self.queue().is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_is_bounded_fifo_and_per_link() {
        let pool = WarmPool::default();
        let mut receivers = Vec::new();
        for id in 0..MAX_PARKED as u64 {
            let link = if id == 0 { 7 } else { 8 };
            receivers.push(pool.park(id, link).map(|(_, rx)| rx));
        }
        assert!(receivers.iter().all(Result::is_ok));
        assert_eq!(pool.park(99, 8).err(), Some(ParkRefusal::Full));
        // Link 7's connection is skipped (and dropped) when link 8 takes one.
        assert!(pool.take(8).is_some());
        assert_eq!(pool.len(), MAX_PARKED - 2);
        pool.unpark(2);
        assert_eq!(pool.len(), MAX_PARKED - 3);
        pool.drop_link(8);
        assert!(pool.is_empty());
        assert!(pool.take(8).is_none());
    }

    #[test]
    fn closed_connections_are_skipped() {
        let pool = WarmPool::default();
        let first = pool.park(1, 5).map(|(_, rx)| rx);
        let _second = pool.park(2, 5).map(|(_, rx)| rx);
        drop(first);
        let tx = pool.take(5);
        assert!(tx.is_some_and(|tx| !tx.is_closed()));
    }
}
