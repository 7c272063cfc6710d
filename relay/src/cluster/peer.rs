//! The node-to-node link (`--peer-listen`): HTTP/1.1 over TLS, authenticated with the
//! cluster secret (a bearer token every node holds in `DATA_DIR/cluster.secret`). Nodes
//! share one TLS certificate, so a node verifies a peer by pinning its own certificate's
//! fingerprint. Two requests:
//!
//! - `POST /peer/v1/open`: open a visitor waiting on the asking node (the owner sends its
//!   agent `open_at`; see `crate::edge::visitor::remote`);
//! - `GET /peer/v1/sessions/{id}/access`: the credentials and host keys the owner holds in
//!   memory, for an instructions request that landed on another node. Never stored in etcd.
//!
//! The server bounds what strangers can make it hold: 64 connections, the handshake
//! timeout for TLS, the API header timeout, 64 KiB bodies, and every request needs the
//! secret. The client bounds every request by [`PEER_REQUEST_TIMEOUT`].

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::future::{BoxFuture, FutureExt};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use porthole_protocol::secret::SecretHash;
use porthole_protocol::tls::RelayTrust;
use porthole_protocol::Secret;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use super::{PeerAccess, Peers, RemoteOpen};
use crate::shared::Relay;

/// Longest wait for one peer request, connection included.
pub const PEER_REQUEST_TIMEOUT: Duration = Duration::from_secs(3);

/// Connections the peer listener holds at once.
const MAX_PEER_CONNECTIONS: usize = 64;

/// Largest peer request or answer body.
const MAX_PEER_BODY: usize = 64 * 1024;

/// What the peer server needs.
#[derive(Clone)]
struct PeerState {
    relay: Arc<Relay>,
    secret: SecretHash,
}

/// Serves the peer link on `listener` until the relay stops.
pub async fn serve(
    relay: Arc<Relay>,
    listener: TcpListener,
    acceptor: TlsAcceptor,
    secret: SecretHash,
) {
    let router = Router::new()
        .route("/peer/v1/open", post(open))
        .route("/peer/v1/sessions/{id}/access", get(access))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_PEER_BODY))
        .with_state(PeerState {
            relay: relay.clone(),
            secret,
        });
    let slots = Arc::new(Semaphore::new(MAX_PEER_CONNECTIONS));
    let handshake = relay.config.handshake_timeout;
    let header = relay.config.api_header_timeout;
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let accepted = tokio::select! {
            () = relay.cancel.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let (tcp, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::debug!(error = %e, "peer link: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (acceptor, router, cancel) = (acceptor.clone(), router.clone(), relay.cancel.clone());
        relay.tasks.spawn(async move {
            let _slot = slot;
            let Ok(Ok(tls)) = tokio::time::timeout(handshake, acceptor.accept(tcp)).await else {
                return tracing::debug!(%peer, "peer link: TLS handshake failed");
            };
            let mut http = hyper::server::conn::http1::Builder::new();
            http.timer(TokioTimer::new()).header_read_timeout(header);
            let conn = http.serve_connection(TokioIo::new(tls), TowerToHyperService::new(router));
            tokio::select! {
                _ = conn => {}
                () = cancel.cancelled() => {}
            }
        });
    }
}

/// Whether the request carries the cluster secret.
fn authorized(headers: &HeaderMap, secret: &SecretHash) -> bool {
    headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|token| Secret::new(token).matches(secret))
}

fn refused(status: StatusCode, why: impl Into<String>) -> Response {
    (status, Json(serde_json::json!({ "error": why.into() }))).into_response()
}

async fn open(
    State(state): State<PeerState>,
    headers: HeaderMap,
    Json(req): Json<RemoteOpen>,
) -> Response {
    if !authorized(&headers, &state.secret) {
        return refused(
            StatusCode::UNAUTHORIZED,
            "the cluster secret is missing or wrong",
        );
    }
    state
        .relay
        .metrics
        .peer_requests
        .with_label_values(&["open", "in"])
        .inc();
    match state.relay.open_for_peer(req) {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(why) => refused(StatusCode::CONFLICT, why),
    }
}

async fn access(
    State(state): State<PeerState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    if !authorized(&headers, &state.secret) {
        return refused(
            StatusCode::UNAUTHORIZED,
            "the cluster secret is missing or wrong",
        );
    }
    state
        .relay
        .metrics
        .peer_requests
        .with_label_values(&["access", "in"])
        .inc();
    let Some(session) = state.relay.sessions.get(&id) else {
        return refused(StatusCode::NOT_FOUND, "no such session");
    };
    let inner = session.lock();
    match (&inner.link, &inner.access) {
        (Some(_), Some(access)) => Json(PeerAccess {
            credentials: access.credentials.clone(),
            host_keys: access.host_keys.clone(),
        })
        .into_response(),
        _ => refused(
            StatusCode::CONFLICT,
            "this node does not hold the agent's link",
        ),
    }
}

