//! `porthole-relay`: the public edge of Porthole. Agents on CI build machines dial in over
//! TLS; the relay gives each session a public port per service, forwards visitors to the
//! agent, and revokes everything at the session's deadline.
//!
//! # Layout (in data-flow order)
//! - [`config`]: every setting, one serde struct that clap also parses; [`config::file`]
//!   layers defaults < TOML file < environment < flags.
//! - [`error`]: the relay error type, [`RelayError`].
//! - [`limits`]: internal constants that are not settings.
//! - [`untrusted`]: peer text made safe for log lines; the session id format check.
//! - [`ops`]: bootstrap of the data dir (TLS certificate, admin token), the audit log,
//!   aggregated refusals, Prometheus metrics.
//! - [`shared`]: [`Relay`], the state all tasks share; TLS reload.
//! - [`cluster`]: cluster mode on etcd (feature `cluster`): identity of the shared files,
//!   node membership (lease), start-up; [`cluster::ClusterState`] in every build.
//! - [`store`]: the durable side of sessions behind one seam ([`store::SessionStore`]):
//!   records with versions, the embedded redb store, an in-memory one for tests.
//! - [`session`]: lifecycle, node-local runtime, the registry of sessions, the operations
//!   (create / join / resume / confirm / finish / revoke), persistence, deadline supervisor.
//! - [`edge`]: where peers connect: [`edge::agent`] (TLS accept, first frame, control link,
//!   attach, park, data port) and [`edge::visitor`] (port pool, guards, protocol openings,
//!   pairing, forwarding).
//! - [`user_token`]: HS256 user tokens (verify, mint, shared secret file).
//! - [`api`]: the HTTP/JSON API (sessions, instructions, health, metrics) and the remote
//!   access page ([`api::web`]), also alone on `--web-listen`.
//!
//! [`start`] binds everything and returns a [`RelayHandle`]; `main.rs` only parses flags.

// The layout above links modules that are crate-private (`pub(crate)`: no other crate
// needs them); `cargo doc --document-private-items` follows those links.
#![allow(rustdoc::private_intra_doc_links)]

pub mod api;
pub(crate) mod cluster;
pub mod config;
pub mod edge;
pub(crate) mod error;
pub mod limits;
pub(crate) mod ops;
pub(crate) mod session;
pub(crate) mod shared;
pub(crate) mod store;
pub(crate) mod untrusted;
pub mod user_token;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

pub use config::RelayConfig;
pub use error::RelayError;
use porthole_protocol::Secret;
pub use shared::Relay;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

/// What an operator needs to know after start.
#[derive(Debug)]
pub struct StartupInfo {
    /// Bound agent endpoint.
    pub agent_addr: SocketAddr,
    /// Bound API address.
    pub api_addr: SocketAddr,
    /// Bound metrics address, when separate from the API.
    pub metrics_addr: Option<SocketAddr>,
    /// Bound address of the page-only listener (`--web-listen`), when set.
    pub web_addr: Option<SocketAddr>,
    /// Bound plain-TCP data port (data plane `tcp` only).
    pub data_addr: Option<SocketAddr>,
    /// Host name in endpoints.
    pub public_host: String,
    /// The TLS certificate file.
    pub cert_path: PathBuf,
    /// Generated during this start.
    pub cert_generated: bool,
    /// The relay's own self-signed certificate (agents must pin it).
    pub self_signed: bool,
    /// SHA-256 of the certificate, hex.
    pub fingerprint: String,
    /// The admin token file.
    pub admin_token_path: PathBuf,
    /// Created during this start.
    pub admin_token_created: bool,
    /// The secret shared with the CI backend for user tokens.
    pub user_token_secret_path: PathBuf,
    /// The audit log (`-`: stdout).
    pub audit_log_path: PathBuf,
}

/// A running relay.
#[derive(Debug)]
pub struct RelayHandle {
    /// Start-up facts.
    pub info: StartupInfo,
    /// The shared state (tests and tools inspect it).
    pub relay: Arc<Relay>,
}

impl RelayHandle {
    /// Reloads the agent endpoint's certificate from disk (SIGHUP).
    pub fn reload_tls(&self) -> Result<String, RelayError> {
        self.relay.reload_tls()
    }

    /// The admin API token.
    pub fn admin_token(&self) -> &Secret {
        &self.relay.admin_token
    }

