//! README promises that only an end-to-end run can show, each with the real binaries: no
//! secret (admin token, join tokens, resume and park secrets, one-time `open` secrets, user
//! token, session passwords) reaches the relay's log, the audit log or the state store; a
//! SIGHUP with a bad certificate pair is refused, logged, and the old certificate is still
//! served; `--revoked-retention` keeps a revoked session visible, then forgets it; the
//! metrics count an instructions fetch and a resume, and no label carries a session id or
//! an address; the audit log records a resume and a finish by the agent.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _};
use common::agent::Agent;
use common::fixture::Tunnel;
use common::proxy::Proxy;
use common::raw::{self, confirm, registered, wait_for_async};
use common::relay::TestRelay;
use common::relay_process::RelaySetup;
use common::scrape::Scrape;
use common::secrets::{random_password, write_secret_file};
use common::{echo, wait_for};
use futures_util::StreamExt;
use porthole_protocol::{Credential, Message, Secret, Service};
use serde_json::{json, Value};

/// A multi-thread runtime for the proxy and the fake agent next to a relay process.
fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

/// Waits for the next `open` on a raw control link; returns its one-time secret.
async fn next_open(link: &mut raw::RawLink) -> anyhow::Result<Secret> {
    loop {
        match tokio::time::timeout(Duration::from_secs(10), link.next()).await? {
            Some(Ok(Message::Open { secret, .. })) => return Ok(secret),
            Some(Ok(_)) => continue,
            other => bail!("no open: {other:?}"),
        }
    }
}

/// The park secret of a `registered` answer.
fn park_secret(answer: &Message) -> Option<Secret> {
    match answer {
        Message::Registered { park_secret, .. } => park_secret.clone(),
        _ => None,
    }
}

/// Where in `text` (named `what`) any of `secrets` appears, as failure lines.
fn leaks(what: &str, text: &str, secrets: &[(&str, String)]) -> Vec<String> {
    secrets
        .iter()
        .filter(|(_, value)| text.contains(value.as_str()))
        .map(|(name, value)| {
            let line = text
                .lines()
                .find(|l| l.contains(value.as_str()))
                .unwrap_or_default();
            format!("{what} holds the {name}: {line}")
        })
        .collect()
}

