//! The real `porthole-relay` binary: the start-up banner, the certificate and admin token it
//! creates in the data dir, what a restart keeps, flag errors, and settings from `PORTHOLE_*`
//! variables. Every child is killed by a guard, even when a test fails.

mod common;

use std::fs;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use base64::Engine;
use porthole_relay::config::PortRange;
use reqwest::StatusCode;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

/// Longest wait for the banner, or for a refused start to exit (a cold debug binary on a
/// busy machine can be slow to start; this bounds a hang, it measures nothing).
const PROCESS_WAIT: Duration = Duration::from_secs(20);

/// The last banner line: what users run.
const BANNER_END: &str = "ssh -p <port> <user>@relay.test";

/// A running `porthole-relay`, killed and reaped on drop.
struct RelayProcess {
    /// The child.
    child: Child,
    /// Its stdout, line by line (a reader thread feeds it).
    stdout: Receiver<String>,
    /// Its stderr so far (a reader thread fills it), for failure messages.
    stderr: Arc<Mutex<String>>,
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The binary with a clean environment (no `PORTHOLE_*` from the caller) run from `cwd`, so
/// a default data dir could never land in the source tree.
fn relay_command(cwd: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_porthole-relay"));
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("PORTHOLE_") {
            cmd.env_remove(name);
        }
    }
    cmd.current_dir(cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// Flags for a relay on loopback with data in `data` (the port range is left to the caller).
fn base_args(cmd: &mut Command, data: &Path) {
    cmd.arg("--data-dir")
        .arg(data)
        .args(["--agent-listen", "127.0.0.1:0"])
        .args(["--api-listen", "127.0.0.1:0"])
        .args(["--public-host", "relay.test"])
        .args(["--public-bind", "127.0.0.1"]);
}

impl RelayProcess {
    fn spawn(mut cmd: Command) -> Result<Self> {
        let mut child = cmd.spawn().context("spawning porthole-relay")?;
        let out = child.stdout.take().context("no stdout pipe")?;
        let err = child.stderr.take().context("no stderr pipe")?;
        let (tx, stdout) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let sink = stderr.clone();
        thread::spawn(move || {
            for line in BufReader::new(err).lines() {
                let Ok(line) = line else { break };
                if let Ok(mut s) = sink.lock() {
                    s.push_str(&line);
                    s.push('\n');
                }
            }
        });
        Ok(Self {
            child,
            stdout,
            stderr,
        })
    }

    fn stderr(&self) -> String {
        self.stderr.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Reads stdout until the banner's last line; returns every banner line.
    fn banner(&self) -> Result<Vec<String>> {
        let until = Instant::now() + PROCESS_WAIT;
        let mut lines = Vec::new();
        loop {
            let left = until.saturating_duration_since(Instant::now());
            match self.stdout.recv_timeout(left) {
                Ok(line) => {
                    let done = line.contains(BANNER_END);
                    lines.push(line);
                    if done {
                        return Ok(lines);
                    }
                }
                Err(RecvTimeoutError::Timeout) => bail!(
                    "no complete banner within {PROCESS_WAIT:?}; stdout so far:\n{}\nstderr:\n{}",
                    lines.join("\n"),
                    self.stderr()
                ),
                Err(RecvTimeoutError::Disconnected) => bail!(
                    "porthole-relay closed stdout before the banner was complete:\n{}\nstderr:\n{}",
                    lines.join("\n"),
                    self.stderr()
                ),
            }
        }
    }

    /// Waits (bounded) for the process to exit by itself.
    fn wait_exit(&mut self) -> Result<ExitStatus> {
        let until = Instant::now() + PROCESS_WAIT;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            ensure!(
                Instant::now() < until,
                "porthole-relay still running after {PROCESS_WAIT:?}; stderr:\n{}",
                self.stderr()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Runs a start that must be refused; returns its stderr.
fn refused_start(cmd: Command) -> Result<String> {
    let mut relay = RelayProcess::spawn(cmd)?;
    let status = relay.wait_exit()?;
    // The reader thread sees EOF once the process is gone; give it a bounded moment.
    let until = Instant::now() + PROCESS_WAIT;
    let mut stderr = relay.stderr();
    while stderr.is_empty() && Instant::now() < until {
        thread::sleep(Duration::from_millis(20));
        stderr = relay.stderr();
    }
    ensure!(!status.success(), "start succeeded; stderr:\n{stderr}");
    Ok(stderr)
}

/// The text after `label` on the banner line that starts with it.
fn banner_value<'a>(lines: &'a [String], label: &str) -> Result<&'a str> {
    lines
        .iter()
        .find_map(|l| l.trim_start().strip_prefix(label))
        .map(str::trim)
        .with_context(|| format!("no `{label}` line in the banner:\n{}", lines.join("\n")))
}

/// SHA-256 (hex) of the DER of the first certificate in a PEM file.
fn pem_cert_fingerprint(path: &Path) -> Result<String> {
    let pem = fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let begin = "-----BEGIN CERTIFICATE-----";
    let end = "-----END CERTIFICATE-----";
    let start = pem.find(begin).context("no BEGIN CERTIFICATE")? + begin.len();
    let stop = start + pem[start..].find(end).context("no END CERTIFICATE")?;
    let b64: String = pem[start..stop]
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    let der = base64::engine::general_purpose::STANDARD.decode(b64)?;
    Ok(hex::encode(Sha256::digest(der)))
}

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.chars().all(|c| c.is_ascii_hexdigit())
}

/// What the first and later starts share.
struct DataDir {
    /// The test's scratch dir (also the child's working dir).
    _tmp: tempfile::TempDir,
    /// `<tmp>/data`.
    data: PathBuf,
    /// `<tmp>` as a path.
    root: PathBuf,
}

fn data_dir() -> Result<DataDir> {
    let tmp = tempfile::tempdir()?;
    let root = tmp.path().to_path_buf();
    Ok(DataDir {
        data: root.join("data"),
        root,
        _tmp: tmp,
    })
}

fn start_with_flags(dir: &DataDir, range: PortRange) -> Result<(RelayProcess, Vec<String>)> {
    let mut cmd = relay_command(&dir.root);
    base_args(&mut cmd, &dir.data);
    cmd.arg("--port-range").arg(range.to_string());
    let relay = RelayProcess::spawn(cmd)?;
    let banner = relay.banner()?;
    Ok((relay, banner))
}

/// Sends requests to a relay's API (the binary's, so a runtime of our own).
fn api<T>(f: impl std::future::Future<Output = Result<T>>) -> Result<T> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(f)
}

#[test]
fn first_start_creates_cert_and_token_and_restart_keeps_them() -> Result<()> {
    let dir = data_dir()?;
    let (relay, banner) = start_with_flags(&dir, common::port_range(10))?;
    let text = banner.join("\n");

    let cert_path = dir.data.join("tls").join("cert.pem");
    let cert_line = banner_value(&banner, "TLS certificate")?;
    assert_eq!(
        cert_line,
        format!("{} (self-signed, generated now)", cert_path.display()),
        "{text}"
    );
    let fingerprint = banner_value(&banner, "SHA-256")?;
    assert!(is_hex(fingerprint, 64), "{text}");
    assert_eq!(
        fingerprint,
        pem_cert_fingerprint(&cert_path)?,
        "banner fingerprint"
    );

    let token_path = dir.data.join("admin.token");
    assert_eq!(
        banner_value(&banner, "admin token")?,
        format!("{} (created now, mode 0600)", token_path.display()),
        "{text}"
    );
    let mode = fs::metadata(&token_path)?.permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "admin token mode {mode:o}");
    let token = fs::read_to_string(&token_path)?.trim().to_owned();
    let digits = token.strip_prefix("pha_").context("token without `pha_`")?;
    assert!(
        is_hex(digits, 64),
        "admin token is not 256-bit hex: {token}"
    );

    let agent_command = banner
        .iter()
        .find(|l| l.contains("porthole-agent --relay relay.test:"))
        .with_context(|| format!("no agent command in the banner:\n{text}"))?;
    assert!(
        agent_command.contains(&format!("--pin-sha256 {fingerprint}")),
        "{agent_command}"
    );
    // The join token goes in the environment, never as an argument (it would show in `ps`).
    assert!(
        agent_command
            .trim_start()
            .starts_with("PORTHOLE_TOKEN=<join_token> porthole-agent"),
        "{agent_command}"
    );
    assert!(
        !text.contains("--token"),
        "the banner passes the token as a flag:\n{text}"
    );

    // The API the banner announces takes the token from the file, and only it.
    let url = format!("{}/v1/sessions", banner_value(&banner, "HTTP API")?);
    let (with_token, without) = api(async {
        let client = reqwest::Client::new();
        let ok = client.get(&url).bearer_auth(&token).send().await?.status();
        let refused = client.get(&url).send().await?.status();
        Ok((ok, refused))
    })?;
    assert_eq!(with_token, StatusCode::OK);
    assert_eq!(without, StatusCode::UNAUTHORIZED);
    let fingerprint = fingerprint.to_owned();
    drop(relay);

    // Secret files readable by others are warned about at start.
    for name in ["admin.token", "user-token.secret"] {
        fs::set_permissions(dir.data.join(name), fs::Permissions::from_mode(0o644))?;
    }
    // Restart on the same data dir: same certificate, same token, nothing new.
    let (relay, banner) = start_with_flags(&dir, common::port_range(10))?;
    for what in ["admin token", "user token secret"] {
        let warning = format!("{what} file is readable by other users");
        let deadline = std::time::Instant::now() + PROCESS_WAIT;
        while !relay.stderr().contains(&warning) && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        assert!(
            relay.stderr().contains(&warning),
            "no `{warning}` warning:\n{}",
            relay.stderr()
        );
    }
    let text = banner.join("\n");
    assert_eq!(banner_value(&banner, "SHA-256")?, fingerprint, "{text}");
    assert_eq!(
        banner_value(&banner, "TLS certificate")?,
        format!("{} (self-signed)", cert_path.display())
    );
    assert_eq!(
        banner_value(&banner, "admin token")?,
        token_path.display().to_string()
    );
    assert!(
        !text.contains("generated now") && !text.contains("created now"),
        "{text}"
    );
    assert_eq!(fs::read_to_string(&token_path)?.trim(), token);
    assert_eq!(pem_cert_fingerprint(&cert_path)?, fingerprint);
    Ok(())
}

#[test]
fn tls_cert_without_tls_key_is_refused() -> Result<()> {
    let dir = data_dir()?;
    let mut cmd = relay_command(&dir.root);
    base_args(&mut cmd, &dir.data);
    cmd.arg("--port-range")
        .arg(common::port_range(10).to_string())
        .arg("--tls-cert")
        .arg(dir.root.join("cert.pem"));
    let stderr = refused_start(cmd)?;
    assert!(stderr.contains("--tls-key"), "{stderr}");
    Ok(())
}

#[test]
fn inverted_port_range_is_refused() -> Result<()> {
    let dir = data_dir()?;
    let mut cmd = relay_command(&dir.root);
    base_args(&mut cmd, &dir.data);
    cmd.args(["--port-range", "5-1"]);
    let stderr = refused_start(cmd)?;
    assert!(
        stderr.contains("5-1") && stderr.contains("port-range"),
        "{stderr}"
    );
    Ok(())
}

#[test]
fn port_range_from_the_environment_is_used() -> Result<()> {
    let dir = data_dir()?;
    let range = common::port_range(10);
    let mut cmd = relay_command(&dir.root);
    base_args(&mut cmd, &dir.data);
    cmd.env("PORTHOLE_PORT_RANGE", range.to_string());
    let relay = RelayProcess::spawn(cmd)?;
    let banner = relay.banner()?;
    assert_eq!(
        banner_value(&banner, "public ports")?,
        format!("127.0.0.1 ports {range}, announced as relay.test")
    );

    // Sessions really get ports from that range.
    let token = fs::read_to_string(dir.data.join("admin.token"))?;
    let url = format!("{}/v1/sessions", banner_value(&banner, "HTTP API")?);
    let (status, created) = api(async {
        let resp = reqwest::Client::new()
            .post(&url)
            .bearer_auth(token.trim())
            .json(&json!({"build_id": "b1", "app_id": "a1", "services": ["ssh"]}))
            .send()
            .await?;
        Ok((resp.status(), resp.json::<Value>().await?))
    })?;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let port = common::ports(&created)?[0];
    assert!(
        (range.lo..=range.hi).contains(&port),
        "port {port} outside {range}"
    );
    assert_eq!(created["endpoints"][0]["host"], "relay.test");
    Ok(())
}

/// Sends `signal` (`TERM`, ...) to the relay.
fn signal(relay: &RelayProcess, signal: &str) -> Result<()> {
    let status = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(relay.child.id().to_string())
        .status()?;
    ensure!(status.success(), "kill -{signal} failed");
    Ok(())
}

/// Waits (bounded) until the relay's stderr contains `needle`; returns all of it.
fn wait_stderr(relay: &RelayProcess, needle: &str) -> Result<String> {
    let until = Instant::now() + PROCESS_WAIT;
    loop {
        let text = relay.stderr();
        if text.contains(needle) {
            return Ok(text);
        }
        ensure!(
            Instant::now() < until,
            "no `{needle}` on stderr within {PROCESS_WAIT:?}:\n{text}"
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// README: "A port range overlapping the kernel's ephemeral range
/// (`net.ipv4.ip_local_port_range`) is a warning at start": the relay starts anyway and its
/// log says which ranges overlap and why it matters; a range below it gets no warning.
#[test]
fn start_warns_about_a_port_range_in_the_ephemeral_range() -> Result<()> {
    use porthole_relay::config::{parse_ephemeral_range, EPHEMERAL_RANGE_FILE};
    let text = fs::read_to_string(EPHEMERAL_RANGE_FILE)
        .with_context(|| format!("reading {EPHEMERAL_RANGE_FILE} (Linux only)"))?;
    let (lo, hi) = parse_ephemeral_range(&text)
        .with_context(|| format!("{EPHEMERAL_RANGE_FILE} holds {text:?}"))?;
    let inside = PortRange {
        lo: hi.saturating_sub(9).max(lo),
        hi,
    };
    let dir = data_dir()?;
    // Warnings and `stopped` are logged at `info` and above, whatever the caller's RUST_LOG.
    let start = |range: PortRange| -> Result<RelayProcess> {
        let mut cmd = relay_command(&dir.root);
        base_args(&mut cmd, &dir.data);
        cmd.arg("--port-range")
            .arg(range.to_string())
            .env("RUST_LOG", "info");
        let relay = RelayProcess::spawn(cmd)?;
        relay.banner()?;
        Ok(relay)
    };
    let relay = start(inside)?;
    let stderr = wait_stderr(&relay, "ephemeral")?;
    let line = stderr
        .lines()
        .find(|l| l.contains("ephemeral"))
        .unwrap_or_default();
    let expected = format!(
        "port_range: {inside} overlaps the kernel's ephemeral port range {lo}-{hi} \
         (net.ipv4.ip_local_port_range): outgoing connections of this host can take a \
         session's port, and binds then fail; choose a range below {lo}"
    );
    ensure!(
        line.contains("WARN") && line.contains(&expected),
        "expected a warning `{expected}`, got:\n{stderr}"
    );
    drop(relay);

    // Below the ephemeral range: quiet. The log is complete once `stopped` is in it.
    let below = common::port_range(10);
    ensure!(below.hi < lo, "test ranges must lie below {lo}: {below}");
    let relay = start(below)?;
    signal(&relay, "TERM")?;
    let stderr = wait_stderr(&relay, "stopped")?;
    ensure!(
        !stderr.contains("ephemeral"),
        "a range below the ephemeral range was warned about:\n{stderr}"
    );
    Ok(())
}

/// README: `--audit-log -` writes the audit log to stdout: after the banner, creating a
/// session prints a `session_created` JSON line there, and no audit file is created.
#[test]
fn audit_log_dash_writes_json_lines_to_stdout() -> Result<()> {
    let dir = data_dir()?;
    let mut cmd = relay_command(&dir.root);
    base_args(&mut cmd, &dir.data);
    cmd.arg("--port-range")
        .arg(common::port_range(10).to_string())
        .args(["--audit-log", "-"]);
    let relay = RelayProcess::spawn(cmd)?;
    let banner = relay.banner()?;
    let token = fs::read_to_string(dir.data.join("admin.token"))?;
    let url = format!("{}/v1/sessions", banner_value(&banner, "HTTP API")?);
    let created = api(async {
        let resp = reqwest::Client::new()
            .post(&url)
            .bearer_auth(token.trim())
            .json(&json!({"build_id": "b-audit", "app_id": "a-audit", "services": ["ssh"]}))
            .send()
            .await?;
        ensure!(resp.status() == StatusCode::CREATED);
        Ok(resp.json::<Value>().await?)
    })?;
    let id = common::str_field(&created, "session_id")?;

    let until = Instant::now() + PROCESS_WAIT;
    let mut seen = Vec::new();
    let line = loop {
        let left = until.saturating_duration_since(Instant::now());
        let line = relay.stdout.recv_timeout(left).with_context(|| {
            format!(
                "no session_created on stdout; after the banner:\n{}\nstderr:\n{}",
                seen.join("\n"),
                relay.stderr()
            )
        })?;
        let v: Value = serde_json::from_str(&line)
            .with_context(|| format!("stdout line after the banner is not JSON: {line}"))?;
        ensure!(
            v["ts"].is_string() && v["event"].is_string(),
            "an audit line has `ts` and `event`: {line}"
        );
        if v["event"] == "session_created" {
            break v;
        }
        seen.push(line);
    };
    ensure!(
        line["session_id"] == id && line["build_id"] == "b-audit" && line["app_id"] == "a-audit",
        "session_created for {id}: {line}"
    );
    ensure!(
        !dir.data.join("audit.log").exists(),
        "with `--audit-log -` no audit file is written"
    );
    Ok(())
}
