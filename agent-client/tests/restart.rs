//! Sessions survive a relay restart, even `kill -9`: the agent resumes by itself, the same
//! port serves SSH again, and deadlines are kept (one that passed while the relay was down
//! revokes at once); a pending session stays pending with a usable join token, a finishing
//! one stays finishing, and the password (kept only in memory) is back once the agent resumes.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Stdio;
use std::time::Duration;

use anyhow::{ensure, Context as _};
use common::fixture::Tunnel;
use common::peers::sshd::Sshd;
use common::relay_process::RelaySetup;
use common::{port_refuses, wait_for};
use serde_json::json;

#[test]
fn kill9_mid_transfer_then_restart_resumes_on_the_same_port() -> anyhow::Result<()> {
    let sshd = Sshd::start()?;
    let setup = RelaySetup::new()?;
    let mut relay = setup.start()?;
    let Tunnel { session, agent, .. } = Tunnel::builder()
        .forward("ssh", sshd.port)
        .start_process(&setup, &relay)?;
    let (port, id) = (session.port("ssh"), session.id);
    let http = setup.http()?;
    let before = relay.session(&http, &id)?;
    assert_eq!(before["state"], "active");

    // A visitor in the middle of a long transfer when the relay dies.
    let mut transfer = sshd.ssh("127.0.0.1", port);
    let mut transfer = transfer
        .arg("head -c 2000000000 /dev/zero")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut out = transfer.stdout.take().context("stdout")?;
    let mut first = vec![0u8; 1 << 20];
    if let Err(e) = std::io::Read::read_exact(&mut out, &mut first) {
        let _ = transfer.kill();
        let mut err = String::new();
        if let Some(mut stderr) = transfer.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut stderr, &mut err);
        }
        anyhow::bail!(
            "transfer did not start ({e}): ssh said: {err}\nagent:\n{}",
            agent.output()
        );
    }
    relay.kill9()?;
    drop(out);
    let _ = transfer.kill();

    let _relay = setup.restart_and_check_resumed(&agent, &id, &before, &sshd, port)?;
    Ok(())
}

/// The hard cap of `deadline_passed_while_down_revokes_on_start`'s session.
const MAX_LIFETIME_SECS: u64 = 15;

#[test]
fn deadline_passed_while_down_revokes_on_start() -> anyhow::Result<()> {
    let sshd = Sshd::start()?;
    let setup = RelaySetup::new()?;
    let mut relay = setup.start()?;
    let Tunnel {
        session, mut agent, ..
    } = Tunnel::builder()
        .forward("ssh", sshd.port)
        .session_fields(json!({"max_lifetime_secs": MAX_LIFETIME_SECS}))
        .start_process(&setup, &relay)?;
    let (port, id) = (session.port("ssh"), session.id);
    // The session is live when the relay dies (a hard cap that had passed already would make
    // the restart's revocation this test's subject no more): a cap long enough for a slow
    // machine to reach this point.
    let http = setup.http()?;
    let view = relay.session(&http, &id)?;
    ensure!(
        view["state"] == "active",
        "the session must be live before the relay dies: {view}"
    );
    let expires_at = common::time_of(&view, "expires_at")?;
    relay.kill9()?;
    // The hard cap passes while the relay is down: wait for its time, not a guess at it.
    if let Ok(left) = expires_at.duration_since(std::time::SystemTime::now()) {
        std::thread::sleep(left + Duration::from_millis(200));
    }
    let relay = setup.start()?;
    let view = wait_for("the session to be revoked", Duration::from_secs(10), || {
        relay
            .session(&http, &id)
            .ok()
            .filter(|v| v["state"] == "revoked")
    })?;
    assert_eq!(view["revoke_reason"], "hard_cap");
    ensure!(
        port_refuses(port),
        "the port of a revoked session must refuse connections"
    );
    let status = agent.wait_exit(Duration::from_secs(30))?;
    ensure!(
        status.success(),
        "agent exits 0 once it learns the session is over:\n{}",
        agent.output()
    );
    Ok(())
}

