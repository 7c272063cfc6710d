//! The state every relay task shares.

use dashmap::DashMap;
use porthole_protocol::secret::SecretHash;
use porthole_protocol::Secret;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::audit::AuditLog;
use crate::config::RelayConfig;
use crate::metrics::Metrics;
use crate::ports::PortPool;
use crate::session::Session;
use crate::store::Store;
use crate::user_token::UserTokens;

/// The relay: settings, sessions, ports, and the owner of every task.
#[derive(Debug)]
pub struct Relay {
    /// Settings.
    pub config: RelayConfig,
    /// Host name put in endpoints.
    pub public_host: String,
    /// Sessions by id (revoked ones stay for the retention period).
    pub sessions: DashMap<String, Arc<Session>>,
    /// Session ids by join-token hash.
    pub by_join: DashMap<SecretHash, String>,
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
    /// The state store.
    pub store: Store,
    /// Cancelled at shutdown; every session's token is a child.
    pub cancel: CancellationToken,
    /// Every spawned task, so shutdown can wait for them.
    pub tasks: TaskTracker,
}

impl Relay {
    /// A relay with no sessions.
    pub fn new(
        config: RelayConfig,
        admin_token: Secret,
        user_tokens: UserTokens,
        audit: AuditLog,
        metrics: Metrics,
        store: Store,
    ) -> Self {
        let pool = PortPool::new(config.port_range, config.public_bind, config.port_cooldown);
        Self {
            public_host: config.public_host(),
            config,
            sessions: DashMap::new(),
            by_join: DashMap::new(),
            pool,
            admin_token,
            user_tokens,
            audit,
            metrics,
            store,
            cancel: CancellationToken::new(),
            tasks: TaskTracker::new(),
        }
    }
}
