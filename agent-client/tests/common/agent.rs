//! The real `porthole-agent` binary as a child process, its output collected line by line.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;

use super::relay::TestRelay;

/// A running agent.
pub struct Agent {
    /// The process.
    child: Child,
    /// stdout and stderr lines, in arrival order per stream.
    lines: Arc<Mutex<Vec<String>>>,
    /// The threads reading stdout and stderr; they end when the pipes close.
    readers: Vec<std::thread::JoinHandle<()>>,
    /// Its pid file (for `porthole-agent finish`).
    pub pid_file: PathBuf,
    /// Keeps the pid file's directory.
    _dir: tempfile::TempDir,
}

/// The agent binary.
pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_porthole-agent")
}

impl Agent {
    /// Starts an agent for `token` with the relay's pin and the given `NAME=HOST:PORT` services.
    pub fn start(relay: &TestRelay, token: &str, services: &[String]) -> anyhow::Result<Self> {
        Self::start_to(&relay.agent_addr(), &relay.pin(), token, services)
    }

    /// Like [`Agent::start`], with more flags (e.g. `--ssh-user`, `--ssh-password-file`).
    pub fn start_with_args(
        relay: &TestRelay,
        token: &str,
        services: &[String],
        extra: &[String],
    ) -> anyhow::Result<Self> {
        let mut args = vec![
            "--relay".to_owned(),
            relay.agent_addr(),
            "--pin-sha256".into(),
            relay.pin(),
        ];
        for s in services {
            args.push("--service".into());
            args.push(s.clone());
        }
        args.extend(extra.iter().cloned());
        Self::spawn(&args, token)
    }

    /// Starts an agent against any relay address and pin.
    pub fn start_to(
        relay: &str,
        pin: &str,
        token: &str,
        services: &[String],
    ) -> anyhow::Result<Self> {
        let mut args = vec![
            "--relay".to_owned(),
            relay.to_owned(),
            "--pin-sha256".into(),
            pin.to_owned(),
        ];
        for s in services {
            args.push("--service".into());
            args.push(s.clone());
        }
        Self::spawn(&args, token)
    }

    /// Starts the agent binary with `args`; the token goes in `PORTHOLE_TOKEN`.
    pub fn spawn(args: &[String], token: &str) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let pid_file = dir.path().join("agent.pid");
        let mut child = Command::new(binary())
            .args(args)
            .arg("--pid-file")
            .arg(&pid_file)
            .env("PORTHOLE_TOKEN", token)
            .env(
                "RUST_LOG",
                std::env::var("AGENT_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting porthole-agent")?;
        let lines = Arc::new(Mutex::new(Vec::new()));
        let out = child.stdout.take().context("agent stdout")?;
        let err = child.stderr.take().context("agent stderr")?;
        let mut readers = Vec::new();
        for stream in [
            Box::new(out) as Box<dyn std::io::Read + Send>,
            Box::new(err),
        ] {
            let lines = lines.clone();
            readers.push(std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    lines.lock().unwrap_or_else(|p| p.into_inner()).push(line);
                }
            }));
        }
        Ok(Self {
            child,
            lines,
            readers,
            pid_file,
            _dir: dir,
        })
    }

    /// Everything the agent printed so far.
    pub fn output(&self) -> String {
        self.lines
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .join("\n")
    }

    /// Waits for a printed line containing `needle`.
    pub fn wait_line(&self, needle: &str, timeout: Duration) -> anyhow::Result<String> {
        super::wait_for(&format!("agent output `{needle}`"), timeout, || {
            self.lines
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .find(|l| l.contains(needle))
                .cloned()
        })
        .with_context(|| format!("agent output so far:\n{}", self.output()))
    }

    /// Waits until the agent says it registered.
    pub fn wait_registered(&self) -> anyhow::Result<()> {
        self.wait_line("remote access session", Duration::from_secs(20))
            .map(|_| ())
    }

    /// Waits for the agent to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        let status = super::wait_for("porthole-agent to exit", timeout, || {
            self.child.try_wait().ok().flatten()
        })
        .with_context(|| format!("agent output so far:\n{}", self.output()))?;
        // Every line is in once both pipes are closed and read to the end.
        super::wait_for("the agent's output pipes to close", timeout, || {
            self.readers
                .iter()
                .all(std::thread::JoinHandle::is_finished)
                .then_some(())
        })
        .context(
            "the agent exited but its stdout or stderr stayed open (a child process holds it)",
        )?;
        Ok(status)
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
