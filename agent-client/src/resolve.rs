//! [`AgentConfig::resolve`]: the flags checked and defaults filled in, into [`Resolved`] (the
//! settings every other module reads), including the credentials and host keys gathered by
//! [`crate::credentials`].

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use porthole_protocol::tls::{parse_pin, RelayTrust};
use porthole_protocol::{Credential, Secret, Service};

use crate::config::{AgentConfig, Target};
use crate::credentials;
use crate::embedded_ssh::EmbeddedSsh;

/// Settings checked and resolved.
#[derive(Clone, Debug)]
pub struct Resolved {
    /// Relay endpoints, HOST:PORT each (one, or the nodes of a cluster), in the order
    /// tried.
    pub relays: Vec<String>,
    /// Name checked against the relay's certificate.
    pub server_name: String,
    /// Join token.
    pub token: Secret,
    /// What serves each service.
    pub services: BTreeMap<Service, Target>,
    /// How the relay is verified.
    pub trust: RelayTrust,
    /// Connect deadline.
    pub connect_timeout: Duration,
    /// Warm data connections to keep.
    pub warm_connections: usize,
    /// When an idle warm data connection is replaced.
    pub warm_idle: Duration,
    /// Login details for the instructions.
    pub credentials: Vec<Credential>,
    /// SSH host public keys.
    pub host_keys: Vec<String>,
    /// The embedded SSH server, when SSH is embedded.
    pub embedded_ssh: Option<Arc<EmbeddedSsh>>,
}

impl AgentConfig {
    /// Checks the settings and resolves defaults.
    pub fn resolve(&self) -> Result<Resolved, String> {
        let relay = self.relay.clone().ok_or("--relay HOST:PORT is required")?;
        let token = self.token.clone().ok_or("--token is required")?;
        let relays: Vec<String> = relay
            .split(',')
            .map(str::trim)
            .filter(|r| !r.is_empty())
            .map(str::to_owned)
            .collect();
        if relays.is_empty() {
            return Err(format!("--relay `{relay}`: expected HOST:PORT"));
        }
        let mut hosts = Vec::new();
        for relay in &relays {
            let (host, port) = relay
                .rsplit_once(':')
                .ok_or_else(|| format!("--relay `{relay}`: expected HOST:PORT"))?;
            port.parse::<u16>()
                .map_err(|_| format!("--relay `{relay}`: `{port}` is not a port"))?;
            let host = host.trim_start_matches('[').trim_end_matches(']');
            if host.is_empty() {
                return Err(format!("--relay `{relay}`: expected HOST:PORT"));
            }
            hosts.push(host.to_owned());
        }
        // The nodes of a cluster share one certificate: the first host names it, unless
        // --server-name says otherwise.
        let host = hosts.swap_remove(0);
        let mut services = BTreeMap::new();
        for s in &self.services {
            if services.insert(s.service, s.target.clone()).is_some() {
                return Err(format!("--service {} is given twice", s.service));
            }
        }
        if self.embedded_ssh {
            match services.insert(Service::Ssh, Target::EmbeddedSsh) {
                None | Some(Target::EmbeddedSsh) => {}
                Some(Target::Dial(addr)) => {
                    return Err(format!(
                        "--embedded-ssh and --service ssh={addr}: pick one SSH server"
                    ))
                }
            }
        }
        if services.is_empty() {
            return Err(
                "at least one --service NAME=HOST:PORT (or --embedded-ssh) is required".into(),
            );
        }
        let trust = match (&self.ca_cert, &self.pin_sha256) {
            (Some(ca), None) => RelayTrust::CaFile(ca.clone()),
            (None, Some(pin)) => RelayTrust::Pin(parse_pin(pin).map_err(|e| e.to_string())?),
            (None, None) => RelayTrust::SystemRoots,
            (Some(_), Some(_)) => return Err("use --ca-cert or --pin-sha256, not both".into()),
        };
        let (credentials, host_keys, embedded_ssh) = credentials::gather(self, &services)?;
        Ok(Resolved {
            credentials,
            host_keys,
            embedded_ssh,
            server_name: self.server_name.clone().unwrap_or(host),
            relays,
            token,
            services,
            trust,
            connect_timeout: self.connect_timeout,
            warm_connections: usize::from(self.warm_connections),
            warm_idle: self.warm_idle,
        })
    }
}
