//! The state every relay task shares.

use porthole_protocol::Secret;
use std::path::PathBuf;
use std::sync::Arc;

use porthole_protocol::tls::{load_certs, load_key, CertResolver};

use crate::edge::source::PerIpLimit;
use crate::error::RelayError;
use crate::limits::{MAX_PENDING_VISITORS, MAX_PENDING_VISITORS_PER_IP};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::cluster::ClusterState;
use crate::config::RelayConfig;
use crate::edge::visitor::ports::PortPool;
use crate::ops::audit::AuditLog;
use crate::ops::metrics::Metrics;
use crate::ops::refusals::RefusalLog;
use crate::session::registry::SessionRegistry;
use crate::store::SessionStore;
use crate::user_token::UserTokens;

/// The agent endpoint's certificate and where it comes from.
#[derive(Debug)]
pub struct TlsFiles {
    /// What handshakes present.
    pub resolver: Arc<CertResolver>,
    /// PEM certificate chain.
    pub cert_path: PathBuf,
    /// PEM private key.
    pub key_path: PathBuf,
}

impl Relay {
    /// Reads the certificate and key files again and presents them to new agent
    /// connections (SIGHUP); existing connections stay up. Returns the new fingerprint.
    pub fn reload_tls(&self) -> Result<String, RelayError> {
        let chain = load_certs(&self.tls.cert_path)?;
        let key = load_key(&self.tls.key_path)?;
        self.tls.resolver.replace(chain, key)?;
        let fingerprint = self.tls.resolver.fingerprint();
        tracing::info!(cert = %self.tls.cert_path.display(), %fingerprint, "reloaded the TLS certificate");
        Ok(fingerprint)
    }
}

/// The relay: settings, sessions, ports, and the owner of every task.
#[derive(Debug)]
pub struct Relay {
    /// Settings.
    pub config: RelayConfig,
    /// Host name put in endpoints.
    pub public_host: String,
    /// Sessions by id and by join-token hash (revoked ones stay for the retention period).
    pub sessions: SessionRegistry,
    /// Public ports.
    pub pool: PortPool,
    /// The admin API token.
    pub admin_token: Secret,
    /// Verifies user tokens for the instructions endpoint.
    pub user_tokens: UserTokens,
    /// The audit log.
    pub audit: AuditLog,
    /// Prometheus metrics.
    pub metrics: Metrics,
    /// The state store (the durable side of sessions).
    pub store: Arc<dyn SessionStore>,
    /// The agent endpoint's certificate, reloadable.
    pub tls: TlsFiles,
    /// Cancelled when shutdown starts: listeners close, agents are told to reconnect,
    /// forwarded visitors keep draining.
    pub stopping: CancellationToken,
    /// Cancelled when shutdown ends (after the drain); every session's token is a child.
    pub cancel: CancellationToken,
    /// Visitor connections, so shutdown can wait for them to drain.
    pub visitor_tasks: TaskTracker,
    /// The bound plain-TCP data port (data plane `tcp` only).
    pub data_port: std::sync::OnceLock<u16>,
    /// Visitors still completing their protocol's opening, relay-wide.
    pub pending_visitors: Arc<tokio::sync::Semaphore>,
    /// Visitors still completing their protocol's opening, per source.
    pub pending_visitors_per_ip: Arc<PerIpLimit>,
    /// Refusals counted for aggregated logging.
    pub refusals: RefusalLog,
    /// Every spawned task, so shutdown can wait for them.
    pub tasks: TaskTracker,
    /// The cluster this node belongs to (cluster mode only).
    pub cluster: Option<Arc<ClusterState>>,
}

impl Relay {
    /// A relay with no sessions.
    pub fn new(
        config: RelayConfig,
        admin_token: Secret,
        user_tokens: UserTokens,
        audit: AuditLog,
        metrics: Metrics,
        store: Arc<dyn SessionStore>,
        tls: TlsFiles,
    ) -> Self {
        // In a cluster, etcd keeps a revoked session's ports for the cooldown on a lease,
        // which counts whole seconds and has a minimum: this node rests them at least as long,
        // so it does not keep offering ports etcd still holds.
        let cooldown = if config.cluster_mode() {
            config
                .port_cooldown
                .max(crate::limits::CLUSTER_MIN_PORT_COOLDOWN)
        } else {
            config.port_cooldown
        };
        let pool = PortPool::new(config.port_range, config.public_bind, cooldown);
        Self {
            public_host: config.public_host(),
            config,
            sessions: SessionRegistry::default(),
            pool,
            admin_token,
            user_tokens,
            audit,
            metrics,
            store,
            tls,
            stopping: CancellationToken::new(),
            cancel: CancellationToken::new(),
            visitor_tasks: TaskTracker::new(),
            data_port: std::sync::OnceLock::new(),
            pending_visitors: Arc::new(tokio::sync::Semaphore::new(MAX_PENDING_VISITORS)),
            pending_visitors_per_ip: PerIpLimit::new(MAX_PENDING_VISITORS_PER_IP),
            refusals: RefusalLog::default(),
            tasks: TaskTracker::new(),
            cluster: None,
        }
    }

    /// The relay as a node of `cluster` (None: a single node), with the shutdown signal and
    /// the task tracker that start-up already handed to the cluster's own tasks.
    pub fn with_cluster(
        mut self,
        cluster: Option<Arc<ClusterState>>,
        stopping: CancellationToken,
        tasks: TaskTracker,
    ) -> Self {
        self.cluster = cluster;
        self.stopping = stopping;
        self.tasks = tasks;
        self
    }
}
