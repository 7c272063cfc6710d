//! The real `porthole-relay` binary as a child process, for tests that kill it (`SIGKILL`)
//! and start it again on the same data dir and ports.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{bail, Context as _};
use serde_json::Value;

/// The relay binary, built beside the test binaries (`cargo build --workspace` or
/// `scripts/test.sh` builds it).
pub fn binary() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .context("test binary has no target dir")?;
    let relay = dir.join("porthole-relay");
    if !relay.exists() {
        bail!(
            "{} is missing: build it with `cargo build -p porthole-relay` (scripts/test.sh does)",
            relay.display()
        );
    }
    Ok(relay)
}

/// A free loopback port (see [`super::peers::tools::free_port`]: never from the ephemeral
/// range, so a relay restarted on it finds it free again).
pub fn free_port() -> anyhow::Result<u16> {
    super::peers::tools::free_port()
}

/// A loopback port where connections are refused, reserved for as long as the returned
/// socket lives: it is bound but never listens, so no other test can take the port in the
/// meantime (as it could with a port that was merely free a moment ago).
pub fn refusing_port() -> anyhow::Result<(tokio::net::TcpSocket, u16)> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(([127, 0, 0, 1], 0).into())?;
    let port = socket.local_addr()?.port();
    Ok((socket, port))
}

/// Fixed addresses and data dir, so a restarted relay comes back at the same place.
pub struct RelaySetup {
    /// Data dir.
    pub data: tempfile::TempDir,
    /// Agent endpoint port.
    pub agent_port: u16,
    /// API port.
    pub api_port: u16,
    /// Public port range.
    pub range: String,
    /// The loopback address it listens on (agent endpoint, API, public ports); cluster
    /// tests give each node its own (127.0.0.2, ...).
    pub ip: std::net::Ipv4Addr,
}

impl RelaySetup {
    /// Fresh ports and data dir.
    pub fn new() -> anyhow::Result<Self> {
        let base = 26000 + (rand::random::<u16>() % 150) * 20;
        Ok(Self {
            data: tempfile::tempdir()?,
            agent_port: free_port()?,
            api_port: free_port()?,
            range: format!("{base}-{}", base + 19),
            ip: std::net::Ipv4Addr::LOCALHOST,
        })
    }

    /// Starts the relay and waits for its banner.
    pub fn start(&self) -> anyhow::Result<RelayProcess> {
        self.start_with(&[])
    }

    /// Starts the relay with extra flags and waits for its banner.
    pub fn start_with(&self, extra: &[&str]) -> anyhow::Result<RelayProcess> {
        self.start_logged(extra, None)
    }

    /// Starts the relay with extra flags, its log (stderr) going to `log` when given, and
    /// waits for its banner.
    pub fn start_logged(&self, extra: &[&str], log: Option<&Path>) -> anyhow::Result<RelayProcess> {
        self.start_logged_at(extra, log, "info")
    }

    /// [`RelaySetup::start_logged`] with `RUST_LOG` set to `filter` (e.g. `debug`).
    pub fn start_logged_at(
        &self,
        extra: &[&str],
        log: Option<&Path>,
        filter: &str,
    ) -> anyhow::Result<RelayProcess> {
        let stderr = match log {
            Some(path) => Stdio::from(std::fs::File::create(path)?),
            None => Stdio::null(),
        };
        let mut child = Command::new(binary()?)
            .arg("--data-dir")
            .arg(self.data.path())
            .args([
                "--agent-listen",
                &format!("{}:{}", self.ip, self.agent_port),
            ])
            .args(["--api-listen", &format!("{}:{}", self.ip, self.api_port)])
            .args([
                "--public-host",
                "127.0.0.1",
                "--public-bind",
                &self.ip.to_string(),
            ])
            .args(["--port-range", &self.range, "--heartbeat-interval", "1s"])
            .args(extra)
            .env("RUST_LOG", filter)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .context("starting porthole-relay")?;
        let out = child.stdout.take().context("relay stdout")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            // Keep draining after the banner: a closed pipe would make the relay's next
            // write fail.
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let mut pin = None;
        let mut process = RelayProcess {
            child,
            pin: String::new(),
            api: format!("http://{}:{}", self.ip, self.api_port),
        };
        while pin.is_none() {
            let line = rx
                .recv_timeout(Duration::from_secs(20))
                .context("relay did not print its banner")?;
            if let Some(fp) = line.trim().strip_prefix("SHA-256") {
                pin = Some(fp.trim().to_owned());
            }
        }
        process.pin = pin.unwrap_or_default();
        Ok(process)
    }