/// `README`: "no secret is ever logged", "No secret is ever written to [the audit log]",
/// "Passwords are never stored" and only hashes of join tokens and resume secrets are.
/// A relay process (log at `debug`) serves a real agent that joins, forwards a visitor,
/// loses its link and resumes, reports a password that the instructions hand to a user,
/// and is finished and deleted; a fake agent joins, is sent an `open`, drops its link and
/// resumes with its resume secret. Then neither the relay's stderr, nor the audit log, nor
/// the state store holds any of the secrets that crossed.
#[test]
fn no_secret_reaches_the_relay_log_the_audit_log_or_the_store() -> anyhow::Result<()> {
    let rt = runtime()?;
    let setup = RelaySetup::new()?;
    let scratch = tempfile::tempdir()?;
    let log = scratch.path().join("relay.log");
    let relay = setup.start_logged_at(&[], Some(&log), "debug")?;
    let agent_addr = format!("127.0.0.1:{}", setup.agent_port);
    let http = setup.http()?;

    // A real agent behind a proxy, with an SSH password.
    let password = random_password(24);
    let password_file = write_secret_file(scratch.path(), "ssh-password", &password)?;
    let proxy = Proxy::start(&rt, agent_addr.clone())?;
    let tunnel = Tunnel::builder()
        .via(&proxy.addr)
        .args([
            "--ssh-user".to_owned(),
            "vagrant".to_owned(),
            "--ssh-password-file".to_owned(),
            password_file.display().to_string(),
        ])
        .start_process(&setup, &relay)?;
    let (id, port) = (tunnel.session.id.clone(), tunnel.port("ssh"));
    assert_eq!(echo::roundtrip(port, b"visitor")?, b"visitor");
    // Its link is cut: it resumes with its (rotating) resume secret.
    proxy.cut();
    tunnel
        .agent
        .wait_line("resumed session", Duration::from_secs(30))?;
    wait_for(
        "forwarding after the resume",
        Duration::from_secs(20),
        || echo::roundtrip(port, b"again").ok(),
    )?;

    // A user fetches the instructions (with the password) with a user token.
    let secret_path = setup.data.path().join("user-token.secret");
    let (signing, _) = porthole_relay::user_token::load_or_create_secret(&secret_path)?;
    let user_token = porthole_relay::user_token::mint(
        &signing,
        "u-17",
        "a",
        porthole_relay::user_token::Roles::One("developer".into()),
        Duration::from_secs(600),
    )
    .map_err(anyhow::Error::msg)?;
    let answer: Value = reqwest::blocking::Client::new()
        .get(format!("{}/v1/sessions/{id}/instructions", relay.api))
        .bearer_auth(&user_token)
        .timeout(Duration::from_secs(10))
        .send()?
        .error_for_status()?
        .json()?;
    ensure!(
        answer["ssh"]["password"] == password.as_str(),
        "the instructions should hand out the password: {answer}"
    );

    // A fake agent: its secrets are visible to the test.
    let (_, fake_token, fake_port) = setup.create_session(&relay.api, json!({}))?;
    let fake_password = random_password(24);
    let credentials = vec![Credential {
        service: Service::Ssh,
        username: "vagrant".into(),
        password: Some(Secret::new(fake_password.clone())),
    }];
    let (mut link, answer) = rt.block_on(raw::hello_with(
        &agent_addr,
        &relay.pin,
        raw::join(&fake_token),
        credentials.clone(),
    ))?;
    let (fake_id, resume_1) = registered(&answer).context("the fake agent's join")?;
    let park_1 = park_secret(&answer).context("no park secret")?;
    rt.block_on(confirm(&mut link))?;
    // A visitor: the relay sends the fake agent an `open` with a one-time secret.
    let mut visitor = std::net::TcpStream::connect(("127.0.0.1", fake_port))?;
    std::io::Write::write_all(&mut visitor, echo::SSH_HELLO)?;
    let open_secret = rt.block_on(next_open(&mut link))?;
    drop(visitor);
    drop(link);
    let answer = rt.block_on(wait_for_async(|| {
        let credentials = credentials.clone();
        let auth = raw::resume(&fake_id, &resume_1);
        let (addr, pin) = (agent_addr.clone(), relay.pin.clone());
        async move {
            let (link, answer) = raw::hello_with(&addr, &pin, auth, credentials).await.ok()?;
            registered(&answer).map(|_| (link, answer))
        }
    }))?;
    let (mut link, answer) = answer;
    let (_, resume_2) = registered(&answer).context("the fake agent's resume")?;
    let park_2 = park_secret(&answer).context("no park secret after the resume")?;
    rt.block_on(confirm(&mut link))?;

    // The end: finish and delete both.
    for session in [&id, &fake_id] {
        http.post(format!("{}/v1/sessions/{session}/finish", relay.api))
            .send()?
            .error_for_status()?;
        http.delete(format!("{}/v1/sessions/{session}", relay.api))
            .send()?
            .error_for_status()?;
    }
    let mut agent = tunnel.agent;
    let status = agent.wait_exit(Duration::from_secs(20))?;
    ensure!(status.success(), "agent: {status}\n{}", agent.output());
    drop(link);

    let audit_path = setup.data.path().join("audit.log");
    let audit = wait_for(
        "both revocations in the audit log",
        Duration::from_secs(10),
        || {
            let text = std::fs::read_to_string(&audit_path).ok()?;
            (text.matches("session_revoked").count() >= 2).then_some(text)
        },
    )?;
    for event in [
        "session_joined",
        "session_resumed",
        "instructions_served",
        "visitor_connected",
        "session_finished",
    ] {
        ensure!(
            audit.contains(event),
            "no {event} in the audit log:\n{audit}"
        );
    }
    let user_secret = std::fs::read_to_string(&secret_path)?.trim().to_owned();
    let secrets = [
        ("admin token", setup.admin_token()?),
        ("user token signing secret", user_secret),
        ("join token", tunnel.session.token.clone()),
        ("fake agent's join token", fake_token),
        ("user token", user_token),
        ("SSH password", password),
        ("fake agent's password", fake_password),
        ("resume secret", resume_1.expose().to_owned()),
        ("rotated resume secret", resume_2.expose().to_owned()),
        ("park secret", park_1.expose().to_owned()),
        ("park secret after the resume", park_2.expose().to_owned()),
        ("open secret", open_secret.expose().to_owned()),
    ];
    for (name, value) in &secrets {
        ensure!(value.len() >= 16, "the {name} is too short to search for");
    }
    let relay_log = std::fs::read_to_string(&log)?;
    ensure!(
        relay_log.contains(&id) && relay_log.contains("DEBUG"),
        "the relay's log should be at debug level and name the session:\n{relay_log}"
    );
    let store = std::fs::read(setup.data.path().join("state.redb"))?;
    let store = String::from_utf8_lossy(&store);
    let mut found = leaks("the relay's log", &relay_log, &secrets);
    found.extend(leaks("the audit log", &audit, &secrets));
    // The store holds the admin token's hash at most; passwords and tokens never.
    found.extend(leaks("state.redb", &store, &secrets));
    ensure!(found.is_empty(), "{}", found.join("\n"));
    Ok(())
}

