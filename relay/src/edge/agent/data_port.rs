//! The plain-TCP data port (data plane `tcp`): each connection must start with an `attach`
//! frame within the handshake deadline (its one-time 256-bit secret is the authentication);
//! then it becomes a visitor's data connection, forwarded with splice(2). Nothing else is
//! accepted here: no control connections, no TLS.

use std::net::SocketAddr;
use std::sync::Arc;

use futures_util::StreamExt;
use porthole_protocol::codec::MessageCodec;
use porthole_protocol::{ErrorCode, Message};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::codec::Framed;

use crate::edge::agent::attach;
use crate::edge::agent::conn::refuse;
use crate::edge::preauth::{accept_loop, PendingGuard};
use crate::session::runtime::DataStream;
use crate::shared::Relay;

/// Accepts data connections until shutdown.
pub async fn serve(relay: Arc<Relay>, listener: TcpListener) {
    let owner = relay.clone();
    accept_loop(relay, listener, "data", move |tcp, peer, guard| {
        handle(owner.clone(), tcp, peer, guard)
    })
    .await;
}

async fn handle(relay: Arc<Relay>, tcp: TcpStream, peer: SocketAddr, pending: PendingGuard) {
    let relay = &relay;
    let mut framed = Framed::new(tcp, MessageCodec);
    let first = tokio::select! {
        first = tokio::time::timeout(relay.config.handshake_timeout, framed.next()) => first,
        () = relay.cancel.cancelled() => return,
        () = pending.evicted() => return,
    };
    drop(pending);
    match first {
        Ok(Some(Ok(Message::Attach {
            session_id,
            conn_id,
            secret,
        }))) => {
            attach::run(
                relay,
                peer.ip(),
                true,
                framed,
                &session_id,
                conn_id,
                &secret,
                DataStream::Tcp,
            )
            .await;
        }
        Ok(Some(Ok(other))) => {
            relay
                .metrics
                .handshake_failed(ErrorCode::UnexpectedMessage.as_str());
            let msg = format!(
                "the data port takes only `attach`, got `{}` (warm data connections need the tls data plane)",
                other.kind()
            );
            refuse(
                relay,
                peer.ip(),
                &mut framed,
                ErrorCode::UnexpectedMessage,
                msg,
            )
            .await;
        }
        Ok(Some(Err(e))) => {
            relay.metrics.handshake_failed(ErrorCode::BadFrame.as_str());
            refuse(
                relay,
                peer.ip(),
                &mut framed,
                ErrorCode::BadFrame,
                format!("first frame refused: {e}"),
            )
            .await;
        }
        Ok(None) => {}
        Err(_) => {
            relay.metrics.handshake_failed("timeout");
            let detail = "data connection closed: no attach within the handshake deadline";
            relay.refusals.agent(peer.ip(), "timeout", detail);
        }
    }
}
