//! The TLS setup over real loopback handshakes: pinning, CA files, ALPN, TLS 1.3, and the
//! errors a user sees for bad pins and bad PEM files.
//!
//! Not tested here: refusing a TLS 1.2-only client. The workspace builds rustls without its
//! `tls12` feature, so such a client cannot be built, and the server cannot speak TLS 1.2.

mod common;

use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, ensure, Context, Result};
use common::{ca_and_leaf, handshake, self_signed, within, Handshake};
use porthole_protocol::limits::ALPN;
use porthole_protocol::tls::{
    client_config, fingerprint_sha256, load_certs, load_key, parse_pin, server_config, RelayTrust,
    TlsError,
};
use rustls::{CertificateError, ProtocolVersion};
use sha2::{Digest, Sha256};
use tempfile::NamedTempFile;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn pem_file(contents: &str) -> Result<NamedTempFile> {
    let mut file = NamedTempFile::new()?;
    file.write_all(contents.as_bytes())?;
    file.flush()?;
    Ok(file)
}

/// The rustls error behind a failed handshake, if that is what failed it.
fn rustls_error(err: &std::io::Error) -> Option<&rustls::Error> {
    err.get_ref()?.downcast_ref::<rustls::Error>()
}

/// Checks that both sides of `outcome` succeeded, negotiated TLS 1.3 and `porthole/1`, and
/// carry bytes both ways.
async fn check_established(outcome: Handshake) -> Result<()> {
    let mut client = outcome.0.context("client handshake")?;
    let mut server = outcome.1.context("server handshake")?;
    for (side, version, alpn) in [
        (
            "client",
            client.get_ref().1.protocol_version(),
            client.get_ref().1.alpn_protocol(),
        ),
        (
            "server",
            server.get_ref().1.protocol_version(),
            server.get_ref().1.alpn_protocol(),
        ),
    ] {
        ensure!(
            version == Some(ProtocolVersion::TLSv1_3),
            "{side} negotiated {version:?}"
        );
        ensure!(alpn == Some(ALPN), "{side} negotiated ALPN {alpn:?}");
    }

    client.write_all(b"ping").await?;
    client.flush().await?;
    let mut got = [0u8; 4];
    server.read_exact(&mut got).await?;
    ensure!(&got == b"ping", "server read {got:?}");
    server.write_all(b"pong").await?;
    server.flush().await?;
    client.read_exact(&mut got).await?;
    ensure!(&got == b"pong", "client read {got:?}");
    Ok(())
}

#[test]
fn fingerprint_is_sha256_of_the_der_and_parses_back_as_a_pin() -> Result<()> {
    let relay = self_signed()?;
    let fingerprint = fingerprint_sha256(&relay.cert);
    let expected: [u8; 32] = Sha256::digest(relay.cert.as_ref()).into();
    ensure!(
        fingerprint == hex::encode(expected),
        "fingerprint {fingerprint}"
    );
    let colons = fingerprint
        .to_uppercase()
        .as_bytes()
        .chunks(2)
        .map(|pair| String::from_utf8_lossy(pair).into_owned())
        .collect::<Vec<_>>()
        .join(":");
    ensure!(parse_pin(&fingerprint)? == expected, "plain hex pin");
    ensure!(
        parse_pin(&colons)? == expected,
        "colon-separated pin {colons}"
    );
    Ok(())
}

#[tokio::test]
async fn pinned_handshake_negotiates_tls13_and_porthole_alpn() -> Result<()> {
    within(async {
        let relay = self_signed()?;
        let client = client_config(&RelayTrust::Pin(relay.pin()?))?;
        // The pin does not depend on the name the agent dials.
        for name in ["localhost", "relay.example.com"] {
            let outcome = handshake(client.clone(), relay.server_config()?, name).await?;
            check_established(outcome)
                .await
                .with_context(|| format!("dialing {name}"))?;
        }
        Ok(())
    })
    .await
}

