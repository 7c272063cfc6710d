//! Prometheus metrics. One registry per relay (not the process-global one), so several
//! relays in one process (tests) never share counters. Labels take only bounded values:
//! states, services, directions, reasons; never a session id or an address.
//!
//! Gauges that mirror state (sessions by state, agents connected, ports) are refreshed from
//! the relay's maps at scrape time, so they cannot drift from the truth.

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use porthole_protocol::{ErrorCode, Service};

use crate::edge::visitor::guards::VisitorRefusal;
use crate::edge::visitor::ports::PortPool;
use crate::session::lifecycle::{RevokeReason, SessionState};
use crate::session::registry::SessionRegistry;

/// Every metric the relay exports.
#[derive(Debug)]
pub struct Metrics {
    /// Where they are registered.
    registry: Registry,
    /// `porthole_sessions{state}`.
    pub sessions: IntGaugeVec,
    /// `porthole_agents_connected`.
    pub agents_connected: IntGauge,
    /// `porthole_public_ports{status="in_use|free|cooling"}`.
    pub ports: IntGaugeVec,
    /// `porthole_visitor_connections_active{service}`.
    pub visitors_active: IntGaugeVec,
    /// `porthole_visitor_connections_total{service}`.
    pub visitors_total: IntCounterVec,
    /// `porthole_visitor_refusals_total{reason}`.
    pub refusals: IntCounterVec,
    /// `porthole_forwarded_bytes_total{service, direction="in|out"}`, counted as connections close.
    pub bytes: IntCounterVec,
    /// `porthole_agent_handshake_failures_total{reason}`.
    pub handshake_failures: IntCounterVec,
    /// `porthole_agent_registrations_total{kind="join|resume"}`.
    pub registrations: IntCounterVec,
    /// `porthole_sessions_created_total`.
    pub sessions_created: IntCounter,
    /// `porthole_sessions_revoked_total{reason}`.
    pub sessions_revoked: IntCounterVec,
    /// `porthole_instructions_requests_total{outcome}`.
    pub instructions: IntCounterVec,
    /// `porthole_session_duration_seconds`, observed at revocation.
    pub session_duration: Histogram,
    /// `porthole_time_to_first_visitor_seconds`, from creation to the first forwarded visitor.
    pub time_to_first_visitor: Histogram,
    /// `porthole_forwarding_mode{mode}`: 1 for the data plane in use.
    pub forwarding_mode: IntGaugeVec,
    /// `porthole_splice_fallbacks_total`: `tcp` data connections forwarded by copying because
    /// no pipe could be had.
    pub splice_fallbacks: IntCounter,
    /// `porthole_spliced_bytes_total`: bytes of `tcp` data connections moved by splice(2),
    /// both directions (the bytes written before forwarding starts are not counted).
    pub spliced_bytes: IntCounter,
    /// `porthole_warm_connections`: agents' data connections parked, waiting for a visitor.
    pub warm_parked: IntGauge,
    /// `porthole_visitor_pairings_total{how="warm|cold"}`: visitors paired with a parked data
    /// connection, or with one the agent dialed on request; `remote`: through another
    /// node of a cluster.
    pub pairings: IntCounterVec,
    /// `porthole_cluster_peer_requests_total{request="open|access",direction="in|out"}`:
    /// requests on the node-to-node link (cluster mode).
    pub peer_requests: IntCounterVec,
    /// `porthole_cluster_nodes`: live nodes of this node's cluster (0 on a single node).
    pub cluster_nodes: IntGauge,
    /// `porthole_cluster_etcd_up`: 1 while etcd answers this node (cluster mode only).
    pub cluster_etcd_up: IntGauge,
    /// `porthole_cluster_sessions_owned`: sessions whose agent link this node holds.
    pub cluster_sessions_owned: IntGauge,
}

fn gauge(r: &Registry, name: &str, help: &str) -> prometheus::Result<IntGauge> {
    let m = IntGauge::new(name, help)?;
    r.register(Box::new(m.clone()))?;
    Ok(m)
}

