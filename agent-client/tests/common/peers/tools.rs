//! Locating external programs, and small process/network helpers shared by
//! the peer wrappers.

use std::fs::File;
use std::io::{Read, Seek as _, SeekFrom, Write as _};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

/// Packages in this list are installed with pip, every other with apt-get.
const PIP_PACKAGES: &[&str] = &["vncdotool"];

/// Directories searched after `$PATH`: sshd lives in sbin, which non-root
/// users often lack on `$PATH`, and `pip install --user` puts scripts in
/// `~/.local/bin`.
const EXTRA_DIRS: &[&str] = &["/usr/sbin", "/sbin", "/usr/local/sbin", "/usr/local/bin"];

/// Finds `program` on `$PATH` (then in sbin dirs and `~/.local/bin`) and
/// returns its absolute path.
///
/// `debian_or_pip_package` names what provides it: a Debian package, or a
/// PyPI one (`vncdotool`, or any name written `pip:NAME`). When the program is
/// missing the error says exactly what to install; callers propagate it so
/// the test FAILS instead of silently skipping.
pub fn require(program: &str, debian_or_pip_package: &str) -> anyhow::Result<PathBuf> {
    if let Some(found) = find_program(program) {
        return Ok(found);
    }
    let install = match debian_or_pip_package.strip_prefix("pip:") {
        Some(pkg) => format!("python3 -m pip install {pkg}"),
        None if PIP_PACKAGES.contains(&debian_or_pip_package) => {
            format!("python3 -m pip install {debian_or_pip_package}")
        }
        None => format!("apt-get install {debian_or_pip_package}"),
    };
    bail!(
        "{program} not found: install it with `{install}` or run scripts/test.sh, which installs it"
    )
}