/// A user token for app `a` (the app of [`RelaySetup::create_session`]) minted with the
/// relay's own command from its data dir.
fn developer_token(setup: &RelaySetup) -> anyhow::Result<String> {
    let out = std::process::Command::new(common::relay_process::binary()?)
        .args(["mint-user-token", "--sub", "u-dev", "--app-id", "a"])
        .args(["--role", "developer", "--ttl", "10m", "--data-dir"])
        .arg(setup.data.path())
        .env_remove("PORTHOLE_DATA_DIR")
        .output()?;
    ensure!(
        out.status.success(),
        "mint-user-token: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout)?;
    Ok(text.lines().last().context("no token")?.trim().to_owned())
}

#[test]
fn pending_and_finishing_sessions_survive_a_restart_and_the_password_comes_back(
) -> anyhow::Result<()> {
    let setup = RelaySetup::new()?;
    let mut relay = setup.start()?;
    let http = setup.http()?;

    // A session whose build machine has not joined yet.
    let (pending_id, pending_token, _) = setup.create_session(&relay.api, json!({}))?;
    // A session whose build finished (a grace far longer than the test: the restart falls
    // inside it), whose agent reports a password. Passwords live only in the relay's memory.
    let dir = tempfile::tempdir()?;
    let password = common::secrets::random_password(20);
    let password_file = common::secrets::write_secret_file(dir.path(), "pw", &password)?;
    let Tunnel { session, agent, .. } = Tunnel::builder()
        .session_fields(json!({ "grace_secs": 600 }))
        .args([
            "--ssh-user".to_owned(),
            "vagrant".to_owned(),
            "--ssh-password-file".to_owned(),
            password_file.display().to_string(),
        ])
        .start_process(&setup, &relay)?;
    let id = session.id.clone();
    http.post(format!("{}/v1/sessions/{id}/finish", relay.api))
        .send()?
        .error_for_status()?;
    let before = relay.session(&http, &id)?;
    assert_eq!(before["state"], "finishing", "{before}");
    let user = developer_token(&setup)?;
    let instructions =
        |relay: &common::relay_process::RelayProcess| -> anyhow::Result<serde_json::Value> {
            Ok(reqwest::blocking::Client::new()
                .get(format!("{}/v1/sessions/{id}/instructions", relay.api))
                .bearer_auth(&user)
                .send()?
                .error_for_status()?
                .json()?)
        };
    assert_eq!(instructions(&relay)?["ssh"]["password"], password.as_str());

    relay.kill9()?;
    let relay = setup.start()?;
    // The finishing session: resumed, still finishing, the same deadline, and the password
    // back in the instructions (the agent sends it again when it resumes).
    agent.wait_line("resumed session", Duration::from_secs(30))?;
    let after = wait_for(
        "the session to be finishing again",
        Duration::from_secs(20),
        || {
            relay
                .session(&http, &id)
                .ok()
                .filter(|v| v["state"] == "finishing")
        },
    )?;
    for field in ["deadline", "expires_at", "created_at", "endpoints"] {
        ensure!(
            after[field] == before[field],
            "{field} must survive the restart: {} vs {}",
            after[field],
            before[field]
        );
    }
    let again = wait_for(
        "the password in the instructions again",
        Duration::from_secs(20),
        || {
            instructions(&relay)
                .ok()
                .filter(|v| v["ssh"]["password"].is_string())
        },
    )?;
    assert_eq!(again["ssh"]["password"], password.as_str(), "{again}");

    // The pending session: still pending, and its join token still joins.
    let view = relay.session(&http, &pending_id)?;
    assert_eq!(view["state"], "pending", "{view}");
    let late = common::agent::Agent::start_to(
        &format!("127.0.0.1:{}", setup.agent_port),
        &relay.pin,
        &pending_token,
        &["ssh=127.0.0.1:9".to_owned()],
    )?;
    wait_for(
        "the pending session to become active",
        Duration::from_secs(30),
        || {
            relay
                .session(&http, &pending_id)
                .ok()
                .filter(|v| v["state"] == "active")
        },
    )
    .with_context(|| format!("agent output:\n{}", late.output()))?;
    drop(late);
    Ok(())
}
