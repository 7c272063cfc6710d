//! Checks of the cluster settings: they only matter once `etcd_endpoints` is set, and then
//! every one of them must make sense before the node talks to etcd.

use std::time::Duration;

use super::validate::InvalidSetting;
use super::RelayConfig;

/// Longest node name (it is a key segment in etcd and a metric label value).
pub const MAX_NODE_NAME: usize = 63;

/// Shortest lease TTL accepted: etcd rounds shorter ones up, and renewals every third of it
/// must stay well above the network's round trips.
const MIN_LEASE_TTL: Duration = Duration::from_secs(2);

/// Longest lease TTL accepted: a dead node's sessions wait this long for a new owner.
const MAX_LEASE_TTL: Duration = Duration::from_secs(300);

impl RelayConfig {
    pub(super) fn check_cluster(&self) -> Result<(), InvalidSetting> {
        if !self.cluster_mode() {
            return Ok(());
        }
        if !cfg!(feature = "cluster") {
            return Err(InvalidSetting::new(
                "etcd_endpoints",
                "this porthole-relay was built without cluster support: build it with \
                 `cargo build --release -p porthole-relay --features cluster` (needs `protoc`, \
                 Debian packages protobuf-compiler and libprotobuf-dev), or leave etcd_endpoints out to run one node",
            ));
        }
        for endpoint in &self.etcd_endpoints {
            check_endpoint(endpoint)?;
        }
        let name = self.node_name();
        if !valid_node_name(&name) {
            return Err(InvalidSetting::new(
                "node_name",
                format!(
                    "`{}` is not a node name: 1 to {MAX_NODE_NAME} characters of a-z, A-Z, 0-9, `.`, `-`, `_`{}",
                    name.escape_debug(),
                    if self.node_name.is_none() { " (it defaults to the hostname: set --node-name)" } else { "" }
                ),
            ));
        }
        match self.advertise_agent() {
            None => {
                return Err(InvalidSetting::new(
                    "advertise_agent",
                    format!(
                        "required in cluster mode when agent_listen ({}) names no address: the HOST:PORT agents reach this node's agent endpoint at, e.g. relay-1.internal:7443",
                        self.agent_listen
                    ),
                ))
            }
            Some(addr) => check_host_port("advertise_agent", &addr)?,
        }
        if self.peer_listen.is_none() {
            return Err(InvalidSetting::new(
                "peer_listen",
                "required in cluster mode: the address of the node-to-node link, e.g. 10.0.0.5:7445 (on a private network)",
            ));
        }
        match self.advertise_peer() {
            None => {
                return Err(InvalidSetting::new(
                    "advertise_peer",
                    "required in cluster mode when peer_listen names no address: the HOST:PORT other nodes reach this node's peer link at",
                ))
            }
            Some(addr) => check_host_port("advertise_peer", &addr)?,
        }
        if self.node_lease_ttl < MIN_LEASE_TTL || self.node_lease_ttl > MAX_LEASE_TTL {
            return Err(InvalidSetting::new(
                "node_lease_ttl",
                format!(
                    "{} is outside {}..={}",
                    humantime::format_duration(self.node_lease_ttl),
                    humantime::format_duration(MIN_LEASE_TTL),
                    humantime::format_duration(MAX_LEASE_TTL)
                ),
            ));
        }
        if self.node_lease_ttl.subsec_nanos() != 0 {
            return Err(InvalidSetting::new(
                "node_lease_ttl",
                "whole seconds only (etcd leases count in seconds)",
            ));
        }
        Ok(())
    }
}

/// Whether `name` may name a node: 1 to [`MAX_NODE_NAME`] of `[A-Za-z0-9._-]`.
pub fn valid_node_name(name: &str) -> bool {
    (1..=MAX_NODE_NAME).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
}