    /// Graceful shutdown: stop accepting (the agent endpoint and public ports close), tell
    /// agents to reconnect, let forwarded visitors drain for up to `grace`, then close
    /// everything that is left.
    pub async fn shutdown(&self, grace: Duration) {
        let relay = &self.relay;
        relay.stopping.cancel();
        relay.visitor_tasks.close();
        if tokio::time::timeout(grace, relay.visitor_tasks.wait())
            .await
            .is_err()
        {
            tracing::info!(
                left = relay.visitor_tasks.len(),
                "drain deadline reached; closing the remaining visitor connections"
            );
        }
        relay.cancel.cancel();
        relay.tasks.close();
        let rest = async {
            relay.tasks.wait().await;
            relay.visitor_tasks.wait().await;
        };
        if tokio::time::timeout(limits::FINAL_SHUTDOWN_WAIT, rest)
            .await
            .is_err()
        {
            tracing::warn!("some tasks did not end in time");
        }
    }
}

/// Binds a listener with a backlog deep enough for bursts of agents (the default is 128).
async fn bind(addr: SocketAddr) -> Result<TcpListener, RelayError> {
    let bound = || -> std::io::Result<TcpListener> {
        let socket = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        socket.listen(limits::LISTEN_BACKLOG)
    };
    bound().map_err(|source| RelayError::Bind { addr, source })
}

/// What start-up keeps of joining a cluster until the relay exists.
#[derive(Debug)]
struct ClusterStart {
    /// What the relay knows of the cluster.
    state: Arc<cluster::ClusterState>,
    /// The cluster secret (the peer link's bearer token).
    #[cfg_attr(not(feature = "cluster"), allow(dead_code))]
    secret: Secret,
}

/// The state store: the embedded one, or (cluster mode) etcd after joining the cluster.
async fn open_store(
    config: &RelayConfig,
    boot: &ops::bootstrap::Bootstrap,
    user_token_secret: &[u8],
    tasks: &tokio_util::task::TaskTracker,
    stopping: CancellationToken,
) -> Result<(Arc<dyn store::SessionStore>, Option<ClusterStart>), RelayError> {
    #[cfg(feature = "cluster")]
    if config.cluster_mode() {
        let shared = cluster::join::Shared {
            admin_token: boot.admin_token.expose().as_bytes(),
            user_token_secret,
            tls_fingerprint: &boot.fingerprint,
        };
        let joined = cluster::join::join(config, shared, tasks, stopping).await?;
        let start = ClusterStart {
            state: joined.state,
            secret: joined.secret,
        };
        return Ok((Arc::new(joined.store), Some(start)));
    }
    let _ = (boot, user_token_secret, tasks, stopping);
    let store = store::RedbStore::open(&config.data_dir.join("state.redb"))?;
    Ok((Arc::new(store), None))
}

/// Cluster mode: serves the peer link on `--peer-listen` and gives the relay its client.
#[cfg(feature = "cluster")]
async fn start_peer_link(
    relay: &Arc<Relay>,
    start: &ClusterStart,
    tls: Arc<tokio_rustls::rustls::ServerConfig>,
    fingerprint: &str,
) -> Result<(), RelayError> {
    let Some(addr) = relay.config.peer_listen else {
        return Err(RelayError::Config(
            "peer_listen: required in cluster mode".into(),
        ));
    };
    let listener = bind(addr).await?;
    let pin = porthole_protocol::tls::parse_pin(fingerprint)?;
    let client = cluster::peer::PeerClient::new(relay, pin, start.secret.expose().to_owned())
        .map_err(RelayError::Config)?;
    let _ = start.state.peers.set(Arc::new(client));
    relay.tasks.spawn(cluster::peer::serve(
        relay.clone(),
        listener,
        TlsAcceptor::from(tls),
        start.secret.hash(),
    ));
    tracing::info!(%addr, advertised = %start.state.advertise_peer, "peer link listening");
    Ok(())
}

