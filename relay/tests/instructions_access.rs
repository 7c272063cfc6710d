//! Who gets remote access instructions, through the real endpoint with minted user tokens:
//! look-alike spellings of a denied role are that role, `--allowed-roles` restricts, the
//! role is decided before the session id is looked up, and a malformed id is answered like
//! an unknown one without reaching the answer or the audit log.
//!
//! The sessions here have no agent: an allowed user gets `409 not_connected` (the role gate
//! passed, the build machine is not there yet), a refused one `403`.

mod common;

use std::time::Duration;

use anyhow::{Context, Result};
use common::{send, str_field, TestRelay};
use porthole_relay::user_token::{load_or_create_secret, mint, Roles};
use reqwest::StatusCode;
use serde_json::{json, Value};

/// The 403 message for denied roles, word for word.
const DENIED: &str = "Users with the Testers/QA role cannot use remote access";
/// An id of the issued shape that no session has.
const UNKNOWN_ID: &str = "s_00000000000000000000";

/// A user token for `app_id` with `roles`, signed with the relay's secret.
fn token(relay: &TestRelay, app_id: &str, roles: &[&str]) -> Result<String> {
    let (secret, _) = load_or_create_secret(&relay.handle.info.user_token_secret_path)?;
    let role = match roles {
        [one] => Roles::One((*one).to_owned()),
        many => Roles::Many(many.iter().map(|r| (*r).to_owned()).collect()),
    };
    mint(&secret, "u1", app_id, role, Duration::from_secs(600)).map_err(anyhow::Error::msg)
}

/// `GET /v1/sessions/{id}/instructions` with a user token (no admin token).
async fn instructions(relay: &TestRelay, id: &str, token: &str) -> Result<(StatusCode, Value)> {
    let url = relay.url(&format!("/v1/sessions/{id}/instructions"));
    send(reqwest::Client::new().get(url).bearer_auth(token)).await
}

/// A pending session of app `a1`; its id.
async fn session(relay: &TestRelay) -> Result<String> {
    let created = relay
        .create_ok(&json!({"build_id": "b1", "app_id": "a1", "services": ["ssh"]}))
        .await?;
    Ok(str_field(&created, "session_id")?.to_owned())
}

/// Asserts `roles` get past the role rule (409: no agent yet) or are refused with `message`.
async fn expect(
    relay: &TestRelay,
    id: &str,
    roles: &[&str],
    refused_with: Option<&str>,
) -> Result<()> {
    let (status, body) = instructions(relay, id, &token(relay, "a1", roles)?).await?;
    match refused_with {
        Some(message) => {
            assert_eq!(status, StatusCode::FORBIDDEN, "{roles:?}: {body}");
            assert_eq!(body["message"], message, "{roles:?}: {body}");
        }
        None => {
            assert_eq!(status, StatusCode::CONFLICT, "{roles:?}: {body}");
            assert_eq!(body["error"], "not_connected", "{roles:?}: {body}");
        }
    }
    Ok(())
}

#[tokio::test]
async fn look_alike_spellings_of_a_denied_role_are_refused() -> Result<()> {
    let relay = TestRelay::start().await?;
    let id = session(&relay).await?;
    for spelling in [
        "qa",
        "ＱＡ",
        "qa\u{200b}",
        "\u{feff}qa",
        " QA ",
        "Q\u{00ad}A",
        "ｔｅｓｔｅｒ",
        "TESTER\u{2060}",
    ] {
        expect(&relay, &id, &[spelling], Some(DENIED)).await?;
        expect(&relay, &id, &["developer", spelling], Some(DENIED)).await?;
    }
    // A token naming only invisible roles names none, and is refused.
    expect(&relay, &id, &["\u{200b}"], Some(DENIED)).await?;
    expect(&relay, &id, &["developer"], None).await?;
    // Cyrillic а is another letter: without an allowlist this role is not a denied one.
    // Only `--allowed-roles` keeps such names out (next test).
    expect(&relay, &id, &["q\u{0430}"], None).await?;
    Ok(())
}

