//! The relay's error type.

use std::path::PathBuf;

use porthole_protocol::tls::TlsError;

use crate::store::StoreError;

/// What can go wrong in the relay outside a single connection.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// A setting is invalid.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A file in the data dir could not be read or written.
    #[error("{path}: {source}")]
    File {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: std::net::SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// TLS could not be set up.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The self-signed certificate could not be generated.
    #[error("cannot generate a self-signed certificate: {0}")]
    CertGen(#[from] rcgen::Error),
    /// The state store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A stored session record cannot be brought back.
    #[error("state store: session {id}: bad {what}")]
    BadRecord {
        /// The session.
        id: String,
        /// The field that does not parse.
        what: &'static str,
    },
    /// Every port of the public range is in use or cooling down.
    #[error("no free public port in {range} ({in_use} in use, {cooling} cooling down after revocation): widen --port-range or wait")]
    PoolExhausted {
        /// The configured range.
        range: String,
        /// Ports held by sessions.
        in_use: usize,
        /// Ports in cooldown.
        cooling: usize,
    },
}
