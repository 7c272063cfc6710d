//! The peers Porthole is compared with, installed from crates.io when missing and
//! configured the same way as Porthole: one service, everything on loopback, the target
//! server behind it.
//! - rathole 0.5.0, TCP transport and TLS transport (PKCS#12 identity made with `openssl`);
//! - bore 0.6.0 (`bore server` + `bore local`), with a shared secret.
//!
//! Versions are pinned ([`PINNED`]): a binary that reports another version is reinstalled
//! (with `--peers`) or refused, never measured.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context as _};

use crate::tunnel::{free_port, wait_listening, wait_ready, Proc, Role, Tunnel};

/// A peer as installed from crates.io: crate, the exact version measured, binary.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct Peer {
    /// crates.io crate.
    #[serde(rename = "crate")]
    pub krate: &'static str,
    /// The exact version installed (`cargo install --locked CRATE@VERSION`) and accepted.
    pub version: &'static str,
    /// The binary it installs.
    #[serde(skip)]
    pub bin: &'static str,
}

/// rathole, pinned.
pub const RATHOLE: Peer = Peer {
    krate: "rathole",
    version: "0.5.0",
    bin: "rathole",
};
/// bore, pinned.
pub const BORE: Peer = Peer {
    krate: "bore-cli",
    version: "0.6.0",
    bin: "bore",
};
/// Every peer, as recorded in the JSON of a run with `--peers`.
pub const PINNED: [Peer; 2] = [RATHOLE, BORE];

/// bore's control port; bore has no flag to change it.
const BORE_CONTROL_PORT: u16 = 7835;
/// The token/secret both sides of a peer share.
const SECRET: &str = "porthole-bench-shared-secret";
/// Password of the PKCS#12 identity for rathole's TLS transport.
const P12_PASSWORD: &str = "porthole-bench";

/// rathole's transports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RatholeTransport {
    /// Plain TCP between server and client.
    Tcp,
    /// TLS (native-tls) between server and client.
    Tls,
}

/// The version a peer's `--version` output names: its first word that starts with a digit
/// (`rathole 0.5.0`, `bore-cli 0.6.0`).
pub fn reported_version(output: &str) -> Option<&str> {
    output
        .split_whitespace()
        .find(|w| w.starts_with(|c: char| c.is_ascii_digit()))
}

/// The version `bin --version` reports, if it runs.
fn installed_version(bin: &Path) -> Option<String> {
    let out = Command::new(bin).arg("--version").output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    reported_version(&text).map(str::to_owned)
}

