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
use tracing::Instrument;

use crate::agent_endpoint::refuse;
use crate::attach;
use crate::limits::{ACCEPT_ERROR_BACKOFF, MAX_PENDING_HANDSHAKES_PER_IP};
use crate::preauth::{PendingHandshakes, PerIpLimit};
use crate::session::DataStream;
use crate::shared::Relay;

/// Accepts data connections until shutdown.
pub async fn serve(relay: Arc<Relay>, listener: TcpListener) {
    let pending = PendingHandshakes::new(relay.config.max_pending_handshakes);
    let per_ip = PerIpLimit::new(MAX_PENDING_HANDSHAKES_PER_IP);
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "data port accept failed; backing off");
                    tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                    continue;
                }
            },
            () = relay.stopping.cancelled() => break,
        };
        let Some(ip_permit) = per_ip.try_acquire(peer.ip()) else {
            relay.metrics.handshake_failed("per_ip_limit");
            continue;
        };
        let (slot, evicted) = pending.admit();
        if evicted {
            relay.metrics.handshake_failed("evicted");
        }
        let span = tracing::info_span!("data_conn", %peer);
        let owner = relay.clone();
        let task = async move {
            let _held = ip_permit;
            tokio::select! {
                () = handle(&owner, tcp, peer) => {}
                () = slot.evicted.cancelled() => {}
            }
        };
        relay.tasks.spawn(task.instrument(span));
    }
}

async fn handle(relay: &Arc<Relay>, tcp: TcpStream, peer: SocketAddr) {
    let _ = tcp.set_nodelay(true);
    let mut framed = Framed::new(tcp, MessageCodec);
    let first = tokio::select! {
        first = tokio::time::timeout(relay.config.handshake_timeout, framed.next()) => first,
        () = relay.cancel.cancelled() => return,
    };
    match first {
        Ok(Some(Ok(Message::Attach {
            session_id,
            conn_id,
            secret,
        }))) => {
            attach::run(
                relay,
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
            let msg = format!("the data port takes only `attach`, got `{}`", other.kind());
            refuse(&mut framed, ErrorCode::UnexpectedMessage, msg).await;
        }
        Ok(Some(Err(e))) => {
            relay.metrics.handshake_failed(ErrorCode::BadFrame.as_str());
            refuse(
                &mut framed,
                ErrorCode::BadFrame,
                format!("first frame refused: {e}"),
            )
            .await;
        }
        Ok(None) => {}
        Err(_) => {
            relay.metrics.handshake_failed("timeout");
            tracing::info!(%peer, "data connection closed: no attach within the handshake deadline");
        }
    }
}
