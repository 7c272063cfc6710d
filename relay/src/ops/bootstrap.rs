//! Prepares the data dir on start: the TLS certificate (the configured one, or a self-signed
//! one generated on first start) and the admin API token (created 0600 if absent).

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use porthole_protocol::tls::{
    fingerprint_sha256, load_certs, load_key, server_config_with, CertResolver,
};
use porthole_protocol::Secret;
use tokio_rustls::rustls::ServerConfig;

use crate::config::RelayConfig;
use crate::error::RelayError;

/// What start-up prepared, and what the operator needs to know about it.
#[derive(Debug)]
pub struct Bootstrap {
    /// TLS configuration for the agent endpoint.
    pub tls: Arc<ServerConfig>,
    /// The certificate the TLS configuration presents (replaced on SIGHUP).
    pub cert: Arc<CertResolver>,
    /// The key file in use.
    pub key_path: PathBuf,
    /// The certificate file in use.
    pub cert_path: PathBuf,
    /// Whether the certificate was generated during this start.
    pub cert_generated: bool,
    /// Whether the certificate is the relay's own self-signed one.
    pub self_signed: bool,
    /// SHA-256 of the leaf certificate's DER, hex.
    pub fingerprint: String,
    /// The admin API token file.
    pub admin_token_path: PathBuf,
    /// Whether the token file was created during this start.
    pub admin_token_created: bool,
    /// The admin API token.
    pub admin_token: Secret,
}

fn file_err(path: &Path) -> impl FnOnce(std::io::Error) -> RelayError + '_ {
    move |source| RelayError::File {
        path: path.to_owned(),
        source,
    }
}

/// Creates the data dir if needed and loads or creates the certificate and admin token.
pub fn prepare(config: &RelayConfig, public_host: &str) -> Result<Bootstrap, RelayError> {
    let dir = &config.data_dir;
    // Owner-only: the directory holds the admin token and the TLS key.
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(file_err(dir))?;
    let (cert_path, key_path, cert_generated, self_signed) =
        match (&config.tls_cert, &config.tls_key) {
            (Some(cert), Some(key)) => (cert.clone(), key.clone(), false, false),
            (None, None) => {
                let tls_dir = dir.join("tls");
                let (cert, key) = (tls_dir.join("cert.pem"), tls_dir.join("key.pem"));
                let generated = if cert.exists() && key.exists() {
                    false
                } else {
                    generate_self_signed(&tls_dir, &cert, &key, public_host)?;
                    true
                };
                (cert, key, generated, true)
            }
            _ => {
                return Err(RelayError::Config(
                    "--tls-cert and --tls-key go together".into(),
                ))
            }
        };
    let chain = load_certs(&cert_path)?;
    let fingerprint = chain
        .first()
        .map(|c| fingerprint_sha256(c.as_ref()))
        .unwrap_or_default();
    let cert = Arc::new(CertResolver::new(chain, load_key(&key_path)?)?);
    let tls = server_config_with(cert.clone())?;
    let admin_token_path = dir.join("admin.token");
    let (admin_token, admin_token_created) = load_or_create_token(&admin_token_path)?;
    Ok(Bootstrap {
        tls,
        cert,
        key_path,
        cert_path,
        cert_generated,
        self_signed,
        fingerprint,
        admin_token_path,
        admin_token_created,
        admin_token,
    })
}

fn generate_self_signed(
    dir: &Path,
    cert: &Path,
    key: &Path,
    public_host: &str,
) -> Result<(), RelayError> {
    fs::create_dir_all(dir).map_err(file_err(dir))?;
    let mut names = vec![
        public_host.to_owned(),
        "localhost".to_owned(),
        "127.0.0.1".to_owned(),
        "::1".to_owned(),
    ];
    names.sort();
    names.dedup();
    let certified = rcgen::generate_simple_self_signed(names)?;
    write_private(key, certified.key_pair.serialize_pem().as_bytes())?;
    fs::write(cert, certified.cert.pem()).map_err(file_err(cert))?;
    tracing::info!(cert = %cert.display(), "generated a self-signed TLS certificate");
    Ok(())
}

fn load_or_create_token(path: &Path) -> Result<(Secret, bool), RelayError> {
    match fs::read_to_string(path) {
        Ok(text) => {
            let token = text.trim();
            if token.is_empty() {
                return Err(RelayError::Config(format!(
                    "{} is empty: delete it to get a new admin token",
                    path.display()
                )));
            }
            warn_if_loose(path, "admin token");
            Ok((Secret::new(token), false))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let token = Secret::generate("pha_");
            write_private(path, format!("{}\n", token.expose()).as_bytes())?;
            Ok((token, true))
        }
        Err(e) => Err(RelayError::File {
            path: path.to_owned(),
            source: e,
        }),
    }
}

/// Warns when the secret file `path` (`what` it holds) can be read or written by other
/// users than its owner.
pub fn warn_if_loose(path: &Path, what: &str) {
    if let Ok(meta) = fs::metadata(path) {
        if meta.permissions().mode() & 0o077 != 0 {
            tracing::warn!(path = %path.display(), "{what} file is readable by other users: chmod 600 it");
        }
    }
}

/// Writes a new file readable by its owner only.
pub fn write_private(path: &Path, data: &[u8]) -> Result<(), RelayError> {
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(file_err(path))?;
    file.write_all(data).map_err(file_err(path))
}
