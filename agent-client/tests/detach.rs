//! The agent as a build step, with the real relay and agent binaries: `--detach` returns 0
//! once registered and SSH through the relay works afterwards; a refused token or an
//! unreachable relay makes it exit non-zero with the reason; `finish --wait` blocks until
//! the grace period ends (cutting a live SSH session) and returns 0 then; `status` and its
//! exit codes; SIGUSR1 still finishes.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::Read as _;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{ensure, Context as _};
use common::detached::{cli, text, Detached};
use common::peers::sshd::Sshd;
use common::peers::tools::run_with_timeout;
use common::relay_process::{refusing_port, RelaySetup};
use common::wait_for;
use serde_json::json;

/// `porthole-agent status --json` of `agent`, parsed (None when it fails).
fn status_json(agent: &Detached) -> Option<serde_json::Value> {
    let done = agent
        .cli(&["status", "--json"], Duration::from_secs(20))
        .ok()?;
    serde_json::from_slice(&done.stdout).ok()
}

#[test]
fn detach_returns_zero_then_ssh_works_and_finish_wait_returns_when_the_grace_ends(
) -> anyhow::Result<()> {
    let sshd = Sshd::start()?;
    let setup = RelaySetup::new()?;
    let relay = setup.start()?;
    let http = setup.http()?;
    let (id, token, port) = setup.create_session(&relay.api, json!({"grace_secs": 5}))?;
    let agent = Detached::start(
        &format!("127.0.0.1:{}", setup.agent_port),
        &relay.pin,
        &token,
        &[format!("ssh=127.0.0.1:{}", sshd.port)],
        &[],
    )?;
    let out = agent.output();
    ensure!(agent.started.status.success(), "--detach failed:\n{out}");
    for want in [
        id.as_str(),
        &format!("127.0.0.1:{port}"),
        "running in the background",
        "finish --wait",
    ] {
        ensure!(out.contains(want), "`{want}` missing from:\n{out}");
    }
    ensure!(!out.contains(&token), "the join token was printed:\n{out}");
    // The background agent runs, registered, with its pid file, socket and log; the token is
    // not on its command line.
    let pid = agent.pid()?;
    ensure!(
        out.contains(&format!("pid {pid}")),
        "pid {pid} not printed:\n{out}"
    );
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline"))?;
    let cmdline = String::from_utf8_lossy(&cmdline);
    ensure!(
        !cmdline.contains(&token),
        "the token is on the background agent's command line"
    );
    ensure!(cmdline.contains("--detached-child"), "{cmdline}");
    ensure!(agent.dir().join("agent.pid.sock").exists());
    ensure!(agent.log_text().contains(&id), "log:\n{}", agent.log_text());
    ensure!(relay.session(&http, &id)?["state"] == "active");

    // `status`: alive, nobody connected.
    let status = agent.cli(&["status"], Duration::from_secs(20))?;
    ensure!(status.status.success(), "status: {}", text(&status));
    for want in [
        "state: active",
        &format!("session: {id}"),
        "visitors connected now: 0",
        "a user connected during the session: no",
        "deadline: ",
    ] {
        ensure!(
            text(&status).contains(want),
            "`{want}` missing:\n{}",
            text(&status)
        );
    }

    // The build goes on (the step returned); SSH through the relay works.
    let ssh = run_with_timeout(
        sshd.ssh("127.0.0.1", port).arg("echo hello from the build"),
        Duration::from_secs(60),
    )?;
    ensure!(ssh.status.success(), "ssh: {}\n{}", ssh.stderr, sshd.log());
    ensure!(ssh.stdout_text() == "hello from the build\n");
    agent.wait_log("a user connected (1 now)", Duration::from_secs(20))?;
    agent.wait_log("a user left (0 now)", Duration::from_secs(20))?;

    // A live SSH session, then the build's final step: `finish --wait`.
    let mut live = sshd
        .ssh("127.0.0.1", port)
        .arg("echo started; sleep 120")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let mut first = [0u8; 8];
    live.stdout
        .take()
        .context("live stdout")?
        .read_exact(&mut first)?;
    ensure!(&first == b"started\n");
    wait_for(
        "status to count the live visitor",
        Duration::from_secs(20),
        || status_json(&agent).filter(|s| s["visitors"] == 1),
    )?;

    let output = tempfile::NamedTempFile::new()?;
    let mut finish = agent
        .command(&["finish", "--wait"])
        .stdout(output.reopen()?)
        .stderr(output.reopen()?)
        .spawn()?;
    let finish_text = || std::fs::read_to_string(output.path()).unwrap_or_default();
    // While the grace period runs, `finish --wait` is still waiting.
    wait_for(
        "finish --wait to be waiting while the session is finishing",
        Duration::from_secs(30),
        || {
            let running = finish.try_wait().ok().flatten().is_none();
            let state = relay.session(&http, &id).ok()?["state"].clone();
            (running && state == "finishing").then_some(())
        },
    )
    .with_context(|| format!("finish --wait printed:\n{}", finish_text()))?;
    let done = wait_for("finish --wait to return", Duration::from_secs(60), || {
        finish.try_wait().ok().flatten()
    })
    .with_context(|| format!("finish --wait printed:\n{}", finish_text()))?;
    // It returned once the session was over: revoked at the end of the grace period.
    let view = relay.session(&http, &id)?;
    ensure!(
        view["state"] == "revoked" && view["revoke_reason"] == "grace_ended",
        "{view}"
    );
    let printed = finish_text();
    ensure!(done.success(), "finish --wait exited {done}:\n{printed}");
    for want in [
        &format!("pid {pid}"),
        "remote access ends at",
        "session ended: the grace period after the build finished is over",
    ] {
        ensure!(printed.contains(want), "`{want}` missing:\n{printed}");
    }
    // The live SSH session was cut then.
    let cut = wait_for(
        "the live ssh session to be cut",
        Duration::from_secs(10),
        || live.try_wait().ok().flatten(),
    )?;
    ensure!(!cut.success(), "the live ssh session ended normally");

    // The agent is gone: `status` says no agent runs (exit 3).
    agent.wait_gone(Duration::from_secs(20))?;
    ensure!(!agent.dir().join("agent.pid.sock").exists());
    let status = agent.cli(&["status"], Duration::from_secs(20))?;
    ensure!(status.status.code() == Some(3), "status: {}", text(&status));
    ensure!(text(&status).contains("no porthole-agent is running"));
    ensure!(agent.log_text().contains("session ended"));
    Ok(())
}

