//! Every relay setting, in one serde struct that clap also parses (flags and `PORTHOLE_*`
//! variables) and a config file fills ([`crate::config::file`]).
//!
//! - this module: [`RelayConfig`], its defaults and derived paths;
//! - `validate`: per-key checks ([`InvalidSetting`]) and warnings (ephemeral port range);
//! - `port_range`: the [`PortRange`] type (`LO-HI`);
//! - `cluster`: checks of the cluster settings (etcd endpoints, node name, advertised
//!   agent endpoint, lease TTL).

mod cluster;
pub mod file;
mod port_range;
mod validate;

pub use port_range::PortRange;
pub use validate::{
    ephemeral_overlap, parse_ephemeral_range, InvalidSetting, EPHEMERAL_RANGE_FILE,
};

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Relay settings. Defaults here and in the clap attributes agree (a test checks).
#[derive(Clone, Debug, PartialEq, Eq, clap::Args, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RelayConfig {
    /// Directory for the TLS certificate, admin token and state.
    #[arg(long, env = "PORTHOLE_DATA_DIR", default_value = "./porthole-data")]
    pub data_dir: PathBuf,
    /// Address agents connect to (TLS).
    #[arg(long, env = "PORTHOLE_AGENT_LISTEN", default_value = "0.0.0.0:7443")]
    pub agent_listen: SocketAddr,
    /// Separate address for /metrics, /healthz and /readyz [default: served on the API address].
    #[arg(long, env = "PORTHOLE_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// Separate public address serving only the remote access page (`/access/{id}`), its
    /// assets and the instructions endpoint (user tokens), so it can face users without the
    /// admin API [default: none; the page is served on the API address only].
    #[arg(long, env = "PORTHOLE_WEB_LISTEN")]
    pub web_listen: Option<SocketAddr>,
    /// Address of the HTTP API (keep it private: it hands out join tokens).
    #[arg(long, env = "PORTHOLE_API_LISTEN", default_value = "127.0.0.1:7080")]
    pub api_listen: SocketAddr,
    /// Host name put in endpoints and instructions [default: this machine's hostname].
    #[arg(long, env = "PORTHOLE_PUBLIC_HOST")]
    pub public_host: Option<String>,
    /// Address the public session ports bind to.
    #[arg(long, env = "PORTHOLE_PUBLIC_BIND", default_value = "0.0.0.0")]
    pub public_bind: IpAddr,
    /// Public session ports, `LO-HI` (keep it below the kernel's ephemeral range).
    #[arg(long, env = "PORTHOLE_PORT_RANGE", default_value = "20000-20999")]
    pub port_range: PortRange,
    /// PEM certificate chain for the agent endpoint, with --tls-key [default: self-signed in
    /// DATA_DIR/tls].
    // No clap `requires`: the pair may come from different layers (file, variables, flags);
    // `validate` checks the merged result.
    #[arg(long, env = "PORTHOLE_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for --tls-cert.
    #[arg(long, env = "PORTHOLE_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// How long a revoked session's ports rest before another session can get them.
    #[arg(long, env = "PORTHOLE_PORT_COOLDOWN", default_value = "120s", value_parser = humantime::parse_duration)]
    #[serde(with = "humantime_serde")]
    pub port_cooldown: Duration,
    /// How long a created session waits for its agent before it is revoked.
    #[arg(long, env = "PORTHOLE_JOIN_TTL", default_value = "15m", value_parser = humantime::parse_duration)]
    #[serde(with = "humantime_serde")]
    pub join_ttl: Duration,
    /// How long a session whose agent link was lost waits for the agent to resume.
    #[arg(long, env = "PORTHOLE_RESUME_WINDOW", default_value = "5m", value_parser = humantime::parse_duration)]
    #[serde(with = "humantime_serde")]
    pub resume_window: Duration,
    /// Heartbeat interval on agent links; a link silent for three intervals is dead.
    #[arg(long, env = "PORTHOLE_HEARTBEAT_INTERVAL", default_value = "10s", value_parser = humantime::parse_duration)]
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// Deadline for a new agent connection's TLS handshake and first frame together.
    #[arg(long, env = "PORTHOLE_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// How long a visitor waits for the agent to attach a data connection.
    #[arg(long, env = "PORTHOLE_OPEN_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    #[serde(with = "humantime_serde")]
    pub open_timeout: Duration,
    /// How long a revoked session stays visible in the API.
    #[arg(long, env = "PORTHOLE_REVOKED_RETENTION", default_value = "1h", value_parser = humantime::parse_duration)]
    #[serde(with = "humantime_serde")]
    pub revoked_retention: Duration,
    /// Agent connections allowed in the handshake phase at once.
    #[arg(long, env = "PORTHOLE_MAX_PENDING_HANDSHAKES", default_value = "1024")]
    pub max_pending_handshakes: usize,
    /// Secret shared with the CI backend for HS256 user tokens [default: DATA_DIR/user-token.secret].
    #[arg(long, env = "PORTHOLE_USER_TOKEN_SECRET_FILE")]
    pub user_token_secret_file: Option<PathBuf>,
    /// Roles that never get remote access instructions (case-insensitive, comma-separated).
    #[arg(
        long,
        env = "PORTHOLE_DENIED_ROLES",
        value_delimiter = ',',
        default_value = "tester,qa"
    )]
    pub denied_roles: Vec<String>,
    /// Roles that may get remote access instructions, comma-separated [default: empty = every
    /// role not denied]. Roles are compared after Unicode NFKC, dropping invisible
    /// (default-ignorable) characters, case folding and trimming.
    #[arg(long, env = "PORTHOLE_ALLOWED_ROLES", value_delimiter = ',')]
    pub allowed_roles: Vec<String>,
    /// Audit log (JSON lines), or `-` for stdout [default: DATA_DIR/audit.log].
    #[arg(long, env = "PORTHOLE_AUDIT_LOG")]
    pub audit_log: Option<PathBuf>,
    /// Concurrent visitor connections per session (a session may ask for fewer or more).
    #[arg(long, env = "PORTHOLE_MAX_VISITORS", default_value = "16")]
    pub max_visitors: usize,
    /// Concurrent visitor connections one source address (IPv6: one /64) may hold per session.
    #[arg(long, env = "PORTHOLE_MAX_VISITORS_PER_SOURCE", default_value = "4")]
    pub max_visitors_per_source: usize,
    /// How long a new visitor may take to complete its protocol's opening (SSH: the client's
    /// identification line; VNC: the client's `RFB 003.00x` version reply) before it is
    /// closed. Until then it does not count toward the session's visitor caps.
    #[arg(long, env = "PORTHOLE_VISITOR_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    #[serde(with = "humantime_serde")]
    pub visitor_handshake_timeout: Duration,
    /// How long a visitor must stay connected before it holds an `extend_while_connected`
    /// session open (default: past OpenSSH's LoginGraceTime of 120 s, so a connection that
    /// never logs in cannot hold it); visitors the agent's embedded SSH server reports as
    /// logged in count at once.
    #[arg(long, env = "PORTHOLE_EXTEND_MIN_VISITOR_AGE", default_value = "130s", value_parser = humantime::parse_duration)]
    #[serde(with = "humantime_serde")]
    pub extend_min_visitor_age: Duration,
    /// New visitor connections a source IP may open at once per session (token bucket size).
    #[arg(long, env = "PORTHOLE_VISITOR_RATE_BURST", default_value = "10")]
    pub visitor_rate_burst: u32,
    /// New visitor connections per source IP per session per minute, after the burst.
    #[arg(long, env = "PORTHOLE_VISITOR_RATE_PER_MINUTE", default_value = "30")]
    pub visitor_rate_per_minute: u32,
    /// Refusals (visitors, agent connections) are logged once per kind (session, reason,
    /// source), then summarised with a count once per this interval while they go on.
    #[arg(long, env = "PORTHOLE_REFUSAL_SUMMARY_INTERVAL", default_value = "10s", value_parser = humantime::parse_duration)]
    #[serde(with = "humantime_serde")]
    pub refusal_summary_interval: Duration,
    /// Concurrent connections to the HTTP API (and the metrics listener); more wait in the
    /// kernel's accept queue.
    #[arg(long, env = "PORTHOLE_MAX_API_CONNECTIONS", default_value = "256")]
    pub max_api_connections: usize,
    /// An HTTP client must send a request's complete headers within this, or it is closed.
    #[arg(long, env = "PORTHOLE_API_HEADER_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    #[serde(with = "humantime_serde")]
    pub api_header_timeout: Duration,
    /// How long live visitor connections may drain after SIGTERM/SIGINT before the relay
    /// closes them and exits.
    #[arg(long, env = "PORTHOLE_SHUTDOWN_GRACE", default_value = "30s", value_parser = humantime::parse_duration)]
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// Log format: `text` for people, `json` for collectors (RUST_LOG sets the filter).
    #[arg(long, env = "PORTHOLE_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// How visitors' data connections travel: `tls` (encrypted, on the agent endpoint) or
    /// `tcp` (plain TCP on --data-listen, forwarded with splice(2); private networks only).
    #[arg(long, env = "PORTHOLE_DATA_PLANE", default_value = "tls")]
    pub data_plane: porthole_protocol::DataPlane,
    /// Address of the plain-TCP data port, used only with `--data-plane tcp`.
    #[arg(long, env = "PORTHOLE_DATA_LISTEN", default_value = "0.0.0.0:7444")]
    pub data_listen: SocketAddr,
    /// etcd endpoints (`http://HOST:PORT`, comma-separated): switches the relay to cluster
    /// mode, sharing sessions with every node on the same etcd [default: none; one node on
    /// the embedded store]. Needs a relay built with `--features cluster`.
    #[arg(long, env = "PORTHOLE_ETCD_ENDPOINTS", value_delimiter = ',')]
    pub etcd_endpoints: Vec<String>,
    /// This node's name in the cluster, unique among its nodes [default: the hostname].
    #[arg(long, env = "PORTHOLE_NODE_NAME")]
    pub node_name: Option<String>,
    /// This node's own agent endpoint, `HOST:PORT`, as agents reach it (cluster mode)
    /// [default: --agent-listen when it names an address].
    #[arg(long, env = "PORTHOLE_ADVERTISE_AGENT")]
    pub advertise_agent: Option<String>,
    /// Address of the node-to-node link (cluster mode; TLS with the relay's certificate,
    /// authenticated with DATA_DIR/cluster.secret). Keep it on a private network.
    #[arg(long, env = "PORTHOLE_PEER_LISTEN")]
    pub peer_listen: Option<SocketAddr>,
    /// This node's peer address, `HOST:PORT`, as the other nodes reach it [default:
    /// --peer-listen when it names an address].
    #[arg(long, env = "PORTHOLE_ADVERTISE_PEER")]
    pub advertise_peer: Option<String>,
    /// How long a cluster node that stopped renewing its etcd lease stays a member: after
    /// it, its sessions lose their owner and their agents resume on another node.
    #[arg(long, env = "PORTHOLE_NODE_LEASE_TTL", default_value = "10s", value_parser = humantime::parse_duration)]
    #[serde(with = "humantime_serde")]
    pub node_lease_ttl: Duration,
}

