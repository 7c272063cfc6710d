//! Dialing the relay: TCP with a deadline, `TCP_NODELAY`, then TLS 1.3 verified as
//! configured.
//!
//! A relay cluster has several nodes (`--relay a:7443,b:7443`, or one name with several
//! addresses). The control link tries them in order, starting with the one that worked
//! last, and moving on from one that fails; every data connection then goes to the very
//! address the control link reached (the node that holds the session's link), never to
//! a fresh resolution of the name, which could name another node.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::TlsConnector;

use crate::error::AgentError;

/// Dials the relay. One per process: its TLS session cache makes later handshakes cheap.
#[derive(Clone)]
pub struct Dialer {
    /// HOST:PORT of each relay node, in the order tried.
    relays: Vec<String>,
    /// Where the next control link starts trying.
    start: Arc<AtomicUsize>,
    /// The address the latest control link reached (data connections go there).
    current: Arc<Mutex<Option<SocketAddr>>>,
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
            .field("relays", &self.relays)
            .field("current", &self.current())
            .finish_non_exhaustive()
    }
}

impl Dialer {
    /// A dialer for `relays` (at least one HOST:PORT).
    pub fn new(
        relays: Vec<String>,
        server_name: &str,
        config: Arc<tokio_rustls::rustls::ClientConfig>,
        timeout: Duration,
    ) -> Result<Self, AgentError> {
        let server_name = ServerName::try_from(server_name.to_owned()).map_err(|_| {
            AgentError::Config(format!("`{server_name}` is not a valid TLS server name"))
        })?;
        if relays.is_empty() {
            return Err(AgentError::Config("no relay address".into()));
        }
        Ok(Self {
            relays,
            start: Arc::default(),
            current: Arc::default(),
            server_name,
            connector: TlsConnector::from(config),
            timeout,
        })
    }

    /// The address the latest control link reached.
    pub fn current(&self) -> Option<SocketAddr> {
        *self.current.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The IP of the node holding the control link (before any: the first relay's host is
    /// resolved by the caller, so this falls back to loopback only if nothing connected,
    /// which a data connection never precedes).
    pub fn current_ip(&self) -> IpAddr {
        self.current()
            .map_or(IpAddr::from([127, 0, 0, 1]), |a| a.ip())
    }

    /// A new control link: tries each relay (each address of each name) in order,
    /// starting with the one that worked last; the first that answers is remembered for
    /// the data connections.
    pub async fn dial_control(&self) -> Result<TlsStream<TcpStream>, AgentError> {
        let n = self.relays.len();
        let first = self.start.load(Ordering::Relaxed) % n;
        let mut errors = Vec::new();
        for i in (0..n).map(|k| (first + k) % n) {
            let relay = &self.relays[i];
            let addrs = match self.resolve(relay).await {
                Ok(addrs) => addrs,
                Err(e) => {
                    errors.push(e.to_string());
                    continue;
                }
            };
            for addr in addrs {
                match self.dial_addr(addr, relay).await {
                    Ok(tls) => {
                        self.start.store(i, Ordering::Relaxed);
                        *self.current.lock().unwrap_or_else(|p| p.into_inner()) = Some(addr);
                        return Ok(tls);
                    }
                    // A certificate the agent does not trust: retrying elsewhere hides a
                    // configuration problem.
                    Err(e @ AgentError::Tls(_)) => return Err(e),
                    Err(e) => errors.push(e.to_string()),
                }
            }
            // Next time, start after the one that failed.
            self.start.store((i + 1) % n, Ordering::Relaxed);
        }
        Err(AgentError::Unreachable(errors.join("; ")))
    }

    /// The next control link starts with the relay after the one that answered last (it
    /// refused the session as busy, or is shutting down). One relay: no change.
    pub fn next_relay(&self) {
        let n = self.relays.len();
        let _ = self
            .start
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |i| Some((i + 1) % n));
    }

    /// A new data connection, to the node holding the control link.
    pub async fn dial(&self) -> Result<TlsStream<TcpStream>, AgentError> {
        match self.current() {
            Some(addr) => self.dial_addr(addr, &addr.to_string()).await,
            None => self.dial_control().await,
        }
    }

    /// A new data connection to another node of the cluster (`relay`, HOST:PORT, as the
    /// node holding the control link named it in `open_at`).
    pub async fn dial_at(&self, relay: &str) -> Result<TlsStream<TcpStream>, AgentError> {
        let valid = relay.len() <= 255
            && relay
                .rsplit_once(':')
                .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
        if !valid {
            return Err(AgentError::Unreachable(format!(
                "the relay named an invalid node address {relay:?}"
            )));
        }
        let addrs = self.resolve(relay).await?;
        let mut last = None;
        for addr in addrs {
            match self.dial_addr(addr, relay).await {
                Ok(tls) => return Ok(tls),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| AgentError::Unreachable(format!("{relay}: no address"))))
    }

    async fn resolve(&self, relay: &str) -> Result<Vec<SocketAddr>, AgentError> {
        match tokio::time::timeout(self.timeout, tokio::net::lookup_host(relay)).await {
            Ok(Ok(addrs)) => Ok(addrs.collect()),
            Ok(Err(e)) => Err(AgentError::Unreachable(format!("{relay}: {e}"))),
            Err(_) => Err(AgentError::Unreachable(format!(
                "{relay}: name lookup timed out"
            ))),
        }
    }

    /// TCP then TLS to `addr` (`relay` names it in errors).
    async fn dial_addr(
        &self,
        addr: SocketAddr,
        relay: &str,
    ) -> Result<TlsStream<TcpStream>, AgentError> {
        let connect = tokio::time::timeout(self.timeout, TcpStream::connect(addr));
        let tcp = match connect.await {
            Ok(Ok(tcp)) => tcp,
            Ok(Err(e)) => return Err(AgentError::Unreachable(format!("{relay}: {e}"))),
            Err(_) => {
                return Err(AgentError::Unreachable(format!(
                    "{relay}: connect timed out"
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
                format!("cannot verify the relay at {relay}: {e}"),
            )),
            Ok(Err(e)) => Err(AgentError::Unreachable(format!(
                "{relay}: TLS handshake: {e}"
            ))),
            Err(_) => Err(AgentError::Unreachable(format!(
                "{relay}: TLS handshake timed out"
            ))),
        }
    }
}
