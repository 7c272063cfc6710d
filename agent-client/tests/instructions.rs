//! Remote access instructions through the real API: who gets them (user tokens, the
//! Testers/QA rule, other apps, the admin token), what they hold (command, password,
//! `known_hosts`, screen sharing), that what they hold works with real OpenSSH and TigerVNC,
//! that they end at revocation, and that the audit log records it all without a secret.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{ensure, Context as _};
use common::agent::Agent;
use common::fixture::Tunnel;
use common::peers::sshd::{password_ssh, password_user, Sshd, SshdOptions};
use common::peers::tools::run_with_timeout;
use common::peers::vnc::{png_size, vncdo_capture, Xvnc};
use common::relay::{ApiAnswer, Created, TestRelay};
use common::secrets::{random_password, write_secret_file};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

/// The 403 body for denied roles, word for word.
const DENIED_MESSAGE: &str = "Users with the Testers/QA role cannot use remote access";

/// A host key the agent reports in the tests that do not need a real sshd.
const HOST_KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJdD7y3aLq454yWBdwLWbieU1ebz9/cu7/QEXn9OIeZJ root@vm";

/// A second host key, so `--ssh-host-key-file` is given twice.
const HOST_KEY_2: &str = "ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBEmKSENjQEezOmxkZMy7opKgwFB9nkt5YRrYMjNuG5N87uRgg6CLrbo5wAdT/y6v0mKV0U2w0WZ2YB/++Tpockg= root@vm";

/// Flags for the agent's SSH login details.
fn ssh_flags(user: &str, password_file: &Path, host_key_file: &Path) -> Vec<String> {
    vec![
        "--ssh-user".into(),
        user.into(),
        "--ssh-password-file".into(),
        password_file.display().to_string(),
        "--ssh-host-key-file".into(),
        host_key_file.display().to_string(),
    ]
}

/// An active SSH session whose agent forwards to an echo service and reports user
/// `vagrant`, a random password and the host keys [`HOST_KEY`] and [`HOST_KEY_2`].
struct ActiveSession {
    created: Created,
    password: String,
    agent: Agent,
    _dir: tempfile::TempDir,
}

fn active_session(relay: &TestRelay) -> anyhow::Result<ActiveSession> {
    let dir = tempfile::tempdir()?;
    let password = random_password(20);
    let password_file = write_secret_file(dir.path(), "ssh-password", &password)?;
    let key_file = write_secret_file(dir.path(), "host_ed25519.pub", HOST_KEY)?;
    let key_file_2 = write_secret_file(dir.path(), "host_ecdsa.pub", HOST_KEY_2)?;
    let mut flags = ssh_flags("vagrant", &password_file, &key_file);
    flags.extend([
        "--ssh-host-key-file".to_owned(),
        key_file_2.display().to_string(),
    ]);
    let Tunnel {
        session: created,
        agent,
        ..
    } = Tunnel::builder().args(flags).start(relay)?;
    relay.wait_state(&created.id, "active", Duration::from_secs(10))?;
    Ok(ActiveSession {
        created,
        password,
        agent,
        _dir: dir,
    })
}

/// Every regular file under `dir`, recursively.
fn files_under(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    let mut dirs = vec![dir.to_owned()];
    while let Some(d) = dirs.pop() {
        for entry in std::fs::read_dir(&d)? {
            let entry = entry?;
            let kind = entry.file_type()?;
            if kind.is_dir() {
                dirs.push(entry.path());
            } else if kind.is_file() {
                files.push(entry.path());
            }
        }
    }
    Ok(files)
}

/// Unix seconds now.
fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Claims of a user token for `app-7`, valid for ten more minutes unless `exp` says otherwise.
fn claims(sub: &str, role: Value, exp: u64) -> Value {
    json!({ "sub": sub, "app_id": "app-7", "role": role, "exp": exp, "iat": now_secs() })
}

/// A JWT signed with `alg` and `secret`, built independently of the relay's minting code.
fn jwt(alg: Algorithm, secret: &[u8], claims: &Value) -> anyhow::Result<String> {
    Ok(jsonwebtoken::encode(
        &Header::new(alg),
        claims,
        &EncodingKey::from_secret(secret),
    )?)
}

