//! Every relay setting, in one serde struct that clap also parses (flags and `PORTHOLE_*`
//! variables), so a config file can fill the same struct later.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::limits::MAX_VISITORS_PER_SESSION;

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
    /// Audit log (JSON lines), or `-` for stdout [default: DATA_DIR/audit.log].
    #[arg(long, env = "PORTHOLE_AUDIT_LOG")]
    pub audit_log: Option<PathBuf>,
    /// Concurrent visitor connections per session (a session may ask for fewer or more).
    #[arg(long, env = "PORTHOLE_MAX_VISITORS", default_value = "16")]
    pub max_visitors: usize,
    /// New visitor connections a source IP may open at once per session (token bucket size).
    #[arg(long, env = "PORTHOLE_VISITOR_RATE_BURST", default_value = "10")]
    pub visitor_rate_burst: u32,
    /// New visitor connections per source IP per session per minute, after the burst.
    #[arg(long, env = "PORTHOLE_VISITOR_RATE_PER_MINUTE", default_value = "30")]
    pub visitor_rate_per_minute: u32,
    /// How long live visitor connections may drain after SIGTERM/SIGINT before the relay
    /// closes them and exits.
    #[arg(long, env = "PORTHOLE_SHUTDOWN_GRACE", default_value = "30s", value_parser = humantime::parse_duration)]
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// Log format: `text` for people, `json` for collectors (RUST_LOG sets the filter).
    #[arg(long, env = "PORTHOLE_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
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
            audit_log: None,
            max_visitors: 16,
            visitor_rate_burst: 10,
            visitor_rate_per_minute: 30,
            shutdown_grace: Duration::from_secs(30),
            log_format: LogFormat::Text,
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

    /// The audit log path (`-`: stdout).
    pub fn audit_log(&self) -> PathBuf {
        self.audit_log
            .clone()
            .unwrap_or_else(|| self.data_dir.join("audit.log"))
    }

    /// Settings that work but are probably not what the operator wants (read against this
    /// host's `/proc/sys/net/ipv4/ip_local_port_range`).
    pub fn warnings(&self) -> Vec<String> {
        let proc_text = std::fs::read_to_string(EPHEMERAL_RANGE_FILE).ok();
        self.warnings_given(proc_text.as_deref())
    }

    /// [`warnings`](Self::warnings) given the content of the kernel's ephemeral range file
    /// (`None`: unknown, e.g. not Linux).
    pub fn warnings_given(&self, ephemeral_range_file: Option<&str>) -> Vec<String> {
        let ephemeral = ephemeral_range_file.and_then(parse_ephemeral_range);
        ephemeral
            .and_then(|(lo, hi)| ephemeral_overlap(self.port_range, lo, hi))
            .into_iter()
            .collect()
    }

    /// Checks values clap and serde cannot; the error names the key.
    pub fn validate(&self) -> Result<(), String> {
        self.check().map_err(|e| e.to_string())
    }

    /// [`validate`](Self::validate) with the offending key apart, so callers can say where
    /// the value came from.
    pub fn check(&self) -> Result<(), InvalidSetting> {
        self.check_durations()?;
        self.check_limits()?;
        self.check_names()
    }

    fn check_durations(&self) -> Result<(), InvalidSetting> {
        let must_be_positive = [
            ("join_ttl", self.join_ttl),
            ("heartbeat_interval", self.heartbeat_interval),
            ("handshake_timeout", self.handshake_timeout),
            ("open_timeout", self.open_timeout),
            ("shutdown_grace", self.shutdown_grace),
        ];
        if let Some((key, _)) = must_be_positive.iter().find(|(_, d)| d.is_zero()) {
            return Err(InvalidSetting::new(
                key,
                "must be more than 0, e.g. \"10s\"",
            ));
        }
        if self.port_cooldown > MAX_PORT_COOLDOWN {
            return Err(InvalidSetting::new(
                "port_cooldown",
                format!("at most {}", humantime::format_duration(MAX_PORT_COOLDOWN)),
            ));
        }
        Ok(())
    }

    fn check_limits(&self) -> Result<(), InvalidSetting> {
        if self.port_range.lo == 0 || self.port_range.lo > self.port_range.hi {
            return Err(InvalidSetting::new(
                "port_range",
                format!("`{}` must satisfy 1 <= LO <= HI", self.port_range),
            ));
        }
        let at_least_one = [
            ("max_visitors", self.max_visitors),
            ("max_pending_handshakes", self.max_pending_handshakes),
            ("visitor_rate_burst", self.visitor_rate_burst as usize),
            (
                "visitor_rate_per_minute",
                self.visitor_rate_per_minute as usize,
            ),
        ];
        if let Some((key, _)) = at_least_one.iter().find(|(_, n)| *n == 0) {
            return Err(InvalidSetting::new(key, "must be at least 1"));
        }
        if self.max_visitors > MAX_VISITORS_PER_SESSION {
            return Err(InvalidSetting::new(
                "max_visitors",
                format!(
                    "{} is above {MAX_VISITORS_PER_SESSION}, the most a session may have",
                    self.max_visitors
                ),
            ));
        }
        Ok(())
    }

    fn check_names(&self) -> Result<(), InvalidSetting> {
        if self.data_dir.as_os_str().is_empty() {
            return Err(InvalidSetting::new("data_dir", "must not be empty"));
        }
        let paths = [
            ("tls_cert", &self.tls_cert),
            ("tls_key", &self.tls_key),
            ("user_token_secret_file", &self.user_token_secret_file),
            ("audit_log", &self.audit_log),
        ];
        if let Some((key, _)) = paths
            .iter()
            .find(|(_, p)| p.as_ref().is_some_and(|p| p.as_os_str().is_empty()))
        {
            return Err(InvalidSetting::new(
                key,
                "must not be empty; leave it out for the default",
            ));
        }
        let lone = match (&self.tls_cert, &self.tls_key) {
            (Some(_), None) => Some(("tls_cert", "tls_key")),
            (None, Some(_)) => Some(("tls_key", "tls_cert")),
            _ => None,
        };
        if let Some((set, missing)) = lone {
            return Err(InvalidSetting::new(
                set,
                format!(
                    "set without {missing} (--{}, PORTHOLE_{}): set both, or neither for a \
                     self-signed certificate",
                    missing.replace('_', "-"),
                    missing.to_ascii_uppercase()
                ),
            ));
        }
        if let Some(role) = self.denied_roles.iter().find(|r| r.trim().is_empty()) {
            return Err(InvalidSetting::new(
                "denied_roles",
                format!("`{role}` is empty; list role names, e.g. [\"tester\", \"qa\"]"),
            ));
        }
        if let Some(host) = &self.public_host {
            if host.is_empty() || host.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(InvalidSetting::new(
                    "public_host",
                    format!("`{host}` is not a host name"),
                ));
            }
        }
        Ok(())
    }
}

