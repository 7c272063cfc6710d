//! The remote access page (`/access/{id}#token=…`) in a real headless Chromium, against a
//! real relay and agent: what a developer sees (command, password only after "Show
//! password", `known_hosts` line and the checked command), that the page follows the session
//! without a reload (finish, revocation), the Testers/QA message with no password anywhere,
//! the states for a bad token, an unknown session, a session waiting for its machine and a
//! token for another app; and the page's security headers, on the API listener and on
//! `--web-listen` (which serves nothing else).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{ensure, Context as _};
use common::browser::Browser;
use common::fixture::Tunnel;
use common::relay::TestRelay;
use common::secrets::{random_password, write_secret_file};
use serde_json::{json, Value};

/// The 403 message for Testers/QA, word for word.
const DENIED_MESSAGE: &str = "Users with the Testers/QA role cannot use remote access";

/// A host key the agent reports (no real sshd is needed to show it).
const HOST_KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJdD7y3aLq454yWBdwLWbieU1ebz9/cu7/QEXn9OIeZJ";

/// How long the page may take to reach a state (it polls every 3–5 s).
const PAGE_WAIT: Duration = Duration::from_secs(45);

/// The page's exact Content-Security-Policy.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// What the page shows, for failure messages.
const DESCRIBE: &str = "JSON.stringify({state: document.getElementById('state').dataset.state, \
    text: document.getElementById('state').textContent, \
    message: document.getElementById('message').textContent, \
    session: document.body.dataset.sessionState, url: location.pathname})";

/// An active `ssh` + `vnc` session (both to echo services) whose agent reports user
/// `vagrant`, the SSH `password`, the VNC password `password` reversed, and [`HOST_KEY`].
fn tunnel_with_login(relay: &TestRelay, dir: &Path, password: &str) -> anyhow::Result<Tunnel> {
    let password_file = write_secret_file(dir, "ssh-password", password)?;
    let vnc_password: String = password.chars().rev().collect();
    let vnc_password_file = write_secret_file(dir, "vnc-password", &vnc_password)?;
    let key_file = write_secret_file(dir, "host_ed25519.pub", &format!("{HOST_KEY} root@vm"))?;
    Tunnel::builder()
        .service("vnc")
        .args([
            "--ssh-user".to_owned(),
            "vagrant".to_owned(),
            "--ssh-password-file".to_owned(),
            password_file.display().to_string(),
            "--vnc-password-file".to_owned(),
            vnc_password_file.display().to_string(),
            "--ssh-host-key-file".to_owned(),
            key_file.display().to_string(),
        ])
        .start(relay)
}

/// The page's URL on `base` for session `id` with `token` in the fragment.
fn page_url(base: &str, id: &str, token: &str) -> String {
    format!("{base}/access/{id}#token={token}")
}

/// Waits until the page's status element has `data-state` = `state`.
fn wait_state(browser: &mut Browser, state: &str) -> anyhow::Result<()> {
    browser
        .wait_until(
            &format!("the page to show state `{state}`"),
            &format!("document.getElementById('state').dataset.state === {state:?}"),
            DESCRIBE,
            PAGE_WAIT,
        )
        .map(|_| ())
}

/// `textContent` of the element `id`.
fn text(browser: &mut Browser, id: &str) -> anyhow::Result<String> {
    let v = browser.eval(&format!("document.getElementById({id:?}).textContent"))?;
    Ok(v.as_str().unwrap_or_default().to_owned())
}

/// Whether `secret` appears anywhere in the document (text, attributes, hidden elements).
fn in_dom(browser: &mut Browser, secret: &str) -> anyhow::Result<bool> {
    let v = browser.eval(&format!(
        "document.documentElement.outerHTML.includes({secret:?}) || document.body.innerText.includes({secret:?})"
    ))?;
    Ok(v == json!(true))
}

/// A relay that also serves the page alone on `--web-listen`, and that listener's base URL.
fn relay_with_web_listener() -> anyhow::Result<(TestRelay, String)> {
    let relay = TestRelay::start_with(|c| {
        c.web_listen = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
    })?;
    let web = format!(
        "http://{}",
        relay.handle.info.web_addr.context("web listener")?
    );
    Ok((relay, web))
}