/// The client side: requests to other nodes' peer addresses, as `members` lists them.
pub struct PeerClient {
    /// The relay (its live members' peer addresses, its metrics); weak, so the client
    /// does not keep a stopped relay alive.
    relay: std::sync::Weak<Relay>,
    /// TLS pinned to the cluster's certificate.
    connector: TlsConnector,
    /// The cluster secret, sent as a bearer token.
    secret: String,
}

impl std::fmt::Debug for PeerClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerClient").finish_non_exhaustive()
    }
}

impl PeerClient {
    /// A client trusting exactly the certificate with SHA-256 `pin` (the cluster's).
    pub fn new(relay: &Arc<Relay>, pin: [u8; 32], secret: String) -> Result<Self, String> {
        let config = porthole_protocol::tls::client_config(&RelayTrust::Pin(pin))
            .map_err(|e| e.to_string())?;
        Ok(Self {
            relay: Arc::downgrade(relay),
            connector: TlsConnector::from(config),
            secret,
        })
    }

    /// One request to node `node`; the answer's status and body.
    async fn request(
        &self,
        node: &str,
        method: hyper::Method,
        path: String,
        body: Option<Vec<u8>>,
    ) -> Result<(StatusCode, Bytes), String> {
        let relay = self.relay.upgrade().ok_or("the relay is stopping")?;
        let cluster = relay.cluster.as_ref().ok_or("not in a cluster")?;
        let addr = cluster
            .members
            .peer_addr(node)
            .ok_or_else(|| format!("node {node} is not a live member"))?;
        let kind = if path.ends_with("/access") {
            "access"
        } else {
            "open"
        };
        relay
            .metrics
            .peer_requests
            .with_label_values(&[kind, "out"])
            .inc();
        let work = async {
            let tcp = TcpStream::connect(&addr)
                .await
                .map_err(|e| format!("{addr}: {e}"))?;
            let _ = tcp.set_nodelay(true);
            let name = ServerName::try_from("porthole-peer").map_err(|e| e.to_string())?;
            let tls = self
                .connector
                .connect(name, tcp)
                .await
                .map_err(|e| format!("{addr}: TLS: {e}"))?;
            let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
                .await
                .map_err(|e| format!("{addr}: {e}"))?;
            tokio::spawn(conn);
            let request = hyper::Request::builder()
                .method(method)
                .uri(path)
                .header(hyper::header::HOST, "porthole-peer")
                .header(
                    hyper::header::AUTHORIZATION,
                    format!("Bearer {}", self.secret),
                )
                .header(hyper::header::CONTENT_TYPE, "application/json")
                .body(Full::new(Bytes::from(body.unwrap_or_default())))
                .map_err(|e| e.to_string())?;
            let answer = send
                .send_request(request)
                .await
                .map_err(|e| format!("{addr}: {e}"))?;
            let status = answer.status();
            let body = Limited::new(answer.into_body(), MAX_PEER_BODY)
                .collect()
                .await
                .map_err(|e| format!("{addr}: {e}"))?
                .to_bytes();
            Ok::<_, String>((status, body))
        };
        match tokio::time::timeout(PEER_REQUEST_TIMEOUT, work).await {
            Ok(answer) => answer,
            Err(_) => Err(format!("node {node} ({addr}) did not answer in time")),
        }
    }
}

/// The `error` of a refusal body, or the status.
fn why(status: StatusCode, body: &Bytes) -> String {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["error"].as_str().map(str::to_owned))
        .unwrap_or_else(|| status.to_string())
}

impl Peers for PeerClient {
    fn open(&self, node: &str, open: RemoteOpen) -> BoxFuture<'static, Result<(), String>> {
        let this = self.clone_for_task();
        let node = node.to_owned();
        async move {
            let body = serde_json::to_vec(&open).map_err(|e| e.to_string())?;
            let (status, answer) = this
                .request(
                    &node,
                    hyper::Method::POST,
                    "/peer/v1/open".into(),
                    Some(body),
                )
                .await?;
            if status.is_success() {
                Ok(())
            } else {
                Err(why(status, &answer))
            }
        }
        .boxed()
    }

    fn access(
        &self,
        node: &str,
        session_id: &str,
    ) -> BoxFuture<'static, Result<PeerAccess, String>> {
        let this = self.clone_for_task();
        let (node, path) = (
            node.to_owned(),
            format!("/peer/v1/sessions/{session_id}/access"),
        );
        async move {
            let (status, answer) = this.request(&node, hyper::Method::GET, path, None).await?;
            if !status.is_success() {
                return Err(why(status, &answer));
            }
            serde_json::from_slice(&answer).map_err(|e| format!("node {node}: {e}"))
        }
        .boxed()
    }
}

impl PeerClient {
    fn clone_for_task(&self) -> Self {
        Self {
            relay: self.relay.clone(),
            connector: self.connector.clone(),
            secret: self.secret.clone(),
        }
    }
}
