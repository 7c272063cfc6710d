//! The HTTP API: JSON over HTTP, admin bearer token on every route.
//!
//! - [`error`]: the JSON error body and status codes.
//! - [`sessions`]: create, get, list, finish, revoke.

pub mod error;
pub mod sessions;

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::header::AUTHORIZATION;
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post};
use axum::Router;
use porthole_protocol::Secret;

use crate::shared::Relay;
use error::ApiError;

/// The API router.
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
        .with_state(relay)
}

/// Refuses requests without the admin bearer token (compared in constant time).
async fn require_admin(
    State(relay): State<Arc<Relay>>,
    req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let presented = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|t| Secret::new(t.trim()));
    match presented {
        Some(token) if token.ct_eq(&relay.admin_token) => Ok(next.run(req).await),
        Some(_) => Err(ApiError::unauthorized("the bearer token is not the relay's admin token")),
        None => Err(ApiError::unauthorized("missing `Authorization: Bearer <admin token>` header (the token is in DATA_DIR/admin.token)")),
    }
}
