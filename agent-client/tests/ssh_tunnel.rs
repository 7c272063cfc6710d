//! Real OpenSSH through relay + agent: a command runs, and 64 MiB cross the tunnel in each
//! direction with matching SHA-256, with host key checking on.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use anyhow::{ensure, Context as _};
use common::fixture::Tunnel;
use common::peers::sshd::Sshd;
use common::peers::tools::{run_with_input, run_with_timeout};
use common::peers::{sha256_file, write_random_file};
use common::relay::TestRelay;
use common::wait_for;
use sha2::{Digest, Sha256};

const BIG: usize = 64 * 1024 * 1024;

#[test]
fn ssh_runs_commands_and_moves_64_mib_each_way() -> anyhow::Result<()> {
    let sshd = Sshd::start()?;
    let relay = TestRelay::start()?;
    let Tunnel { session, agent, .. } =
        Tunnel::builder().forward("ssh", sshd.port).start(&relay)?;
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
    let tunnel = Tunnel::builder().forward("ssh", sshd.port).start(&relay)?;
    let session = &tunnel.session;
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

/// The `tcp` data plane: data connections go in plain TCP to the relay's data port, are
/// authenticated by their one-time secret, and both ends forward with splice(2).
#[test]
fn ssh_over_the_tcp_data_plane_with_splice() -> anyhow::Result<()> {
    let sshd = Sshd::start()?;
    let relay = TestRelay::start_with(|c| {
        c.data_plane = porthole_protocol::DataPlane::Tcp;
        c.data_listen = "127.0.0.1:0".parse().unwrap_or(c.data_listen);
    })?;
    ensure!(
        relay.handle.relay.data_port.get().is_some(),
        "the data port is bound"
    );
    let tunnel = Tunnel::builder().forward("ssh", sshd.port).start(&relay)?;
    let session = &tunnel.session;
    let port = session.port("ssh");
    let out = run_with_timeout(
        sshd.ssh("127.0.0.1", port).arg("echo over tcp"),
        Duration::from_secs(60),
    )?;
    ensure!(out.status.success(), "ssh failed: {}", out.stderr);
    assert_eq!(out.stdout_text(), "over tcp\n");

    let work = tempfile::tempdir()?;
    let src = work.path().join("a.bin");
    let want = write_random_file(&src, 16 << 20)?;
    let copy = work.path().join("b.bin");
    let up = run_with_input(
        sshd.ssh("127.0.0.1", port)
            .arg(format!("cat > '{}'", copy.display())),
        &std::fs::read(&src)?,
        Duration::from_secs(120),
    )?;
    ensure!(up.status.success(), "upload failed: {}", up.stderr);
    assert_eq!(sha256_file(&copy)?, want);
    let down = run_with_timeout(
        sshd.ssh("127.0.0.1", port)
            .arg(format!("cat '{}'", src.display())),
        Duration::from_secs(120),
    )?;
    ensure!(down.status.success(), "download failed: {}", down.stderr);
    assert_eq!(hex::encode(Sha256::digest(&down.stdout)), want);

    // The plain data port takes nothing but `attach` with a live one-time secret.
    let data_port = relay.handle.relay.data_port.get().copied().unwrap_or(0);
    let ask = |msg: porthole_protocol::Message| -> anyhow::Result<porthole_protocol::Message> {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", data_port))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut out = bytes::BytesMut::new();
        porthole_protocol::frame::encode(&msg, &mut out)?;
        s.write_all(&out)?;
        let mut answer = Vec::new();
        s.read_to_end(&mut answer)?;
        let mut buf = bytes::BytesMut::from(&answer[..]);
        porthole_protocol::frame::decode(&mut buf)?.context("no answer frame")
    };
    // Each refusal is a typed error whose message says why.
    let expect_refused = |msg: porthole_protocol::Message,
                          code: porthole_protocol::ErrorCode,
                          says: &str|
     -> anyhow::Result<()> {
        let refused = ask(msg)?;
        ensure!(
            matches!(
                &refused,
                porthole_protocol::Message::Error { code: got, message }
                    if *got == code && message.contains(says)
            ),
            "expected {code:?} saying {says:?}, got {refused:?}"
        );
        Ok(())
    };
    use porthole_protocol::ErrorCode;
    expect_refused(
        porthole_protocol::Message::Ping { seq: 1 },
        ErrorCode::UnexpectedMessage,
        "`ping`",
    )?;
    let forged = porthole_protocol::Message::Attach {
        session_id: session.id.clone(),
        conn_id: 1,
        secret: porthole_protocol::Secret::new("phc_forged"),
    };
    expect_refused(forged, ErrorCode::BadAttach, "attach refused")?;
    // No warm data connections in clear text: `park` is refused on the data port.
    let park = porthole_protocol::Message::Park {
        session_id: session.id.clone(),
        secret: porthole_protocol::Secret::new("php_x"),
    };
    expect_refused(park, ErrorCode::UnexpectedMessage, "tls data plane")?;

    let metrics = &relay.handle.relay.metrics;
    assert_eq!(metrics.forwarding_mode.with_label_values(&["tcp"]).get(), 1);
    assert_eq!(metrics.forwarding_mode.with_label_values(&["tls"]).get(), 0);
    assert_eq!(
        metrics.splice_fallbacks.get(),
        0,
        "pipes were available: every connection spliced"
    );
    // And splice moved the bytes: the 16 MiB each way went through the relay's pipes (each
    // connection is counted when it ends, just after its `ssh` exits).
    let spliced = wait_for(
        "the relay to count 32 MiB moved by splice(2)",
        Duration::from_secs(20),
        || {
            let n = metrics.spliced_bytes.get();
            (n >= 32 << 20).then_some(n)
        },
    )
    .with_context(|| format!("spliced bytes: {}", metrics.spliced_bytes.get()))?;
    println!("relay spliced {spliced} bytes");
    Ok(())
}