fn gauge_vec(
    r: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> prometheus::Result<IntGaugeVec> {
    let m = IntGaugeVec::new(Opts::new(name, help), labels)?;
    r.register(Box::new(m.clone()))?;
    Ok(m)
}

fn counter_vec(
    r: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> prometheus::Result<IntCounterVec> {
    let m = IntCounterVec::new(Opts::new(name, help), labels)?;
    r.register(Box::new(m.clone()))?;
    Ok(m)
}

fn histogram(
    r: &Registry,
    name: &str,
    help: &str,
    buckets: Vec<f64>,
) -> prometheus::Result<Histogram> {
    let m = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))?;
    r.register(Box::new(m.clone()))?;
    Ok(m)
}

impl Metrics {
    /// Registers every metric in a fresh registry.
    pub fn new() -> prometheus::Result<Self> {
        let r = Registry::new();
        let agents_connected = IntGauge::new(
            "porthole_agents_connected",
            "Agents with a live control link",
        )?;
        r.register(Box::new(agents_connected.clone()))?;
        let sessions_created =
            IntCounter::new("porthole_sessions_created_total", "Sessions created")?;
        let splice_fallbacks = IntCounter::new(
            "porthole_splice_fallbacks_total",
            "tcp data connections copied because no pipe could be had",
        )?;
        r.register(Box::new(splice_fallbacks.clone()))?;
        let spliced_bytes = IntCounter::new(
            "porthole_spliced_bytes_total",
            "Bytes of tcp data connections moved by splice(2), both directions",
        )?;
        r.register(Box::new(spliced_bytes.clone()))?;
        let warm_parked = IntGauge::new(
            "porthole_warm_connections",
            "Agents' warm data connections waiting for a visitor",
        )?;
        r.register(Box::new(warm_parked.clone()))?;
        r.register(Box::new(sessions_created.clone()))?;
        let minutes = vec![
            60.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 10800.0, 21600.0, 86400.0,
        ];
        let m = Self {
            sessions: gauge_vec(&r, "porthole_sessions", "Sessions by state", &["state"])?,
            agents_connected,
            ports: gauge_vec(
                &r,
                "porthole_public_ports",
                "Public ports by status",
                &["status"],
            )?,
            visitors_active: gauge_vec(
                &r,
                "porthole_visitor_connections_active",
                "Open visitor connections",
                &["service"],
            )?,
            visitors_total: counter_vec(
                &r,
                "porthole_visitor_connections_total",
                "Visitor connections forwarded",
                &["service"],
            )?,
            refusals: counter_vec(
                &r,
                "porthole_visitor_refusals_total",
                "Visitor connections refused",
                &["reason"],
            )?,
            bytes: counter_vec(
                &r,
                "porthole_forwarded_bytes_total",
                "Bytes forwarded (counted at close)",
                &["service", "direction"],
            )?,
            handshake_failures: counter_vec(
                &r,
                "porthole_agent_handshake_failures_total",
                "Agent connections refused before registration",
                &["reason"],
            )?,
            registrations: counter_vec(
                &r,
                "porthole_agent_registrations_total",
                "Agent registrations",
                &["kind"],
            )?,
            sessions_created,
            splice_fallbacks,
            spliced_bytes,
            warm_parked,
            pairings: counter_vec(
                &r,
                "porthole_visitor_pairings_total",
                "Visitors paired with a warm (parked) or cold (dialed on request) data connection, or through another cluster node (remote)",
                &["how"],
            )?,
            peer_requests: counter_vec(
                &r,
                "porthole_cluster_peer_requests_total",
                "Requests on the node-to-node link of a cluster",
                &["request", "direction"],
            )?,
            cluster_nodes: gauge(
                &r,
                "porthole_cluster_nodes",
                "Live nodes of this node's cluster (0 on a single node)",
            )?,
            cluster_etcd_up: gauge(
                &r,
                "porthole_cluster_etcd_up",
                "1 while etcd answers this cluster node",
            )?,
            cluster_sessions_owned: gauge(
                &r,
                "porthole_cluster_sessions_owned",
                "Sessions whose agent link this cluster node holds",
            )?,
            sessions_revoked: counter_vec(
                &r,
                "porthole_sessions_revoked_total",
                "Sessions revoked",
                &["reason"],
            )?,
            instructions: counter_vec(
                &r,
                "porthole_instructions_requests_total",
                "Instructions requests",
                &["outcome"],
            )?,
            session_duration: histogram(
                &r,
                "porthole_session_duration_seconds",
                "Session lifetime at revocation",
                minutes,
            )?,
            time_to_first_visitor: histogram(
                &r,
                "porthole_time_to_first_visitor_seconds",
                "Creation to first forwarded visitor",
                vec![5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0],
            )?,
            forwarding_mode: gauge_vec(
                &r,
                "porthole_forwarding_mode",
                "Data plane in use",
                &["mode"],
            )?,
            registry: r,
        };

        m.zero_known_series();
        Ok(m)
    }