/// Unpadded base64url, for hand-built tokens.
fn b64url(bytes: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..=chunk.len() {
            out.push(char::from(T[((n >> (18 - 6 * i)) & 63) as usize]));
        }
    }
    out
}

/// An unsigned token: header `{"alg":"none","typ":"JWT"}`, empty signature.
fn alg_none(claims: &Value) -> String {
    format!(
        "{}.{}.",
        b64url(br#"{"alg":"none","typ":"JWT"}"#),
        b64url(claims.to_string().as_bytes())
    )
}

/// Checks the status and that the answer must not be cached.
fn expect(answer: &ApiAnswer, status: u16, case: &str) -> anyhow::Result<()> {
    ensure!(
        answer.status == status,
        "{case}: expected {status}, got {} {}",
        answer.status,
        answer.body
    );
    ensure!(
        answer.cache_control.as_deref() == Some("no-store"),
        "{case}: every instructions answer needs `Cache-Control: no-store`, got {:?}",
        answer.cache_control
    );
    Ok(())
}

#[test]
fn role_matrix_and_bad_tokens_get_the_documented_answers() -> anyhow::Result<()> {
    let relay = TestRelay::start()?;
    let s = active_session(&relay)?;
    let id = &s.created.id;
    let port = s.created.port("ssh");
    let secret = relay.user_token_secret()?;

    // Allowed roles get everything.
    for role in ["owner", "admin", "developer"] {
        let token = relay.user_token(&format!("u-{role}"), "app-7", &[role])?;
        let a = relay.instructions(id, Some(&token))?;
        expect(&a, 200, role)?;
        let b = &a.body;
        assert_eq!(b["session_id"], id.as_str(), "{role}: {b}");
        assert_eq!(b["state"], "active", "{role}: {b}");
        assert_eq!(
            b["ssh"]["command"],
            format!("ssh -p {port} vagrant@127.0.0.1"),
            "{role}: {b}"
        );
        assert_eq!(b["ssh"]["host"], "127.0.0.1", "{role}: {b}");
        assert_eq!(b["ssh"]["port"], port, "{role}: {b}");
        assert_eq!(b["ssh"]["username"], "vagrant", "{role}: {b}");
        assert_eq!(b["ssh"]["password"], s.password.as_str(), "{role}: {b}");
        let key = HOST_KEY.trim_end_matches(" root@vm");
        let key_2 = HOST_KEY_2.trim_end_matches(" root@vm");
        assert_eq!(
            b["ssh"]["known_hosts"],
            format!("[127.0.0.1]:{port} {key}\n[127.0.0.1]:{port} {key_2}"),
            "{role}: one known_hosts line per host key: {b}"
        );
        assert!(
            b.get("screenshare").is_none(),
            "{role}: no VNC, no screenshare: {b}"
        );
        assert_eq!(
            b["available_until"],
            Value::Null,
            "{role}: build running: {b}"
        );
        assert!(b["hard_cap"].is_string(), "{role}: {b}");
        assert_eq!(b["lifetime_policy"], "grace_after_finish", "{role}: {b}");
    }

    // Testers and QA never do, whatever the case or the company of other roles.
    let denied: [(&str, &[&str]); 4] = [
        ("tester", &["tester"]),
        ("qa", &["qa"]),
        ("QA", &["QA"]),
        ("developer+tester", &["developer", "tester"]),
    ];
    for (case, roles) in denied {
        let token = relay.user_token(&format!("u-{case}"), "app-7", roles)?;
        let a = relay.instructions(id, Some(&token))?;
        expect(&a, 403, case)?;
        assert_eq!(
            a.body,
            json!({ "error": "forbidden", "message": DENIED_MESSAGE }),
            "{case}"
        );
    }

    // The hand-built tokens below are valid when nothing is wrong with them.
    let fresh = now_secs() + 600;
    let control = jwt(
        Algorithm::HS256,
        &secret,
        &claims("u-ctl", json!("developer"), fresh),
    )?;
    expect(
        &relay.instructions(id, Some(&control))?,
        200,
        "hand-built HS256 control token",
    )?;

    // Missing, expired, forged, unsigned, wrong-algorithm tokens and the admin token: 401.
    let expired = jwt(
        Algorithm::HS256,
        &secret,
        &claims("u-exp", json!("developer"), now_secs() - 300),
    )?;
    let forged = jwt(
        Algorithm::HS256,
        b"not-the-relay-secret-not-the-relay-secret",
        &claims("u-forged", json!("developer"), fresh),
    )?;
    let none = alg_none(&claims("u-none", json!("developer"), fresh));
    let hs512 = jwt(
        Algorithm::HS512,
        &secret,
        &claims("u-512", json!("developer"), fresh),
    )?;
    let mut early = claims("u-early", json!("developer"), fresh);
    early["nbf"] = json!(now_secs() + 3600);
    let not_yet = jwt(Algorithm::HS256, &secret, &early)?;
    let admin = relay.handle.admin_token().expose().to_owned();
    let unauthorized: [(&str, Option<&str>); 7] = [
        ("no token", None),
        ("expired token", Some(&expired)),
        ("token not valid before an hour from now", Some(&not_yet)),
        ("token signed with another secret", Some(&forged)),
        ("alg=none token", Some(&none)),
        ("HS512 token with the right secret", Some(&hs512)),
        ("admin token as user token", Some(&admin)),
    ];
    for (case, token) in unauthorized {
        let a = relay.instructions(id, token)?;
        expect(&a, 401, case)?;
        assert_eq!(a.body["error"], "unauthorized", "{case}: {}", a.body);
        assert!(
            a.body.get("ssh").is_none(),
            "{case}: no instructions: {}",
            a.body
        );
    }

    // A valid token for another app: 403, and not the Testers/QA message.
    let other_app = relay.user_token("u-other", "app-8", &["developer"])?;
    let a = relay.instructions(id, Some(&other_app))?;
    expect(&a, 403, "other app")?;
    assert_eq!(a.body["error"], "forbidden", "{}", a.body);
    assert!(a.body.get("ssh").is_none(), "{}", a.body);

    // Unknown session: 404.
    let dev = relay.user_token("u-dev", "app-7", &["developer"])?;
    expect(
        &relay.instructions("s_doesnotexist", Some(&dev))?,
        404,
        "unknown session",
    )?;

    // A user token is not an admin token.
    let user_client = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()?;
    let create = user_client
        .post(format!("{}/v1/sessions", relay.api))
        .bearer_auth(&dev)
        .json(&json!({ "build_id": "b", "app_id": "app-7", "services": ["ssh"] }))
        .send()?;
    assert_eq!(
        create.status().as_u16(),
        401,
        "user token on POST /v1/sessions"
    );
    let get = user_client
        .get(format!("{}/v1/sessions/{id}", relay.api))
        .bearer_auth(&dev)
        .send()?;
    assert_eq!(
        get.status().as_u16(),
        401,
        "user token on GET /v1/sessions/{{id}}"
    );
    let delete = user_client
        .delete(format!("{}/v1/sessions/{id}", relay.api))
        .bearer_auth(&dev)
        .send()?;
    assert_eq!(
        delete.status().as_u16(),
        401,
        "user token on DELETE /v1/sessions/{{id}}"
    );
    assert_eq!(
        relay.state(id)?,
        "active",
        "a user token must not revoke anything"
    );
    drop(s.agent);
    Ok(())
}

#[test]
fn audit_log_records_served_and_denied_instructions_without_secrets() -> anyhow::Result<()> {
    let relay = TestRelay::start()?;
    let s = active_session(&relay)?;
    let id = &s.created.id;
    let secret = relay.user_token_secret()?;

    let dev = relay.user_token("u-dev", "app-7", &["developer"])?;
    let tester = relay.user_token("u-tester", "app-7", &["tester"])?;
    let mixed = relay.user_token("u-mixed", "app-7", &["developer", "QA"])?;
    let other_app = relay.user_token("u-other", "app-8", &["developer"])?;
    let forged = jwt(
        Algorithm::HS256,
        b"not-the-relay-secret-not-the-relay-secret",
        &claims("u-forged", json!("developer"), now_secs() + 600),
    )?;
    expect(&relay.instructions(id, Some(&dev))?, 200, "developer")?;
    expect(&relay.instructions(id, Some(&tester))?, 403, "tester")?;
    expect(&relay.instructions(id, Some(&mixed))?, 403, "developer+QA")?;
    expect(&relay.instructions(id, Some(&other_app))?, 403, "other app")?;
    expect(&relay.instructions(id, Some(&forged))?, 401, "forged")?;
    let admin = relay.handle.admin_token().expose().to_owned();
    expect(&relay.instructions(id, Some(&admin))?, 401, "admin token")?;
    relay.delete(id)?;

    let lines = relay.audit_lines()?;
    let log = relay.audit_log()?;
    let find = |event: &str, sub: Option<&str>| -> anyhow::Result<Value> {
        lines
            .iter()
            .find(|l| {
                l["event"] == event
                    && l["session_id"] == id.as_str()
                    && sub.is_none_or(|s| l["sub"] == s)
            })
            .cloned()
            .with_context(|| format!("no `{event}` line for {sub:?} in the audit log:\n{log}"))
    };
    for event in [
        "session_created",
        "session_joined",
        "session_revoked",
        "instructions_served",
    ] {
        find(event, None)?;
    }
    let served = find("instructions_served", Some("u-dev"))?;
    assert_eq!(served["role"], "developer", "{served}");
    assert_eq!(served["app_id"], "app-7", "{served}");
    assert_eq!(served["source_ip"], "127.0.0.1", "{served}");

    let denied = find("instructions_denied", Some("u-tester"))?;
    assert_eq!(denied["role"], "tester", "{denied}");
    assert_eq!(denied["reason"], DENIED_MESSAGE, "{denied}");
    assert_eq!(denied["source_ip"], "127.0.0.1", "{denied}");
    let denied = find("instructions_denied", Some("u-mixed"))?;
    let role = denied["role"].as_str().unwrap_or("");
    ensure!(
        role.contains("developer") && role.contains("QA"),
        "both roles in {denied}"
    );
    assert_eq!(denied["reason"], DENIED_MESSAGE, "{denied}");
    let denied = find("instructions_denied", Some("u-other"))?;
    assert_eq!(denied["app_id"], "app-8", "{denied}");
    ensure!(
        denied["reason"].as_str().is_some_and(|r| !r.is_empty()),
        "reason in {denied}"
    );
    let unauthenticated = lines
        .iter()
        .filter(|l| l["event"] == "instructions_denied" && l["sub"].is_null())
        .count();
    // Forged and admin tokens are both refused as `unauthorized` from 127.0.0.1: the first
    // is written in full, the second is counted for the next aggregated summary line.
    assert_eq!(
        unauthenticated, 1,
        "forged and admin tokens are denied without a user, aggregated per source:\n{log}"
    );
    ensure!(
        lines
            .iter()
            .filter(|l| l["event"] == "instructions_denied")
            .all(|l| l["reason"].as_str().is_some_and(|r| !r.is_empty())),
        "every instructions_denied line has a reason:\n{log}"
    );

    let signature = |t: &str| t.rsplit('.').next().unwrap_or("").to_owned();
    let mut secrets = vec![
        s.password.clone(),
        s.created.token.clone(),
        admin.clone(),
        String::from_utf8_lossy(&secret).into_owned(),
    ];
    for t in [&dev, &tester, &mixed, &other_app, &forged] {
        secrets.push(t.clone());
        secrets.push(signature(t));
    }
    for secret in secrets {
        ensure!(
            !log.contains(&secret),
            "the audit log must hold no secret, found `{secret}`:\n{log}"
        );
    }
    // Passwords live in memory only: no file the relay wrote holds one.
    for file in files_under(relay.dir.path())? {
        let bytes = std::fs::read(&file)?;
        ensure!(
            !String::from_utf8_lossy(&bytes).contains(&s.password),
            "{} holds the SSH password; the relay must keep it in memory only",
            file.display()
        );
    }
    Ok(())
}

#[test]
fn pending_is_409_revoked_is_410_and_passwords_are_forgotten() -> anyhow::Result<()> {
    let relay = TestRelay::start()?;
    let created = relay.create(&["ssh"], None)?;
    let dev = relay.user_token("u-dev", "app-7", &["developer"])?;

    let a = relay.instructions(&created.id, Some(&dev))?;
    expect(&a, 409, "pending session")?;
    let message = a.body["message"].as_str().unwrap_or("");
    ensure!(
        message.contains("build machine has not connected"),
        "409 should say the build machine has not connected yet: {}",
        a.body
    );

    // The agent joins with a password: now it is served.
    let echo = common::echo::start()?;
    let dir = tempfile::tempdir()?;
    let password = random_password(20);
    let password_file = write_secret_file(dir.path(), "ssh-password", &password)?;
    let key_file = write_secret_file(dir.path(), "host.pub", HOST_KEY)?;
    let agent = Agent::start_with_args(
        &relay,
        &created.token,
        &[format!("ssh=127.0.0.1:{echo}")],
        &ssh_flags("vagrant", &password_file, &key_file),
    )?;
    agent.wait_registered()?;
    let a = relay.instructions(&created.id, Some(&dev))?;
    expect(&a, 200, "joined session")?;
    assert_eq!(a.body["ssh"]["password"], password.as_str(), "{}", a.body);

    relay.delete(&created.id)?;
    let a = relay.instructions(&created.id, Some(&dev))?;
    expect(&a, 410, "revoked session")?;
    assert_eq!(a.body["error"], "gone", "{}", a.body);
    assert!(a.body.get("ssh").is_none(), "{}", a.body);
    let session = relay
        .handle
        .relay
        .sessions
        .get(&created.id)
        .context("a revoked session stays visible during its retention")?;
    let inner = session.lock();
    assert!(
        inner.access.is_none(),
        "credentials must be dropped at revocation, still held: {:?}",
        inner.access
    );
    Ok(())
}

#[test]
fn returned_password_and_known_hosts_log_in_with_real_openssh() -> anyhow::Result<()> {
    let user = password_user()?;
    let sshd = Sshd::start_with(SshdOptions {
        password_auth: true,
        user: Some(user.name.clone()),
    })?;
    let relay = TestRelay::start()?;
    let dir = tempfile::tempdir()?;
    let password_file = write_secret_file(dir.path(), "ssh-password", &user.password)?;
    let Tunnel {
        session: created,
        agent,
        ..
    } = Tunnel::builder()
        .forward("ssh", sshd.port)
        .args(ssh_flags(
            &user.name,
            &password_file,
            &sshd.host_public_key_file(),
        ))
        .start(&relay)?;
    let port = created.port("ssh");

    let dev = relay.user_token("u-dev", "app-7", &["developer"])?;
    let a = relay.instructions(&created.id, Some(&dev))?;
    expect(&a, 200, "developer")?;
    let ssh = &a.body["ssh"];
    assert_eq!(
        ssh["command"],
        format!("ssh -p {port} {}@127.0.0.1", user.name),
        "{ssh}"
    );
    assert_eq!(ssh["username"], user.name.as_str(), "{ssh}");
    let host = ssh["host"].as_str().context("ssh.host")?;
    let known_hosts = ssh["known_hosts"].as_str().context("ssh.known_hosts")?;
    let password = ssh["password"].as_str().context("ssh.password")?;
    let host_key = sshd.host_public_key();
    let key: Vec<&str> = host_key.split_whitespace().take(2).collect();
    assert_eq!(
        known_hosts,
        format!("[{host}]:{port} {}", key.join(" ")),
        "known_hosts line from the host key the agent reported"
    );

    // Exactly the returned line, strict checking, password only.
    let known_hosts_file = dir.path().join("known_hosts");
    std::fs::write(&known_hosts_file, format!("{known_hosts}\n"))?;
    let out = run_with_timeout(
        password_ssh(host, port, &user.name, password, &known_hosts_file)?.arg("echo ok"),
        Duration::from_secs(60),
    )?;
    ensure!(
        out.status.success(),
        "ssh with the returned password and known_hosts failed ({}): {}\nsshd log:\n{}",
        out.status,
        out.stderr,
        sshd.log()
    );
    assert_eq!(out.stdout_text(), "ok\n");

    // The login really was a password check: a wrong one is refused.
    let wrong = run_with_timeout(
        password_ssh(host, port, &user.name, "wrong-password", &known_hosts_file)?.arg("echo ok"),
        Duration::from_secs(60),
    )?;
    ensure!(
        !wrong.status.success() && wrong.stdout_text().is_empty(),
        "a wrong password must be refused: {} {}",
        wrong.status,
        wrong.stdout_text()
    );

    // The build log shows how to connect, never the password.
    let output = agent.output();
    ensure!(
        output.contains(&format!("ssh -p {port} {}@127.0.0.1", user.name)),
        "agent output should hold the ssh command:\n{output}"
    );
    ensure!(
        !output.contains(&user.password),
        "agent output must not hold the password:\n{output}"
    );
    Ok(())
}

#[test]
fn screenshare_instructions_work_with_a_real_vnc_client() -> anyhow::Result<()> {
    let vnc_password = random_password(8);
    let xvnc = Xvnc::start(800, 600, &vnc_password)?;
    let relay = TestRelay::start()?;
    let dir = tempfile::tempdir()?;
    let ssh_password = random_password(20);
    let ssh_file = write_secret_file(dir.path(), "ssh-password", &ssh_password)?;
    let vnc_file = write_secret_file(dir.path(), "vnc-password", &vnc_password)?;
    let key_file = write_secret_file(dir.path(), "host.pub", HOST_KEY)?;
    let mut flags = ssh_flags("vagrant", &ssh_file, &key_file);
    flags.extend([
        "--vnc-password-file".to_owned(),
        vnc_file.display().to_string(),
    ]);
    let Tunnel {
        session: created,
        agent,
        ..
    } = Tunnel::builder()
        .forward("vnc", xvnc.port)
        .args(flags)
        .start(&relay)?;
    let vnc_port = created.port("vnc");

    let dev = relay.user_token("u-dev", "app-7", &["developer"])?;
    let a = relay.instructions(&created.id, Some(&dev))?;
    expect(&a, 200, "developer")?;
    let share = &a.body["screenshare"];
    assert_eq!(share["address"], format!("127.0.0.1:{vnc_port}"), "{share}");
    assert_eq!(share["port"], vnc_port, "{share}");
    assert_eq!(share["password"], vnc_password.as_str(), "{share}");
    assert_eq!(
        share["username"], "vagrant",
        "the VNC user defaults to the SSH user: {share}"
    );
    assert_eq!(
        a.body["ssh"]["password"],
        ssh_password.as_str(),
        "{}",
        a.body
    );

    let host = share["host"].as_str().context("screenshare.host")?;
    let password = share["password"].as_str().context("screenshare.password")?;
    let png = dir.path().join("screen.png");
    vncdo_capture(host, vnc_port, password, &png)
        .with_context(|| format!("Xvnc log:\n{}", xvnc.log()))?;
    assert_eq!(png_size(&png)?, (800, 600));

    let output = agent.output();
    ensure!(
        output.contains(&format!("127.0.0.1:{vnc_port}")),
        "agent output should name the VNC endpoint:\n{output}"
    );
    for secret in [&vnc_password, &ssh_password] {
        ensure!(
            !output.contains(secret.as_str()),
            "agent output must not hold a password:\n{output}"
        );
    }
    Ok(())
}

#[test]
fn hand_built_tokens_are_well_formed() {
    // RFC 4648 vectors, unpadded: the alg=none token above fails for its algorithm only.
    for (plain, encoded) in [
        ("", ""),
        ("f", "Zg"),
        ("fo", "Zm8"),
        ("foo", "Zm9v"),
        ("foob", "Zm9vYg"),
        ("fooba", "Zm9vYmE"),
        ("foobar", "Zm9vYmFy"),
    ] {
        assert_eq!(b64url(plain.as_bytes()), encoded);
    }
    assert_eq!(b64url(&[0xfb, 0xff]), "-_8");
    let none = alg_none(&json!({ "sub": "u" }));
    assert!(
        none.starts_with("eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiJ1In0."),
        "{none}"
    );
}
