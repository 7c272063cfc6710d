//! Dialing the relay: TCP with a deadline, `TCP_NODELAY`, then TLS 1.3 verified as configured.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::TlsConnector;

use crate::error::AgentError;

/// Dials the relay. One per process: its TLS session cache makes later handshakes cheap.
#[derive(Clone)]
pub struct Dialer {
    /// HOST:PORT.
    relay: String,
    /// Name verified against the certificate.
    server_name: ServerName<'static>,
    /// TLS client.
    connector: TlsConnector,
    /// Deadline for TCP connect and TLS handshake each.
    timeout: Duration,
}

impl std::fmt::Debug for Dialer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dialer")
            .field("relay", &self.relay)
            .finish_non_exhaustive()
    }
}

impl Dialer {
    /// A dialer for `relay`.
    pub fn new(
        relay: String,
        server_name: &str,
        config: Arc<tokio_rustls::rustls::ClientConfig>,
        timeout: Duration,
    ) -> Result<Self, AgentError> {
        let server_name = ServerName::try_from(server_name.to_owned()).map_err(|_| {
            AgentError::Config(format!("`{server_name}` is not a valid TLS server name"))
        })?;
        Ok(Self {
            relay,
            server_name,
            connector: TlsConnector::from(config),
            timeout,
        })
    }

    /// The relay address.
    pub fn relay(&self) -> &str {
        &self.relay
    }

    /// A new TLS connection to the relay.
    pub async fn dial(&self) -> Result<TlsStream<TcpStream>, AgentError> {
        let connect = tokio::time::timeout(self.timeout, TcpStream::connect(&self.relay));
        let tcp = match connect.await {
            Ok(Ok(tcp)) => tcp,
            Ok(Err(e)) => return Err(AgentError::Unreachable(format!("{}: {e}", self.relay))),
            Err(_) => {
                return Err(AgentError::Unreachable(format!(
                    "{}: connect timed out",
                    self.relay
                )))
            }
        };
        let _ = tcp.set_nodelay(true);
        let handshake = tokio::time::timeout(
            self.timeout,
            self.connector.connect(self.server_name.clone(), tcp),
        );
        match handshake.await {
            Ok(Ok(tls)) => Ok(tls),
            // tokio-rustls reports TLS failures (certificate, alert, protocol) as InvalidData;
            // those are configuration problems that retrying cannot fix.
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::InvalidData => Err(AgentError::Tls(
                format!("cannot verify the relay at {}: {e}", self.relay),
            )),
            Ok(Err(e)) => Err(AgentError::Unreachable(format!(
                "{}: TLS handshake: {e}",
                self.relay
            ))),
            Err(_) => Err(AgentError::Unreachable(format!(
                "{}: TLS handshake timed out",
                self.relay
            ))),
        }
    }
}