#[test]
fn a_developer_sees_the_instructions_and_the_page_follows_the_session() -> anyhow::Result<()> {
    let relay = TestRelay::start()?;
    let dir = tempfile::tempdir()?;
    let password = random_password(24);
    let tunnel = tunnel_with_login(&relay, dir.path(), &password)?;
    let id = tunnel.session.id.clone();
    let port = tunnel.port("ssh");
    let token = relay.user_token("u-17", "app-7", &["developer"])?;
    let mut browser = Browser::start()?;
    browser.navigate(&page_url(&relay.api, &id, &token))?;
    wait_state(&mut browser, "ready")?;
    // A marker that survives only as long as the document does: no reload below.
    browser.eval("window.portholeTestMarker = 'same document'")?;

    assert_eq!(
        text(&mut browser, "ssh-command")?,
        format!("ssh -p {port} vagrant@127.0.0.1")
    );
    assert_eq!(
        text(&mut browser, "ssh-known-hosts")?,
        format!("[127.0.0.1]:{port} {HOST_KEY}")
    );
    let file = format!("porthole_known_hosts_{id}");
    assert_eq!(text(&mut browser, "ssh-known-hosts-file")?, file);
    assert_eq!(
        text(&mut browser, "ssh-strict-command")?,
        format!(
            "ssh -o UserKnownHostsFile={file} -o StrictHostKeyChecking=yes -p {port} vagrant@127.0.0.1"
        )
    );
    assert_eq!(
        browser.eval("document.body.dataset.sessionState")?,
        json!("active")
    );
    // While the build runs, the countdown runs to the hard cap; it ticks without a reload.
    assert_eq!(
        browser.eval("document.getElementById('deadline').dataset.kind")?,
        json!("hard_cap")
    );
    let first = text(&mut browser, "countdown")?;
    ensure!(first.contains("(in "), "countdown: {first:?}");
    browser.wait_until(
        "the countdown to tick",
        &format!("document.getElementById('countdown').textContent !== {first:?}"),
        DESCRIBE,
        PAGE_WAIT,
    )?;

    // Screen sharing: address, user, a vnc:// link; its password hidden too.
    let vnc_port = tunnel.port("vnc");
    let vnc_password: String = password.chars().rev().collect();
    assert_eq!(
        text(&mut browser, "vnc-address")?,
        format!("127.0.0.1:{vnc_port}")
    );
    assert_eq!(text(&mut browser, "vnc-username")?, "vagrant");
    assert_eq!(
        browser.eval("document.getElementById('vnc-link').getAttribute('href')")?,
        json!(format!("vnc://vagrant@127.0.0.1:{vnc_port}"))
    );
    ensure!(
        !in_dom(&mut browser, &vnc_password)?,
        "the VNC password is in the DOM before Show password"
    );
    browser.eval("document.getElementById('vnc-password-reveal').click()")?;
    assert_eq!(text(&mut browser, "vnc-password")?, vnc_password);
    browser.eval("document.getElementById('vnc-password-reveal').click()")?;
    ensure!(
        !in_dom(&mut browser, &vnc_password)?,
        "VNC password left shown"
    );

    // The CSP is in force in the browser: an injected inline script does not run.
    let ran = browser.eval(
        "(() => { const s = document.createElement('script'); \
         s.textContent = 'window.portholeInjected = true'; document.body.appendChild(s); \
         return window.portholeInjected === true; })()",
    )?;
    assert_eq!(ran, json!(false), "an inline script ran despite the CSP");

    // The password is nowhere in the document until it is revealed.
    ensure!(
        !in_dom(&mut browser, &password)?,
        "the password is in the DOM before Show password"
    );
    assert_eq!(
        browser.eval("document.getElementById('ssh-password').dataset.hidden")?,
        json!("true")
    );
    // Revealed from the keyboard: focus the button, press Enter.
    browser.eval("document.getElementById('ssh-password-reveal').focus()")?;
    assert_eq!(
        browser.eval("document.activeElement.id")?,
        json!("ssh-password-reveal")
    );
    browser.press_enter()?;
    browser.wait_until(
        "the password to be shown",
        "document.getElementById('ssh-password').dataset.hidden === 'false'",
        DESCRIBE,
        PAGE_WAIT,
    )?;
    assert_eq!(text(&mut browser, "ssh-password")?, password);
    assert_eq!(
        browser
            .eval("document.getElementById('ssh-password-reveal').getAttribute('aria-pressed')")?,
        json!("true")
    );
    browser.eval("document.getElementById('ssh-password-reveal').click()")?;
    ensure!(
        !in_dom(&mut browser, &password)?,
        "the password stays in the DOM after Hide password"
    );
    // Tab from the reveal button reaches the password's copy button.
    browser.eval("document.getElementById('ssh-password-reveal').focus()")?;
    browser.press_tab(1)?;
    assert_eq!(
        browser.eval("document.activeElement.id")?,
        json!("ssh-password-copy")
    );
    // Every control is a real button with a name.
    let unnamed = browser.eval(
        "[...document.querySelectorAll('button')].filter(b => b.tabIndex < 0 || !b.textContent.trim()).length",
    )?;
    assert_eq!(unnamed, json!(0));

    // The build finishes through the API: the page moves to the grace deadline by itself.
    relay.finish(&id)?;
    browser.wait_until(
        "the page to show the grace period",
        "document.body.dataset.sessionState === 'finishing' && \
         document.getElementById('deadline').dataset.kind === 'available_until'",
        DESCRIBE,
        PAGE_WAIT,
    )?;
    let left = text(&mut browser, "countdown")?;
    ensure!(
        left.contains("(in ") && left.contains('m'),
        "countdown after finish: {left:?}"
    );
    let until =
        browser.eval("document.getElementById('deadline-time').getAttribute('datetime')")?;
    let session = relay.get(&id)?;
    let deadline = session["deadline"].as_str().unwrap_or_default();
    ensure!(
        until
            .as_str()
            .and_then(|u| u.get(..19))
            .is_some_and(|u| Some(u) == deadline.get(..19)),
        "page deadline {until} vs the session's {deadline}"
    );

    // Revoked: the page says it ended and forgets the instructions.
    relay.delete(&id)?;
    wait_state(&mut browser, "ended")?;
    ensure!(
        !in_dom(&mut browser, &password)?,
        "password left after the end"
    );
    assert_eq!(
        browser.eval("document.getElementById('ssh').hidden")?,
        json!(true)
    );
    assert_eq!(
        browser.eval("window.portholeTestMarker")?,
        json!("same document"),
        "the page reloaded"
    );
    Ok(())
}

