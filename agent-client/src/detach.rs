//! `porthole-agent --detach`: the agent as a build step.
//!
//! The command re-executes its own binary ([`std::env::current_exe`]) as a child with the
//! same arguments (minus any `--token`, which goes to the child's `PORTHOLE_TOKEN`, so the
//! token never appears in a command line) and a hidden `--detached-child` flag. The child
//! starts a new session (`setsid`: no controlling terminal, not in the build step's process
//! group), reads nothing (stdin is `/dev/null`) and writes its output to the log file
//! (`--log-file`, default next to the pid file). The parent watches the child's control
//! socket (`wait`) until the child registered — then prints the instructions and returns —
//! or failed, or `--connect-timeout` plus [`MARGIN`] passed (then it stops the child) — and
//! exits non-zero with the reason.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::fcntl::OFlag;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use porthole_protocol::Secret;

use crate::local::client::{Client, ClientError};
use crate::local::wire::{Reply, Request};
use crate::status::Status;

/// Added to `--connect-timeout` for the whole start (the child's start-up, TLS, `hello`).
pub const MARGIN: Duration = Duration::from_secs(5);
/// The hidden flag that makes the re-executed agent the background one.
pub const CHILD_FLAG: &str = "--detached-child";
/// How often the parent looks for the child's control socket.
const POLL: Duration = Duration::from_millis(50);
/// How long a stopped child gets to exit after SIGTERM.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// Default `--log-file`: the pid file's path with `.pid` replaced by `.log` (or `.log`
/// appended), e.g. `$XDG_RUNTIME_DIR/porthole-agent.log`.
pub fn default_log_file(pid_file: &Path) -> PathBuf {
    if pid_file.extension() == Some(OsStr::new("pid")) {
        return pid_file.with_extension("log");
    }
    let mut path = pid_file.as_os_str().to_owned();
    path.push(".log");
    PathBuf::from(path)
}

/// The child's arguments: ours without `--token T` / `--token=T`, plus [`CHILD_FLAG`].
pub fn child_args(args: impl IntoIterator<Item = OsString>) -> Vec<OsString> {
    let mut out = Vec::new();
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        if arg == OsStr::new("--token") {
            args.next();
            continue;
        }
        if arg.as_encoded_bytes().starts_with(b"--token=") {
            continue;
        }
        out.push(arg);
    }
    out.push(CHILD_FLAG.into());
    out
}

/// Opens (creates, mode 0600) the log file for appending. Refuses a symbolic link, anything
/// that is not a regular file, and a file of another user.
pub fn open_log(path: &Path) -> Result<File, String> {
    let shown = path.display();
    let file = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .custom_flags((OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK).bits())
        .open(path)
        .map_err(|e| {
            if e.raw_os_error() == Some(nix::errno::Errno::ELOOP as i32) {
                format!("log file {shown} is a symbolic link: refusing it (pass --log-file)")
            } else {
                format!("cannot open log file {shown}: {e} (pass --log-file)")
            }
        })?;
    let meta = file
        .metadata()
        .map_err(|e| format!("cannot inspect log file {shown}: {e}"))?;
    if !meta.is_file() {
        return Err(format!(
            "log file {shown} is not a regular file (pass --log-file)"
        ));
    }
    let me = nix::unistd::geteuid().as_raw();
    if meta.uid() != me {
        return Err(format!(
            "log file {shown} belongs to another user (uid {}): refusing to write to it (pass \
             --log-file)",
            meta.uid()
        ));
    }
    Ok(file)
}

/// The background agent, registered.
#[derive(Debug)]
pub struct Started {
    /// Its process id.
    pub pid: u32,
    /// Its status when it registered.
    pub status: Status,
    /// Where its output goes.
    pub log: PathBuf,
}

/// Starts the background agent and waits until it registered (see the module
/// documentation). `token` is the join token (it goes to the child's environment only).
pub fn launch(
    pid_file: &Path,
    log: &Path,
    connect_timeout: Duration,
    token: &Secret,
) -> Result<Started, String> {
    let mut log_file = open_log(log)?;
    let start = log_file.seek(SeekFrom::End(0)).unwrap_or(0);
    let exe = std::env::current_exe()
        .map_err(|e| format!("cannot find the porthole-agent binary to re-execute: {e}"))?;
    let stderr = log_file
        .try_clone()
        .map_err(|e| format!("log file {}: {e}", log.display()))?;
    let mut child = Command::new(&exe)
        .args(child_args(std::env::args_os().skip(1)))
        .env("PORTHOLE_TOKEN", token.expose())
        .stdin(Stdio::null())
        .stdout(log_file)
        .stderr(stderr)
        .spawn()
        .map_err(|e| format!("cannot start {} in the background: {e}", exe.display()))?;
    let deadline = Instant::now() + connect_timeout + MARGIN;
    let mut last_error = None;
    loop {
        if let Some(status) = child.try_wait().ok().flatten() {
            let why = log_error(log, start)
                .unwrap_or_else(|| format!("it exited with {status} (log: {})", log.display()));
            return Err(format!(
                "the background agent stopped before it registered: {why}"
            ));
        }
        if Instant::now() >= deadline {
            break;
        }
        match watch_child(pid_file, child.id(), deadline, &mut last_error) {
            Watch::Registered(status) => {
                return Ok(Started {
                    pid: child.id(),
                    status: *status,
                    log: log.to_owned(),
                })
            }
            Watch::Failed(reason) => {
                reap(&mut child);
                return Err(reason);
            }
            Watch::NotYet => std::thread::sleep(POLL),
        }
    }
    stop(&mut child);
    let why = last_error.unwrap_or_else(|| "the relay did not answer".into());
    Err(format!(
        "could not register with the relay within {} (--connect-timeout {} + {}s): {why}; the \
         background agent was stopped (log: {})",
        humantime::format_duration(connect_timeout + MARGIN),
        humantime::format_duration(connect_timeout),
        MARGIN.as_secs(),
        log.display()
    ))
}

