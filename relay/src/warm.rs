//! Warm data connections: the agent keeps a few authenticated, idle data connections parked
//! on the relay (`park`), so a visitor is paired at once (`assign`) instead of waiting for
//! the agent to dial and complete a handshake.
//!
//! [`WarmPool`] is one session's queue of them; [`run`] serves one parked connection.

use std::collections::VecDeque;
use std::sync::{Mutex, MutexGuard};

use futures_util::{SinkExt, StreamExt};
use porthole_protocol::codec::MessageCodec;
use porthole_protocol::{ErrorCode, Message, Secret, Service};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::oneshot;
use tokio_util::codec::Framed;

use crate::agent_endpoint::refuse;
use crate::session::{DataConn, DataStream};
use crate::shared::Relay;
use crate::untrusted::Untrusted;

/// Warm data connections one session may hold (agents keep at most 8; this leaves room for
/// connections of a link that just ended, and bounds a misbehaving agent).
pub const MAX_PARKED: usize = 16;
/// How long sending `assign` on a parked connection may take (the visitor waits
/// `public::ASSIGN_TIMEOUT` in all, then takes the cold path).
pub const ASSIGN_SEND_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

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

/// Serves one parked data connection: it waits until a visitor is assigned (then sends
/// `assign` and hands the connection over), the agent closes it, or its link ends. The agent
/// retires a parked connection by sending any frame on it (it still serves an `assign`
/// that crossed): the relay then forgets it and closes it.
pub async fn run<S>(
    relay: &Relay,
    peer: std::net::IpAddr,
    mut framed: Framed<S, MessageCodec>,
    session_id: &str,
    secret: &Secret,
    into_stream: impl FnOnce(S) -> DataStream,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let session = relay.sessions.get(session_id);
    let parked = match &session {
        Some(session) => session.park(secret),
        None => Err(ParkRefusal::BadSecret),
    };
    let (session, (park_id, rx, link)) = match (session, parked) {
        (Some(session), Ok(parked)) => (session, parked),
        (_, Err(why)) => {
            let (code, msg) = match why {
                ParkRefusal::BadSecret => (
                    ErrorCode::BadToken,
                    format!(
                        "park refused: session `{}` has no link with that park secret",
                        Untrusted(session_id)
                    ),
                ),
                ParkRefusal::Full => (
                    ErrorCode::UnexpectedMessage,
                    format!(
                        "park refused: session `{}` already holds {MAX_PARKED} warm connections",
                        Untrusted(session_id)
                    ),
                ),
            };
            relay.metrics.handshake_failed(code.as_str());
            refuse(relay, peer, &mut framed, code, msg).await;
            return;
        }
        (None, Ok(_)) => return,
    };
    relay.metrics.warm_parked.inc();
    let assigned = tokio::select! {
        got = rx => got.ok(),
        _ = framed.next() => None,
        () = link.cancel.cancelled() => None,
    };
    session.warm.unpark(park_id);
    relay.metrics.warm_parked.dec();
    let Some(assignment) = assigned else {
        tracing::debug!(session_id, "warm data connection closed");
        return;
    };
    let assign = Message::Assign {
        conn_id: assignment.conn_id,
        service: assignment.service,
    };
    match tokio::time::timeout(ASSIGN_SEND_TIMEOUT, framed.send(assign)).await {
        Ok(Ok(())) => {}
        _ => {
            // The visitor falls back to a cold data connection.
            tracing::debug!(session_id, "cannot send assign on a warm data connection");
            return;
        }
    }
    let parts = framed.into_parts();
    let _ = assignment.reply.send(DataConn {
        stream: into_stream(parts.io),
        prefix: parts.read_buf,
    });
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
