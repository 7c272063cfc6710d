//! TLS setup for both sides: TLS 1.3 only, ALPN [`crate::limits::ALPN`], the ring provider.
//!
//! The agent verifies the relay by system roots, a CA file, or a pinned SHA-256 fingerprint
//! of the relay's certificate. There is deliberately no way to skip verification.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use sha2::{Digest, Sha256};

use crate::limits::ALPN;

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A certificate or key file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A PEM file held no certificate.
    #[error("{0} contains no PEM certificate")]
    NoCertificate(PathBuf),
    /// A PEM file held no private key.
    #[error("{0} contains no PEM private key (PKCS#8, PKCS#1 or SEC1)")]
    NoKey(PathBuf),
    /// A pin was not 64 hex digits.
    #[error("bad certificate pin `{0}`: expected the SHA-256 of the relay certificate as 64 hex digits (colons allowed)")]
    BadPin(String),
    /// The system has no usable root certificates.
    #[error("no system root certificates found: pass --ca-cert FILE or --pin-sha256 HEX")]
    NoSystemRoots,
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

/// How the agent decides that it talks to the real relay.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RelayTrust {
    /// The operating system's root certificates, with host name checks.
    SystemRoots,
    /// Certificates in a PEM file as roots, with host name checks.
    CaFile(PathBuf),
    /// Exactly the certificate whose DER has this SHA-256 (host name not checked: the pin is
    /// stronger than any name).
    Pin([u8; 32]),
}

/// The TLS 1.3 cipher suites both ends offer, in preference order.
///
/// AES-128-GCM comes first: on the x86-64 and arm64 machines relays and build machines run
/// on, AES-GCM runs on the CPU's AES and carry-less-multiply instructions, and AES-128 does 10
/// rounds per block against AES-256's 14, for a security margin far beyond what a session
/// that lives hours needs. `benches/benches/tls_records.rs` measures the three (seal + open
/// per byte); AES-256-GCM and ChaCha20-Poly1305 remain for peers without AES instructions.
pub fn cipher_suites() -> Vec<rustls::SupportedCipherSuite> {
    use rustls::crypto::ring::cipher_suite as suite;
    vec![
        suite::TLS13_AES_128_GCM_SHA256,
        suite::TLS13_AES_256_GCM_SHA384,
        suite::TLS13_CHACHA20_POLY1305_SHA256,
    ]
}

fn provider() -> Arc<CryptoProvider> {
    let mut provider = rustls::crypto::ring::default_provider();
    provider.cipher_suites = cipher_suites();
    Arc::new(provider)
}

/// SHA-256 of a DER certificate, lowercase hex: the relay prints it, agents pin it.
pub fn fingerprint_sha256(cert_der: &[u8]) -> String {
    hex::encode(Sha256::digest(cert_der))
}

/// Parses a pin: 64 hex digits, colons and case ignored.
pub fn parse_pin(text: &str) -> Result<[u8; 32], TlsError> {
    let digits: String = text.chars().filter(|c| *c != ':').collect();
    let mut pin = [0u8; 32];
    hex::decode_to_slice(digits.trim(), &mut pin).map_err(|_| TlsError::BadPin(text.to_owned()))?;
    Ok(pin)
}

/// Reads every certificate of a PEM file.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let data = std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.into(),
        source,
    })?;
    let certs: Vec<_> = rustls_pemfile::certs(&mut data.as_slice())
        .collect::<Result<_, _>>()
        .map_err(|source| TlsError::Read {
            path: path.into(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate(path.into()));
    }
    Ok(certs)
}

/// Reads the first private key of a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let data = std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.into(),
        source,
    })?;
    rustls_pemfile::private_key(&mut data.as_slice())
        .map_err(|source| TlsError::Read {
            path: path.into(),
            source,
        })?
        .ok_or_else(|| TlsError::NoKey(path.into()))
}

