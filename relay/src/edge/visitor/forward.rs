//! A visitor paired with its data connection: who it is ([`Visit`], for logs and the audit
//! log, and its refusals), and forwarding it until either side ends (splice on the `tcp`
//! data plane, the VNC server's opening, holding the session once logged in). Shared by
//! visitors served by this node's agent link ([`super::public`]) and those opened through
//! another node of a cluster ([`super::remote`]).

use std::net::SocketAddr;
use std::time::Instant;

use porthole_protocol::forward::{forward_until, ForwardError, ForwardStats};
use porthole_protocol::splice::{splice_forward_with, Path as SplicePath, SpliceOptions};
use porthole_protocol::Service;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::edge::visitor::guards::VisitorRefusal;
use crate::edge::visitor::rfb;
use crate::ops::audit::AuditEvent;
use crate::ops::refusals::RefusalKind;
use crate::session::lifecycle::LifetimePolicy;
use crate::session::runtime::{DataConn, DataStream, Session, VisitorGuard};
use crate::shared::Relay;

/// One visitor's identity, for logs and the audit log.
pub(crate) struct Visit<'a> {
    pub(crate) relay: &'a Relay,
    pub(crate) session: &'a Session,
    pub(crate) service: Service,
    pub(crate) port: u16,
    pub(crate) peer: SocketAddr,
}

impl Visit<'_> {
    /// Counts a refusal; writes it to the logs when it is the first of its kind lately
    /// (repeats go into [`crate::ops::refusals`]' summaries).
    pub(crate) fn refuse(&self, reason: VisitorRefusal) {
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

/// A visitor and the data connection it was paired with.
pub(crate) struct Paired {
    /// The visitor's connection.
    pub(crate) stream: TcpStream,
    /// The agent's data connection for it.
    pub(crate) data: DataConn,
    /// Its connection id.
    pub(crate) conn_id: u64,
    /// Counts it in the session while it lives.
    pub(crate) counted: VisitorGuard,
}

/// Forwards a paired visitor until either side ends or the link is cancelled.
pub(crate) async fn forward_visitor(
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
            match path {
                SplicePath::Copy => metrics.splice_fallbacks.inc(),
                SplicePath::Splice => {
                    let stats = match &result {
                        Ok(stats) => *stats,
                        Err(e) => e.stats,
                    };
                    // The agent's prefix is written to the visitor with write(2) first.
                    let moved =
                        (stats.a_to_b + stats.b_to_a).saturating_sub(data.prefix.len() as u64);
                    metrics.spliced_bytes.inc_by(moved);
                }
            }
            result
        }
    }
}
