//! The remote access page: `GET /access/{session_id}` and its assets, embedded in the binary.
//!
//! The page holds no data. Its script reads the session id from the path and the user token
//! from the URL fragment (`/access/s_…#token=<user token>`: browsers never send a fragment,
//! so the token stays out of server logs and `Referer`), then polls
//! `GET /v1/sessions/{id}/instructions` with `Authorization: Bearer`. Everything the server
//! or the agent said is inserted with `textContent`. Every answer carries a strict
//! Content-Security-Policy (no inline script or style: the assets are separate files),
//! `Cache-Control: no-store`, `X-Content-Type-Options: nosniff` and
//! `Referrer-Policy: no-referrer`.

use axum::extract::Path;
use axum::http::header::{
    CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE, REFERRER_POLICY, X_CONTENT_TYPE_OPTIONS,
    X_FRAME_OPTIONS,
};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use crate::untrusted::valid_session_id;

/// The page's Content-Security-Policy: only this origin's script, style and API; no
/// framing, no forms, no `<base>`.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; \
frame-ancestors 'none'";

/// Path of the page's script.
pub const SCRIPT_PATH: &str = "/access/assets/page.js";
/// Path of the page's style sheet.
pub const STYLE_PATH: &str = "/access/assets/page.css";

const PAGE_HTML: &str = include_str!("web/page.html");
const PAGE_JS: &str = include_str!("web/page.js");
const PAGE_CSS: &str = include_str!("web/page.css");

/// The page and its assets (no state, no token: the page is public, it contains no data).
pub fn router<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route(
            SCRIPT_PATH,
            get(|| async { asset(PAGE_JS, "text/javascript; charset=utf-8") }),
        )
        .route(
            STYLE_PATH,
            get(|| async { asset(PAGE_CSS, "text/css; charset=utf-8") }),
        )
        .route("/access/{id}", get(page))
}

async fn page(Path(id): Path<String>) -> Response {
    // The id is checked before anything else; the answer never echoes it.
    if !valid_session_id(&id) {
        return secured(
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            "no such remote access session\n",
        );
    }
    secured(StatusCode::OK, "text/html; charset=utf-8", PAGE_HTML)
}

fn asset(body: &'static str, content_type: &'static str) -> Response {
    secured(StatusCode::OK, content_type, body)
}

/// `body` with the page's security headers.
fn secured(status: StatusCode, content_type: &'static str, body: &'static str) -> Response {
    let mut resp = (status, body).into_response();
    let h = resp.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    h.insert(X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_has_no_inline_script_or_style_and_loads_its_assets() {
        let lower = PAGE_HTML.to_ascii_lowercase();
        assert!(!lower.contains("style="), "inline style attribute");
        assert!(!lower.contains("<style"), "inline style element");
        // No inline event handler attribute (` onclick=` and the like).
        let handler = lower.split(" on").skip(1).any(|rest| {
            let name: String = rest.chars().take_while(char::is_ascii_alphabetic).collect();
            !name.is_empty() && rest[name.len()..].starts_with('=')
        });
        assert!(!handler, "inline event handler");
        assert_eq!(lower.matches("<script").count(), 1);
        assert!(PAGE_HTML.contains(&format!("<script src=\"{SCRIPT_PATH}\" defer></script>")));
        assert!(PAGE_HTML.contains(&format!("href=\"{STYLE_PATH}\"")));
        assert!(!PAGE_JS.contains("innerHTML") && !PAGE_JS.contains("outerHTML"));
        assert!(!PAGE_JS.contains("eval(") && !PAGE_JS.contains("document.write"));
    }
}