/// `README`: "SIGHUP: ... A bad pair is refused and the old one kept." Each bad pair
/// (mismatched key, garbage certificate, garbage key) written over the relay's files and
/// signalled is logged as an error naming the problem; the relay stays up, the live agent
/// keeps its link, and a new agent pinning the old certificate still registers. A good pair
/// afterwards is taken.
#[test]
fn sighup_with_a_bad_certificate_pair_keeps_the_old_one() -> anyhow::Result<()> {
    let setup = RelaySetup::new()?;
    let scratch = tempfile::tempdir()?;
    let log = scratch.path().join("relay.log");
    let mut relay = setup.start_logged(&[], Some(&log))?;
    let agent_addr = format!("127.0.0.1:{}", setup.agent_port);
    let old_pin = relay.pin.clone();
    let tunnel = Tunnel::builder().start_process(&setup, &relay)?;
    let (echo_port, port) = (tunnel.echo_port()?, tunnel.port("ssh"));
    let tls = setup.data.path().join("tls");
    let (cert_path, key_path) = (tls.join("cert.pem"), tls.join("key.pem"));

    let a = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()])?;
    let b = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()])?;
    let a_pin = porthole_protocol::tls::fingerprint_sha256(a.cert.der());
    let cases: [(&str, String, String, &[&str]); 3] = [
        (
            "a key that is not the certificate's",
            a.cert.pem(),
            b.key_pair.serialize_pem(),
            &["KeyMismatch"],
        ),
        (
            "a certificate file without a certificate",
            "garbage\n".to_owned(),
            a.key_pair.serialize_pem(),
            &["cert.pem", "no PEM certificate"],
        ),
        (
            "a key file without a key",
            a.cert.pem(),
            "-----BEGIN PRIVATE KEY-----\nZ2FyYmFnZQ==\n-----END PRIVATE KEY-----\n".to_owned(),
            &["private key"],
        ),
    ];
    for (round, (what, cert, key, names)) in cases.iter().enumerate() {
        std::fs::write(&cert_path, cert)?;
        std::fs::write(&key_path, key)?;
        relay.signal("HUP")?;
        let line = wait_for(
            &format!("the relay to log the refused reload ({what})"),
            Duration::from_secs(20),
            || {
                let text = std::fs::read_to_string(&log).ok()?;
                let failures: Vec<&str> = text
                    .lines()
                    .filter(|l| l.contains("certificate reload failed"))
                    .collect();
                failures.get(round).map(|l| (*l).to_owned())
            },
        )
        .with_context(|| {
            format!(
                "relay log:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            )
        })?;
        eprintln!("{what}: {line}");
        ensure!(
            line.contains("ERROR") && names.iter().all(|n| line.contains(n)),
            "{what}: the error should name the problem ({names:?}): {line}"
        );
        ensure!(relay.running(), "{what}: the relay exited");

        // The old certificate is still what new connections get.
        let (_, token, _) = setup.create_session(&relay.api, json!({}))?;
        let fresh = Agent::start_to(
            &agent_addr,
            &old_pin,
            &token,
            &[format!("ssh=127.0.0.1:{echo_port}")],
        )?;
        fresh
            .wait_registered()
            .with_context(|| format!("{what}: an agent pinning the old certificate"))?;
        drop(fresh);
        assert_eq!(echo::roundtrip(port, b"still up")?, b"still up");
    }
    ensure!(
        !tunnel.agent.output().contains("reconnecting"),
        "the live agent lost its link:\n{}",
        tunnel.agent.output()
    );

    // A good pair is still taken after the refusals.
    std::fs::write(&cert_path, a.cert.pem())?;
    std::fs::write(&key_path, a.key_pair.serialize_pem())?;
    relay.signal("HUP")?;
    let (_, token, _) = setup.create_session(&relay.api, json!({}))?;
    wait_for(
        "an agent pinning the good new certificate",
        Duration::from_secs(20),
        || {
            let agent = Agent::start_to(
                &agent_addr,
                &a_pin,
                &token,
                &[format!("ssh=127.0.0.1:{echo_port}")],
            )
            .ok()?;
            agent.wait_registered().ok().map(|()| agent)
        },
    )?;
    Ok(())
}

