//! The peers Porthole is compared with, installed from crates.io when missing and
//! configured the same way as Porthole: one service, everything on loopback, the target
//! server behind it.
//! - rathole 0.5, TCP transport and TLS transport (PKCS#12 identity made with `openssl`);
//! - bore (`bore server` + `bore local`), with a shared secret.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context as _};

use crate::tunnel::{free_port, wait_listening, wait_ready, Proc, Role, Tunnel};

/// crates.io name, version requirement and installed binary of each peer.
const RATHOLE: (&str, &str, &str) = ("rathole", "^0.5", "rathole");
const BORE: (&str, &str, &str) = ("bore-cli", "*", "bore");
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

/// Returns the peer binary `bin` under `root/bin`, installing crate `krate` there with
/// `cargo install` when it is missing and `install` is set.
fn ensure(
    root: &Path,
    (krate, version, bin): (&str, &str, &str),
    install: bool,
) -> anyhow::Result<PathBuf> {
    let path = root.join("bin").join(bin);
    if path.is_file() {
        return Ok(path);
    }
    if !install {
        bail!(
            "{} is not installed (pass --peers to install it)",
            path.display()
        );
    }
    eprintln!(
        "installing {krate}@{version} into {} (cargo install)…",
        root.display()
    );
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let log = root.join(format!("install-{krate}.log"));
    std::fs::create_dir_all(root)?;
    let out = std::fs::File::create(&log)?;
    let status = Command::new(cargo)
        .args(["install", "--root"])
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
    Ok(path)
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
