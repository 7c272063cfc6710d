//! The agent's pid file (`--pid-file`), read by `porthole-agent finish`.
//!
//! Created exclusively (`O_CREAT|O_EXCL`, `O_NOFOLLOW`, mode 0600), so it never follows a
//! symbolic link or overwrites a file planted in a shared directory. A file already there
//! is handled by what it is: a live porthole-agent's pid file stops the start; a stale one
//! (its pid is gone or is not a porthole-agent) is replaced; a symbolic link, anything that
//! is not a regular file, or a regular file that does not hold a pid is refused and left
//! alone. The file is removed at exit only if it still holds this process's pid.
//! [`signal_agent`] checks that the pid belongs to a porthole-agent before signalling it.

use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// The agent binary's file name, as `/proc/PID/exe` and `/proc/PID/comm` show it.
pub const AGENT_NAME: &str = "porthole-agent";
/// Longest pid file accepted when reading (a pid and a newline need far less).
const MAX_PID_FILE_LEN: u64 = 64;
/// What `/proc/PID/exe` appends when the binary was replaced or removed.
const DELETED_SUFFIX: &str = " (deleted)";
/// `/proc/PID/comm` holds at most this many bytes of the name.
const COMM_LEN: usize = 15;

/// This process's pid file; removed on drop if it still holds this process's pid.
#[derive(Debug)]
pub struct PidFile {
    path: PathBuf,
    pid: u32,
}

impl PidFile {
    /// Writes this process's pid to `path` (see the module documentation for what happens
    /// when a file is already there).
    pub fn create(path: &Path) -> Result<Self, String> {
        let pid = std::process::id();
        match write_new(path, pid) {
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {
                clear_stale(path, pid)?;
                write_new(path, pid).map_err(|e| match e.kind() {
                    ErrorKind::AlreadyExists => format!(
                        "{} appeared again while replacing a stale pid file: is another \
                         porthole-agent starting? Pass --pid-file",
                        path.display()
                    ),
                    _ => format!("cannot create pid file {}: {e}", path.display()),
                })?;
            }
            Err(e) => return Err(format!("cannot create pid file {}: {e}", path.display())),
            Ok(()) => {}
        }
        Ok(Self {
            path: path.to_owned(),
            pid,
        })
    }

    /// Where the file is.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        // Another agent may have replaced it (after deciding ours was stale): leave theirs.
        if matches!(read_pid(&self.path), Ok(Some(pid)) if pid == self.pid) {
            if let Err(e) = std::fs::remove_file(&self.path) {
                tracing::warn!(path = %self.path.display(), error = %e, "cannot remove the pid file");
            }
        }
    }
}

/// Creates `path` exclusively, never through a symbolic link, mode 0600, holding `pid`.
fn write_new(path: &Path, pid: u32) -> std::io::Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags((OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC).bits())
        .open(path)?;
    let written = file
        .write_all(format!("{pid}\n").as_bytes())
        .and_then(|()| file.sync_all());
    if written.is_err() {
        let _ = std::fs::remove_file(path);
    }
    written
}

/// Removes the existing file at `path` if it is a stale pid file; otherwise says why not.
fn clear_stale(path: &Path, own_pid: u32) -> Result<(), String> {
    let shown = path.display();
    let meta = std::fs::symlink_metadata(path)
        .map_err(|e| format!("cannot inspect existing pid file {shown}: {e}"))?;
    let kind = meta.file_type();
    if kind.is_symlink() {
        return Err(format!(
            "pid file {shown} is a symbolic link: refusing to use or remove it (remove it \
             yourself, or pass another --pid-file)"
        ));
    }
    if !kind.is_file() {
        let what = if kind.is_dir() {
            "a directory"
        } else if kind.is_fifo() {
            "a FIFO"
        } else if kind.is_socket() {
            "a socket"
        } else {
            "not a regular file"
        };
        return Err(format!(
            "pid file {shown} is {what}: refusing to use it (pass another --pid-file)"
        ));
    }
    let pid = match read_pid(path) {
        Ok(Some(pid)) => pid,
        Ok(None) => {
            return Err(format!(
                "{shown} exists and does not hold a pid: refusing to replace it (is it really \
                 a pid file? remove it yourself, or pass another --pid-file)"
            ))
        }
        Err(e) => return Err(format!("cannot read existing pid file {shown}: {e}")),
    };
    if pid != own_pid && process(pid) == Process::Agent {
        return Err(format!(
            "another porthole-agent (pid {pid}) is running with pid file {shown}: stop it, or \
             pass --pid-file to run a second agent"
        ));
    }
    tracing::info!(path = %shown, pid, "replacing a stale pid file");
    std::fs::remove_file(path).map_err(|e| format!("cannot remove stale pid file {shown}: {e}"))
}