/// Returns the peer's binary under `root/bin`, installing the pinned version there with
/// `cargo install --locked` when it is missing, or present in another version, and `install`
/// is set. A binary of another version is never measured.
fn ensure(root: &Path, peer: Peer, install: bool) -> anyhow::Result<PathBuf> {
    let Peer {
        krate,
        version,
        bin,
    } = peer;
    let path = root.join("bin").join(bin);
    let found = path.is_file().then(|| installed_version(&path));
    match &found {
        Some(Some(v)) if v.as_str() == version => return Ok(path),
        _ if !install => {
            let what = match found {
                None => "is not installed".to_owned(),
                Some(Some(v)) => format!("is version {v}, the benchmark pins {version}"),
                Some(None) => "does not report its version".to_owned(),
            };
            bail!(
                "{} {what} (pass --peers to install {krate} {version})",
                path.display()
            );
        }
        _ => {}
    }
    eprintln!(
        "installing {krate} {version} into {} (cargo install --locked)…",
        root.display()
    );
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let log = root.join(format!("install-{krate}.log"));
    std::fs::create_dir_all(root)?;
    let out = std::fs::File::create(&log)?;
    // A version without an operator is exact for `cargo install`; --force replaces a binary
    // of another version.
    let status = Command::new(cargo)
        .args(["install", "--locked", "--force", "--root"])
        .arg(root)
        .arg(format!("{krate}@{version}"))
        .stdout(out.try_clone()?)
        .stderr(out)
        .status()
        .context("running cargo install")?;
    if !status.success() || !path.is_file() {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(8).collect();
        bail!(
            "cargo install {krate}@{version} failed ({status}); last lines of {}:\n{}",
            log.display(),
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    match installed_version(&path) {
        Some(v) if v == version => Ok(path),
        other => bail!(
            "{} reports version {other:?} after installing {krate} {version}",
            path.display()
        ),
    }
}

/// Starts a rathole server and client for `target` and waits until they carry an echo.
pub fn start_rathole(
    root: &Path,
    install: bool,
    transport: RatholeTransport,
    work: &Path,
    target: SocketAddr,
) -> anyhow::Result<Tunnel> {
    let bin = ensure(root, RATHOLE, install)?;
    let control = free_port()?;
    let visitor = free_port()?;
    let (server_tls, client_tls) = match transport {
        RatholeTransport::Tcp => ("type = \"tcp\"\n".to_owned(), "type = \"tcp\"\n".to_owned()),
        RatholeTransport::Tls => tls_sections(work)?,
    };
    let server_toml = format!(
        "[server]\nbind_addr = \"127.0.0.1:{control}\"\n\n[server.transport]\n{server_tls}\n\
         [server.services.bench]\ntoken = \"{SECRET}\"\nbind_addr = \"127.0.0.1:{visitor}\"\n"
    );
    let client_toml = format!(
        "[client]\nremote_addr = \"127.0.0.1:{control}\"\n\n[client.transport]\n{client_tls}\n\
         [client.services.bench]\ntoken = \"{SECRET}\"\nlocal_addr = \"{target}\"\n"
    );
    let server_cfg = work.join("server.toml");
    let client_cfg = work.join("client.toml");
    std::fs::write(&server_cfg, server_toml)?;
    std::fs::write(&client_cfg, client_toml)?;
    let mut cmd = Command::new(&bin);
    cmd.arg("--server").arg(&server_cfg);
    let server = Proc::spawn(Role::Server, cmd, &work.join("server.log"))?;
    let mut cmd = Command::new(&bin);
    cmd.arg("--client").arg(&client_cfg);
    let client = Proc::spawn(Role::Client, cmd, &work.join("client.log"))?;
    let mut tunnel = Tunnel {
        visitor: SocketAddr::from(([127, 0, 0, 1], visitor)),
        procs: vec![server, client],
    };
    wait_ready(&mut tunnel)?;
    Ok(tunnel)
}

/// The `[*.transport]` bodies for TLS: a self-signed ECDSA P-256 certificate for
/// `localhost` (the key type Porthole's relay generates), packed as PKCS#12 for the server.
fn tls_sections(work: &Path) -> anyhow::Result<(String, String)> {
    let key = work.join("key.pem");
    let cert = work.join("cert.pem");
    let p12 = work.join("identity.p12");
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-days",
        "30",
        "-subj",
        "/CN=localhost",
        "-addext",
        "subjectAltName=DNS:localhost",
        "-keyout",
        path_str(&key)?,
        "-out",
        path_str(&cert)?,
    ])?;
    let pass = format!("pass:{P12_PASSWORD}");
    openssl(&[
        "pkcs12",
        "-export",
        "-inkey",
        path_str(&key)?,
        "-in",
        path_str(&cert)?,
        "-out",
        path_str(&p12)?,
        "-passout",
        &pass,
    ])?;
    let server = format!(
        "type = \"tls\"\n[server.transport.tls]\npkcs12 = \"{}\"\npkcs12_password = \"{P12_PASSWORD}\"\n",
        p12.display()
    );
    let client = format!(
        "type = \"tls\"\n[client.transport.tls]\ntrusted_root = \"{}\"\nhostname = \"localhost\"\n",
        cert.display()
    );
    Ok((server, client))
}

fn path_str(p: &Path) -> anyhow::Result<&str> {
    p.to_str()
        .with_context(|| format!("{} is not UTF-8", p.display()))
}

fn openssl(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .context("running `openssl` (install the openssl package for rathole's TLS transport)")?;
    if !out.status.success() {
        bail!(
            "openssl {} failed: {}",
            args.first().unwrap_or(&""),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Starts `bore server` and `bore local` for `target` and waits until they carry an echo.
pub fn start_bore(
    root: &Path,
    install: bool,
    work: &Path,
    target: SocketAddr,
) -> anyhow::Result<Tunnel> {
    let bin = ensure(root, BORE, install)?;
    if std::net::TcpListener::bind(("127.0.0.1", BORE_CONTROL_PORT)).is_err() {
        bail!("bore's fixed control port {BORE_CONTROL_PORT} is taken on this machine");
    }
    let visitor = free_port()?;
    let mut cmd = Command::new(&bin);
    cmd.args(["server", "--bind-addr", "127.0.0.1", "--secret", SECRET]);
    let mut server = Proc::spawn(Role::Server, cmd, &work.join("server.log"))?;
    wait_listening(
        &mut server,
        SocketAddr::from(([127, 0, 0, 1], BORE_CONTROL_PORT)),
    )
    .context("bore server did not start")?;
    let mut cmd = Command::new(&bin);
    cmd.arg("local")
        .arg(target.port().to_string())
        .args(["--local-host", "127.0.0.1", "--to", "127.0.0.1"])
        .args(["--port", &visitor.to_string(), "--secret", SECRET]);
    let client = Proc::spawn(Role::Client, cmd, &work.join("client.log"))?;
    let mut tunnel = Tunnel {
        visitor: SocketAddr::from(([127, 0, 0, 1], visitor)),
        procs: vec![server, client],
    };
    wait_ready(&mut tunnel)?;
    Ok(tunnel)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_version_is_the_first_word_starting_with_a_digit() {
        assert_eq!(reported_version("rathole 0.5.0\n"), Some("0.5.0"));
        assert_eq!(reported_version("bore-cli 0.6.0"), Some("0.6.0"));
        assert_eq!(reported_version("usage: bore"), None);
        assert_eq!(reported_version(""), None);
    }
}
