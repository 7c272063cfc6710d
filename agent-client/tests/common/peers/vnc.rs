//! A real TigerVNC `Xvnc` server with VNC password auth, and the `vncdo`
//! client (PyPI `vncdotool`) to take screenshots through it.

use std::fs::{self, File};
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _};
use tempfile::TempDir;

use super::tools::{self, require};

/// How long Xvnc gets to start answering with its `RFB ` greeting.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How many ports are tried when another process steals the free port.
const BIND_ATTEMPTS: u32 = 5;
/// `vncdo` can hang forever on protocol problems; it is killed after this.
const VNCDO_TIMEOUT: Duration = Duration::from_secs(60);

/// A running TigerVNC `Xvnc` (virtual X display + RFB server) that listens
/// on 127.0.0.1 only and requires VNC password auth. Stopped on drop.
#[derive(Debug)]
pub struct Xvnc {
    /// Loopback port of the RFB (VNC) server.
    pub port: u16,
    /// X display number Xvnc chose (`DISPLAY=:N`); X11 is not on TCP.
    pub display: u32,
    child: Child,
    log: PathBuf,
    // Last field: dropped after the process using it has been stopped.
    dir: TempDir,
}

impl Xvnc {
    /// Starts `Xvnc` with a `width`x`height` 24-bit screen, `VncAuth` with
    /// `password` (VNC only uses its first 8 bytes), on a free loopback port
    /// and the first free X display (`-displayfd`).
    ///
    /// Returns once the port greets with `RFB ` (at most ~10 s; the error then
    /// includes Xvnc's log). Retries on another port if the chosen one was
    /// taken in the meantime.
    pub fn start(width: u32, height: u32, password: &str) -> anyhow::Result<Xvnc> {
        let xvnc = require("Xvnc", "tigervnc-standalone-server")?;
        let dir = tempfile::Builder::new()
            .prefix("porthole-xvnc-")
            .tempdir()
            .context("creating Xvnc temp dir")?;
        let password_file = dir.path().join("passwd");
        write_password_file(password, &password_file)?;

        let log = dir.path().join("Xvnc.log");
        let display_file = dir.path().join("display");
        for attempt in 1..=BIND_ATTEMPTS {
            let port = tools::free_port()?;
            let log_file = File::create(&log).context("creating Xvnc log file")?;
            // `-displayfd 1`: Xvnc picks a free display and writes its number
            // to stdout, which is this file.
            let display_out = File::create(&display_file).context("creating display file")?;
            let mut child = Command::new(&xvnc)
                .args([
                    "-displayfd",
                    "1",
                    "-nolisten",
                    "tcp",
                    "-desktop",
                    "porthole-test",
                ])
                .arg("-geometry")
                .arg(format!("{width}x{height}"))
                .args(["-depth", "24", "-rfbport", &port.to_string()])
                .args(["-localhost", "-interface", "127.0.0.1"])
                .args(["-SecurityTypes", "VncAuth", "-PasswordFile"])
                .arg(&password_file)
                .stdin(Stdio::null())
                .stdout(display_out)
                .stderr(log_file)
                .spawn()
                .with_context(|| format!("starting {}", xvnc.display()))?;
            let ready = tools::wait_for_banner(&mut child, port, b"RFB ", START_TIMEOUT)
                .and_then(|()| wait_for_display(&display_file, START_TIMEOUT));
            match ready {
                Ok(display) => {
                    return Ok(Xvnc {
                        port,
                        display,
                        child,
                        log,
                        dir,
                    })
                }
                Err(e) => {
                    tools::terminate(&mut child, Duration::from_secs(2));
                    let output = fs::read_to_string(&log).unwrap_or_default();
                    let port_taken = output.contains("Address already in use");
                    if attempt < BIND_ATTEMPTS && port_taken {
                        continue;
                    }
                    bail!("Xvnc did not start: {e:#}\n--- Xvnc log ---\n{output}");
                }
            }
        }
        bail!("Xvnc could not bind a free port in {BIND_ATTEMPTS} attempts")
    }

    /// Everything Xvnc has logged so far; attach it to assertion messages.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_else(|e| format!("<reading Xvnc log: {e}>"))
    }

    /// Scratch directory owned by this server (password file, log).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Xvnc {
    fn drop(&mut self) {
        // SIGTERM first so Xvnc removes /tmp/.X<n>-lock and its X socket.
        tools::terminate(&mut self.child, Duration::from_secs(5));
    }
}

