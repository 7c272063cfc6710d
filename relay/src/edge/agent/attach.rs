//! Data connections: an `attach` frame hands the connection to the visitor waiting for it,
//! with any bytes already read past the frame.

use porthole_protocol::{ErrorCode, Secret};

use porthole_protocol::codec::MessageCodec;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::codec::Framed;

use crate::edge::agent::conn::refuse;
use crate::session::runtime::{DataConn, DataStream};
use crate::shared::Relay;
use crate::untrusted::Untrusted;
use std::net::IpAddr;

/// Pairs a data connection from `peer` with its waiting visitor, or refuses it. With
/// `from_link_only` (the plain-TCP data port, where the secret travels in clear text), the
/// connection must come from the address of the session's control link.
#[allow(clippy::too_many_arguments)]
pub async fn run<S>(
    relay: &Relay,
    peer: IpAddr,
    from_link_only: bool,
    mut framed: Framed<S, MessageCodec>,
    session_id: &str,
    conn_id: u64,
    secret: &Secret,
    into_stream: impl FnOnce(S) -> DataStream,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let waiting = relay.sessions.get(session_id).and_then(|s| {
        let from = from_link_only.then_some(peer);
        s.take_open(conn_id, secret, from)
    });
    let Some(tx) = waiting else {
        let msg = format!(
            "attach refused: session `{}` has no visitor {conn_id} waiting with that secret{}",
            Untrusted(session_id),
            if from_link_only {
                " from this address"
            } else {
                ""
            }
        );
        relay
            .metrics
            .handshake_failed(ErrorCode::BadAttach.as_str());
        refuse(relay, peer, &mut framed, ErrorCode::BadAttach, msg).await;
        return;
    };
    let parts = framed.into_parts();
    if tx
        .send(DataConn {
            stream: into_stream(parts.io),
            prefix: parts.read_buf,
        })
        .is_err()
    {
        tracing::debug!(
            session_id,
            conn_id,
            "visitor left before the data connection arrived"
        );
    }
}
