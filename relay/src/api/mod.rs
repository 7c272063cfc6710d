//! The HTTP API: JSON over HTTP, admin bearer token on every route.
//!
//! - [`bearer`]: the `Authorization: Bearer` header, for admin and user tokens alike.
//! - [`error`]: the JSON error body and status codes.
//! - [`sessions`]: create, get, list, finish, revoke (admin token).
//! - [`instructions`]: remote access instructions (user token).
//! - [`health`]: `/metrics`, `/healthz`, `/readyz` (no token).
//! - [`web`]: the remote access page `/access/{id}` and its assets (no token: it holds no
//!   data; its script fetches the instructions with the user token from the URL fragment).
//! - [`shell`]: shell-safe quoting of the commands in the instructions.
//! - [`serve`]: HTTP/1.1 serving with a header timeout and a connection cap (both listeners).

pub mod bearer;
pub mod error;
pub mod health;
pub mod instructions;
pub mod serve;
pub mod sessions;
pub mod shell;
pub mod web;

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post};
use axum::{Extension, Router};
use porthole_protocol::Secret;

use crate::limits::MAX_API_BODY;
use crate::shared::Relay;
use crate::user_token::RolePolicy;
use bearer::{bearer_token, NoBearer};
use error::ApiError;

/// The API router: admin routes behind the admin token; the instructions route checks user
/// tokens itself (the two kinds of token never stand in for each other); the page needs none.
pub fn router(relay: Arc<Relay>) -> Router {
    Router::new()
        .route("/v1/sessions", post(sessions::create).get(sessions::list))
        .route(
            "/v1/sessions/{id}",
            get(sessions::get).delete(sessions::revoke),
        )
        .route("/v1/sessions/{id}/finish", post(sessions::finish))
        .fallback(|| async { ApiError::not_found("no such route") })
        .layer(middleware::from_fn_with_state(relay.clone(), require_admin))
        .merge(user_routes(&relay))
        .merge(web::router())
        .layer(DefaultBodyLimit::max(MAX_API_BODY))
        .with_state(relay.clone())
        .merge(health::router(relay))
}

/// The router of `--web-listen`: only the page, its assets and the instructions endpoint,
/// so that listener can face users without exposing the admin API or the metrics.
pub fn web_router(relay: Arc<Relay>) -> Router {
    user_routes(&relay)
        .merge(web::router())
        .fallback(|| async { ApiError::not_found("no such route") })
        .layer(DefaultBodyLimit::max(MAX_API_BODY))
        .with_state(relay)
}

/// The instructions route, with the configured role lists normalised once.
fn user_routes(relay: &Relay) -> Router<Arc<Relay>> {
    let roles = RolePolicy::new(&relay.config.denied_roles, &relay.config.allowed_roles);
    Router::new()
        .route(
            "/v1/sessions/{id}/instructions",
            get(instructions::instructions),
        )
        .layer(Extension(Arc::new(roles)))
}

/// Refuses requests without the admin bearer token (compared in constant time).
async fn require_admin(
    State(relay): State<Arc<Relay>>,
    req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    match bearer_token(req.headers()) {
        Ok(token) if Secret::new(token).ct_eq(&relay.admin_token) => Ok(next.run(req).await),
        Ok(_) => Err(ApiError::unauthorized(
            "the bearer token is not the relay's admin token",
        )),
        Err(NoBearer::Missing) => Err(ApiError::unauthorized(
            "missing `Authorization: Bearer <admin token>` header (the token is in DATA_DIR/admin.token)",
        )),
        Err(NoBearer::Malformed) => Err(ApiError::unauthorized(
            "the Authorization header is not `Bearer <admin token>`",
        )),
    }
}
