//! The relay's HTTP API through real HTTP against an in-process relay: authorization,
//! session creation and its public ports, defaults, views, errors, finish, revocation, port
//! pool exhaustion and the join TTL.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, SystemTime};

use anyhow::{ensure, Context, Result};
use common::{
    assert_near, expect_accepted_then_closed, expect_refused, ports, send, str_field, time_field,
    TestRelay,
};
use reqwest::StatusCode;
use serde_json::{json, Value};

/// Tolerance for timestamps computed by the relay from its clock at request time.
const SLACK: Duration = Duration::from_secs(1);

fn ssh_vnc(build: &str) -> Value {
    json!({"build_id": build, "app_id": "a1", "services": ["ssh", "vnc"]})
}

fn assert_error(status: StatusCode, body: &Value, want_status: StatusCode, code: &str) {
    assert_eq!(status, want_status, "{body}");
    assert_eq!(body["error"], code, "{body}");
    assert!(
        body["message"].as_str().is_some_and(|m| !m.is_empty()),
        "error without a message: {body}"
    );
}

#[tokio::test]
async fn api_requires_the_admin_bearer_token() -> Result<()> {
    let relay = TestRelay::start().await?;
    let url = relay.url("/v1/sessions");
    let anonymous = reqwest::Client::new();

    let (status, body) = send(anonymous.get(&url)).await?;
    assert_error(status, &body, StatusCode::UNAUTHORIZED, "unauthorized");

    let wrong = format!("pha_{}", "0".repeat(64));
    let (status, body) = send(anonymous.get(&url).bearer_auth(&wrong)).await?;
    assert_error(status, &body, StatusCode::UNAUTHORIZED, "unauthorized");

    // Not even a create slips through without the token.
    let (status, body) = send(anonymous.post(&url).json(&ssh_vnc("b1"))).await?;
    assert_error(status, &body, StatusCode::UNAUTHORIZED, "unauthorized");
    assert_eq!(relay.handle.relay.sessions.len(), 0);

    let token = relay.handle.admin_token().expose().to_owned();
    let (status, body) = send(anonymous.get(&url).bearer_auth(token)).await?;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body, json!({"sessions": []}));

    // The scheme name is case-insensitive; another scheme is refused with a message that says so.
    let token = relay.handle.admin_token().expose().to_owned();
    let lower = anonymous
        .get(&url)
        .header("Authorization", format!("bearer {token}"));
    let (status, body) = send(lower).await?;
    assert_eq!(status, StatusCode::OK, "{body}");
    let basic = anonymous
        .get(&url)
        .header("Authorization", "Basic dXNlcjpwYXNz");
    let (status, body) = send(basic).await?;
    assert_error(status, &body, StatusCode::UNAUTHORIZED, "unauthorized");
    assert!(
        body["message"]
            .as_str()
            .unwrap_or("")
            .contains("not `Bearer"),
        "{body}"
    );
    Ok(())
}

#[tokio::test]
async fn oversized_api_bodies_are_refused() -> Result<()> {
    let relay = TestRelay::start().await?;
    let huge = format!(
        r#"{{"build_id":"{}","app_id":"a","services":["ssh"]}}"#,
        "b".repeat(1 << 20)
    );
    let req = reqwest::Client::new()
        .post(relay.url("/v1/sessions"))
        .bearer_auth(relay.handle.admin_token().expose())
        .header("content-type", "application/json")
        .body(huge);
    let resp = req.send().await?;
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(relay.handle.relay.sessions.len(), 0);
    Ok(())
}

#[tokio::test]
async fn create_returns_token_expiry_and_listening_ports() -> Result<()> {
    let relay = TestRelay::start().await?;
    let before = SystemTime::now();
    let created = relay.create_ok(&ssh_vnc("b1")).await?;
    let after = SystemTime::now();

    assert!(
        str_field(&created, "session_id")?.starts_with("s_"),
        "{created}"
    );
    let token = str_field(&created, "join_token")?;
    let hex = token
        .strip_prefix("phj_")
        .context("join token without `phj_`")?;
    assert!(
        hex.len() == 64 && hex.chars().all(|c| c.is_ascii_hexdigit()),
        "join token is not 256-bit hex: {token}"
    );

    let three_hours = Duration::from_secs(3 * 3600);
    let expires_at = time_field(&created, "expires_at")?;
    assert!(
        expires_at + SLACK >= before + three_hours && expires_at <= after + three_hours + SLACK,
        "expires_at {} is not 3 h after the request",
        humantime::format_rfc3339_millis(expires_at)
    );

    let endpoints = created["endpoints"].as_array().context("no endpoints")?;
    let services: Vec<&Value> = endpoints.iter().map(|e| &e["service"]).collect();
    assert_eq!(services, [&json!("ssh"), &json!("vnc")], "{created}");
    for e in endpoints {
        assert_eq!(e["host"], "127.0.0.1", "{e}");
    }
    let ports = ports(&created)?;
    assert_ne!(ports[0], ports[1], "two services share a port: {created}");
    for port in &ports {
        assert!(
            (relay.range.lo..=relay.range.hi).contains(port),
            "port {port} outside {}",
            relay.range
        );
        // Pending: no agent yet, so the visitor is closed without a byte.
        expect_accepted_then_closed(*port).await?;
    }
    Ok(())
}