#[test]
fn a_tester_gets_the_exact_message_and_no_password_on_the_web_listener() -> anyhow::Result<()> {
    let (relay, web) = relay_with_web_listener()?;
    let dir = tempfile::tempdir()?;
    let password = random_password(24);
    let tunnel = tunnel_with_login(&relay, dir.path(), &password)?;
    let id = tunnel.session.id.clone();
    let mut browser = Browser::start()?;

    let tester = relay.user_token("u-5", "app-7", &["developer", "QA"])?;
    browser.navigate(&page_url(&web, &id, &tester))?;
    wait_state(&mut browser, "denied")?;
    assert_eq!(text(&mut browser, "message")?, DENIED_MESSAGE);
    ensure!(
        !in_dom(&mut browser, &password)?,
        "a tester's page holds the password"
    );
    assert_eq!(
        browser.eval("document.getElementById('ssh').hidden")?,
        json!(true)
    );

    // A developer of another app: 403 with the server's message, nothing shown.
    let other = relay.user_token("u-6", "app-other", &["developer"])?;
    browser.navigate(&page_url(&web, &id, &other))?;
    wait_state(&mut browser, "forbidden")?;
    assert_eq!(
        text(&mut browser, "message")?,
        "this user token is for another app"
    );
    ensure!(
        !in_dom(&mut browser, &password)?,
        "another app's page holds the password"
    );

    // The same page on the web listener works for a developer.
    let developer = relay.user_token("u-7", "app-7", &["developer"])?;
    browser.navigate(&page_url(&web, &id, &developer))?;
    wait_state(&mut browser, "ready")?;
    assert_eq!(
        text(&mut browser, "ssh-command")?,
        format!("ssh -p {} vagrant@127.0.0.1", tunnel.port("ssh"))
    );
    Ok(())
}

#[test]
fn bad_tokens_unknown_and_waiting_sessions_have_their_states() -> anyhow::Result<()> {
    let relay = TestRelay::start()?;
    // No agent: the session waits for its build machine.
    let pending = relay.create(&["ssh"], None)?;
    let token = relay.user_token("u-1", "app-7", &["developer"])?;
    let mut browser = Browser::start()?;

    browser.navigate(&page_url(&relay.api, &pending.id, "not-a-jwt"))?;
    wait_state(&mut browser, "unauthorized")?;
    let message = text(&mut browser, "message")?;
    ensure!(!message.is_empty(), "the 401 message is shown");

    browser.navigate(&format!("{}/access/{}", relay.api, pending.id))?;
    wait_state(&mut browser, "unauthorized")?;

    browser.navigate(&page_url(&relay.api, "s_00000000000000000000", &token))?;
    wait_state(&mut browser, "unknown")?;

    browser.navigate(&page_url(&relay.api, &pending.id, &token))?;
    wait_state(&mut browser, "waiting")?;
    // Still polling: revoking the session moves the page on by itself.
    relay.delete(&pending.id)?;
    wait_state(&mut browser, "ended")?;
    Ok(())
}

