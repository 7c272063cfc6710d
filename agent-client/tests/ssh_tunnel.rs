//! Real OpenSSH through relay + agent: a command runs, and 64 MiB cross the tunnel in each
//! direction with matching SHA-256, with host key checking on.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use anyhow::{ensure, Context as _};
use common::agent::Agent;
use common::peers::sshd::Sshd;
use common::peers::tools::{run_with_input, run_with_timeout};
use common::peers::{sha256_file, write_random_file};
use common::relay::TestRelay;
use sha2::{Digest, Sha256};

const BIG: usize = 64 * 1024 * 1024;

#[test]
fn ssh_runs_commands_and_moves_64_mib_each_way() -> anyhow::Result<()> {
    let sshd = Sshd::start()?;
    let relay = TestRelay::start()?;
    let session = relay.create(&["ssh"], None)?;
    let agent = Agent::start(
        &relay,
        &session.token,
        &[format!("ssh=127.0.0.1:{}", sshd.port)],
    )?;
    agent.wait_registered()?;
    let port = session.port("ssh");
    ensure!(
        agent.output().contains(&format!("127.0.0.1:{port}")),
        "agent should print the public endpoint:\n{}",
        agent.output()
    );
    assert_eq!(relay.state(&session.id)?, "active");

    let out = run_with_timeout(
        sshd.ssh("127.0.0.1", port)
            .arg("echo hello through porthole"),
        Duration::from_secs(60),
    )?;
    ensure!(
        out.status.success(),
        "ssh failed: {}\nsshd log:\n{}",
        out.stderr,
        sshd.log()
    );
    assert_eq!(out.stdout_text(), "hello through porthole\n");

    // Upload: 64 MiB on ssh's stdin into a file on the "build machine".
    let work = tempfile::tempdir()?;
    let src = work.path().join("artifact.bin");
    let want = write_random_file(&src, BIG)?;
    let uploaded = work.path().join("uploaded.bin");
    let data = std::fs::read(&src)?;
    let remote = format!("cat > '{}'", uploaded.display());
    let up = run_with_input(
        sshd.ssh("127.0.0.1", port).arg(remote),
        &data,
        Duration::from_secs(300),
    )?;
    ensure!(up.status.success(), "upload failed: {}", up.stderr);
    assert_eq!(sha256_file(&uploaded)?, want, "uploaded file differs");

    // Download: the same 64 MiB back on ssh's stdout.
    let remote = format!("cat '{}'", src.display());
    let down = run_with_timeout(
        sshd.ssh("127.0.0.1", port).arg(remote),
        Duration::from_secs(300),
    )?;
    ensure!(down.status.success(), "download failed: {}", down.stderr);
    assert_eq!(down.stdout.len(), BIG);
    assert_eq!(
        hex::encode(Sha256::digest(&down.stdout)),
        want,
        "downloaded bytes differ"
    );
    Ok(())
}

#[test]
fn idle_ssh_connection_stays_open() -> anyhow::Result<()> {
    let sshd = Sshd::start()?;
    let relay = TestRelay::start()?;
    let session = relay.create(&["ssh"], None)?;
    let agent = Agent::start(
        &relay,
        &session.token,
        &[format!("ssh=127.0.0.1:{}", sshd.port)],
    )?;
    agent.wait_registered()?;
    // Silent for several relay heartbeat intervals (1 s in tests): the visitor stays connected.
    let out = run_with_timeout(
        sshd.ssh("127.0.0.1", session.port("ssh"))
            .arg("sleep 5; echo still here"),
        Duration::from_secs(60),
    )
    .context("idle ssh")?;
    ensure!(out.status.success(), "ssh failed: {}", out.stderr);
    assert_eq!(out.stdout_text(), "still here\n");
    Ok(())
}
