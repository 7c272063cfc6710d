//! Starting a shell or command for an SSH session channel, on a pseudo-terminal or on pipes,
//! and ending its whole process group.
//!
//! `pty-process` does the fork-side work (new session, controlling terminal) so this crate
//! needs no `unsafe`.

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use pty_process::{OwnedReadPty, OwnedWritePty};
use tokio::process::{Child, ChildStderr, ChildStdin, ChildStdout};

use super::settings::Settings;

/// Most `env` requests one channel may make (OpenSSH clients send a handful).
pub const MAX_CLIENT_ENV: usize = 64;
/// Longest value of a client `env` request.
pub const MAX_ENV_VALUE: usize = 4096;
/// How long a hung-up process group gets before SIGKILL.
const HANGUP_GRACE: Duration = Duration::from_secs(2);

/// A terminal as the client asked for it.
#[derive(Clone, Debug)]
pub struct Terminal {
    /// `TERM`.
    pub term: String,
    /// Columns.
    pub cols: u16,
    /// Rows.
    pub rows: u16,
}

/// What a channel asked to run.
#[derive(Clone, Debug, Default)]
pub struct Request {
    /// `None`: the login shell; `Some`: `shell -c COMMAND`.
    pub command: Option<Vec<u8>>,
    /// A pseudo-terminal, when the client asked for one.
    pub terminal: Option<Terminal>,
    /// Variables from the client's `env` requests.
    pub env: Vec<(String, String)>,
}

impl Request {
    /// Records an `env` request; false when refused (bad name, too long, too many).
    pub fn add_env(&mut self, name: &str, value: &str) -> bool {
        let valid_name = !name.is_empty()
            && name.len() <= 256
            && !name.starts_with(|c: char| c.is_ascii_digit())
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid_name || value.len() > MAX_ENV_VALUE || value.contains('\0') {
            return false;
        }
        self.env.retain(|(k, _)| k != name);
        if self.env.len() >= MAX_CLIENT_ENV {
            return false;
        }
        self.env.push((name.to_owned(), value.to_owned()));
        true
    }
}

/// A started process and its standard streams.
#[derive(Debug)]
pub struct Spawned {
    /// The child (killed if dropped).
    pub child: Child,
    /// Its process group (the child leads it).
    pub group: Pid,
    /// Its standard streams.
    pub io: Io,
}

/// Standard streams of a started process.
#[derive(Debug)]
pub enum Io {
    /// All three on one pseudo-terminal.
    Pty {
        /// Output (stdout and stderr).
        output: OwnedReadPty,
        /// Input; also resizes the terminal.
        input: OwnedWritePty,
    },
    /// Three pipes.
    Pipes {
        /// Input.
        stdin: ChildStdin,
        /// Output.
        stdout: ChildStdout,
        /// Errors (sent as SSH extended data).
        stderr: ChildStderr,
    },
}