    /// The admin token the relay created.
    pub fn admin_token(&self) -> anyhow::Result<String> {
        Ok(
            std::fs::read_to_string(self.data.path().join("admin.token"))?
                .trim()
                .to_owned(),
        )
    }

    /// `POST /v1/sessions` for one SSH service with `extra` fields; returns the session id,
    /// join token and public port.
    pub fn create_session(
        &self,
        api: &str,
        extra: serde_json::Value,
    ) -> anyhow::Result<(String, String, u16)> {
        let mut body = serde_json::json!({"build_id": "b", "app_id": "a", "services": ["ssh"]});
        if let (Some(body), Some(extra)) = (body.as_object_mut(), extra.as_object()) {
            body.extend(extra.clone());
        }
        let v: Value = self
            .http()?
            .post(format!("{api}/v1/sessions"))
            .json(&body)
            .send()?
            .error_for_status()?
            .json()?;
        let port = v["endpoints"][0]["port"].as_u64().context("port")? as u16;
        Ok((
            v["session_id"].as_str().context("id")?.into(),
            v["join_token"].as_str().context("token")?.into(),
            port,
        ))
    }

    /// Starts the relay again on the same data dir and ports and checks what a restart must
    /// keep: the agent resumes by itself, the session is active with the same deadlines and
    /// endpoints as `before`, and SSH through its port works.
    pub fn restart_and_check_resumed(
        &self,
        agent: &super::agent::Agent,
        id: &str,
        before: &Value,
        sshd: &super::peers::sshd::Sshd,
        port: u16,
    ) -> anyhow::Result<RelayProcess> {
        let relay = self.start()?;
        agent.wait_line("resumed session", Duration::from_secs(30))?;
        let http = self.http()?;
        let after = super::wait_for(
            "the session to be active again",
            Duration::from_secs(20),
            || {
                relay
                    .session(&http, id)
                    .ok()
                    .filter(|v| v["state"] == "active")
            },
        )?;
        for field in ["deadline", "expires_at", "created_at", "endpoints"] {
            anyhow::ensure!(
                after[field] == before[field],
                "{field} must survive the restart: {} vs {}",
                after[field],
                before[field]
            );
        }
        let ok = super::peers::tools::run_with_timeout(
            sshd.ssh("127.0.0.1", port).arg("echo after restart"),
            Duration::from_secs(30),
        )?;
        anyhow::ensure!(ok.status.success(), "ssh after the restart: {}", ok.stderr);
        anyhow::ensure!(
            ok.stdout_text() == "after restart\n",
            "ssh said {:?}",
            ok.stdout_text()
        );
        Ok(relay)
    }

    /// An API client with the admin token.
    pub fn http(&self) -> anyhow::Result<reqwest::blocking::Client> {
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert(
            reqwest::header::AUTHORIZATION,
            format!("Bearer {}", self.admin_token()?).parse()?,
        );
        Ok(reqwest::blocking::Client::builder()
            .default_headers(headers)
            .timeout(Duration::from_secs(10))
            .build()?)
    }
}

/// A running relay process.
pub struct RelayProcess {
    /// The child.
    child: Child,
    /// Its certificate pin.
    pub pin: String,
    /// API base URL.
    pub api: String,
}

impl RelayProcess {
    /// `kill -9`.
    pub fn kill9(&mut self) -> anyhow::Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }

    /// Sends `signal` (e.g. `TERM`, `HUP`) with `kill`.
    pub fn signal(&self, signal: &str) -> anyhow::Result<()> {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status()?;
        anyhow::ensure!(status.success(), "kill -{signal} failed");
        Ok(())
    }

    /// Whether the process is still running (not exited).
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits for the relay to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> anyhow::Result<std::process::ExitStatus> {
        super::wait_for("porthole-relay to exit", timeout, || {
            self.child.try_wait().ok().flatten()
        })
    }

    /// GET a session.
    pub fn session(&self, http: &reqwest::blocking::Client, id: &str) -> anyhow::Result<Value> {
        Ok(http
            .get(format!("{}/v1/sessions/{id}", self.api))
            .send()?
            .error_for_status()?
            .json()?)
    }
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