/// An etcd endpoint: `http://HOST:PORT` (plain) — TLS to etcd is not supported yet.
fn check_endpoint(endpoint: &str) -> Result<(), InvalidSetting> {
    let bad = |why: &str| {
        InvalidSetting::new(
            "etcd_endpoints",
            format!("`{}` {why}", endpoint.escape_debug()),
        )
    };
    let Some(rest) = endpoint.strip_prefix("http://") else {
        if endpoint.starts_with("https://") {
            return Err(bad("uses TLS, which this relay does not speak to etcd yet: reach etcd over a private network with http://HOST:PORT"));
        }
        return Err(bad("is not an etcd endpoint: write http://HOST:PORT"));
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    check_host_port("etcd_endpoints", rest).map_err(|_| bad("is not http://HOST:PORT"))
}

/// `HOST:PORT` with a non-empty host (name, IPv4, or `[IPv6]`) and a port 1..=65535.
fn check_host_port(key: &'static str, value: &str) -> Result<(), InvalidSetting> {
    let bad = || InvalidSetting::new(key, format!("`{}` is not HOST:PORT", value.escape_debug()));
    let (host, port) = value.rsplit_once(':').ok_or_else(bad)?;
    let port_ok = port.parse::<u16>().is_ok_and(|p| p != 0);
    let host_ok = !host.is_empty()
        && host.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b':' | b'[' | b']')
        });
    if port_ok && host_ok {
        Ok(())
    } else {
        Err(bad())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster() -> RelayConfig {
        RelayConfig {
            etcd_endpoints: vec!["http://127.0.0.1:2379".into()],
            node_name: Some("relay-1".into()),
            advertise_agent: Some("relay-1.internal:7443".into()),
            peer_listen: "10.0.0.5:7445".parse().ok(),
            ..RelayConfig::default()
        }
    }

    #[cfg(feature = "cluster")]
    fn key_of(c: &RelayConfig) -> Option<&'static str> {
        c.check().err().map(|e| e.key)
    }

    #[test]
    fn single_node_ignores_cluster_settings() {
        let c = RelayConfig {
            node_name: Some("not a name!".into()),
            ..RelayConfig::default()
        };
        assert!(c.check().is_ok());
    }

    #[test]
    #[cfg(not(feature = "cluster"))]
    fn a_build_without_the_feature_says_how_to_get_it() {
        let err = cluster()
            .check()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("--features cluster"), "{err}");
    }

    #[test]
    #[cfg(feature = "cluster")]
    fn cluster_settings_are_checked() {
        assert_eq!(key_of(&cluster()), None);
        let with = |f: &dyn Fn(&mut RelayConfig)| {
            let mut c = cluster();
            f(&mut c);
            key_of(&c)
        };
        assert_eq!(
            with(&|c| c.etcd_endpoints = vec!["127.0.0.1:2379".into()]),
            Some("etcd_endpoints")
        );
        assert_eq!(
            with(&|c| c.etcd_endpoints = vec!["https://etcd:2379".into()]),
            Some("etcd_endpoints")
        );
        assert_eq!(
            with(&|c| c.etcd_endpoints = vec!["http://etcd:0".into()]),
            Some("etcd_endpoints")
        );
        assert_eq!(
            with(&|c| c.etcd_endpoints.push("http://etcd-2:2379/".into())),
            None
        );
        assert_eq!(
            with(&|c| c.node_name = Some("a/b".into())),
            Some("node_name")
        );
        assert_eq!(
            with(&|c| c.node_name = Some("x".repeat(64))),
            Some("node_name")
        );
        assert_eq!(with(&|c| c.advertise_agent = None), Some("advertise_agent"));
        assert_eq!(
            with(&|c| {
                c.advertise_agent = None;
                c.agent_listen = "10.0.0.5:7443".parse().unwrap_or(c.agent_listen);
            }),
            None
        );
        assert_eq!(
            with(&|c| c.advertise_agent = Some("relay-1".into())),
            Some("advertise_agent")
        );
        assert_eq!(with(&|c| c.peer_listen = None), Some("peer_listen"));
        assert_eq!(
            with(&|c| c.peer_listen = "0.0.0.0:7445".parse().ok()),
            Some("advertise_peer")
        );
        assert_eq!(
            with(&|c| {
                c.peer_listen = "0.0.0.0:7445".parse().ok();
                c.advertise_peer = Some("relay-1.internal:7445".into());
            }),
            None
        );
        assert_eq!(
            with(&|c| c.node_lease_ttl = Duration::from_secs(1)),
            Some("node_lease_ttl")
        );
        assert_eq!(
            with(&|c| c.node_lease_ttl = Duration::from_millis(3500)),
            Some("node_lease_ttl")
        );
        assert_eq!(with(&|c| c.node_lease_ttl = Duration::from_secs(3)), None);
    }
}