#[tokio::test]
async fn defaults_and_max_lifetime_are_reflected() -> Result<()> {
    let relay = TestRelay::start().await?;
    let created = relay.create_ok(&ssh_vnc("b-defaults")).await?;
    let id = str_field(&created, "session_id")?;
    let view = relay.session(id).await?;
    assert_eq!(view["state"], "pending", "{view}");
    // A pending session's deadline is its join TTL (default 15 min).
    assert_eq!(view["deadline"], created["join_by"], "{view}");
    let created_at = time_field(&view, "created_at")?;
    let deadline = time_field(&view, "deadline")?;
    assert_near(
        "deadline",
        deadline,
        created_at + Duration::from_secs(15 * 60),
        SLACK,
    );
    // Default max lifetime: 10800 s.
    let expires_at = time_field(&view, "expires_at")?;
    assert_near(
        "expires_at",
        expires_at,
        created_at + Duration::from_secs(10_800),
        SLACK,
    );
    assert_eq!(view["expires_at"], created["expires_at"]);
    // Default grace: 600 s from finish (earlier than the join TTL, so it becomes the deadline).
    let before = SystemTime::now();
    let (status, finished) = relay.post(&format!("/v1/sessions/{id}/finish")).await?;
    assert_eq!(status, StatusCode::OK, "{finished}");
    let grace = Duration::from_secs(600);
    let deadline = time_field(&finished, "deadline")?;
    assert!(
        deadline + SLACK >= before + grace && deadline <= SystemTime::now() + grace,
        "deadline after finish {} is not 600 s away",
        humantime::format_rfc3339_millis(deadline)
    );

    let short = relay
        .create_ok(
            &json!({"build_id": "b-short", "app_id": "a1", "services": ["ssh"],
            "max_lifetime_secs": 60}),
        )
        .await?;
    let view = relay.session(str_field(&short, "session_id")?).await?;
    let created_at = time_field(&view, "created_at")?;
    let expires_at = time_field(&view, "expires_at")?;
    assert_near(
        "expires_at",
        expires_at,
        created_at + Duration::from_secs(60),
        SLACK,
    );
    // The join TTL never outlives the hard cap.
    assert_eq!(view["deadline"], view["expires_at"], "{view}");
    Ok(())
}

#[tokio::test]
async fn get_shows_the_session_and_list_shows_all() -> Result<()> {
    let relay = TestRelay::start().await?;
    let first = relay.create_ok(&ssh_vnc("b1")).await?;
    let second = relay
        .create_ok(&json!({"build_id": "b2", "app_id": "a2", "services": ["ssh"]}))
        .await?;
    let id = str_field(&first, "session_id")?;

    let view = relay.session(id).await?;
    let keys: BTreeSet<&str> = view
        .as_object()
        .context("session view is not an object")?
        .keys()
        .map(String::as_str)
        .collect();
    let want: BTreeSet<&str> = [
        "session_id",
        "build_id",
        "app_id",
        "state",
        "endpoints",
        "deadline",
        "expires_at",
        "created_at",
        "lifetime_policy",
        "visitors",
        "visitors_holding",
        "allow_cidrs",
    ]
    .into();
    assert_eq!(keys, want, "{view}");
    assert_eq!(view["session_id"], id);
    assert_eq!(view["build_id"], "b1");
    assert_eq!(view["app_id"], "a1");
    assert_eq!(view["state"], "pending");
    assert_eq!(view["endpoints"], first["endpoints"]);
    for field in ["deadline", "expires_at", "created_at"] {
        time_field(&view, field)?;
    }

    let (status, list) = relay.get("/v1/sessions").await?;
    assert_eq!(status, StatusCode::OK, "{list}");
    let ids: Vec<&str> = list["sessions"]
        .as_array()
        .context("no `sessions` array")?
        .iter()
        .filter_map(|s| s["session_id"].as_str())
        .collect();
    assert_eq!(
        ids,
        [id, str_field(&second, "session_id")?],
        "list in creation order: {list}"
    );
    assert_eq!(list["sessions"][0], view);
    Ok(())
}

