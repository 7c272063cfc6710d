//! `/metrics` (Prometheus text), `/healthz` (process up) and `/readyz` (listeners bound and
//! audit log open, not shutting down). No authentication: nothing here is secret, and
//! scrapers and probes carry no tokens.

use std::sync::Arc;

use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

use crate::shared::Relay;

/// The health and metrics routes.
pub fn router(relay: Arc<Relay>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(relay)
}

async fn metrics(State(relay): State<Arc<Relay>>) -> impl IntoResponse {
    let body = relay.metrics.render(&relay.sessions, &relay.pool);
    (
        [(CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        body,
    )
}

async fn readyz(State(relay): State<Arc<Relay>>) -> impl IntoResponse {
    // Listeners are bound and the audit log is open before the API serves at all; the one
    // way to become unready is shutting down.
    if relay.stopping.is_cancelled() {
        (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n")
    } else {
        (StatusCode::OK, "ready\n")
    }
}