/// A GET without any token; returns status, headers and body.
fn get(url: &str) -> anyhow::Result<(u16, reqwest::header::HeaderMap, String)> {
    let resp = reqwest::blocking::Client::new()
        .get(url)
        .timeout(Duration::from_secs(20))
        .send()
        .with_context(|| format!("GET {url}"))?;
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    Ok((status, headers, resp.text()?))
}

fn header<'a>(headers: &'a reqwest::header::HeaderMap, name: &str) -> &'a str {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

fn assert_secured(url: &str, headers: &reqwest::header::HeaderMap) {
    assert_eq!(header(headers, "content-security-policy"), CSP, "{url}");
    assert_eq!(header(headers, "cache-control"), "no-store", "{url}");
    assert_eq!(
        header(headers, "x-content-type-options"),
        "nosniff",
        "{url}"
    );
    assert_eq!(header(headers, "referrer-policy"), "no-referrer", "{url}");
}

#[test]
fn the_page_and_its_assets_carry_the_security_headers() -> anyhow::Result<()> {
    let (relay, web) = relay_with_web_listener()?;
    let pending = relay.create(&["ssh"], None)?;
    for base in [relay.api.as_str(), web.as_str()] {
        let url = format!("{base}/access/{}", pending.id);
        let (status, headers, body) = get(&url)?;
        assert_eq!(status, 200, "{url}");
        assert_eq!(
            header(&headers, "content-type"),
            "text/html; charset=utf-8",
            "{url}"
        );
        assert_secured(&url, &headers);
        // No data in the page, and no inline script or style for the CSP to refuse.
        ensure!(
            !body.contains(&pending.id),
            "the page embeds the session id"
        );
        ensure!(body.contains("<script src=\"/access/assets/page.js\" defer></script>"));
        ensure!(!body.contains("style=") && !body.contains("<style"));
        for (asset, kind) in [
            ("/access/assets/page.js", "text/javascript; charset=utf-8"),
            ("/access/assets/page.css", "text/css; charset=utf-8"),
        ] {
            let url = format!("{base}{asset}");
            let (status, headers, body) = get(&url)?;
            assert_eq!(status, 200, "{url}");
            assert_eq!(header(&headers, "content-type"), kind, "{url}");
            assert_secured(&url, &headers);
            ensure!(!body.is_empty(), "{url} is empty");
        }
        // Ids not of the relay's shape are refused before anything, and never echoed.
        for bad in [
            "s_123",
            "S_00000000000000000000",
            "..%2f..%2fetc",
            "s_0000000000000000000g",
        ] {
            let url = format!("{base}/access/{bad}");
            let (status, headers, body) = get(&url)?;
            assert_eq!(status, 404, "{url}");
            assert_secured(&url, &headers);
            ensure!(!body.contains(bad), "{url} echoes the id: {body}");
        }
    }

    // The web listener serves the instructions endpoint with user tokens...
    let token = relay.user_token("u-1", "app-7", &["developer"])?;
    let resp = reqwest::blocking::Client::new()
        .get(format!("{web}/v1/sessions/{}/instructions", pending.id))
        .bearer_auth(&token)
        .send()?;
    assert_eq!(
        resp.status().as_u16(),
        409,
        "a session waiting for its machine"
    );
    // ... and nothing of the admin API or the metrics, even with the admin token.
    let admin = relay.handle.admin_token().expose().to_owned();
    let client = reqwest::blocking::Client::new();
    for path in [
        "/v1/sessions",
        &format!("/v1/sessions/{}", pending.id),
        "/metrics",
        "/healthz",
    ] {
        let resp = client
            .get(format!("{web}{path}"))
            .bearer_auth(&admin)
            .send()?;
        assert_eq!(resp.status().as_u16(), 404, "{path} on the web listener");
    }
    let resp = client
        .post(format!("{web}/v1/sessions"))
        .bearer_auth(&admin)
        .json(&json!({ "build_id": "b", "app_id": "app-7", "services": ["ssh"] }))
        .send()?;
    assert_eq!(
        resp.status().as_u16(),
        404,
        "POST /v1/sessions on the web listener"
    );
    // On the API listener the page needs no admin token, but the admin routes still do.
    let (status, _, _) = get(&format!("{}/v1/sessions", relay.api))?;
    assert_eq!(status, 401);
    let listed: Value = client
        .get(format!("{}/v1/sessions", relay.api))
        .bearer_auth(&admin)
        .send()?
        .json()?;
    ensure!(listed["sessions"].as_array().is_some_and(|s| s.len() == 1));
    Ok(())
}