/// The relay's server configuration, with a fixed certificate.
pub fn server_config(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<Arc<ServerConfig>, TlsError> {
    server_config_with(Arc::new(CertResolver::new(chain, key)?))
}

/// The relay's server configuration, taking its certificate from `resolver` at each
/// handshake (so it can be replaced while the relay runs).
pub fn server_config_with(resolver: Arc<CertResolver>) -> Result<Arc<ServerConfig>, TlsError> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![ALPN.to_vec()];
    // Stateless session tickets (encrypted under a rotating key): every agent's data
    // connections resume without a full handshake, however many agents there are, and the
    // relay keeps no per-session cache for it.
    config.ticketer = rustls::crypto::ring::Ticketer::new()?;
    Ok(Arc::new(config))
}

/// The relay's certificate, replaceable at run time (certificates rotate): handshakes after
/// [`CertResolver::replace`] present the new one; established connections are untouched.
#[derive(Debug)]
pub struct CertResolver {
    /// The certificate and key in use.
    current: std::sync::RwLock<Arc<CertifiedKey>>,
}

impl CertResolver {
    /// A resolver presenting `chain` signed by `key`.
    pub fn new(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Result<Self, TlsError> {
        Ok(Self {
            current: std::sync::RwLock::new(certified(chain, key)?),
        })
    }

    /// Swaps in a new certificate and key (checked first: a bad pair leaves the old one).
    pub fn replace(
        &self,
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Result<(), TlsError> {
        let next = certified(chain, key)?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = next;
        Ok(())
    }

    /// SHA-256 of the leaf certificate in use.
    pub fn fingerprint(&self) -> String {
        let current = self
            .current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        current
            .cert
            .first()
            .map(|c| fingerprint_sha256(c.as_ref()))
            .unwrap_or_default()
    }
}

fn certified(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<Arc<CertifiedKey>, TlsError> {
    let signing = provider().key_provider.load_private_key(key)?;
    let certified = CertifiedKey::new(chain, signing);
    certified.keys_match()?;
    Ok(Arc::new(certified))
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        )
    }
}

/// The agent's client configuration. Keep one per process: it caches TLS sessions, so data
/// connections resume instead of doing a full handshake.
pub fn client_config(trust: &RelayTrust) -> Result<Arc<ClientConfig>, TlsError> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?;
    let mut config = match trust {
        RelayTrust::Pin(pin) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinVerifier {
                pin: *pin,
                provider: provider(),
            }))
            .with_no_client_auth(),
        RelayTrust::CaFile(path) => {
            let mut roots = RootCertStore::empty();
            for cert in load_certs(path)? {
                roots.add(cert)?;
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        RelayTrust::SystemRoots => {
            let mut roots = RootCertStore::empty();
            let found = rustls_native_certs::load_native_certs();
            let (added, _ignored) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                return Err(TlsError::NoSystemRoots);
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
    };
    config.alpn_protocols = vec![ALPN.to_vec()];
    Ok(Arc::new(config))
}

/// Accepts exactly one certificate, by the SHA-256 of its DER; handshake signatures are
/// still verified, so only the holder of that certificate's key passes.
#[derive(Debug)]
struct PinVerifier {
    pin: [u8; 32],
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let got: [u8; 32] = Sha256::digest(end_entity.as_ref()).into();
        if got == self.pin {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(format!(
                "relay certificate SHA-256 is {}, not the pinned {}",
                hex::encode(got),
                hex::encode(self.pin)
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_parse_with_or_without_colons() {
        let hex64 = "ab".repeat(32);
        let colons = vec!["AB"; 32].join(":");
        assert_eq!(parse_pin(&hex64).ok(), Some([0xab; 32]));
        assert_eq!(parse_pin(&colons).ok(), Some([0xab; 32]));
        assert!(parse_pin("abcd").is_err());
        assert!(parse_pin(&"zz".repeat(32)).is_err());
    }
}