#[tokio::test]
async fn an_allowlist_admits_only_its_roles_and_denied_wins() -> Result<()> {
    let relay = TestRelay::start_with(common::DEFAULT_RANGE_LEN, |c| {
        c.allowed_roles = vec!["Developer".into(), "owner".into()];
    })
    .await?;
    let id = session(&relay).await?;
    let not_allowed = porthole_relay::api::instructions::NOT_ALLOWED_ROLE_MESSAGE;
    for allowed in ["developer", "ＤＥＶＥＬＯＰＥＲ", " owner\u{200b}"] {
        expect(&relay, &id, &[allowed], None).await?;
    }
    expect(&relay, &id, &["viewer", "owner"], None).await?;
    for other in ["viewer", "d\u{0435}veloper", "q\u{0430}", "developers"] {
        expect(&relay, &id, &[other], Some(not_allowed)).await?;
    }
    expect(&relay, &id, &["developer", "qa"], Some(DENIED)).await?;
    expect(&relay, &id, &["owner", "ＴＥＳＴＥＲ"], Some(DENIED)).await?;
    Ok(())
}

#[tokio::test]
async fn the_role_is_decided_before_the_id_is_looked_up() -> Result<()> {
    let relay = TestRelay::start().await?;
    let qa = token(&relay, "a1", &["qa"])?;
    let dev = token(&relay, "a1", &["developer"])?;
    let malformed = "not-a-session-id";
    for id in [UNKNOWN_ID, malformed] {
        let (status, body) = instructions(&relay, id, &qa).await?;
        assert_eq!(status, StatusCode::FORBIDDEN, "{id}: {body}");
        assert_eq!(body["message"], DENIED, "{id}: {body}");
    }
    // An allowed user gets one answer for an unknown id and a malformed one.
    let (status, unknown) = instructions(&relay, UNKNOWN_ID, &dev).await?;
    assert_eq!(status, StatusCode::NOT_FOUND, "{unknown}");
    let (status, bad) = instructions(&relay, malformed, &dev).await?;
    assert_eq!(status, StatusCode::NOT_FOUND, "{bad}");
    assert_eq!(bad, unknown);
    assert!(
        str_field(&bad, "message")?.starts_with("no session"),
        "{bad}"
    );
    Ok(())
}

/// The audit log's `instructions_denied` lines.
fn denied_lines(relay: &TestRelay) -> Result<Vec<String>> {
    let path = &relay.handle.info.audit_log_path;
    let log = std::fs::read_to_string(path).with_context(|| format!("{}", path.display()))?;
    Ok(log
        .lines()
        .filter(|l| l.contains(r#""event":"instructions_denied""#))
        .map(str::to_owned)
        .collect())
}

#[tokio::test]
async fn malformed_ids_are_not_echoed_into_answers_or_the_audit_log() -> Result<()> {
    let relay = TestRelay::start().await?;
    let dev = token(&relay, "a1", &["developer"])?;
    let qa = token(&relay, "a1", &["qa"])?;
    let huge = "A".repeat(60_000);
    let forged = "x%0A%7B%22event%22%3A%22forged%22%7D";
    for (id, token, status) in [
        (huge.as_str(), &dev, StatusCode::NOT_FOUND),
        (huge.as_str(), &qa, StatusCode::FORBIDDEN),
        (forged, &dev, StatusCode::NOT_FOUND),
    ] {
        let (got, body) = instructions(&relay, id, token).await?;
        assert_eq!(got, status, "{body}");
        let text = body.to_string();
        assert!(text.len() < 1024 && !text.contains("AAAA"), "{text}");
        assert!(!text.contains("forged"), "{text}");
    }
    let lines = denied_lines(&relay)?;
    assert_eq!(lines.len(), 3, "{lines:?}");
    for line in &lines {
        assert!(line.len() < 1024, "audit line of {} bytes", line.len());
        let v: Value = serde_json::from_str(line)?;
        assert_eq!(v["session_id"], "(malformed)", "{line}");
        assert!(!line.contains("forged") && !line.contains("AAAA"), "{line}");
    }

    // The admin routes answer a malformed id like an unknown one, without echoing it.
    let (_, unknown) = relay.get(&format!("/v1/sessions/{UNKNOWN_ID}")).await?;
    for path in [
        format!("/v1/sessions/{huge}"),
        format!("/v1/sessions/{forged}"),
    ] {
        let (status, body) = relay.get(&path).await?;
        assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
        assert_eq!(body, unknown);
        let (status, body) = relay.delete(&path).await?;
        assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
        assert_eq!(body, unknown);
        let (status, body) = relay.post(&format!("{path}/finish")).await?;
        assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
        assert_eq!(body, unknown);
    }
    Ok(())
}