/// The pid in the pid file at `path`: `Ok(None)` when the file does not hold exactly a pid
/// (decimal, optional trailing newline). Never follows a symbolic link.
pub fn read_pid(path: &Path) -> std::io::Result<Option<u32>> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags((OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK).bits())
        .open(path)?;
    if !file.metadata()?.is_file() {
        return Ok(None);
    }
    let mut text = String::new();
    if (&file as &File)
        .take(MAX_PID_FILE_LEN + 1)
        .read_to_string(&mut text)
        .is_err()
        || text.len() as u64 > MAX_PID_FILE_LEN
    {
        return Ok(None);
    }
    Ok(parse_pid(&text))
}

/// `"1234\n"` → 1234; anything else (signs, spaces, 0, other text) → `None`.
fn parse_pid(text: &str) -> Option<u32> {
    let digits = text.strip_suffix('\n').unwrap_or(text);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits
        .parse::<u32>()
        .ok()
        .filter(|&pid| pid > 0 && i32::try_from(pid).is_ok())
}

/// What a pid is, as far as the agent is concerned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Process {
    /// No such process.
    Gone,
    /// A porthole-agent.
    Agent,
    /// Another program (its name, when it could be read).
    Other(Option<String>),
}

/// What process `pid` is: its executable's file name from `/proc/PID/exe` (ignoring a
/// ` (deleted)` suffix), else, when that link cannot be read (another user's process, a
/// zombie), `/proc/PID/comm` (the name truncated to 15 bytes).
pub fn process(pid: u32) -> Process {
    let Ok(raw) = i32::try_from(pid) else {
        return Process::Gone;
    };
    if raw <= 0 || kill(Pid::from_raw(raw), None) == Err(Errno::ESRCH) {
        return Process::Gone;
    }
    let exe = std::fs::read_link(format!("/proc/{pid}/exe"))
        .ok()
        .and_then(|target| exe_name(&target));
    if let Some(name) = exe {
        return if name == AGENT_NAME {
            Process::Agent
        } else {
            Process::Other(Some(name))
        };
    }
    match std::fs::read_to_string(format!("/proc/{pid}/comm")) {
        Ok(comm) => {
            let comm = comm.trim_end_matches('\n');
            if comm == truncated(AGENT_NAME, COMM_LEN) {
                Process::Agent
            } else {
                Process::Other(Some(comm.to_owned()))
            }
        }
        // It went away meanwhile.
        Err(e) if e.kind() == ErrorKind::NotFound => Process::Gone,
        Err(_) => Process::Other(None),
    }
}

/// The file name of a `/proc/PID/exe` target, without the ` (deleted)` suffix.
fn exe_name(target: &Path) -> Option<String> {
    let name = target.file_name()?.to_string_lossy().into_owned();
    Some(match name.strip_suffix(DELETED_SUFFIX) {
        Some(stripped) => stripped.to_owned(),
        None => name,
    })
}

/// `name` cut to `len` bytes (at a character boundary).
fn truncated(name: &str, len: usize) -> &str {
    let mut end = name.len().min(len);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    &name[..end]
}