/// Longest `port_cooldown` accepted.
const MAX_PORT_COOLDOWN: Duration = Duration::from_secs(24 * 3600);

/// A setting whose value makes no sense, found by [`RelayConfig::check`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {problem}")]
pub struct InvalidSetting {
    /// The setting's name (the config file key).
    pub key: &'static str,
    /// What is wrong with its value, and what to do.
    pub problem: String,
}

impl InvalidSetting {
    fn new(key: &'static str, problem: impl Into<String>) -> Self {
        Self {
            key,
            problem: problem.into(),
        }
    }
}

/// Where Linux keeps the range it picks outgoing connections' local ports from.
pub const EPHEMERAL_RANGE_FILE: &str = "/proc/sys/net/ipv4/ip_local_port_range";

/// Parses `/proc/sys/net/ipv4/ip_local_port_range` (`LO<tab>HI`).
pub fn parse_ephemeral_range(text: &str) -> Option<(u16, u16)> {
    let mut parts = text.split_whitespace().map(str::parse::<u16>);
    match (parts.next(), parts.next()) {
        (Some(Ok(lo)), Some(Ok(hi))) if lo <= hi => Some((lo, hi)),
        _ => None,
    }
}

/// The warning for a public port range that overlaps the kernel's ephemeral range.
pub fn ephemeral_overlap(range: PortRange, lo: u16, hi: u16) -> Option<String> {
    (range.lo <= hi && lo <= range.hi).then(|| {
        format!(
            "port_range: {range} overlaps the kernel's ephemeral port range {lo}-{hi} (net.ipv4.ip_local_port_range): \
             outgoing connections of this host can take a session's port, and binds then fail; \
             choose a range below {lo}"
        )
    })
}

/// An inclusive range of TCP ports, written `LO-HI`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct PortRange {
    /// First port.
    pub lo: u16,
    /// Last port (inclusive).
    pub hi: u16,
}

impl PortRange {
    /// Number of ports in the range.
    pub fn len(&self) -> usize {
        usize::from(self.hi.saturating_sub(self.lo)) + 1
    }

    /// Always false: a valid range holds at least one port.
    pub fn is_empty(&self) -> bool {
        false
    }
}