#[tokio::test]
async fn wrong_pin_fails_the_handshake_saying_pinned() -> Result<()> {
    within(async {
        let relay = self_signed()?;
        let impostor = self_signed()?;
        let client = client_config(&RelayTrust::Pin(relay.pin()?))?;
        let (client, server) = handshake(client, impostor.server_config()?, "localhost").await?;
        let Err(err) = client else {
            bail!("the client accepted a certificate that does not match its pin");
        };
        let message = err.to_string();
        ensure!(message.contains("pinned"), "error message: {message}");
        ensure!(
            message.contains(&fingerprint_sha256(&impostor.cert)),
            "error message does not say which certificate was offered: {message}"
        );
        ensure!(
            server.is_err(),
            "the server completed a handshake the client refused"
        );
        Ok(())
    })
    .await
}

#[tokio::test]
async fn ca_file_trusts_a_leaf_it_signed_for_the_right_name_only() -> Result<()> {
    within(async {
        let (ca, leaf) = ca_and_leaf("localhost")?;
        let ca_file = pem_file(&ca.cert_pem)?;
        let client = client_config(&RelayTrust::CaFile(ca_file.path().into()))?;
        let server = server_config(vec![leaf.cert.clone()], leaf.key())?;

        let outcome = handshake(client.clone(), server.clone(), "localhost").await?;
        check_established(outcome)
            .await
            .context("dialing localhost")?;

        let (wrong_name, _) = handshake(client, server, "other.example").await?;
        let Err(err) = wrong_name else {
            bail!("a certificate for localhost was accepted for other.example");
        };
        ensure!(
            matches!(
                rustls_error(&err),
                Some(rustls::Error::InvalidCertificate(
                    CertificateError::NotValidForName
                        | CertificateError::NotValidForNameContext { .. }
                ))
            ),
            "expected a name mismatch, got: {err}"
        );
        Ok(())
    })
    .await
}

#[tokio::test]
async fn ca_file_does_not_trust_a_certificate_from_elsewhere() -> Result<()> {
    within(async {
        let (ca, _) = ca_and_leaf("localhost")?;
        let stranger = self_signed()?;
        let ca_file = pem_file(&ca.cert_pem)?;
        let client = client_config(&RelayTrust::CaFile(ca_file.path().into()))?;
        let (outcome, _) = handshake(client, stranger.server_config()?, "localhost").await?;
        let Err(err) = outcome else {
            bail!("a certificate not signed by the CA file was accepted");
        };
        ensure!(
            matches!(
                rustls_error(&err),
                Some(rustls::Error::InvalidCertificate(
                    CertificateError::UnknownIssuer
                ))
            ),
            "expected an unknown issuer, got: {err}"
        );
        Ok(())
    })
    .await
}

#[tokio::test]
async fn client_offering_only_another_alpn_is_refused() -> Result<()> {
    within(async {
        let relay = self_signed()?;
        let mut config = (*client_config(&RelayTrust::Pin(relay.pin()?))?).clone();
        config.alpn_protocols = vec![b"h2".to_vec()];
        let (client, server) =
            handshake(Arc::new(config), relay.server_config()?, "localhost").await?;
        let Err(err) = server else {
            bail!("the server accepted a client that does not speak porthole/1");
        };
        ensure!(
            matches!(
                rustls_error(&err),
                Some(rustls::Error::NoApplicationProtocol)
            ),
            "expected no common application protocol, got: {err}"
        );
        ensure!(client.is_err(), "the client completed a refused handshake");
        Ok(())
    })
    .await
}