/// Sends `signal` to the porthole-agent whose pid file is `path`; refuses when the file is
/// missing, not a pid file, or names a process that is not a porthole-agent. Returns the pid.
pub fn signal_agent(path: &Path, signal: Signal) -> Result<u32, String> {
    let shown = path.display();
    let pid = match read_pid(path) {
        Ok(Some(pid)) => pid,
        Ok(None) => return Err(format!("{shown} does not hold a pid")),
        Err(e) if e.raw_os_error() == Some(Errno::ELOOP as i32) => {
            return Err(format!(
                "{shown} is a symbolic link: not a pid file the agent wrote"
            ))
        }
        Err(e) => {
            return Err(format!(
                "cannot read {shown}: {e} (is porthole-agent running? pass --pid-file)"
            ))
        }
    };
    match process(pid) {
        Process::Agent => {}
        Process::Gone => {
            return Err(format!(
                "{shown} names pid {pid}, which is not running (the agent has ended?)"
            ))
        }
        Process::Other(name) => {
            let name = name.map_or_else(|| "an unknown program".to_owned(), |n| format!("`{n}`"));
            return Err(format!(
                "{shown} names pid {pid}, which is {name}, not a porthole-agent: not signalling it"
            ));
        }
    }
    let raw = i32::try_from(pid).map_err(|_| format!("{shown}: pid {pid} is out of range"))?;
    kill(Pid::from_raw(raw), signal)
        .map_err(|e| format!("cannot signal porthole-agent (pid {pid}): {e}"))?;
    Ok(pid)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;
    use std::process::{Child, Command};

    use super::*;

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    /// A child that is killed and reaped when dropped.
    struct Reaped(Child);

    impl Drop for Reaped {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    /// `sleep 100`, started from a copy of the `sleep` binary named `name` (`None`: the
    /// real one).
    fn sleeper(dir: &Path, name: Option<&str>) -> Result<Reaped, Box<dyn std::error::Error>> {
        let program = match name {
            Some(name) => {
                let copy = dir.join(name);
                std::fs::copy("/bin/sleep", &copy)?;
                copy
            }
            None => PathBuf::from("sleep"),
        };
        // A test forking meanwhile may briefly hold the copy open for writing (ETXTBSY).
        let mut tries = 0;
        loop {
            match Command::new(&program).arg("100").spawn() {
                Ok(child) => return Ok(Reaped(child)),
                Err(e) if e.raw_os_error() == Some(Errno::ETXTBSY as i32) && tries < 20 => {
                    tries += 1;
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// The pid of a process that has ended and been reaped.
    fn gone_pid() -> Result<u32, std::io::Error> {
        let mut child = Command::new("true").spawn()?;
        child.wait()?;
        Ok(child.id())
    }

    #[test]
    fn pids_parse_strictly() {
        assert_eq!(parse_pid("1234\n"), Some(1234));
        assert_eq!(parse_pid("1234"), Some(1234));
        for bad in [
            "",
            "\n",
            "0\n",
            "-1\n",
            "+5",
            " 12",
            "12 \n",
            "12\n\n",
            "x",
            "99999999999",
        ] {
            assert_eq!(parse_pid(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn names_come_from_the_exe_link_or_comm() {
        assert_eq!(
            exe_name(Path::new("/usr/bin/porthole-agent (deleted)")).as_deref(),
            Some(AGENT_NAME)
        );
        assert_eq!(exe_name(Path::new("/bin/sleep")).as_deref(), Some("sleep"));
        assert_eq!(truncated("porthole-agent", COMM_LEN), "porthole-agent");
        assert_eq!(truncated("porthole-agent-2.0", COMM_LEN), "porthole-agent-");
        assert_eq!(truncated("ééééééééé", COMM_LEN), "ééééééé");
    }

    #[test]
    fn processes_are_told_apart() -> TestResult {
        let dir = tempfile::tempdir()?;
        let sleep = sleeper(dir.path(), None)?;
        assert_eq!(process(sleep.0.id()), Process::Other(Some("sleep".into())));
        let agent = sleeper(dir.path(), Some(AGENT_NAME))?;
        assert_eq!(process(agent.0.id()), Process::Agent);
        assert_eq!(process(gone_pid()?), Process::Gone);
        assert_eq!(process(0), Process::Gone);
        assert_eq!(process(u32::MAX), Process::Gone);
        Ok(())
    }

    #[test]
    fn created_exclusively_0600_and_removed_only_while_ours() -> TestResult {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("agent.pid");
        let file = PidFile::create(&path)?;
        assert_eq!(file.path(), path);
        assert_eq!(read_pid(&path)?, Some(std::process::id()));
        let mode = std::fs::symlink_metadata(&path)?.permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        drop(file);
        assert!(!path.exists());

        // Replaced by another agent meanwhile: its file stays.
        let file = PidFile::create(&path)?;
        std::fs::remove_file(&path)?;
        std::fs::write(&path, "1\n")?;
        drop(file);
        assert_eq!(std::fs::read_to_string(&path)?, "1\n");
        Ok(())
    }

    #[test]
    fn stale_pid_files_are_replaced() -> TestResult {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("agent.pid");
        // No such process.
        std::fs::write(&path, format!("{}\n", gone_pid()?))?;
        let file = PidFile::create(&path)?;
        assert_eq!(read_pid(&path)?, Some(std::process::id()));
        drop(file);
        // A live process that is not a porthole-agent.
        let sleep = sleeper(dir.path(), None)?;
        std::fs::write(&path, format!("{}\n", sleep.0.id()))?;
        let _file = PidFile::create(&path)?;
        assert_eq!(read_pid(&path)?, Some(std::process::id()));
        Ok(())
    }

    #[test]
    fn a_live_agents_pid_file_stops_the_start() -> TestResult {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("agent.pid");
        let agent = sleeper(dir.path(), Some(AGENT_NAME))?;
        let text = format!("{}\n", agent.0.id());
        std::fs::write(&path, &text)?;
        let err = PidFile::create(&path).err().unwrap_or_default();
        assert!(err.contains("another porthole-agent"), "{err}");
        assert!(err.contains("--pid-file"), "{err}");
        assert_eq!(std::fs::read_to_string(&path)?, text);
        Ok(())
    }

    #[test]
    fn links_other_file_types_and_foreign_files_are_left_alone() -> TestResult {
        let dir = tempfile::tempdir()?;
        let target = dir.path().join("precious");
        std::fs::write(&target, "precious\n")?;
        let path = dir.path().join("agent.pid");
        std::os::unix::fs::symlink(&target, &path)?;
        let err = PidFile::create(&path).err().unwrap_or_default();
        assert!(err.contains("symbolic link"), "{err}");
        assert_eq!(std::fs::read_to_string(&target)?, "precious\n");
        assert!(std::fs::symlink_metadata(&path)?.file_type().is_symlink());

        // A dangling link is not followed to create its target either.
        let dangling = dir.path().join("dangling.pid");
        let nowhere = dir.path().join("nowhere");
        std::os::unix::fs::symlink(&nowhere, &dangling)?;
        let err = PidFile::create(&dangling).err().unwrap_or_default();
        assert!(err.contains("symbolic link"), "{err}");
        assert!(!nowhere.exists());

        let sub = dir.path().join("sub");
        std::fs::create_dir(&sub)?;
        let err = PidFile::create(&sub).err().unwrap_or_default();
        assert!(err.contains("a directory"), "{err}");

        // A regular file that is no pid file (a mistyped --pid-file) is not deleted.
        let err = PidFile::create(&target).err().unwrap_or_default();
        assert!(err.contains("does not hold a pid"), "{err}");
        assert_eq!(std::fs::read_to_string(&target)?, "precious\n");
        Ok(())
    }

    #[test]
    fn only_porthole_agents_are_signalled() -> TestResult {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("agent.pid");
        let mut sleep = sleeper(dir.path(), None)?;
        std::fs::write(&path, format!("{}\n", sleep.0.id()))?;
        let err = signal_agent(&path, Signal::SIGTERM)
            .err()
            .unwrap_or_default();
        assert!(err.contains("`sleep`, not a porthole-agent"), "{err}");
        assert!(sleep.0.try_wait()?.is_none(), "sleep was signalled");

        std::fs::write(&path, format!("{}\n", gone_pid()?))?;
        let err = signal_agent(&path, Signal::SIGTERM)
            .err()
            .unwrap_or_default();
        assert!(err.contains("not running"), "{err}");

        let link = dir.path().join("link.pid");
        std::os::unix::fs::symlink(&path, &link)?;
        let err = signal_agent(&link, Signal::SIGTERM)
            .err()
            .unwrap_or_default();
        assert!(err.contains("symbolic link"), "{err}");

        let mut agent = sleeper(dir.path(), Some(AGENT_NAME))?;
        std::fs::write(&path, format!("{}\n", agent.0.id()))?;
        assert_eq!(signal_agent(&path, Signal::SIGTERM)?, agent.0.id());
        let status = agent.0.wait()?;
        assert!(!status.success());
        Ok(())
    }
}