/// How log lines are written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("./porthole-data"),
            agent_listen: SocketAddr::from((Ipv4Addr::UNSPECIFIED, 7443)),
            api_listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 7080)),
            public_host: None,
            metrics_listen: None,
            web_listen: None,
            public_bind: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            port_range: PortRange {
                lo: 20000,
                hi: 20999,
            },
            tls_cert: None,
            tls_key: None,
            port_cooldown: Duration::from_secs(120),
            join_ttl: Duration::from_secs(15 * 60),
            resume_window: Duration::from_secs(5 * 60),
            heartbeat_interval: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(10),
            open_timeout: Duration::from_secs(10),
            revoked_retention: Duration::from_secs(3600),
            max_pending_handshakes: 1024,
            user_token_secret_file: None,
            denied_roles: vec!["tester".into(), "qa".into()],
            allowed_roles: Vec::new(),
            audit_log: None,
            max_visitors: 16,
            max_visitors_per_source: 4,
            visitor_handshake_timeout: Duration::from_secs(10),
            extend_min_visitor_age: Duration::from_secs(130),
            visitor_rate_burst: 10,
            visitor_rate_per_minute: 30,
            refusal_summary_interval: Duration::from_secs(10),
            max_api_connections: 256,
            api_header_timeout: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(30),
            log_format: LogFormat::Text,
            data_plane: porthole_protocol::DataPlane::Tls,
            data_listen: SocketAddr::from((Ipv4Addr::UNSPECIFIED, 7444)),
            etcd_endpoints: Vec::new(),
            node_name: None,
            advertise_agent: None,
            peer_listen: None,
            advertise_peer: None,
            node_lease_ttl: Duration::from_secs(10),
        }
    }
}