/// Starts what `request` asks for, as the agent's user, in `settings.workdir`.
pub fn spawn(settings: &Settings, request: &Request) -> std::io::Result<Spawned> {
    let shell_name = settings
        .shell
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "sh".into());
    let mut args: Vec<OsString> = Vec::new();
    // A shell without a command is a login shell: argv[0] starts with '-', as sshd does.
    let arg0 = match &request.command {
        Some(command) => {
            args.push("-c".into());
            args.push(OsString::from_vec(command.clone()));
            shell_name
        }
        None => format!("-{shell_name}"),
    };
    let mut env = settings.env.clone();
    for (k, v) in &request.env {
        env.retain(|(name, _)| name.as_os_str() != k.as_str());
        env.push((k.into(), v.into()));
    }
    if let Some(t) = &request.terminal {
        env.retain(|(name, _)| name != "TERM");
        env.push(("TERM".into(), t.term.clone().into()));
    }
    match &request.terminal {
        Some(t) => {
            let (pty, pts) = pty_process::open().map_err(std::io::Error::other)?;
            pty.resize(pty_process::Size::new(t.rows, t.cols))
                .map_err(std::io::Error::other)?;
            let child = pty_process::Command::new(&settings.shell)
                .arg0(arg0)
                .args(args)
                .env_clear()
                .envs(env)
                .current_dir(&settings.workdir)
                .kill_on_drop(true)
                .spawn(pts)
                .map_err(std::io::Error::other)?;
            let group = child_pid(&child)?;
            let (output, input) = pty.into_split();
            Ok(Spawned {
                child,
                group,
                io: Io::Pty { output, input },
            })
        }
        None => {
            let mut child = tokio::process::Command::new(&settings.shell)
                .arg0(arg0)
                .args(args)
                .env_clear()
                .envs(env)
                .current_dir(&settings.workdir)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .process_group(0)
                .kill_on_drop(true)
                .spawn()?;
            let group = child_pid(&child)?;
            let (Some(stdin), Some(stdout), Some(stderr)) =
                (child.stdin.take(), child.stdout.take(), child.stderr.take())
            else {
                return Err(std::io::Error::other("the child has no standard streams"));
            };
            Ok(Spawned {
                child,
                group,
                io: Io::Pipes {
                    stdin,
                    stdout,
                    stderr,
                },
            })
        }
    }
}

fn child_pid(child: &Child) -> std::io::Result<Pid> {
    child
        .id()
        .and_then(|id| i32::try_from(id).ok())
        .map(Pid::from_raw)
        .ok_or_else(|| std::io::Error::other("the child exited at once"))
}

/// Sends `signal` to the process group.
pub fn signal_group(group: Pid, signal: Signal) {
    if let Err(e) = killpg(group, signal) {
        tracing::debug!(group = group.as_raw(), %signal, error = %e, "cannot signal the process group");
    }
}

/// Ends a session's processes the way a closed terminal does: SIGHUP to the group (shells
/// pass it on to their jobs), then SIGKILL after a grace period — to the group and, for a
/// terminal session (whose shell leads its own session, each job in its own group), to
/// every process of that session.
pub async fn hang_up(child: &mut Child, group: Pid, terminal: bool) -> Option<ExitStatus> {
    signal_group(group, Signal::SIGHUP);
    signal_group(group, Signal::SIGCONT);
    let deadline = tokio::time::Instant::now() + HANGUP_GRACE;
    let status = match tokio::time::timeout_at(deadline, child.wait()).await {
        Ok(Ok(status)) => Some(status),
        _ => None,
    };
    // A shell passes SIGHUP on to its jobs and exits at once: the jobs get the rest of the
    // grace period too (an editor saving its buffer) before SIGKILL, with a terminal or
    // without.
    while tokio::time::Instant::now() < deadline && any_left(group, terminal) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    signal_group(group, Signal::SIGKILL);
    if terminal {
        for pid in session_members(group) {
            let _ = nix::sys::signal::kill(pid, Signal::SIGKILL);
        }
    }
    match status {
        Some(status) => Some(status),
        None => child.wait().await.ok(),
    }
}

/// Whether a process SIGKILL would reach is left: of the terminal's session, or else of
/// the group (signal 0 finds any).
fn any_left(group: Pid, terminal: bool) -> bool {
    if terminal {
        !session_members(group).is_empty()
    } else {
        killpg(group, None).is_ok()
    }
}

/// Processes whose session id is `session` (from `/proc/PID/stat`).
fn session_members(session: Pid) -> Vec<Pid> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|stat| stat_session(&stat))
                == Some(session.as_raw())
        })
        .map(Pid::from_raw)
        .collect()
}

/// The session id field of a `/proc/PID/stat` line (the 6th field; the command name in
/// parentheses may hold spaces, so fields are counted after the last `)`).
fn stat_session(stat: &str) -> Option<i32> {
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(3)?.parse().ok()
}

