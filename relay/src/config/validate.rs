//! Checking settings: [`RelayConfig::check`] finds the first setting whose value makes no
//! sense and names its key; [`RelayConfig::warnings`] finds settings that work but are
//! probably not what the operator wants.

use std::net::SocketAddr;
use std::time::Duration;

use super::{PortRange, RelayConfig};
use crate::limits::MAX_VISITORS_PER_SESSION;

impl RelayConfig {
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
        let mut warnings: Vec<String> = ephemeral
            .and_then(|(lo, hi)| ephemeral_overlap(self.port_range, lo, hi))
            .into_iter()
            .collect();
        if self.data_plane == porthole_protocol::DataPlane::Tcp
            && !private_or_loopback(self.data_listen.ip())
        {
            warnings.push(format!(
                "data_listen: {} is not a private or loopback address, but the tcp data plane sends visitors' bytes in clear text: \
                 bind it to the private network the build machines share with this relay, or use data_plane = \"tls\"",
                self.data_listen
            ));
        }
        warnings
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
        self.check_names()?;
        self.check_cluster()
    }

    fn check_durations(&self) -> Result<(), InvalidSetting> {
        let must_be_positive = [
            ("join_ttl", self.join_ttl),
            ("heartbeat_interval", self.heartbeat_interval),
            ("handshake_timeout", self.handshake_timeout),
            ("open_timeout", self.open_timeout),
            ("shutdown_grace", self.shutdown_grace),
            ("visitor_handshake_timeout", self.visitor_handshake_timeout),
            ("api_header_timeout", self.api_header_timeout),
            ("refusal_summary_interval", self.refusal_summary_interval),
        ];
        if let Some((key, _)) = must_be_positive.iter().find(|(_, d)| d.is_zero()) {
            return Err(InvalidSetting::new(
                key,
                "must be more than 0, e.g. \"10s\"",
            ));
        }
        // Upper bounds keep every deadline computed from these far from overflow and catch
        // unit mistakes ("10000h").
        let hour = Duration::from_secs(3600);
        let at_most = [
            ("port_cooldown", self.port_cooldown, MAX_PORT_COOLDOWN),
            ("join_ttl", self.join_ttl, 7 * 24 * hour),
            ("resume_window", self.resume_window, 7 * 24 * hour),
            ("heartbeat_interval", self.heartbeat_interval, hour),
            ("handshake_timeout", self.handshake_timeout, hour),
            ("open_timeout", self.open_timeout, hour),
            ("revoked_retention", self.revoked_retention, 30 * 24 * hour),
            ("shutdown_grace", self.shutdown_grace, hour),
            (
                "visitor_handshake_timeout",
                self.visitor_handshake_timeout,
                hour,
            ),
            (
                "extend_min_visitor_age",
                self.extend_min_visitor_age,
                24 * hour,
            ),
            ("api_header_timeout", self.api_header_timeout, hour),
            (
                "refusal_summary_interval",
                self.refusal_summary_interval,
                hour,
            ),
        ];
        if let Some((key, _, max)) = at_most.iter().find(|(_, d, max)| d > max) {
            return Err(InvalidSetting::new(
                key,
                format!("at most {}", humantime::format_duration(*max)),
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
            ("max_visitors_per_source", self.max_visitors_per_source),
            ("max_api_connections", self.max_api_connections),
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
        if let Some(web) = self.web_listen {
            // Port 0 (pick a free port) never collides.
            let same = |other: SocketAddr| web.port() != 0 && web == other;
            if same(self.api_listen) || self.metrics_listen.is_some_and(same) {
                return Err(InvalidSetting::new(
                    "web_listen",
                    format!(
                        "{web} is already the API or metrics address; leave web_listen out to serve the page on the API address"
                    ),
                ));
            }
        }
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
        if let Some(role) = self.allowed_roles.iter().find(|r| r.trim().is_empty()) {
            return Err(InvalidSetting::new(
                "allowed_roles",
                format!("`{role}` is empty; list role names, e.g. [\"developer\"], or leave it out to allow every role not denied"),
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

/// Whether `ip` is a loopback, private (RFC 1918, IPv6 unique local) or link-local address:
/// one the Internet cannot reach directly.
pub fn private_or_loopback(ip: std::net::IpAddr) -> bool {
    match ip.to_canonical() {
        std::net::IpAddr::V4(v4) => v4.is_loopback() || v4.is_private() || v4.is_link_local(),
        std::net::IpAddr::V6(v6) => {
            v6.is_loopback() || v6.is_unique_local() || v6.is_unicast_link_local()
        }
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
    pub(super) fn new(key: &'static str, problem: impl Into<String>) -> Self {
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    #[test]
    fn web_listen_must_not_be_the_api_address() {
        let mut c = RelayConfig {
            web_listen: Some(SocketAddr::from(([127, 0, 0, 1], 7080))),
            ..RelayConfig::default()
        };
        let err = c.validate().err().unwrap_or_default();
        assert!(err.contains("web_listen"), "{err}");
        c.web_listen = Some(SocketAddr::from(([0, 0, 0, 0], 8443)));
        assert_eq!(c.validate(), Ok(()));
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
    fn the_tcp_data_plane_on_a_public_address_is_warned_about() {
        let mut config = RelayConfig {
            data_plane: porthole_protocol::DataPlane::Tcp,
            ..RelayConfig::default()
        };
        let warnings = config.warnings_given(None);
        assert_eq!(warnings.len(), 1, "0.0.0.0 is every address: {warnings:?}");
        assert!(warnings[0].contains("clear text"), "{warnings:?}");
        for private in [
            "127.0.0.1:7444",
            "10.1.2.3:7444",
            "192.168.0.9:7444",
            "[fd00::1]:7444",
            "[::1]:7444",
        ] {
            config.data_listen = private.parse().unwrap_or_else(|e| unreachable!("{e}"));
            assert_eq!(
                config.warnings_given(None),
                Vec::<String>::new(),
                "{private}"
            );
        }
        config.data_listen = "203.0.113.7:7444"
            .parse()
            .unwrap_or_else(|e| unreachable!("{e}"));
        assert_eq!(config.warnings_given(None).len(), 1);
        config.data_plane = porthole_protocol::DataPlane::Tls;
        assert_eq!(
            config.warnings_given(None),
            Vec::<String>::new(),
            "tls plane: no data port"
        );
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
}
