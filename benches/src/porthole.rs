//! Porthole as a candidate: the release `porthole-relay` and `porthole-agent` binaries as
//! separate processes (so their CPU time and RSS are their own), one session with one
//! service pointing at the target server, created through the relay's real API.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context as _};
use serde_json::json;

use crate::http::post_json;
use crate::tunnel::{wait_ready, Proc, Role, Tunnel};

/// Visitor connections the harness may hold besides its idle connections (probes, the
/// loaded step's streams and ping-pong).
const VISITOR_MARGIN: usize = 64;
/// The relay's largest `--max-visitors`.
const MAX_VISITORS: usize = 1024;
/// Per-source-IP rate limits, raised so the harness (one source IP) is never throttled.
pub(crate) const RATE_BURST: &str = "1000000";
/// See [`RATE_BURST`].
pub(crate) const RATE_PER_MINUTE: &str = "100000000";

/// Where the relay and agent binaries are, and where their files go.
#[derive(Clone, Debug)]
pub struct PortholeSetup {
    /// Directory holding `porthole-relay` and `porthole-agent`.
    pub bin_dir: PathBuf,
    /// Scratch directory for this candidate (data dir, logs).
    pub work: PathBuf,
    /// Idle visitor connections the memory step holds at once.
    pub idle_conns: usize,
    /// The relay's `--data-plane`: `tls` or `tcp`.
    pub data_plane: &'static str,
}

/// What the relay printed at start.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Banner {
    /// The agent endpoint (`HOST:PORT`).
    pub agent: String,
    /// The HTTP API.
    pub api: SocketAddr,
    /// SHA-256 of the relay's self-signed certificate (agents pin it).
    pub fingerprint: String,
    /// The admin token file.
    pub admin_token_path: PathBuf,
}

/// Where the relay listens: `127.0.0.1:0` addresses for a one-off relay, fixed ones for a
/// relay that is restarted and must come back where its agents and sessions expect it.
#[derive(Clone, Debug)]
pub(crate) struct RelayAddrs {
    /// `--agent-listen`.
    pub agent: SocketAddr,
    /// `--api-listen`.
    pub api: SocketAddr,
    /// `--data-listen` (used by the `tcp` data plane only).
    pub data: SocketAddr,
    /// `--port-range` (`LO-HI`).
    pub port_range: String,
}

impl RelayAddrs {
    /// Ports the kernel picks, and 16 public ports varied per run.
    fn ephemeral() -> Self {
        let any = SocketAddr::from(([127, 0, 0, 1], 0));
        Self {
            agent: any,
            api: any,
            data: any,
            port_range: port_range(),
        }
    }
}

/// Starts relay and agent for `target` and waits until a visitor gets an echo back.
pub fn start(setup: &PortholeSetup, target: SocketAddr) -> anyhow::Result<Tunnel> {
    let relay_bin = binary(&setup.bin_dir, "porthole-relay")?;
    let agent_bin = binary(&setup.bin_dir, "porthole-agent")?;
    let data = setup.work.join("data");
    let _ = std::fs::remove_dir_all(&data);
    let mut relay = Proc::spawn(
        Role::Server,
        relay_command(
            &relay_bin,
            &data,
            &RelayAddrs::ephemeral(),
            (setup.idle_conns + VISITOR_MARGIN).min(MAX_VISITORS),
            setup.data_plane,
        ),
        &setup.work.join("relay.log"),
    )?;
    let text = relay
        .wait_log(&["agent endpoint", "HTTP API", "SHA-256", "admin token"])
        .context("porthole-relay did not start")?;
    let banner = parse_banner(&text)?;
    let token = std::fs::read_to_string(&banner.admin_token_path)
        .with_context(|| format!("reading {}", banner.admin_token_path.display()))?;
    let created = create_session(banner.api, token.trim())?;
    let agent_cmd = agent_command(
        &agent_bin,
        &banner,
        target,
        &setup.work.join("agent.pid"),
        &created.join_token,
    );
    let port = created.port;
    let mut agent = Proc::spawn(Role::Client, agent_cmd, &setup.work.join("agent.log"))?;
    agent
        .wait_log(&["remote access session"])
        .context("porthole-agent did not register")?;
    let mut tunnel = Tunnel {
        visitor: SocketAddr::from(([127, 0, 0, 1], port)),
        procs: vec![relay, agent],
    };
    wait_ready(&mut tunnel)?;
    Ok(tunnel)
}

/// `dir/name`, or an error saying how to build it.
pub(crate) fn binary(dir: &Path, name: &str) -> anyhow::Result<PathBuf> {
    let path = dir.join(name);
    if !path.is_file() {
        bail!(
            "{} is missing: run `cargo build --release --workspace` (or drop --no-build)",
            path.display()
        );
    }
    Ok(path)
}