    /// Creates every known label combination at 0, so series exist from the start and
    /// `rate()`/`increase()` see the first event.
    fn zero_known_series(&self) {
        for service in Service::ALL.map(Service::as_str) {
            self.visitors_total.with_label_values(&[service]);
            self.visitors_active.with_label_values(&[service]);
            for direction in ["in", "out"] {
                self.bytes.with_label_values(&[service, direction]);
            }
        }
        for reason in VisitorRefusal::ALL {
            self.refusals.with_label_values(&[reason.as_str()]);
        }
        for reason in RevokeReason::ALL {
            self.sessions_revoked.with_label_values(&[reason.as_str()]);
        }
        for kind in ["join", "resume"] {
            self.registrations.with_label_values(&[kind]);
        }
        for how in ["warm", "cold", "remote"] {
            self.pairings.with_label_values(&[how]);
        }
        for request in ["open", "access"] {
            for direction in ["in", "out"] {
                self.peer_requests.with_label_values(&[request, direction]);
            }
        }
        let codes = [
            ErrorCode::VersionMismatch,
            ErrorCode::BadToken,
            ErrorCode::TokenUsed,
            ErrorCode::SessionRevoked,
            ErrorCode::SessionBusy,
            ErrorCode::ServiceMismatch,
            ErrorCode::BadFrame,
            ErrorCode::FrameTooLarge,
            ErrorCode::UnexpectedMessage,
            ErrorCode::BadAttach,
            ErrorCode::Internal,
        ];
        let reasons = ["tls", "timeout", "per_ip_limit", "evicted"]
            .into_iter()
            .chain(codes.map(ErrorCode::as_str));
        for reason in reasons {
            self.handshake_failures.with_label_values(&[reason]);
        }
        for outcome in [
            "served",
            "unauthorized",
            "forbidden",
            "not_found",
            "not_connected",
            "gone",
        ] {
            self.instructions.with_label_values(&[outcome]);
        }
    }

    /// Marks the data plane in use.
    pub fn set_data_plane(&self, plane: porthole_protocol::DataPlane) {
        for mode in [
            porthole_protocol::DataPlane::Tls,
            porthole_protocol::DataPlane::Tcp,
        ] {
            self.forwarding_mode
                .with_label_values(&[mode.as_str()])
                .set(i64::from(mode == plane));
        }
    }

    /// Counts an agent connection refused before registration.
    pub fn handshake_failed(&self, reason: &str) {
        self.handshake_failures.with_label_values(&[reason]).inc();
    }

    /// The text exposition, with state gauges refreshed from the sessions and the port pool.
    pub fn render(&self, sessions: &SessionRegistry, pool: &PortPool) -> String {
        self.refresh(sessions, pool);
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::error!(error = %e, "cannot encode metrics");
        }
        String::from_utf8_lossy(&out).into_owned()
    }

    fn refresh(&self, sessions: &SessionRegistry, pool: &PortPool) {
        let states = [
            SessionState::Pending,
            SessionState::Active,
            SessionState::Disconnected,
            SessionState::Finishing,
            SessionState::Revoked,
        ];
        let mut counts = [0i64; 5];
        let mut agents = 0;
        for session in sessions.list() {
            let inner = session.lock();
            let state = inner.life.state();
            if let Some(i) = states.iter().position(|s| *s == state) {
                counts[i] += 1;
            }
            agents += i64::from(inner.link.is_some());
        }
        for (state, count) in states.iter().zip(counts) {
            self.sessions
                .with_label_values(&[state.as_str()])
                .set(count);
        }
        self.agents_connected.set(agents);
        let pool = pool.counts();
        for (status, n) in [
            ("in_use", pool.in_use),
            ("free", pool.free),
            ("cooling", pool.cooling),
        ] {
            self.ports.with_label_values(&[status]).set(n as i64);
        }
    }
}