#[test]
fn a_refused_token_makes_detach_exit_non_zero_with_the_reason() -> anyhow::Result<()> {
    let setup = RelaySetup::new()?;
    let relay = setup.start()?;
    let wrong = format!("phj_{}", "0".repeat(64));
    let agent = Detached::start(
        &format!("127.0.0.1:{}", setup.agent_port),
        &relay.pin,
        &wrong,
        &["ssh=127.0.0.1:9".into()],
        &[],
    )?;
    let out = agent.output();
    ensure!(
        agent.started.status.code() == Some(1),
        "--detach with a wrong token: {:?}\n{out}",
        agent.started.status
    );
    ensure!(
        out.contains("stopped before it registered") && out.contains("refused"),
        "{out}"
    );
    ensure!(!out.contains(&wrong), "the token was printed:\n{out}");
    // Nothing is left running.
    ensure!(!agent.pid_file.exists(), "the pid file stayed");
    ensure!(!agent.dir().join("agent.pid.sock").exists());
    Ok(())
}

#[test]
fn an_unreachable_relay_makes_detach_give_up_after_the_connect_timeout() -> anyhow::Result<()> {
    // Nothing listens there: the agent keeps retrying until --detach gives up.
    let (_reserved, port) = refusing_port()?;
    let relay = format!("127.0.0.1:{port}");
    let agent = Detached::start(
        &relay,
        &"00".repeat(32),
        "phj_test",
        &["ssh=127.0.0.1:9".into()],
        &["--connect-timeout", "1s"],
    )?;
    let out = agent.output();
    ensure!(
        agent.started.status.code() == Some(1),
        "--detach to nowhere: {:?}\n{out}",
        agent.started.status
    );
    ensure!(
        out.contains("could not register with the relay within 6s") && out.contains("unreachable"),
        "{out}"
    );
    ensure!(
        !agent.pid_file.exists(),
        "the stopped agent left its pid file"
    );
    Ok(())
}

#[test]
fn wait_if_nobody_connected_ends_an_unvisited_session_early() -> anyhow::Result<()> {
    let setup = RelaySetup::new()?;
    let relay = setup.start()?;
    let http = setup.http()?;
    // The default grace period (10 minutes): only the early end can end it within the test.
    let (id, token, _port) = setup.create_session(&relay.api, json!({}))?;
    let agent = Detached::start(
        &format!("127.0.0.1:{}", setup.agent_port),
        &relay.pin,
        &token,
        &["ssh=127.0.0.1:9".into()],
        &[],
    )?;
    ensure!(agent.started.status.success(), "{}", agent.output());
    let done = agent.cli(
        &["finish", "--wait", "--wait-if-nobody-connected", "2s"],
        Duration::from_secs(90),
    )?;
    ensure!(done.status.success(), "finish --wait: {}", text(&done));
    let view = relay.session(&http, &id)?;
    ensure!(
        view["state"] == "revoked" && view["revoke_reason"] == "ended_by_agent",
        "{view}"
    );
    for want in [
        "the session ends early unless a user connects within 2s",
        "ending the session",
        "session ended",
    ] {
        ensure!(
            text(&done).contains(want),
            "`{want}` missing:\n{}",
            text(&done)
        );
    }
    agent.wait_log("ending the session", Duration::from_secs(10))?;
    Ok(())
}