/// The signal an SSH `signal` request names.
pub fn signal_from_ssh(sig: &russh::Sig) -> Option<Signal> {
    use russh::Sig;
    Some(match sig {
        Sig::ABRT => Signal::SIGABRT,
        Sig::ALRM => Signal::SIGALRM,
        Sig::FPE => Signal::SIGFPE,
        Sig::HUP => Signal::SIGHUP,
        Sig::ILL => Signal::SIGILL,
        Sig::INT => Signal::SIGINT,
        Sig::KILL => Signal::SIGKILL,
        Sig::PIPE => Signal::SIGPIPE,
        Sig::QUIT => Signal::SIGQUIT,
        Sig::SEGV => Signal::SIGSEGV,
        Sig::TERM => Signal::SIGTERM,
        Sig::USR1 => Signal::SIGUSR1,
        Sig::Custom(name) => match name.as_str() {
            "USR2" => Signal::SIGUSR2,
            "CONT" => Signal::SIGCONT,
            "STOP" => Signal::SIGSTOP,
            "TSTP" => Signal::SIGTSTP,
            "WINCH" => Signal::SIGWINCH,
            _ => return None,
        },
    })
}

/// The SSH name of the signal that ended a process (`exit-signal`).
pub fn signal_to_ssh(signal: i32) -> russh::Sig {
    use russh::Sig;
    match Signal::try_from(signal) {
        Ok(Signal::SIGABRT) => Sig::ABRT,
        Ok(Signal::SIGALRM) => Sig::ALRM,
        Ok(Signal::SIGFPE) => Sig::FPE,
        Ok(Signal::SIGHUP) => Sig::HUP,
        Ok(Signal::SIGILL) => Sig::ILL,
        Ok(Signal::SIGINT) => Sig::INT,
        Ok(Signal::SIGKILL) => Sig::KILL,
        Ok(Signal::SIGPIPE) => Sig::PIPE,
        Ok(Signal::SIGQUIT) => Sig::QUIT,
        Ok(Signal::SIGSEGV) => Sig::SEGV,
        Ok(Signal::SIGTERM) => Sig::TERM,
        Ok(Signal::SIGUSR1) => Sig::USR1,
        Ok(other) => Sig::Custom(other.as_str().trim_start_matches("SIG").to_owned()),
        Err(_) => Sig::Custom(format!("SIG{signal}")),
    }
}

/// A terminal dimension as the kernel takes it (0 means "unknown" in SSH: keep `otherwise`).
pub fn dimension(n: u32, otherwise: u16) -> u16 {
    match n {
        0 => otherwise,
        n => u16::try_from(n).unwrap_or(u16::MAX),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_requests_are_checked() {
        let mut r = Request::default();
        assert!(r.add_env("LANG", "C.UTF-8"));
        assert!(r.add_env("LANG", "en_US.UTF-8"));
        assert_eq!(r.env.len(), 1);
        assert!(!r.add_env("", "x"));
        assert!(!r.add_env("A=B", "x"));
        assert!(!r.add_env("1X", "x"));
        assert!(!r.add_env("X", &"v".repeat(MAX_ENV_VALUE + 1)));
        for i in 0..MAX_CLIENT_ENV + 5 {
            r.add_env(&format!("V{i}"), "1");
        }
        assert_eq!(r.env.len(), MAX_CLIENT_ENV);
    }

    #[test]
    fn session_ids_come_from_proc_stat() {
        let stat = "1234 (my (odd) cmd) S 1 1230 1229 34816 1230 4194560 0 0";
        assert_eq!(stat_session(stat), Some(1229));
        assert_eq!(stat_session("garbage"), None);
        let own = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
        assert_eq!(
            stat_session(&own),
            Some(nix::unistd::getsid(None).map(Pid::as_raw).unwrap_or(-1))
        );
    }

    #[test]
    fn signals_map_both_ways() {
        assert_eq!(signal_from_ssh(&russh::Sig::INT), Some(Signal::SIGINT));
        assert_eq!(signal_from_ssh(&russh::Sig::Custom("NOPE".into())), None);
        assert!(matches!(signal_to_ssh(15), russh::Sig::TERM));
        assert!(matches!(signal_to_ssh(12), russh::Sig::Custom(ref n) if n == "USR2"));
    }
}