/// What one look at the child's socket found.
enum Watch {
    Registered(Box<Status>),
    Failed(String),
    NotYet,
}

/// Connects to the child's socket (if it is there yet) and follows its status until it
/// registered, failed, the connection ended or `deadline`.
fn watch_child(
    pid_file: &Path,
    pid: u32,
    deadline: Instant,
    last_error: &mut Option<String>,
) -> Watch {
    let mut client = match Client::connect(pid_file) {
        Ok(client) => client,
        Err(_) => return Watch::NotYet,
    };
    if client.send(&Request::Wait).is_err() {
        return Watch::NotYet;
    }
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Watch::NotYet;
        }
        match client.next(Some(left)) {
            Ok(Some(Reply::Status { status })) => {
                // Another agent's socket (ours then fails on the pid file): keep watching
                // the child.
                if status.pid != pid {
                    return Watch::NotYet;
                }
                if let Some(end) = &status.end {
                    return Watch::Failed(format!(
                        "the background agent stopped before it registered: {}",
                        end.reason
                    ));
                }
                if status.last_error.is_some() {
                    last_error.clone_from(&status.last_error);
                }
                if status.registered() {
                    return Watch::Registered(Box::new(status));
                }
            }
            Ok(Some(_)) => {}
            Ok(None) | Err(ClientError::TimedOut) => return Watch::NotYet,
            Err(_) => return Watch::NotYet,
        }
    }
}

/// The error the child printed to the log since `start` (`porthole-agent: error: ...`).
fn log_error(log: &Path, start: u64) -> Option<String> {
    let mut file = File::open(log).ok()?;
    file.seek(SeekFrom::Start(start)).ok()?;
    let mut text = String::new();
    file.take(1 << 20).read_to_string(&mut text).ok()?;
    let error = text
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("porthole-agent: error: "))
        .map(str::to_owned);
    error.or_else(|| {
        let tail: Vec<&str> = text.lines().rev().take(5).collect();
        (!tail.is_empty()).then(|| {
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            format!("it said: {}", tail.join(" / "))
        })
    })
}

/// Stops the child: SIGTERM, then SIGKILL after [`STOP_GRACE`].
fn stop(child: &mut Child) {
    if let Ok(pid) = i32::try_from(child.id()) {
        let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
    }
    let until = Instant::now() + STOP_GRACE;
    while Instant::now() < until {
        if child.try_wait().ok().flatten().is_some() {
            return;
        }
        std::thread::sleep(POLL);
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Waits (bounded) for a child that is ending by itself.
fn reap(child: &mut Child) {
    let until = Instant::now() + STOP_GRACE;
    while Instant::now() < until {
        if child.try_wait().ok().flatten().is_some() {
            return;
        }
        std::thread::sleep(POLL);
    }
    stop(child);
}

/// In the background agent: leaves the build step's session and process group, so the
/// step ending (or its terminal hanging up) does not stop the agent.
pub fn become_session_leader() {
    if let Err(e) = nix::unistd::setsid() {
        tracing::warn!(error = %e, "cannot start a new session");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_never_reaches_the_childs_command_line() {
        let args = [
            "--relay",
            "r:1",
            "--token",
            "phj_secret",
            "--token=phj_two",
            "--detach",
        ]
        .map(OsString::from);
        let got = child_args(args);
        let want = ["--relay", "r:1", "--detach", CHILD_FLAG].map(OsString::from);
        assert_eq!(got, want);
    }

    #[test]
    fn the_log_sits_next_to_the_pid_file() {
        assert_eq!(
            default_log_file(Path::new("/run/user/1000/porthole-agent.pid")),
            Path::new("/run/user/1000/porthole-agent.log")
        );
        assert_eq!(
            default_log_file(Path::new("/tmp/agent")),
            Path::new("/tmp/agent.log")
        );
        assert_eq!(
            default_log_file(Path::new("/tmp/.pid")),
            Path::new("/tmp/.pid.log")
        );
    }

    #[test]
    fn log_files_are_0600_and_links_refused() -> Result<(), Box<dyn std::error::Error>> {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir()?;
        let log = dir.path().join("agent.log");
        drop(open_log(&log)?);
        assert_eq!(std::fs::metadata(&log)?.permissions().mode() & 0o777, 0o600);
        let link = dir.path().join("link.log");
        std::os::unix::fs::symlink(&log, &link)?;
        let err = open_log(&link).err().unwrap_or_default();
        assert!(err.contains("symbolic link"), "{err}");
        let err = open_log(dir.path()).err().unwrap_or_default();
        assert!(!err.is_empty());
        Ok(())
    }
}