/// `README`: `--revoked-retention`: "revoked sessions stay visible in the API this long".
/// A deleted session reads as `revoked` (with its reason) right after, and is answered 404
/// (and gone from the list) once the retention passed.
#[test]
fn revoked_sessions_stay_visible_for_the_retention_then_are_forgotten() -> anyhow::Result<()> {
    const RETENTION: Duration = Duration::from_secs(6);
    let setup = RelaySetup::new()?;
    let relay = setup.start_with(&["--revoked-retention", "6s"])?;
    let http = setup.http()?;
    let (id, _, _) = setup.create_session(&relay.api, json!({}))?;
    let deleted_at = Instant::now();
    http.delete(format!("{}/v1/sessions/{id}", relay.api))
        .send()?
        .error_for_status()?;
    let view = relay.session(&http, &id)?;
    ensure!(
        deleted_at.elapsed() < RETENTION,
        "too slow to look within the retention: inconclusive"
    );
    ensure!(
        view["state"] == "revoked" && view["revoke_reason"] == "deleted",
        "right after DELETE: {view}"
    );
    let listed = |id: &str| -> anyhow::Result<bool> {
        let all: Value = http
            .get(format!("{}/v1/sessions", relay.api))
            .send()?
            .error_for_status()?
            .json()?;
        let sessions = all["sessions"].as_array().context("sessions")?;
        Ok(sessions.iter().any(|s| s["session_id"] == id))
    };
    ensure!(listed(&id)?, "a revoked session stays in the list");

    let gone = wait_for(
        "the revoked session to be forgotten",
        RETENTION + Duration::from_secs(30),
        || {
            let resp = http
                .get(format!("{}/v1/sessions/{id}", relay.api))
                .send()
                .ok()?;
            (resp.status() == 404).then(|| resp.json::<Value>().unwrap_or(Value::Null))
        },
    )?;
    ensure!(
        deleted_at.elapsed() >= RETENTION,
        "forgotten before its retention ended"
    );
    ensure!(gone["error"].is_string(), "404 body: {gone}");
    ensure!(!listed(&id)?, "a forgotten session is still listed");
    Ok(())
}