/// The relay's command line; `max_visitors` becomes the default of every session.
pub(crate) fn relay_command(
    bin: &Path,
    data: &Path,
    addrs: &RelayAddrs,
    max_visitors: usize,
    data_plane: &str,
) -> Command {
    let mut cmd = Command::new(bin);
    cmd.arg("--data-dir")
        .arg(data)
        .args(["--agent-listen", &addrs.agent.to_string()])
        .args(["--api-listen", &addrs.api.to_string()])
        .args(["--public-host", "127.0.0.1", "--public-bind", "127.0.0.1"])
        .args(["--port-range", &addrs.port_range])
        .args(["--max-visitors", &max_visitors.to_string()])
        .args(["--visitor-rate-burst", RATE_BURST])
        .args(["--visitor-rate-per-minute", RATE_PER_MINUTE])
        .args(["--data-plane", data_plane])
        .args(["--data-listen", &addrs.data.to_string()])
        // Every connection of the harness comes from 127.0.0.1: the per-source visitor cap
        // (4 by default, since the public-edge hardening) is lifted to the session's cap.
        // Through the environment, which relays from before the setting ignore, so older
        // binaries (`--bin-dir`) run with the same command line.
        .env("PORTHOLE_MAX_VISITORS_PER_SOURCE", max_visitors.to_string());
    cmd
}

/// The agent's command line: one `ssh` service forwarding to `target`, the relay's
/// self-signed certificate pinned, the join token in `PORTHOLE_TOKEN` (out of `ps`).
pub(crate) fn agent_command(
    bin: &Path,
    banner: &Banner,
    target: SocketAddr,
    pid_file: &Path,
    join_token: &str,
) -> Command {
    let mut cmd = Command::new(bin);
    cmd.args([
        "--relay",
        &banner.agent,
        "--pin-sha256",
        &banner.fingerprint,
    ])
    .args(["--service", &format!("ssh={target}")])
    .args(["--ssh-user", "bench"])
    .arg("--pid-file")
    .arg(pid_file)
    .env("PORTHOLE_TOKEN", join_token);
    cmd
}

/// 16 public ports below the ephemeral range, varied per run so parallel runs rarely meet.
fn port_range() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let lo = 21000 + (nanos / 1000 % 180) * 16;
    format!("{lo}-{}", lo + 15)
}

/// Reads the agent endpoint, API, fingerprint and admin token path from the relay's banner.
pub(crate) fn parse_banner(text: &str) -> anyhow::Result<Banner> {
    let field = |label: &str| -> anyhow::Result<String> {
        let line = text
            .lines()
            .find(|l| l.trim_start().starts_with(label))
            .with_context(|| format!("relay banner has no `{label}` line"))?;
        let rest = line.trim_start()[label.len()..].trim();
        Ok(rest
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_owned())
    };
    let api = field("HTTP API")?;
    let api = api.trim_start_matches("http://");
    Ok(Banner {
        agent: field("agent endpoint")?,
        api: api
            .parse()
            .with_context(|| format!("API address `{api}`"))?,
        fingerprint: field("SHA-256")?,
        admin_token_path: PathBuf::from(field("admin token")?),
    })
}

/// A session created through the API.
#[derive(Debug)]
pub(crate) struct Created {
    /// Its id.
    pub session_id: String,
    /// The agent's single-use join token.
    pub join_token: String,
    /// The public port of its one (ssh) service.
    pub port: u16,
}

/// Creates a one-service (ssh) session.
pub(crate) fn create_session(api: SocketAddr, admin: &str) -> anyhow::Result<Created> {
    let body = json!({
        "build_id": "bench",
        "app_id": "bench",
        "services": ["ssh"],
    });
    let (status, v) = post_json(api, "/v1/sessions", admin, &body)?;
    if status != 201 {
        bail!("creating a session answered {status}: {v}");
    }
    let token = v["join_token"]
        .as_str()
        .context("no join_token in the answer")?;
    let session_id = v["session_id"]
        .as_str()
        .context("no session_id in the answer")?;
    let port = v["endpoints"][0]["port"]
        .as_u64()
        .and_then(|p| u16::try_from(p).ok())
        .context("no endpoint port in the answer")?;
    Ok(Created {
        session_id: session_id.to_owned(),
        join_token: token.to_owned(),
        port,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn banner_fields_are_found() -> anyhow::Result<()> {
        let text =
            "porthole-relay 0.1.0 is running\n  agent endpoint  127.0.0.1:4000 (TLS 1.3)\n  \
                    HTTP API        http://127.0.0.1:5000\n  SHA-256         abcd\n  \
                    admin token     /tmp/x/admin.token (created now, mode 0600)\n";
        let b = parse_banner(text)?;
        assert_eq!(b.agent, "127.0.0.1:4000");
        assert_eq!(b.api, "127.0.0.1:5000".parse()?);
        assert_eq!(b.fingerprint, "abcd");
        assert_eq!(b.admin_token_path, PathBuf::from("/tmp/x/admin.token"));
        Ok(())
    }
}
