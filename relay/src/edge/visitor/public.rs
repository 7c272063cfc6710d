//! Public session ports: accept visitors, pair each with a warm data connection (or ask the
//! agent for one), forward.

use std::net::SocketAddr;
use std::sync::Arc;

use porthole_protocol::{Message, Secret, Service};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tracing::Instrument;

use crate::edge::visitor::forward::{forward_visitor, Paired, Visit};
use crate::edge::visitor::guards::VisitorRefusal;
use crate::edge::visitor::scanner::read_ssh_banner;
use crate::edge::visitor::{remote, rfb};
use crate::limits::ACCEPT_ERROR_BACKOFF;
use crate::session::runtime::{DataConn, Route, Session};
use crate::session::warm_pool::Assignment;
use crate::shared::Relay;

/// How long handing a visitor to parked data connections may take in all before the visitor
/// falls back to a freshly dialed one (longer than a parked connection may take to send
/// `assign`: [`crate::edge::agent::park::ASSIGN_SEND_TIMEOUT`]).
const ASSIGN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

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
                () = relay.stopping.cancelled() => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        let task = visitor(relay.clone(), session.clone(), service, port, stream, peer);
                        relay.visitor_tasks.spawn(task.in_current_span());
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

/// Serves one visitor connection: guards, `open` to the agent, wait for its data
/// connection, forward.
async fn visitor(
    relay: Arc<Relay>,
    session: Arc<Session>,
    service: Service,
    port: u16,
    mut stream: TcpStream,
    peer: SocketAddr,
) {
    let _ = stream.set_nodelay(true);
    let visit = Visit {
        relay: &relay,
        session: &session,
        service,
        port,
        peer,
    };
    if let Err(reason) = session.guards.admit(peer.ip()) {
        return visit.refuse(reason);
    }
    // Refuse at once when nobody is there to serve (no need to wait for a banner).
    if !session.lock().life.accepts_visitors() {
        return visit.refuse(VisitorRefusal::AgentNotConnected);
    }
    let early = {
        // Until it completes its protocol's opening, a visitor holds a bounded slot
        // (relay-wide and per source) and counts toward none of the session's caps.
        let global = relay.pending_visitors.clone().try_acquire_owned();
        let per_ip = relay.pending_visitors_per_ip.try_acquire(peer.ip());
        let (Ok(_global), Some(_per_ip)) = (global, per_ip) else {
            return visit.refuse(VisitorRefusal::TooManyPending);
        };
        let deadline = relay.config.visitor_handshake_timeout;
        let opened = match service {
            Service::Ssh => read_ssh_banner(&mut stream, deadline).await,
            Service::Vnc => rfb::read_viewer_version(&mut stream, deadline).await,
        };
        match opened {
            Ok(bytes) => bytes,
            Err(reason) => return visit.refuse(reason),
        }
    };
    let per_source = relay.config.max_visitors_per_source;
    let cluster = relay.cluster.as_deref();
    let (link, counted) = match session.admit_visitor(peer.ip(), per_source, cluster) {
        Ok((Route::Here(link), counted)) => (link, counted),
        Ok((Route::Owner(owner), counted)) => {
            return remote::serve(&visit, &owner, counted, stream, &early).await;
        }
        Err(reason) => return visit.refuse(reason),
    };
    if let Some((conn_id, data)) = warm_data_connection(&session, link.id, service).await {
        relay.metrics.pairings.with_label_values(&["warm"]).inc();
        counted.announce();
        let paired = Paired {
            stream,
            data,
            conn_id,
            counted,
        };
        return forward_visitor(&visit, &link.cancel, paired, &early).await;
    }
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
        return visit.refuse(VisitorRefusal::AgentBusy);
    }
    counted.announce();
    let data = tokio::select! {
        got = tokio::time::timeout(relay.config.open_timeout, rx) => match got {
            Ok(Ok(data)) => data,
            Ok(Err(_)) => return visit.refuse(VisitorRefusal::AgentFailed),
            Err(_) => {
                session.cancel_open(conn_id);
                return visit.refuse(VisitorRefusal::AgentFailed);
            }
        },
        () = link.cancel.cancelled() => return,
    };
    relay.metrics.pairings.with_label_values(&["cold"]).inc();
    let paired = Paired {
        stream,
        data,
        conn_id,
        counted,
    };
    forward_visitor(&visit, &link.cancel, paired, &early).await;
}

/// A parked data connection of the agent's link `link_id`, assigned to this visitor, if one
/// is ready within [`ASSIGN_TIMEOUT`] (after that the visitor takes the cold path).
async fn warm_data_connection(
    session: &Session,
    link_id: u64,
    service: Service,
) -> Option<(u64, DataConn)> {
    let deadline = tokio::time::Instant::now() + ASSIGN_TIMEOUT;
    while let Some(parked) = session.take_parked(link_id) {
        let conn_id = session.next_id();
        let (reply, rx) = oneshot::channel();
        let assignment = Assignment {
            conn_id,
            service,
            reply,
        };
        if parked.send(assignment).is_err() {
            continue;
        }
        // The parked task only writes one small frame before answering.
        match tokio::time::timeout_at(deadline, rx).await {
            Ok(Ok(data)) => return Some((conn_id, data)),
            Ok(Err(_)) => continue,
            Err(_) => return None,
        }
    }
    None
}
