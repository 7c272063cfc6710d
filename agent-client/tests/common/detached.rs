//! The agent as a build step: `porthole-agent --detach` started from a test, the background
//! agent it leaves (stopped with SIGTERM when dropped), and its subcommands (`status`,
//! `finish`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::Context as _;

use super::agent::binary;
use super::peers::tools::{run_with_timeout, Finished};

/// A background agent started with `--detach` (if it started), in its own directory.
pub struct Detached {
    /// Its pid file.
    pub pid_file: PathBuf,
    /// Its log file.
    pub log: PathBuf,
    /// What `--detach` printed and its exit status.
    pub started: Finished,
    /// Keeps the directory.
    dir: tempfile::TempDir,
}

impl Detached {
    /// Runs `porthole-agent --detach --relay RELAY --pin-sha256 PIN --service S... EXTRA...`
    /// with the token in `PORTHOLE_TOKEN`, and waits (bounded) for it to return.
    pub fn start(
        relay: &str,
        pin: &str,
        token: &str,
        services: &[String],
        extra: &[&str],
    ) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let pid_file = dir.path().join("agent.pid");
        let log = dir.path().join("agent.log");
        let mut cmd = Command::new(binary());
        cmd.args(["--detach", "--relay", relay, "--pin-sha256", pin])
            .arg("--pid-file")
            .arg(&pid_file)
            .arg("--log-file")
            .arg(&log)
            .args(extra)
            .env("PORTHOLE_TOKEN", token)
            .env("RUST_LOG", "info");
        for s in services {
            cmd.args(["--service", s]);
        }
        let started = run_with_timeout(&mut cmd, Duration::from_secs(90))?;
        Ok(Self {
            pid_file,
            log,
            started,
            dir,
        })
    }

    /// What `--detach` printed (stdout, then stderr).
    pub fn output(&self) -> String {
        format!("{}{}", self.started.stdout_text(), self.started.stderr)
    }

    /// The background agent's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The background agent's pid (from its pid file).
    pub fn pid(&self) -> anyhow::Result<u32> {
        porthole_agent::pidfile::read_pid(&self.pid_file)?.context("no pid in the pid file")
    }

    /// `porthole-agent ARGS... --pid-file PID_FILE`, bounded by `timeout`.
    pub fn cli(&self, args: &[&str], timeout: Duration) -> anyhow::Result<Finished> {
        cli(args, &self.pid_file, timeout)
    }

    /// `porthole-agent ARGS... --pid-file PID_FILE` as a command to spawn.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(binary());
        cmd.args(args).arg("--pid-file").arg(&self.pid_file);
        cmd
    }

    /// Waits for a line of the background agent's log containing `needle`.
    pub fn wait_log(&self, needle: &str, timeout: Duration) -> anyhow::Result<()> {
        super::wait_for(&format!("`{needle}` in the agent's log"), timeout, || {
            self.log_text().contains(needle).then_some(())
        })
        .with_context(|| format!("agent log:\n{}", self.log_text()))
    }

    /// Waits for the background agent to exit (its pid file goes).
    pub fn wait_gone(&self, timeout: Duration) -> anyhow::Result<()> {
        super::wait_for("the background agent to exit", timeout, || {
            (!self.pid_file.exists()).then_some(())
        })
        .with_context(|| format!("agent log:\n{}", self.log_text()))
    }

    /// The directory holding the pid file, socket and log.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Detached {
    fn drop(&mut self) {
        if self.pid_file.exists() {
            let _ = porthole_agent::pidfile::signal_agent(
                &self.pid_file,
                nix::sys::signal::Signal::SIGTERM,
            );
            let _ = self.wait_gone(Duration::from_secs(10));
        }
    }
}

/// `porthole-agent ARGS... --pid-file PID_FILE`, bounded by `timeout`.
pub fn cli(args: &[&str], pid_file: &Path, timeout: Duration) -> anyhow::Result<Finished> {
    run_with_timeout(
        Command::new(binary())
            .args(args)
            .arg("--pid-file")
            .arg(pid_file),
        timeout,
    )
}

/// stdout and stderr of a finished command.
pub fn text(done: &Finished) -> String {
    format!("{}{}", done.stdout_text(), done.stderr)
}