/// Prepares the data dir, binds the agent endpoint and the API, and starts serving.
pub async fn start(config: RelayConfig) -> Result<RelayHandle, RelayError> {
    config.validate().map_err(RelayError::Config)?;
    let public_host = config.public_host();
    let boot = ops::bootstrap::prepare(&config, &public_host)?;
    let agent_listener = bind(config.agent_listen).await?;
    let api_listener = bind(config.api_listen).await?;
    let local = |l: &TcpListener, addr| {
        l.local_addr()
            .map_err(|source| RelayError::Bind { addr, source })
    };
    let agent_addr = local(&agent_listener, config.agent_listen)?;
    let api_addr = local(&api_listener, config.api_listen)?;
    let metrics_listener = match config.metrics_listen {
        Some(addr) => Some(bind(addr).await?),
        None => None,
    };
    let metrics_addr = match (&metrics_listener, config.metrics_listen) {
        (Some(l), Some(addr)) => Some(local(l, addr)?),
        _ => None,
    };
    let web_listener = match config.web_listen {
        Some(addr) => Some(bind(addr).await?),
        None => None,
    };
    let web_addr = match (&web_listener, config.web_listen) {
        (Some(l), Some(addr)) => Some(local(l, addr)?),
        _ => None,
    };
    let user_token_secret_path = config.user_token_secret_file();
    let audit_log_path = config.audit_log();
    let (secret, _) = user_token::load_or_create_secret(&user_token_secret_path)?;
    let user_tokens = user_token::UserTokens::new(&secret, &config.denied_roles);
    let audit = ops::audit::AuditLog::open(&audit_log_path)?;
    let metrics =
        ops::metrics::Metrics::new().map_err(|e| RelayError::Config(format!("metrics: {e}")))?;
    let stopping = CancellationToken::new();
    let tasks = tokio_util::task::TaskTracker::new();
    let (store, cluster) = open_store(&config, &boot, &secret, &tasks, stopping.clone()).await?;
    let tls = shared::TlsFiles {
        resolver: boot.cert.clone(),
        cert_path: boot.cert_path.clone(),
        key_path: boot.key_path.clone(),
    };
    let relay = Arc::new(
        Relay::new(
            config,
            boot.admin_token,
            user_tokens,
            audit,
            metrics,
            store,
            tls,
        )
        .with_cluster(cluster.as_ref().map(|c| c.state.clone()), stopping, tasks),
    );
    relay.metrics.set_data_plane(relay.config.data_plane);
    let mut data_addr = None;
    if relay.config.data_plane == porthole_protocol::DataPlane::Tcp {
        let addr = relay.config.data_listen;
        let listener = bind(addr).await?;
        let bound = local(&listener, addr)?;
        let _ = relay.data_port.set(bound.port());
        data_addr = Some(bound);
        relay
            .tasks
            .spawn(edge::agent::data_port::serve(relay.clone(), listener));
    }
    let owner = relay.clone();
    relay.tasks.spawn(async move {
        let interval = owner.config.refusal_summary_interval;
        ops::refusals::summarise(
            &owner.refusals,
            &owner.audit,
            interval,
            owner.cancel.clone(),
        )
        .await;
    });
    #[cfg(feature = "cluster")]
    if let Some(start) = &cluster {
        start_peer_link(&relay, start, boot.tls.clone(), &boot.fingerprint).await?;
    }
    #[cfg(not(feature = "cluster"))]
    let _ = &cluster;
    #[cfg(feature = "cluster")]
    let members_from = match &relay.cluster {
        // Owners' liveness decides which sessions are connected: read the nodes first.
        Some(cluster) => Some(cluster::members::load(cluster).await?.2 + 1),
        None => None,
    };
    let restored = relay.restore().await?;
    if relay.cluster.is_some() {
        relay.tasks.spawn(relay.clone().follow_store());
    }
    #[cfg(feature = "cluster")]
    if let (Some(cluster), Some(from)) = (&relay.cluster, members_from) {
        relay.tasks.spawn(cluster::members::follow(
            relay.clone(),
            cluster.clone(),
            from,
        ));
    }
    if restored > 0 {
        tracing::info!(
            sessions = restored,
            "restored live sessions; their agents resume on their own"
        );
    }
    let acceptor = TlsAcceptor::from(boot.tls);
    relay.tasks.spawn(edge::agent::accept::serve(
        relay.clone(),
        agent_listener,
        acceptor,
    ));
    // Header timeout and connection cap per listener; see api::serve.
    let limits = api::serve::ServeLimits::of(&relay.config);
    relay.tasks.spawn(api::serve::serve(
        api_listener,
        api::router(relay.clone()),
        limits,
        relay.cancel.clone(),
        "api",
    ));
    if let Some(listener) = metrics_listener {
        relay.tasks.spawn(api::serve::serve(
            listener,
            api::health::router(relay.clone()),
            limits,
            relay.cancel.clone(),
            "metrics",
        ));
    }
    if let Some(listener) = web_listener {
        relay.tasks.spawn(api::serve::serve(
            listener,
            api::web_router(relay.clone()),
            limits,
            relay.cancel.clone(),
            "web",
        ));
    }
    let info = StartupInfo {
        agent_addr,
        api_addr,
        metrics_addr,
        web_addr,
        data_addr,
        public_host,
        cert_path: boot.cert_path,
        cert_generated: boot.cert_generated,
        self_signed: boot.self_signed,
        fingerprint: boot.fingerprint,
        admin_token_path: boot.admin_token_path,
        admin_token_created: boot.admin_token_created,
        user_token_secret_path,
        audit_log_path,
    };
    Ok(RelayHandle { info, relay })
}