/// Returns the absolute path of the first executable file named `program`.
fn find_program(program: &str) -> Option<PathBuf> {
    if program.contains('/') {
        let path = PathBuf::from(program);
        return is_executable(&path).then_some(path);
    }
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    dirs.extend(EXTRA_DIRS.iter().map(PathBuf::from));
    if let Some(home) = std::env::var_os("HOME") {
        dirs.push(Path::new(&home).join(".local/bin"));
    }
    dirs.into_iter()
        .filter(|dir| dir.is_absolute())
        .map(|dir| dir.join(program))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    std::fs::metadata(path)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// Returns a loopback TCP port that was free a moment ago, picked at random below the
/// kernel's ephemeral range (32768 and up): a port from that range can be taken at any
/// moment by some process's outgoing connection, which would make a server restarted on
/// "its" port (a relay after `kill -9`, etcd after a stop) fail to bind. Ports 12000-19999
/// are below it and below the public port ranges the tests give relays.
pub fn free_port() -> anyhow::Result<u16> {
    for _ in 0..1000 {
        let port = 12000 + rand::random::<u16>() % 8000;
        if TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok() {
            return Ok(port);
        }
    }
    anyhow::bail!("no free loopback port between 12000 and 19999")
}

/// Name of the user running the tests (`id -un`).
pub fn current_user() -> anyhow::Result<String> {
    id_output("-un")
}

/// Whether the tests run as root (`id -u` is 0).
pub fn is_root() -> anyhow::Result<bool> {
    Ok(id_output("-u")? == "0")
}

fn id_output(flag: &str) -> anyhow::Result<String> {
    let out = Command::new("id")
        .arg(flag)
        .output()
        .with_context(|| format!("running `id {flag}`"))?;
    if !out.status.success() {
        bail!(
            "`id {flag}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Output of a command run by [`run_with_timeout`].
#[derive(Debug)]
pub struct Finished {
    /// Exit status.
    pub status: ExitStatus,
    /// Everything written to stdout, as raw bytes.
    pub stdout: Vec<u8>,
    /// Everything written to stderr.
    pub stderr: String,
}

impl Finished {
    /// stdout decoded as UTF-8 (lossily).
    pub fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
}

/// Runs `cmd` to completion with stdin closed and stdout/stderr captured,
/// killing it if it is still running after `timeout` (which is an error that
/// includes what it printed so far).
pub fn run_with_timeout(cmd: &mut Command, timeout: Duration) -> anyhow::Result<Finished> {
    run_with_input(cmd, b"", timeout)
}

/// Like [`run_with_timeout`], but feeds `input` to the command's stdin.
pub fn run_with_input(
    cmd: &mut Command,
    input: &[u8],
    timeout: Duration,
) -> anyhow::Result<Finished> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    let mut stdin = tempfile::tempfile().context("creating a temp file for stdin")?;
    stdin
        .write_all(input)
        .context("writing stdin for the command")?;
    stdin
        .seek(SeekFrom::Start(0))
        .context("rewinding stdin for the command")?;
    // Files rather than pipes: nothing blocks if the output is large, and no
    // reader threads are needed.
    let mut out = tempfile::tempfile().context("creating a temp file for stdout")?;
    let mut err = tempfile::tempfile().context("creating a temp file for stderr")?;
    let mut child = cmd
        .stdin(stdin)
        .stdout(out.try_clone().context("cloning stdout file")?)
        .stderr(err.try_clone().context("cloning stderr file")?)
        .spawn()
        .with_context(|| format!("starting {program}"))?;
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child
            .try_wait()
            .with_context(|| format!("waiting for {program}"))?
        {
            break Some(status);
        }
        if Instant::now() >= deadline {
            kill_and_wait(&mut child);
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let stdout = read_all(&mut out)?;
    let stderr = String::from_utf8_lossy(&read_all(&mut err)?).into_owned();
    match status {
        Some(status) => Ok(Finished { status, stdout, stderr }),
        None => bail!(
            "{program} did not finish within {timeout:?} and was killed\n--- stdout ---\n{}\n--- stderr ---\n{stderr}",
            String::from_utf8_lossy(&stdout)
        ),
    }
}

fn read_all(file: &mut File) -> anyhow::Result<Vec<u8>> {
    file.seek(SeekFrom::Start(0))
        .context("rewinding captured output")?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)
        .context("reading captured output")?;
    Ok(bytes)
}

/// Kills `child` (SIGKILL) and reaps it, ignoring errors (it may be gone).
pub fn kill_and_wait(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// Asks `child` to exit with SIGTERM (via `kill`, so servers clean up their
/// sockets and lock files), waits up to `grace`, then SIGKILLs and reaps it.
pub fn terminate(child: &mut Child, grace: Duration) {
    if let Ok(None) = child.try_wait() {
        let sent = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        let deadline = Instant::now() + grace;
        while sent && Instant::now() < deadline {
            if !matches!(child.try_wait(), Ok(None)) {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    kill_and_wait(child);
}

/// Polls until `127.0.0.1:port` accepts a connection whose first bytes start
/// with `banner`, or `timeout` passes. Fails early if `child` exits.
///
/// Errors say what happened last (refused, wrong greeting, exit status); the
/// caller adds the server's log.
pub fn wait_for_banner(
    child: &mut Child,
    port: u16,
    banner: &[u8],
    timeout: Duration,
) -> anyhow::Result<()> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let deadline = Instant::now() + timeout;
    let mut last = String::from("never tried");
    loop {
        if let Some(status) = child
            .try_wait()
            .context("checking whether the server exited")?
        {
            bail!("server exited with {status} before serving on port {port} (last probe: {last})");
        }
        match probe(addr, banner.len()) {
            Ok(got) if got.starts_with(banner) => return Ok(()),
            Ok(got) => last = format!("unexpected greeting {:?}", String::from_utf8_lossy(&got)),
            Err(e) => last = format!("{e:#}"),
        }
        if Instant::now() >= deadline {
            bail!(
                "port {port} did not greet with {:?} within {timeout:?} (last probe: {last})",
                String::from_utf8_lossy(banner)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Connects to `addr` and reads up to `len` bytes (less if it closes).
fn probe(addr: SocketAddr, len: usize) -> anyhow::Result<Vec<u8>> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(1))
        .with_context(|| format!("connecting to {addr}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(2)))
        .context("setting read timeout")?;
    let mut got = Vec::with_capacity(len);
    let mut buf = [0u8; 64];
    while got.len() < len {
        let n = stream
            .read(&mut buf)
            .with_context(|| format!("reading greeting from {addr}"))?;
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
    }
    Ok(got)
}