#[test]
fn cert_and_key_files_load_back_to_the_same_der() -> Result<()> {
    let (ca, leaf) = ca_and_leaf("localhost")?;
    let chain = pem_file(&format!("{}{}", leaf.cert_pem, ca.cert_pem))?;
    let key = pem_file(&leaf.key_pem)?;
    let certs = load_certs(chain.path())?;
    ensure!(
        certs == vec![leaf.cert.clone(), ca.cert.clone()],
        "load_certs returned {} certificates, not the leaf then the CA",
        certs.len()
    );
    let loaded = load_key(key.path())?;
    ensure!(
        loaded.secret_der() == leaf.key().secret_der(),
        "load_key returned another key"
    );
    server_config(certs, loaded)?;
    Ok(())
}

fn names(message: &str, path: &Path) -> bool {
    message.contains(&path.display().to_string())
}

#[test]
fn load_certs_without_a_certificate_names_the_file() -> Result<()> {
    let key_only = pem_file(&self_signed()?.key_pem)?;
    let empty = pem_file("not PEM at all\n")?;
    for file in [&key_only, &empty] {
        match load_certs(file.path()) {
            Ok(certs) => bail!("found {} certificates in a file without any", certs.len()),
            Err(err @ TlsError::NoCertificate(_)) => {
                let message = err.to_string();
                ensure!(
                    names(&message, file.path()),
                    "message does not name the file: {message}"
                );
            }
            Err(other) => bail!("expected NoCertificate, got {other:?}"),
        }
    }
    Ok(())
}

#[test]
fn load_certs_of_a_missing_file_names_the_file() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let missing = dir.path().join("relay.pem");
    match load_certs(&missing) {
        Ok(_) => bail!("loaded certificates from a file that does not exist"),
        Err(err @ TlsError::Read { .. }) => {
            let message = err.to_string();
            ensure!(
                names(&message, &missing),
                "message does not name the file: {message}"
            );
        }
        Err(other) => bail!("expected Read, got {other:?}"),
    }
    Ok(())
}

#[test]
fn load_key_of_a_certificate_only_file_is_no_key() -> Result<()> {
    let cert_only = pem_file(&self_signed()?.cert_pem)?;
    match load_key(cert_only.path()) {
        Ok(_) => bail!("found a private key in a certificate-only file"),
        Err(TlsError::NoKey(path)) => {
            ensure!(path == cert_only.path(), "NoKey names {}", path.display());
        }
        Err(other) => bail!("expected NoKey, got {other:?}"),
    }
    Ok(())
}

#[test]
fn ca_file_without_certificates_is_refused() -> Result<()> {
    let key_only = pem_file(&self_signed()?.key_pem)?;
    match client_config(&RelayTrust::CaFile(key_only.path().into())) {
        Ok(_) => bail!("built a client trusting an empty CA file"),
        Err(TlsError::NoCertificate(path)) => {
            ensure!(
                path == key_only.path(),
                "NoCertificate names {}",
                path.display()
            );
        }
        Err(other) => bail!("expected NoCertificate, got {other:?}"),
    }
    Ok(())
}

/// Data connections (and the agent's warm ones, refilled for every visitor) resume the TLS
/// session of an earlier connection: no certificate signature or check per connection.
#[tokio::test]
async fn later_connections_resume_the_tls_session() -> Result<()> {
    within(async {
        let relay = self_signed()?;
        let client = client_config(&RelayTrust::Pin(relay.pin()?))?;
        let server = relay.server_config()?;
        let mut kinds = Vec::new();
        for _ in 0..3 {
            let outcome = handshake(client.clone(), server.clone(), "localhost").await?;
            let kind = outcome
                .0
                .as_ref()
                .ok()
                .and_then(|c| c.get_ref().1.handshake_kind());
            // The ping-pong lets the client read the server's session tickets.
            check_established(outcome).await?;
            kinds.push(kind);
        }
        ensure!(
            kinds[0] == Some(rustls::HandshakeKind::Full),
            "first handshake: {kinds:?}"
        );
        ensure!(
            kinds[1..]
                .iter()
                .all(|k| *k == Some(rustls::HandshakeKind::Resumed)),
            "later handshakes resume: {kinds:?}"
        );
        Ok(())
    })
    .await
}