impl FromStr for PortRange {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("port range `{s}`: expected LO-HI, e.g. 20000-20999");
        let (lo, hi) = s.split_once('-').ok_or_else(bad)?;
        let lo: u16 = lo.trim().parse().map_err(|_| bad())?;
        let hi: u16 = hi.trim().parse().map_err(|_| bad())?;
        if lo == 0 || lo > hi {
            return Err(format!(
                "port range `{s}`: LO must be at least 1 and not above HI"
            ));
        }
        Ok(PortRange { lo, hi })
    }
}

impl TryFrom<String> for PortRange {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl From<PortRange> for String {
    fn from(r: PortRange) -> String {
        r.to_string()
    }
}

impl std::fmt::Display for PortRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.lo, self.hi)
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

    #[test]
    fn ephemeral_overlap_is_a_warning_that_says_why() {
        assert_eq!(
            parse_ephemeral_range("32768\t60999\n"),
            Some((32768, 60999))
        );
        assert_eq!(parse_ephemeral_range("junk"), None);
        let default = PortRange {
            lo: 20000,
            hi: 20999,
        };
        assert_eq!(ephemeral_overlap(default, 32768, 60999), None);
        let w = ephemeral_overlap(
            PortRange {
                lo: 32000,
                hi: 33000,
            },
            32768,
            60999,
        )
        .unwrap_or_default();
        assert!(
            w.contains("port_range") && w.contains("ephemeral") && w.contains("32768-60999"),
            "{w}"
        );
    }

    #[test]
    fn warnings_read_the_kernel_range_file_content() {
        let mut config = RelayConfig::default();
        assert_eq!(
            config.warnings_given(Some("32768\t60999\n")),
            Vec::<String>::new()
        );
        assert_eq!(config.warnings_given(None), Vec::<String>::new());
        config.port_range = PortRange {
            lo: 60000,
            hi: 61999,
        };
        let warnings = config.warnings_given(Some("32768\t60999\n"));
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(
            warnings[0].contains("outgoing connections") && warnings[0].contains("below 32768"),
            "{warnings:?}"
        );
        assert_eq!(config.warnings_given(Some("")), Vec::<String>::new());
    }

    #[test]
    fn the_defaults_are_valid() {
        assert_eq!(RelayConfig::default().check(), Ok(()));
    }

    /// Each broken setting is refused, and the error names that setting.
    #[test]
    fn validate_names_the_key() {
        type Breaker = fn(&mut RelayConfig);
        let cases: [(&str, Breaker); 18] = [
            ("data_dir", |c| c.data_dir = PathBuf::new()),
            ("audit_log", |c| c.audit_log = Some(PathBuf::new())),
            ("join_ttl", |c| c.join_ttl = Duration::ZERO),
            ("heartbeat_interval", |c| {
                c.heartbeat_interval = Duration::ZERO
            }),
            ("handshake_timeout", |c| {
                c.handshake_timeout = Duration::ZERO
            }),
            ("open_timeout", |c| c.open_timeout = Duration::ZERO),
            ("shutdown_grace", |c| c.shutdown_grace = Duration::ZERO),
            ("port_cooldown", |c| {
                c.port_cooldown = Duration::from_secs(90_000)
            }),
            ("port_range", |c| {
                c.port_range = PortRange { lo: 30, hi: 20 }
            }),
            ("max_visitors", |c| c.max_visitors = 0),
            ("max_visitors", |c| {
                c.max_visitors = MAX_VISITORS_PER_SESSION + 1
            }),
            ("max_pending_handshakes", |c| c.max_pending_handshakes = 0),
            ("visitor_rate_burst", |c| c.visitor_rate_burst = 0),
            ("visitor_rate_per_minute", |c| c.visitor_rate_per_minute = 0),
            ("denied_roles", |c| {
                c.denied_roles = vec!["qa".into(), " ".into()]
            }),
            ("tls_cert", |c| c.tls_cert = Some("cert.pem".into())),
            ("tls_key", |c| c.tls_key = Some("key.pem".into())),
            ("public_host", |c| c.public_host = Some("two words".into())),
        ];
        for (key, breaker) in cases {
            let mut config = RelayConfig::default();
            breaker(&mut config);
            let err = config.check().err();
            assert_eq!(err.as_ref().map(|e| e.key), Some(key), "{err:?}");
            let text = config.validate().err().unwrap_or_default();
            assert!(text.starts_with(&format!("{key}: ")), "{text}");
        }
    }

    #[test]
    fn port_ranges_parse_and_refuse_nonsense() {
        assert_eq!(
            "20000-20999".parse::<PortRange>().map(|r| r.len()),
            Ok(1000)
        );
        assert!("20999-20000".parse::<PortRange>().is_err());
        assert!("0-10".parse::<PortRange>().is_err());
        assert!("abc".parse::<PortRange>().is_err());
        assert!("1-70000".parse::<PortRange>().is_err());
    }
}
