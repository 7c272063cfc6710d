//! Helpers shared by the integration tests: a deadline for every test, loopback TCP pairs,
//! rcgen certificates, and TLS stream pairs built from the crate's own configurations.

// Each test binary uses a different subset of these helpers.
#![allow(dead_code)]

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use porthole_protocol::tls::{
    client_config, fingerprint_sha256, parse_pin, server_config, RelayTrust,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::{ClientConfig, ServerConfig};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{client, server, TlsAcceptor, TlsConnector};

/// How long any one test may run before it counts as hung. Generous: debug builds on two
/// cores, tests running in parallel. A deadline, not a speed assertion.
pub const DEADLINE: Duration = Duration::from_secs(120);

/// Runs `fut` under [`DEADLINE`], so a hang fails the test instead of blocking the suite.
pub async fn within<T>(fut: impl Future<Output = Result<T>>) -> Result<T> {
    tokio::time::timeout(DEADLINE, fut)
        .await
        .map_err(|_| anyhow!("test did not finish within {DEADLINE:?} (hung)"))?
}

/// Both ends of one fresh loopback TCP connection: (connecting side, accepted side).
pub async fn tcp_pair() -> Result<(TcpStream, TcpStream)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (client, (accepted, _)) = tokio::try_join!(TcpStream::connect(addr), listener.accept())?;
    Ok((client, accepted))
}

/// A certificate and its private key, in DER and PEM.
pub struct Identity {
    /// The certificate, DER.
    pub cert: CertificateDer<'static>,
    /// The certificate, PEM.
    pub cert_pem: String,
    /// The private key, PKCS#8 PEM.
    pub key_pem: String,
    /// The private key, PKCS#8 DER.
    key_der: Vec<u8>,
}

impl Identity {
    /// The private key, as rustls takes it.
    pub fn key(&self) -> PrivateKeyDer<'static> {
        PrivatePkcs8KeyDer::from(self.key_der.clone()).into()
    }

    /// The pin an agent would be given for this certificate, parsed the way the agent does.
    pub fn pin(&self) -> Result<[u8; 32]> {
        Ok(parse_pin(&fingerprint_sha256(&self.cert))?)
    }

    /// A server configuration presenting this certificate alone.
    pub fn server_config(&self) -> Result<Arc<ServerConfig>> {
        Ok(server_config(vec![self.cert.clone()], self.key())?)
    }

    fn from_rcgen(cert: &rcgen::Certificate, key: &rcgen::KeyPair) -> Self {
        Self {
            cert: cert.der().clone(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            key_der: key.serialize_der(),
        }
    }
}

/// A self-signed certificate for `localhost`.
pub fn self_signed() -> Result<Identity> {
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()])?;
    Ok(Identity::from_rcgen(&certified.cert, &certified.key_pair))
}

/// A CA, and a leaf for `leaf_name` signed by it: (CA, leaf).
pub fn ca_and_leaf(leaf_name: &str) -> Result<(Identity, Identity)> {
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "Porthole test CA");
    ca_params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let ca_key = rcgen::KeyPair::generate()?;
    let ca_cert = ca_params.self_signed(&ca_key)?;

    let mut leaf_params = rcgen::CertificateParams::new(vec![leaf_name.to_owned()])?;
    leaf_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, leaf_name);
    let leaf_key = rcgen::KeyPair::generate()?;
    let leaf_cert = leaf_params.signed_by(&leaf_key, &ca_cert, &ca_key)?;
    Ok((
        Identity::from_rcgen(&ca_cert, &ca_key),
        Identity::from_rcgen(&leaf_cert, &leaf_key),
    ))
}

/// The outcome of one handshake attempt over loopback, both sides kept.
pub type Handshake = (
    std::io::Result<client::TlsStream<TcpStream>>,
    std::io::Result<server::TlsStream<TcpStream>>,
);

/// Runs one TLS handshake over a fresh loopback connection, client and server concurrently,
/// and returns both outcomes (neither side is cut short by the other's failure).
pub async fn handshake(
    client: Arc<ClientConfig>,
    server: Arc<ServerConfig>,
    server_name: &str,
) -> Result<Handshake> {
    let (tcp_client, tcp_server) = tcp_pair().await?;
    let name = ServerName::try_from(server_name.to_owned())
        .with_context(|| format!("server name {server_name}"))?;
    Ok(tokio::join!(
        TlsConnector::from(client).connect(name, tcp_client),
        TlsAcceptor::from(server).accept(tcp_server),
    ))
}

/// Both ends of a TLS 1.3 connection set up the way agent and relay set it up: a fresh
/// self-signed relay certificate, the agent pinning its fingerprint.
pub async fn pinned_tls_pair(
) -> Result<(client::TlsStream<TcpStream>, server::TlsStream<TcpStream>)> {
    let relay = self_signed()?;
    let client = client_config(&RelayTrust::Pin(relay.pin()?))?;
    let (client, server) = handshake(client, relay.server_config()?, "localhost").await?;
    Ok((
        client.context("client side of the TLS handshake")?,
        server.context("server side of the TLS handshake")?,
    ))
}