/// `README`, Metrics: `porthole_instructions_requests_total{outcome}` counts an
/// instructions fetch, `porthole_agent_registrations_total{kind="resume"}` a resume, and
/// "labels never carry session ids or addresses": after a session with a forwarded visitor,
/// a refused one (another source address), a fetch and a resume, no label of any series
/// holds the session id, an IP address or a session's port.
#[test]
fn metrics_count_fetches_and_resumes_and_no_label_names_a_session_or_address() -> anyhow::Result<()>
{
    let relay = TestRelay::start()?;
    let proxy = Proxy::start(&relay.rt, relay.agent_addr())?;
    let tunnel = Tunnel::builder()
        .via(&proxy.addr)
        .session_fields(json!({ "allow_cidrs": ["127.0.0.1/32"] }))
        .start(&relay)?;
    let (id, port) = (tunnel.session.id.clone(), tunnel.port("ssh"));
    let before = Scrape::take(&relay)?;

    // A visitor forwarded, and one refused for its source address.
    assert_eq!(echo::roundtrip(port, b"hello")?, b"hello");
    let mut refused = relay.connect_from("127.0.0.2".parse()?, port)?;
    let mut rest = Vec::new();
    let _ = std::io::Read::read_to_end(&mut refused, &mut rest);
    ensure!(rest.is_empty(), "the refused visitor got bytes: {rest:?}");

    // An instructions fetch.
    let token = relay.user_token("u-1", "app-7", &["developer"])?;
    let answer = relay.instructions(&id, Some(&token))?;
    ensure!(answer.status == 200, "instructions: {answer:?}");

    // A resume.
    proxy.cut();
    tunnel
        .agent
        .wait_line("resumed session", Duration::from_secs(30))?;

    let resumes = |s: &Scrape| s.counter("porthole_agent_registrations_total", "kind", "resume");
    let served =
        |s: &Scrape| s.counter("porthole_instructions_requests_total", "outcome", "served");
    let refusals = |s: &Scrape| {
        s.counter(
            "porthole_visitor_refusals_total",
            "reason",
            "source_not_allowed",
        )
    };
    let after = wait_for(
        "the resume and the refusal in /metrics",
        Duration::from_secs(10),
        || {
            let s = Scrape::take(&relay).ok()?;
            (resumes(&s) > resumes(&before) && refusals(&s) > refusals(&before)).then_some(s)
        },
    )?;
    assert_eq!(resumes(&after) - resumes(&before), 1.0, "resumes counted");
    assert_eq!(
        served(&after) - served(&before),
        1.0,
        "served fetches counted"
    );
    assert_eq!(
        after.counter("porthole_agent_registrations_total", "kind", "join"),
        1.0,
        "one join"
    );

    let hex = id.trim_start_matches("s_");
    let port_text = port.to_string();
    let mut problems = Vec::new();
    let all = after.labels()?;
    ensure!(all.len() > 20, "too few labelled series to prove anything");
    for (series, label, value) in &all {
        let text = format!("{label}={value}");
        if text.contains(hex) {
            problems.push(format!("{series}: {text} carries the session id"));
        }
        if value.parse::<std::net::IpAddr>().is_ok()
            || value.parse::<std::net::SocketAddr>().is_ok()
            || value.contains("127.0.0.")
        {
            problems.push(format!("{series}: {text} carries an address"));
        }
        // (`le`: histogram bucket bounds are numbers by design.)
        if label != "le" && (*value == port_text || value.ends_with(&format!(":{port_text}"))) {
            problems.push(format!("{series}: {text} carries the session's port"));
        }
    }
    ensure!(problems.is_empty(), "{}", problems.join("\n"));
    Ok(())
}

/// `README`, audit log: `session_resumed` when the agent comes back after a lost link and
/// `session_finished` by `agent` when the build machine runs `porthole-agent finish`.
#[test]
fn the_audit_log_records_a_resume_and_a_finish_by_the_agent() -> anyhow::Result<()> {
    let relay = TestRelay::start()?;
    let proxy = Proxy::start(&relay.rt, relay.agent_addr())?;
    let tunnel = Tunnel::builder().via(&proxy.addr).start(&relay)?;
    let id = tunnel.session.id.clone();
    let events = |name: &str| -> Vec<Value> {
        relay
            .audit_lines()
            .unwrap_or_default()
            .into_iter()
            .filter(|l| l["event"] == name && l["session_id"] == id.as_str())
            .collect()
    };
    ensure!(
        events("session_resumed").is_empty(),
        "a resume before any lost link"
    );

    proxy.cut();
    tunnel
        .agent
        .wait_line("resumed session", Duration::from_secs(30))?;
    let resumed = wait_for("session_resumed", Duration::from_secs(10), || {
        events("session_resumed").pop()
    })?;
    ensure!(
        resumed["agent_ip"] == "127.0.0.1",
        "session_resumed: {resumed}"
    );
    ensure!(
        events("session_joined").len() == 1,
        "the resume was logged as a join: {:?}",
        events("session_joined")
    );

    let out = std::process::Command::new(common::agent::binary())
        .arg("finish")
        .arg("--pid-file")
        .arg(&tunnel.agent.pid_file)
        .output()?;
    ensure!(
        out.status.success(),
        "porthole-agent finish: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let finished = wait_for("session_finished", Duration::from_secs(10), || {
        events("session_finished").pop()
    })?;
    ensure!(finished["by"] == "agent", "session_finished: {finished}");
    ensure!(
        events("session_finished").len() == 1,
        "one finish, one line: {:?}",
        events("session_finished")
    );
    relay.wait_state(&id, "finishing", Duration::from_secs(10))?;
    Ok(())
}
