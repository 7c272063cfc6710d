//! Public session ports: accept visitors, pair each with a warm data connection (or ask the
//! agent for one), forward.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use porthole_protocol::forward::{forward_until, ForwardError, ForwardStats};
use porthole_protocol::splice::{splice_forward_with, Path as SplicePath, SpliceOptions};
use porthole_protocol::{Message, Secret, Service};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tracing::Instrument;

use crate::edge::visitor::guards::VisitorRefusal;
use crate::edge::visitor::rfb;
use crate::edge::visitor::scanner::read_ssh_banner;
use crate::limits::ACCEPT_ERROR_BACKOFF;
use crate::ops::audit::AuditEvent;
use crate::ops::refusals::RefusalKind;
use crate::session::lifecycle::LifetimePolicy;
use crate::session::runtime::{DataConn, DataStream, Session, VisitorGuard};
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

/// One visitor's identity, for logs and the audit log.
struct Visit<'a> {
    relay: &'a Relay,
    session: &'a Session,
    service: Service,
    port: u16,
    peer: SocketAddr,
}

impl Visit<'_> {
    /// Counts a refusal; writes it to the logs when it is the first of its kind lately
    /// (repeats go into [`crate::ops::refusals`]' summaries).
    fn refuse(&self, reason: VisitorRefusal) {
        self.relay
            .metrics
            .refusals
            .with_label_values(&[reason.as_str()])
            .inc();
        let source_ip = self.peer.ip().to_canonical();
        let kind = RefusalKind::Visitor {
            session_id: self.session.id.clone(),
            service: self.service,
            port: self.port,
            source: Some(crate::edge::source::source_key(source_ip)),
            reason,
        };
        if !self.relay.refusals.note(kind) {
            return;
        }
        tracing::info!(peer = %self.peer, ?reason, "visitor refused");
        self.relay.audit.record(AuditEvent::VisitorRefused {
            session_id: self.session.id.clone(),
            service: self.service,
            port: self.port,
            source_ip: Some(source_ip),
            reason,
            count: 1,
            summary_secs: None,
        });
    }
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
    let (link, counted) = match session.admit_visitor(peer.ip(), per_source) {
        Ok(admitted) => admitted,
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

/// A visitor and the data connection it was paired with.
struct Paired {
    /// The visitor's connection.
    stream: TcpStream,
    /// The agent's data connection for it.
    data: DataConn,
    /// Its connection id.
    conn_id: u64,
    /// Counts it in the session while it lives.
    counted: VisitorGuard,
}

/// Forwards a paired visitor until either side ends or the link is cancelled.
async fn forward_visitor(
    visit: &Visit<'_>,
    cancel: &tokio_util::sync::CancellationToken,
    paired: Paired,
    early: &[u8],
) {
    let Paired {
        mut stream,
        mut data,
        conn_id,
        counted,
    } = paired;
    if visit.service == Service::Vnc {
        let deadline = visit.relay.config.open_timeout;
        if let Err(e) = open_vnc_server(&mut data, early, deadline).await {
            tracing::warn!(peer = %visit.peer, conn_id, error = %e, "VNC visitor closed");
            return visit.refuse(VisitorRefusal::AgentFailed);
        }
    }
    let started = Instant::now();
    let source_ip = visit.peer.ip().to_canonical();
    let (session_id, service, port, peer) = (
        visit.session.id.clone(),
        visit.service,
        visit.port,
        visit.peer,
    );
    tracing::info!(%peer, conn_id, "visitor connected");
    let metrics = &visit.relay.metrics;
    let label = [service.as_str()];
    metrics.visitors_total.with_label_values(&label).inc();
    let active = metrics.visitors_active.with_label_values(&label);
    active.inc();
    if visit.session.mark_first_visitor() {
        let created = visit.session.lock().life.created_at;
        let waited = std::time::SystemTime::now()
            .duration_since(created)
            .unwrap_or_default();
        metrics.time_to_first_visitor.observe(waited.as_secs_f64());
    }
    visit.relay.audit.record(AuditEvent::VisitorConnected {
        session_id: session_id.clone(),
        service,
        port,
        source_ip,
    });
    let forward = forward_data(&mut stream, data, early, cancel, &visit.relay.metrics);
    let held = hold_when_logged_in(visit, conn_id, &counted);
    let result = {
        tokio::pin!(forward);
        tokio::select! {
            result = &mut forward => result,
            () = held => forward.await,
        }
    };
    visit.session.forget_authenticated(conn_id);
    drop(counted);
    let mut stats = match result {
        Ok(stats) => stats,
        Err(e) if e.source.kind() == std::io::ErrorKind::Interrupted => {
            tracing::info!(%peer, conn_id, "visitor cut: session revoked or agent link lost");
            e.stats
        }
        Err(e) => {
            tracing::info!(%peer, conn_id, error = %e, "visitor connection ended with an error");
            e.stats
        }
    };
    stats.a_to_b += early.len() as u64;
    active.dec();
    metrics
        .bytes
        .with_label_values(&[service.as_str(), "in"])
        .inc_by(stats.a_to_b);
    metrics
        .bytes
        .with_label_values(&[service.as_str(), "out"])
        .inc_by(stats.b_to_a);
    let duration_secs = started.elapsed().as_secs_f64();
    tracing::info!(%peer, conn_id, bytes_in = stats.a_to_b, bytes_out = stats.b_to_a, duration_secs, "visitor closed");
    visit.relay.audit.record(AuditEvent::VisitorClosed {
        session_id,
        service,
        port,
        source_ip,
        bytes_in: stats.a_to_b,
        bytes_out: stats.b_to_a,
        duration_secs,
    });
}

/// Consumes the VNC server's version line from a fresh data connection (the viewer already
/// got the relay's, see [`crate::edge::visitor::rfb`]).
async fn open_vnc_server(
    data: &mut DataConn,
    viewer_reply: &[u8],
    deadline: std::time::Duration,
) -> Result<(), rfb::ServerVersionError> {
    let prefix = &mut data.prefix;
    match &mut data.stream {
        DataStream::Tls(s) => {
            rfb::consume_server_version(s.as_mut(), prefix, viewer_reply, deadline).await
        }
        DataStream::Tcp(s) => rfb::consume_server_version(s, prefix, viewer_reply, deadline).await,
    }
}

/// Resolves once the visitor holds an `extend_while_connected` session open: when it has
/// been connected `extend_min_visitor_age`, or the agent reported it logged in. Never
/// resolves for other sessions.
async fn hold_when_logged_in(visit: &Visit<'_>, conn_id: u64, counted: &VisitorGuard) {
    let policy = visit.session.lock().life.policy;
    if policy != LifetimePolicy::ExtendWhileConnected {
        return std::future::pending().await;
    }
    let reported = visit.session.await_authenticated(conn_id);
    let age = visit.relay.config.extend_min_visitor_age;
    tokio::select! {
        () = tokio::time::sleep(age) => {}
        Ok(()) = reported => tracing::debug!(conn_id, "the agent reports the visitor logged in"),
    }
    counted.hold();
}

/// Forwards a visitor over its data connection, by data plane: the bytes the scanner filter
/// read go first, then both directions until either side ends or `cancel` fires.
async fn forward_data(
    visitor: &mut TcpStream,
    data: DataConn,
    early: &[u8],
    cancel: &tokio_util::sync::CancellationToken,
    metrics: &crate::ops::metrics::Metrics,
) -> Result<ForwardStats, ForwardError> {
    let unsent = |source| ForwardError {
        stats: ForwardStats::default(),
        source,
    };
    match data.stream {
        DataStream::Tls(mut agent) => {
            agent.write_all(early).await.map_err(unsent)?;
            forward_until(visitor, &mut agent, &data.prefix, cancel).await
        }
        DataStream::Tcp(mut agent) => {
            agent.write_all(early).await.map_err(unsent)?;
            let options = SpliceOptions::default();
            let (path, result) =
                splice_forward_with(visitor, &mut agent, &data.prefix, cancel, options).await;
            if path == SplicePath::Copy {
                metrics.splice_fallbacks.inc();
            }
            result
        }
    }
}
