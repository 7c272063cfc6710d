//! The real `porthole-agent` binary started with a chosen environment — variables set or
//! removed (`SSL_CERT_FILE`, `RUST_LOG`, `PORTHOLE_TOKEN`) — and, when the tests run as root,
//! optionally as an unprivileged user (`setpriv`), its output collected line by line. For
//! what [`super::agent::Agent`] does not vary: that one always inherits the test's
//! environment and runs as the test's user.
//!
//! ```ignore
//! let agent = Launch::new(&["--relay", &addr, "--service", &svc])
//!     .env("PORTHOLE_TOKEN", &token)
//!     .env("SSL_CERT_FILE", bundle)
//!     .env_remove("SSL_CERT_DIR")
//!     .start()?;
//! agent.wait_registered()?;
//! ```

use std::ffi::{OsStr, OsString};
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;

/// The uid and gid the tests use for "another, unprivileged user" when they run as root
/// (`nobody`, `nogroup` on Debian).
pub const NOBODY: (u32, u32) = (65534, 65534);

/// How to start an agent.
#[derive(Debug, Clone, Default)]
pub struct Launch {
    /// Arguments (a `--pid-file` in a fresh directory is added).
    args: Vec<OsString>,
    /// Variables to set (`Some`) or remove (`None`), in order.
    env: Vec<(String, Option<OsString>)>,
    /// Run as this uid and gid (through `setpriv`; the test must be root).
    user: Option<(u32, u32)>,
}

/// Whether this test process runs as root.
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// A command that runs `program` as `user` (uid, gid) through `setpriv`, or as this process's
/// user when `user` is `None`.
pub fn command_as(user: Option<(u32, u32)>, program: impl AsRef<OsStr>) -> Command {
    match user {
        Some((uid, gid)) => {
            let mut cmd = Command::new("setpriv");
            cmd.arg(format!("--reuid={uid}"))
                .arg(format!("--regid={gid}"))
                .arg("--clear-groups")
                .arg("--")
                .arg(program);
            cmd
        }
        None => Command::new(program),
    }
}

impl Launch {
    /// The agent with `args`, `RUST_LOG=info`, the test's environment otherwise.
    pub fn new<S: AsRef<OsStr>>(args: impl IntoIterator<Item = S>) -> Self {
        Self {
            args: args.into_iter().map(|a| a.as_ref().to_owned()).collect(),
            env: vec![("RUST_LOG".into(), Some("info".into()))],
            user: None,
        }
    }

    /// Sets `name` to `value` in the agent's environment.
    pub fn env(mut self, name: &str, value: impl AsRef<OsStr>) -> Self {
        self.env
            .push((name.to_owned(), Some(value.as_ref().to_owned())));
        self
    }

    /// Removes `name` from the agent's environment.
    pub fn env_remove(mut self, name: &str) -> Self {
        self.env.push((name.to_owned(), None));
        self
    }

    /// Runs the agent as `uid`:`gid` (`setpriv`, which execs it: same pid). The test must
    /// run as root for that.
    pub fn user(mut self, uid: u32, gid: u32) -> Self {
        self.user = Some((uid, gid));
        self
    }

    /// Starts the agent.
    pub fn start(self) -> anyhow::Result<Launched> {
        let dir = tempfile::tempdir()?;
        if let Some((uid, gid)) = self.user {
            anyhow::ensure!(is_root(), "running the agent as uid {uid} needs root");
            // The agent writes its pid file and control socket there.
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid))
                .with_context(|| format!("chown {} to {uid}:{gid}", dir.path().display()))?;
        }
        let pid_file = dir.path().join("agent.pid");
        let mut cmd = command_as(self.user, super::agent::binary());
        cmd.args(&self.args).arg("--pid-file").arg(&pid_file);
        for (name, value) in &self.env {
            match value {
                Some(value) => cmd.env(name, value),
                None => cmd.env_remove(name),
            };
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting porthole-agent (through setpriv when run as another user)")?;
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
        Ok(Launched {
            child,
            lines,
            readers,
            pid_file,
            _dir: dir,
        })
    }
}

/// A running agent started by [`Launch`]; killed when dropped.
pub struct Launched {
    /// The process.
    child: Child,
    /// stdout and stderr lines, in arrival order per stream.
    lines: Arc<Mutex<Vec<String>>>,
    /// The threads reading stdout and stderr.
    readers: Vec<std::thread::JoinHandle<()>>,
    /// Its pid file.
    pub pid_file: PathBuf,
    /// Keeps the pid file's directory.
    _dir: tempfile::TempDir,
}

impl Launched {
    /// Every line printed so far.
    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Everything printed so far.
    pub fn output(&self) -> String {
        self.lines().join("\n")
    }

    /// Waits for a printed line containing `needle`.
    pub fn wait_line(&self, needle: &str, timeout: Duration) -> anyhow::Result<String> {
        super::wait_for(&format!("agent output `{needle}`"), timeout, || {
            self.lines().into_iter().find(|l| l.contains(needle))
        })
        .with_context(|| format!("agent output so far:\n{}", self.output()))
    }

    /// Waits until the agent says it registered.
    pub fn wait_registered(&self) -> anyhow::Result<()> {
        self.wait_line("remote access session", Duration::from_secs(30))
            .map(|_| ())
    }

    /// Waits for the agent to exit and for its output to be complete.
    pub fn wait_exit(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        let status = super::wait_for("porthole-agent to exit", timeout, || {
            self.child.try_wait().ok().flatten()
        })
        .with_context(|| format!("agent output so far:\n{}", self.output()))?;
        super::wait_for("the agent's output pipes to close", timeout, || {
            self.readers
                .iter()
                .all(std::thread::JoinHandle::is_finished)
                .then_some(())
        })?;
        Ok(status)
    }

    /// The process id (setpriv execs the agent, so it is the agent's).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Launched {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