#[test]
fn wait_if_nobody_connected_keeps_a_visited_session() -> anyhow::Result<()> {
    let sshd = Sshd::start()?;
    let setup = RelaySetup::new()?;
    let relay = setup.start()?;
    let http = setup.http()?;
    let (id, token, port) = setup.create_session(&relay.api, json!({"grace_secs": 4}))?;
    let agent = Detached::start(
        &format!("127.0.0.1:{}", setup.agent_port),
        &relay.pin,
        &token,
        &[format!("ssh=127.0.0.1:{}", sshd.port)],
        &[],
    )?;
    ensure!(agent.started.status.success(), "{}", agent.output());
    // A user visited during the build and left.
    let ssh = run_with_timeout(
        sshd.ssh("127.0.0.1", port).arg("true"),
        Duration::from_secs(60),
    )?;
    ensure!(ssh.status.success(), "ssh: {}", ssh.stderr);
    agent.wait_log("a user left (0 now)", Duration::from_secs(20))?;
    let status = status_json(&agent).context("status")?;
    ensure!(status["visited"] == true, "{status}");

    let done = agent.cli(
        &["finish", "--wait", "--wait-if-nobody-connected", "1s"],
        Duration::from_secs(90),
    )?;
    ensure!(done.status.success(), "finish --wait: {}", text(&done));
    ensure!(
        text(&done).contains("a user connected during the session"),
        "{}",
        text(&done)
    );
    let view = relay.session(&http, &id)?;
    ensure!(
        view["state"] == "revoked" && view["revoke_reason"] == "grace_ended",
        "the visited session must keep its grace period: {view}"
    );
    Ok(())
}

#[test]
fn status_and_finish_say_when_no_agent_runs_and_sigusr1_still_finishes() -> anyhow::Result<()> {
    // No agent: exit 3 with a clear message, for `status`, `finish` and `finish --wait`.
    let nowhere = tempfile::tempdir()?;
    let pid_file = nowhere.path().join("agent.pid");
    for args in [&["status"][..], &["finish"], &["finish", "--wait"]] {
        let done = cli(args, &pid_file, Duration::from_secs(20))?;
        ensure!(
            done.status.code() == Some(3),
            "{args:?}: {:?} {}",
            done.status,
            text(&done)
        );
        ensure!(
            text(&done).contains("no porthole-agent is running"),
            "{args:?}: {}",
            text(&done)
        );
    }

    let setup = RelaySetup::new()?;
    let relay = setup.start()?;
    let http = setup.http()?;
    let (id, token, _port) = setup.create_session(&relay.api, json!({}))?;
    let agent = Detached::start(
        &format!("127.0.0.1:{}", setup.agent_port),
        &relay.pin,
        &token,
        &["ssh=127.0.0.1:9".into()],
        &[],
    )?;
    ensure!(agent.started.status.success(), "{}", agent.output());
    // SIGUSR1 still tells the agent the build finished.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(agent.pid()?)?),
        nix::sys::signal::Signal::SIGUSR1,
    )?;
    wait_for(
        "the session to be finishing",
        Duration::from_secs(20),
        || {
            relay
                .session(&http, &id)
                .ok()
                .filter(|v| v["state"] == "finishing")
        },
    )?;
    let status = wait_for("status to say finishing", Duration::from_secs(20), || {
        let done = agent.cli(&["status"], Duration::from_secs(20)).ok()?;
        text(&done).contains("state: finishing").then_some(done)
    })?;
    ensure!(status.status.success(), "{}", text(&status));
    ensure!(text(&status).contains("build finished: yes"));
    // Revoked through the API: the agent ends, and `status` says no agent runs.
    http.delete(format!("{}/v1/sessions/{id}", relay.api))
        .send()?
        .error_for_status()?;
    agent.wait_gone(Duration::from_secs(20))?;
    let status = agent.cli(&["status"], Duration::from_secs(20))?;
    ensure!(status.status.code() == Some(3), "{}", text(&status));
    Ok(())
}