/// Writes a TigerVNC password file (DES-obfuscated, 8 bytes) with
/// `vncpasswd -f`, which reads the password on stdin.
fn write_password_file(password: &str, path: &Path) -> anyhow::Result<()> {
    // Debian ships vncpasswd in tigervnc-tools (an alternatives link to
    // tigervncpasswd), NOT in tigervnc-standalone-server.
    let vncpasswd = require("vncpasswd", "tigervnc-tools")
        .or_else(|e| require("tigervncpasswd", "tigervnc-tools").map_err(|_| e))?;
    let done = tools::run_with_input(
        Command::new(&vncpasswd).arg("-f"),
        format!("{password}\n").as_bytes(),
        Duration::from_secs(30),
    )?;
    ensure!(
        done.status.success() && !done.stdout.is_empty(),
        "`{} -f` failed ({}): {}",
        vncpasswd.display(),
        done.status,
        done.stderr
    );
    fs::write(path, &done.stdout).with_context(|| format!("writing {}", path.display()))
}

/// Polls `path` until Xvnc has written its display number there.
fn wait_for_display(path: &Path, timeout: Duration) -> anyhow::Result<u32> {
    let deadline = Instant::now() + timeout;
    loop {
        let text = fs::read_to_string(path).unwrap_or_default();
        if text.ends_with('\n') {
            return text
                .trim()
                .parse()
                .with_context(|| format!("Xvnc wrote {text:?} as its display number"));
        }
        if Instant::now() >= deadline {
            bail!("Xvnc did not report its display number within {timeout:?} (got {text:?})");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Takes a screenshot with `vncdo -s HOST::PORT -p PASSWORD capture OUT`,
/// killing vncdo after ~60 s (it can hang). Errors include vncdo's output.
pub fn vncdo_capture(host: &str, port: u16, password: &str, out: &Path) -> anyhow::Result<()> {
    let vncdo = require("vncdo", "vncdotool")?;
    let server = format!("{host}::{port}");
    let done = tools::run_with_timeout(
        Command::new(&vncdo)
            .args(["-s", &server, "-p", password, "capture"])
            .arg(out),
        VNCDO_TIMEOUT,
    )
    .with_context(|| format!("vncdo capture from {server}"))?;
    ensure!(
        done.status.success(),
        "vncdo capture from {server} failed ({})\n--- stdout ---\n{}\n--- stderr ---\n{}",
        done.status,
        done.stdout_text(),
        done.stderr
    );
    let written = fs::metadata(out).map(|m| m.len()).unwrap_or(0);
    ensure!(
        written > 0,
        "vncdo capture from {server} exited successfully but wrote no {}\n--- stderr ---\n{}",
        out.display(),
        done.stderr
    );
    Ok(())
}

/// Runs `vncdo capture` with a password the server must refuse, and checks it was refused
/// *as a wrong password*: vncdo exits non-zero and says `Authentication failure` (any other
/// error, or no answer before the timeout, fails). Returns vncdo's stderr.
pub fn vncdo_refused(host: &str, port: u16, password: &str, out: &Path) -> anyhow::Result<String> {
    let vncdo = require("vncdo", "vncdotool")?;
    let server = format!("{host}::{port}");
    let done = tools::run_with_timeout(
        Command::new(&vncdo)
            .args(["-s", &server, "-p", password, "capture"])
            .arg(out),
        VNCDO_TIMEOUT,
    )
    .with_context(|| format!("vncdo capture from {server} with a wrong password"))?;
    ensure!(
        !done.status.success(),
        "vncdo with a wrong password succeeded against {server}"
    );
    ensure!(
        done.stderr.contains("Authentication failure"),
        "vncdo with a wrong password failed, but not as a refused password ({})\n--- stderr ---\n{}",
        done.status,
        done.stderr
    );
    Ok(done.stderr)
}

/// Reads `(width, height)` from a PNG's IHDR chunk, after checking the PNG
/// signature.
pub fn png_size(path: &Path) -> anyhow::Result<(u32, u32)> {
    const SIGNATURE: [u8; 8] = [0x89, b'P', b'N', b'G', b'\r', b'\n', 0x1a, b'\n'];
    let mut head = [0u8; 24];
    File::open(path)
        .and_then(|mut f| f.read_exact(&mut head))
        .with_context(|| format!("reading the PNG header of {}", path.display()))?;
    ensure!(
        head[..8] == SIGNATURE,
        "{} is not a PNG (bad signature)",
        path.display()
    );
    ensure!(
        &head[12..16] == b"IHDR",
        "{}: first PNG chunk is not IHDR",
        path.display()
    );
    let be = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
    Ok((be(&head[16..20]), be(&head[20..24])))
}
