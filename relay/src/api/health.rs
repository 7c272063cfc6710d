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
    if let Some(cluster) = &relay.cluster {
        let m = &relay.metrics;
        m.cluster_nodes
            .set(i64::try_from(cluster.members.count()).unwrap_or(i64::MAX));
        m.cluster_etcd_up.set(i64::from(cluster.etcd_ok()));
        let owned = relay
            .sessions
            .list()
            .iter()
            .filter(|s| s.lock().link.is_some())
            .count();
        m.cluster_sessions_owned
            .set(i64::try_from(owned).unwrap_or(i64::MAX));
    }
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
    } else if relay.cluster.as_ref().is_some_and(|c| !c.etcd_ok()) {
        // Still ready: live sessions keep forwarding, and taking every node out of the load
        // balancer during an etcd outage would cut them. The body and the
        // `porthole_cluster_etcd_up` metric say what does not work.
        (
            StatusCode::OK,
            "ready, degraded: etcd unreachable (creating, finishing and deleting sessions fail until it is back)\n",
        )
    } else {
        (StatusCode::OK, "ready\n")
    }
}
