//! Public session ports: accept visitors, ask the agent for a data connection, forward.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use porthole_protocol::forward::forward;
use porthole_protocol::{Message, Secret, Service};
use tokio::net::{TcpListener, TcpStream};
use tracing::Instrument;

use crate::limits::ACCEPT_ERROR_BACKOFF;
use crate::session::Session;
use crate::shared::Relay;

/// Accepts visitors on one public port until the session is revoked; dropping the listener
/// then closes the port.
pub async fn serve_port(
    relay: Arc<Relay>,
    session: Arc<Session>,
    service: Service,
    port: u16,
    listener: TcpListener,
) {
    let span = tracing::info_span!("public", session_id = %session.id, %service, port);
    async move {
        loop {
            tokio::select! {
                () = session.cancel.cancelled() => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        let task = visitor(relay.clone(), session.clone(), service, stream, peer);
                        relay.tasks.spawn(task.in_current_span());
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed; backing off");
                        tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                    }
                }
            }
        }
        tracing::debug!("public port closed");
    }
    .instrument(span)
    .await
}

/// Serves one visitor connection.
async fn visitor(
    relay: Arc<Relay>,
    session: Arc<Session>,
    service: Service,
    mut stream: TcpStream,
    peer: SocketAddr,
) {
    let _ = stream.set_nodelay(true);
    let link = {
        let inner = session.lock();
        inner
            .life
            .accepts_visitors()
            .then(|| inner.link.clone())
            .flatten()
    };
    let Some(link) = link else {
        tracing::info!(%peer, "visitor refused: the build machine is not connected");
        return;
    };
    let secret = Secret::generate("phc_");
    let (conn_id, rx) = session.register_open(&secret);
    if link
        .tx
        .try_send(Message::Open {
            conn_id,
            service,
            secret,
        })
        .is_err()
    {
        session.cancel_open(conn_id);
        tracing::warn!(%peer, "visitor refused: agent link is saturated or closing");
        return;
    }
    let data = tokio::select! {
        got = tokio::time::timeout(relay.config.open_timeout, rx) => match got {
            Ok(Ok(data)) => data,
            Ok(Err(_)) => {
                tracing::info!(%peer, conn_id, "visitor closed: the agent could not reach the service");
                return;
            }
            Err(_) => {
                session.cancel_open(conn_id);
                tracing::warn!(%peer, conn_id, "visitor closed: the agent did not attach in time");
                return;
            }
        },
        () = link.cancel.cancelled() => return,
    };
    let started = Instant::now();
    tracing::info!(%peer, conn_id, "visitor connected");
    let mut agent = data.stream;
    tokio::select! {
        result = forward(&mut stream, &mut agent, &data.prefix) => match result {
            Ok(stats) => tracing::info!(%peer, conn_id, bytes_in = stats.a_to_b, bytes_out = stats.b_to_a,
                secs = started.elapsed().as_secs_f64(), "visitor closed"),
            Err(e) => tracing::info!(%peer, conn_id, error = %e, secs = started.elapsed().as_secs_f64(),
                "visitor connection ended with an error"),
        },
        () = link.cancel.cancelled() => tracing::info!(%peer, conn_id, "visitor cut: session revoked or agent link lost"),
    }
}