#[tokio::test]
async fn unknown_session_is_404() -> Result<()> {
    let relay = TestRelay::start().await?;
    let path = "/v1/sessions/s_doesnotexist";
    let (status, body) = relay.get(path).await?;
    assert_error(status, &body, StatusCode::NOT_FOUND, "not_found");
    let (status, body) = relay.post(&format!("{path}/finish")).await?;
    assert_error(status, &body, StatusCode::NOT_FOUND, "not_found");
    let (status, body) = relay.delete(path).await?;
    assert_error(status, &body, StatusCode::NOT_FOUND, "not_found");
    Ok(())
}

#[tokio::test]
async fn malformed_create_bodies_are_400_naming_the_field() -> Result<()> {
    let relay = TestRelay::start().await?;
    let cases: [(&str, &'static str, &str); 9] = [
        (
            "missing build_id",
            r#"{"app_id":"a1","services":["ssh"]}"#,
            "build_id",
        ),
        (
            "unknown service",
            r#"{"build_id":"b1","app_id":"a1","services":["rdp"]}"#,
            "services",
        ),
        (
            "grace_secs not a number",
            r#"{"build_id":"b1","app_id":"a1","services":["ssh"],"grace_secs":"x"}"#,
            "grace_secs",
        ),
        (
            "empty services",
            r#"{"build_id":"b1","app_id":"a1","services":[]}"#,
            "services",
        ),
        (
            "duplicate services",
            r#"{"build_id":"b1","app_id":"a1","services":["ssh","ssh"]}"#,
            "services",
        ),
        (
            "unknown field",
            r#"{"build_id":"b1","app_id":"a1","services":["ssh"],"foo":1}"#,
            "foo",
        ),
        (
            "empty build_id",
            r#"{"build_id":"","app_id":"a1","services":["ssh"]}"#,
            "build_id",
        ),
        ("not JSON", "build_id=b1&app_id=a1", ""),
        (
            "zero max lifetime",
            r#"{"build_id":"b1","app_id":"a1","services":["ssh"],"max_lifetime_secs":0}"#,
            "max_lifetime_secs",
        ),
    ];
    for (what, body, field) in cases {
        let (status, answer) = relay.create_raw(body).await?;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{what}: {answer}");
        assert_eq!(answer["error"], "bad_request", "{what}: {answer}");
        let message = str_field(&answer, "message")?;
        assert!(
            !message.is_empty() && message.contains(field),
            "{what}: message does not name `{field}`: {message}"
        );
    }
    // Refused requests leave nothing behind: no session, no port.
    assert_eq!(relay.get("/v1/sessions").await?.1, json!({"sessions": []}));
    assert_eq!(relay.handle.relay.pool.counts().in_use, 0);
    Ok(())
}

#[tokio::test]
async fn finish_on_pending_session_starts_grace_and_never_extends() -> Result<()> {
    let relay = TestRelay::start().await?;
    let created = relay
        .create_ok(
            &json!({"build_id": "b1", "app_id": "a1", "services": ["ssh"],
            "grace_secs": 5}),
        )
        .await?;
    let id = str_field(&created, "session_id")?;
    let finish = format!("/v1/sessions/{id}/finish");
    let grace = Duration::from_secs(5);

    let before = SystemTime::now();
    let (status, first) = relay.post(&finish).await?;
    let after = SystemTime::now();
    assert_eq!(status, StatusCode::OK, "{first}");
    assert_eq!(first["state"], "pending", "no agent ever joined: {first}");
    let deadline = time_field(&first, "deadline")?;
    assert!(
        deadline <= after + grace && deadline + Duration::from_millis(1) >= before + grace,
        "deadline {} is not 5 s after finish",
        humantime::format_rfc3339_millis(deadline)
    );
    assert!(deadline < time_field(&created, "join_by")?);

    // Let the clock move so a second finish would compute a later deadline.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let (status, second) = relay.post(&finish).await?;
    assert_eq!(status, StatusCode::OK, "{second}");
    assert_eq!(
        second["deadline"], first["deadline"],
        "finish extended the deadline"
    );
    let view = relay.session(id).await?;
    assert_eq!(view["deadline"], first["deadline"]);
    assert_eq!(view["state"], "pending");
    Ok(())
}

#[tokio::test]
async fn delete_revokes_and_closes_the_ports() -> Result<()> {
    let relay = TestRelay::start().await?;
    let created = relay.create_ok(&ssh_vnc("b1")).await?;
    let id = str_field(&created, "session_id")?;
    let ports = ports(&created)?;
    for port in &ports {
        expect_accepted_then_closed(*port).await?;
    }

    let (status, revoked) = relay.delete(&format!("/v1/sessions/{id}")).await?;
    assert_eq!(status, StatusCode::OK, "{revoked}");
    assert_eq!(revoked["state"], "revoked", "{revoked}");
    assert_eq!(revoked["revoke_reason"], "deleted", "{revoked}");
    let view = relay.session(id).await?;
    assert_eq!(view["state"], "revoked", "{view}");
    assert_eq!(view["revoke_reason"], "deleted", "{view}");
    for port in &ports {
        expect_refused(*port).await?;
    }

    // Finishing a revoked session does not bring it back.
    let (status, view) = relay.post(&format!("/v1/sessions/{id}/finish")).await?;
    assert_eq!(status, StatusCode::OK, "{view}");
    assert_eq!(view["state"], "revoked", "{view}");
    assert_eq!(view["revoke_reason"], "deleted", "{view}");
    Ok(())
}

/// A relay with exactly two public ports, both free: retries on other ranges when another
/// process holds one of them (the first create then fails early).
async fn two_port_relay() -> Result<(TestRelay, Value)> {
    let mut last = Value::Null;
    for _ in 0..5 {
        let relay =
            TestRelay::start_with(2, |c| c.port_cooldown = Duration::from_secs(3600)).await?;
        let (status, created) = relay.create(&ssh_vnc("b1")).await?;
        if status == StatusCode::CREATED {
            return Ok((relay, created));
        }
        ensure!(
            status == StatusCode::SERVICE_UNAVAILABLE,
            "create answered {status}: {created}"
        );
        last = created;
    }
    anyhow::bail!("no free two-port range found; last answer: {last}")
}

#[tokio::test]
async fn exhausted_pool_is_503_and_revoked_ports_cool_down() -> Result<()> {
    let (relay, created) = two_port_relay().await?;
    let mut got = ports(&created)?;
    got.sort_unstable();
    assert_eq!(got, [relay.range.lo, relay.range.hi]);

    let (status, body) = relay.create(&ssh_vnc("b2")).await?;
    assert_error(
        status,
        &body,
        StatusCode::SERVICE_UNAVAILABLE,
        "ports_exhausted",
    );
    let message = str_field(&body, "message")?;
    assert!(message.contains("no free public port"), "{message}");

    let id = str_field(&created, "session_id")?;
    let (status, body) = relay.delete(&format!("/v1/sessions/{id}")).await?;
    assert_eq!(status, StatusCode::OK, "{body}");
    // Once the listeners are closed the ports could be bound again; only the cooldown
    // keeps a new session off them.
    for port in &got {
        expect_refused(*port).await?;
    }
    let one = json!({"build_id": "b3", "app_id": "a1", "services": ["ssh"]});
    let (status, body) = relay.create(&one).await?;
    assert_error(
        status,
        &body,
        StatusCode::SERVICE_UNAVAILABLE,
        "ports_exhausted",
    );
    // The failed creates left no session behind.
    let (_, list) = relay.get("/v1/sessions").await?;
    assert_eq!(list["sessions"].as_array().map(Vec::len), Some(1), "{list}");
    Ok(())
}

#[tokio::test]
async fn join_ttl_revokes_a_pending_session() -> Result<()> {
    let relay = TestRelay::start_with(common::DEFAULT_RANGE_LEN, |c| {
        c.join_ttl = Duration::from_millis(500);
    })
    .await?;
    let created = relay.create_ok(&ssh_vnc("b1")).await?;
    let id = str_field(&created, "session_id")?;
    let join_by = time_field(&created, "join_by")?;

    // Bounded polling: the supervisor revokes at the join TTL (0.5 s).
    let mut view = Value::Null;
    for _ in 0..100 {
        view = relay.session(id).await?;
        if view["state"] == "revoked" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(view["state"], "revoked", "still not revoked: {view}");
    assert_eq!(view["revoke_reason"], "join_ttl_expired", "{view}");
    // Revoked at the join TTL, not before.
    assert!(time_field(&view, "deadline")? >= join_by, "{view}");
    for port in ports(&created)? {
        expect_refused(port).await?;
    }
    Ok(())
}