impl RelayConfig {
    /// The public host name: the setting, or this machine's hostname.
    pub fn public_host(&self) -> String {
        self.public_host
            .clone()
            .unwrap_or_else(|| gethostname::gethostname().to_string_lossy().into_owned())
    }

    /// The user token secret file.
    pub fn user_token_secret_file(&self) -> PathBuf {
        self.user_token_secret_file
            .clone()
            .unwrap_or_else(|| self.data_dir.join("user-token.secret"))
    }

    /// Whether the relay runs as a node of a cluster (etcd endpoints set).
    pub fn cluster_mode(&self) -> bool {
        !self.etcd_endpoints.is_empty()
    }

    /// This node's name: the setting, or this machine's hostname.
    pub fn node_name(&self) -> String {
        self.node_name
            .clone()
            .unwrap_or_else(|| gethostname::gethostname().to_string_lossy().into_owned())
    }

    /// This node's agent endpoint as agents reach it: the setting, or `--agent-listen` when
    /// it names an address (None: it does not, and the setting is required).
    pub fn advertise_agent(&self) -> Option<String> {
        self.advertise_agent.clone().or_else(|| {
            (!self.agent_listen.ip().is_unspecified()).then(|| self.agent_listen.to_string())
        })
    }

    /// This node's peer address as the other nodes reach it: the setting, or
    /// `--peer-listen` when it names an address.
    pub fn advertise_peer(&self) -> Option<String> {
        self.advertise_peer.clone().or_else(|| {
            self.peer_listen
                .filter(|a| !a.ip().is_unspecified())
                .map(|a| a.to_string())
        })
    }

    /// The audit log path (`-`: stdout).
    pub fn audit_log(&self) -> PathBuf {
        self.audit_log
            .clone()
            .unwrap_or_else(|| self.data_dir.join("audit.log"))
    }
}

#[cfg(test)]
mod tests {

    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        config: RelayConfig,
    }

    #[test]
    fn clap_defaults_match_default_impl() {
        let cli = Cli::try_parse_from(["porthole-relay"]).unwrap_or_else(|e| unreachable!("{e}"));
        assert_eq!(cli.config, RelayConfig::default());
    }
}
