//! Warm data connections: the agent keeps a few authenticated, idle data connections parked
//! on the relay (`park`), so a visitor is paired at once (`assign`) instead of waiting for
//! the agent to dial and complete a handshake.
//!
//! [`crate::session::warm_pool::WarmPool`] is one session's queue of them; [`run`] serves one parked
//! connection.

use futures_util::StreamExt;
use porthole_protocol::codec::send_within;
use porthole_protocol::codec::MessageCodec;
use porthole_protocol::{ErrorCode, Message, Secret};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::codec::Framed;

use crate::edge::agent::conn::refuse;
use crate::session::runtime::{DataConn, DataStream};
use crate::session::warm_pool::{ParkRefusal, MAX_PARKED};
use crate::shared::Relay;
use crate::untrusted::Untrusted;

/// How long sending `assign` on a parked connection may take (the visitor waits
/// `public::ASSIGN_TIMEOUT` in all, then takes the cold path).
pub const ASSIGN_SEND_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

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
    match send_within(&mut framed, assign, ASSIGN_SEND_TIMEOUT, "agent").await {
        Ok(()) => {}
        Err(_) => {
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
