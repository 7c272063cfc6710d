//! The `--pid-file` rules with the real binary: a symbolic link there is refused and its
//! target left alone; a stale pid file is replaced; a live agent's pid file stops a second
//! agent; the file goes at exit; and `porthole-agent finish` signals only a porthole-agent.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::Read as _;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use anyhow::{ensure, Context as _};
use common::agent::binary;
use common::wait_for;

/// A child process killed and reaped when dropped.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Reaped {
    /// Waits up to `timeout` for the process to exit; returns its status and output.
    fn exit_within(
        mut self,
        timeout: Duration,
    ) -> anyhow::Result<(std::process::ExitStatus, String)> {
        let status = wait_for("the process to exit", timeout, || {
            self.0.try_wait().ok().flatten()
        })?;
        let mut text = String::new();
        if let Some(mut out) = self.0.stdout.take() {
            out.read_to_string(&mut text)?;
        }
        if let Some(mut err) = self.0.stderr.take() {
            err.read_to_string(&mut text)?;
        }
        Ok((status, text))
    }
}

/// Starts an agent that writes `pid_file` and then keeps trying to reach a relay that is not
/// there (so it runs until killed, if it starts at all).
fn agent(pid_file: &Path) -> anyhow::Result<Reaped> {
    let child = Command::new(binary())
        .args(["--relay", "127.0.0.1:9", "--pin-sha256", &"00".repeat(32)])
        .args(["--service", "ssh=127.0.0.1:9", "--pid-file"])
        .arg(pid_file)
        .env("PORTHOLE_TOKEN", "phj_test")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting porthole-agent")?;
    Ok(Reaped(child))
}

/// `porthole-agent finish --pid-file PID_FILE`.
fn finish(pid_file: &Path) -> anyhow::Result<Output> {
    Ok(Command::new(binary())
        .args(["finish", "--pid-file"])
        .arg(pid_file)
        .output()?)
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

#[test]
fn a_symlinked_pid_file_is_refused_and_its_target_untouched() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let target = dir.path().join("precious");
    std::fs::write(&target, "keep me\n")?;
    let link = dir.path().join("agent.pid");
    std::os::unix::fs::symlink(&target, &link)?;
    let (status, output) = agent(&link)?.exit_within(Duration::from_secs(20))?;
    ensure!(
        !status.success(),
        "started through a symlinked pid file:\n{output}"
    );
    ensure!(output.contains("symbolic link"), "{output}");
    ensure!(
        std::fs::read_to_string(&target)? == "keep me\n",
        "the target changed"
    );
    ensure!(
        std::fs::symlink_metadata(&link)?.file_type().is_symlink(),
        "the link was removed"
    );
    // A dangling link does not create its target either.
    let nowhere = dir.path().join("nowhere");
    let dangling = dir.path().join("dangling.pid");
    std::os::unix::fs::symlink(&nowhere, &dangling)?;
    let (status, output) = agent(&dangling)?.exit_within(Duration::from_secs(20))?;
    ensure!(
        !status.success() && output.contains("symbolic link"),
        "{output}"
    );
    ensure!(!nowhere.exists(), "the link's target was created");
    Ok(())
}

#[test]
fn a_stale_pid_file_is_replaced_a_live_one_is_not_and_it_goes_at_exit() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let pid_file = dir.path().join("agent.pid");
    let mut ended = Command::new("true").spawn()?;
    ended.wait()?;
    std::fs::write(&pid_file, format!("{}\n", ended.id()))?;

    let first = agent(&pid_file)?;
    let pid = first.0.id();
    wait_for(
        "the stale pid file replaced",
        Duration::from_secs(20),
        || {
            let text = std::fs::read_to_string(&pid_file).ok()?;
            (text == format!("{pid}\n")).then_some(())
        },
    )?;
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&pid_file)?.permissions());
    ensure!(mode & 0o777 == 0o600, "pid file mode {mode:o}");

    // A second agent on the same pid file stops at once and leaves it alone.
    let (status, output) = agent(&pid_file)?.exit_within(Duration::from_secs(20))?;
    ensure!(!status.success(), "a second agent started:\n{output}");
    ensure!(
        output.contains(&format!("another porthole-agent (pid {pid})"))
            && output.contains("--pid-file"),
        "{output}"
    );
    ensure!(std::fs::read_to_string(&pid_file)? == format!("{pid}\n"));

    // `finish` reaches the real agent.
    let told = finish(&pid_file)?;
    ensure!(told.status.success(), "finish: {}", text(&told));
    ensure!(
        text(&told).contains(&format!("pid {pid}")),
        "{}",
        text(&told)
    );

    // SIGTERM: the agent stops and removes its pid file.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(pid)?),
        nix::sys::signal::Signal::SIGTERM,
    )?;
    let (status, output) = first.exit_within(Duration::from_secs(20))?;
    ensure!(status.success(), "SIGTERM: {status}:\n{output}");
    ensure!(!pid_file.exists(), "the pid file stayed after exit");
    Ok(())
}

#[test]
fn finish_refuses_a_pid_that_is_not_a_porthole_agent() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let pid_file = dir.path().join("agent.pid");
    let mut sleep = Reaped(Command::new("sleep").arg("100").spawn()?);
    std::fs::write(&pid_file, format!("{}\n", sleep.0.id()))?;
    let told = finish(&pid_file)?;
    ensure!(
        !told.status.success(),
        "finish signalled `sleep`: {}",
        text(&told)
    );
    ensure!(
        text(&told).contains("not a porthole-agent") && text(&told).contains("`sleep`"),
        "{}",
        text(&told)
    );
    std::thread::sleep(Duration::from_millis(200));
    ensure!(sleep.0.try_wait()?.is_none(), "sleep is no longer running");
    Ok(())
}
