//! Serving a router on a listener (the API, and the metrics listener when it is separate)
//! over HTTP/1.1 with the limits a public edge needs and `axum::serve` lacks:
//!
//! - a client must send a request's complete headers within the header timeout (the first
//!   request and every later one on a kept-alive connection; an idle connection counts as
//!   a request not sent), or it is closed;
//! - at most a fixed number of connections are held at once: a permit is taken before
//!   `accept`, so further clients wait in the kernel's accept queue, not in memory.
//!
//! Every request carries `ConnectInfo<SocketAddr>` like `into_make_service_with_connect_info`
//! gives it. Upgrades (WebSockets) are served. On shutdown the listener stops accepting,
//! idle connections close, and requests in flight are answered before theirs close.

use crate::edge::source::{PerIpLimit, PerIpPermit};
use crate::limits::{
    API_CONNECTION_CLOSE_GRACE, API_CONNECTION_MAX_AGE, MAX_API_CONNECTIONS_PER_SOURCE,
};
use std::io;
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::Router;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::Request;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt as _;

use crate::config::RelayConfig;

/// Pause after an accept error that is not about one connection (e.g. out of file
/// descriptors), so the loop does not spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_secs(1);

/// The limits of one listener.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServeLimits {
    /// Connections held at once; more wait in the kernel's accept queue.
    pub max_connections: usize,
    /// Time a client has to send a request's complete headers before it is closed.
    pub header_timeout: Duration,
}

impl ServeLimits {
    /// `--max-api-connections` and `--api-header-timeout`.
    pub fn of(config: &RelayConfig) -> Self {
        Self {
            max_connections: config.max_api_connections,
            header_timeout: config.api_header_timeout,
        }
    }
}

/// Serves `app` on `listener` until `shutdown` is cancelled, then stops accepting and
/// returns once every connection has ended (requests in flight are answered first).
/// `name` names the listener in log lines.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ServeLimits,
    shutdown: CancellationToken,
    name: &'static str,
) {
    let permits = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let per_source = PerIpLimit::new(MAX_API_CONNECTIONS_PER_SOURCE);
    let connections = TaskTracker::new();
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    loop {
        let permit = tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            permit = permits.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                // The semaphore is never closed; if it were, nothing more could be served.
                Err(_) => break,
            },
        };
        let accepted = tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) if is_per_connection(&e) => continue,
            Err(e) => {
                tracing::warn!(listener = name, error = %e, "accepting a connection failed");
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = tokio::time::sleep(ACCEPT_ERROR_PAUSE) => continue,
                }
            }
        };
        // One source cannot take every slot: past its share the connection is closed at once.
        let Some(source_permit) = per_source.try_acquire(peer.ip()) else {
            tracing::debug!(listener = name, %peer, "HTTP connection closed: too many from this source");
            continue;
        };
        connections.spawn(connection(
            stream,
            peer,
            app.clone(),
            http.clone(),
            shutdown.clone(),
            (permit, source_permit),
            name,
        ));
    }
    drop(listener);
    connections.close();
    connections.wait().await;
}

/// Errors about the one connection being accepted (it went away first): accept the next.
fn is_per_connection(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
    )
}

/// Serves one connection; its permit is returned when it ends (or is upgraded).
async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    app: Router,
    http: http1::Builder,
    shutdown: CancellationToken,
    _permits: (OwnedSemaphorePermit, PerIpPermit),
    name: &'static str,
) {
    // Small JSON answers: do not wait for Nagle.
    let _ = stream.set_nodelay(true);
    let service = app.map_request(move |mut req: Request<Incoming>| {
        req.extensions_mut().insert(ConnectInfo(peer));
        req
    });
    let conn = http
        .serve_connection(TokioIo::new(stream), TowerToHyperService::new(service))
        .with_upgrades();
    let mut conn = pin!(conn);
    // A client that stops reading its answers stalls hyper where no header timeout runs: every
    // connection ends after API_CONNECTION_MAX_AGE (keep-alive clients reconnect).
    let ended = tokio::select! {
        ended = conn.as_mut() => ended,
        () = shutdown.cancelled() => {
            // Closes the connection once the request in flight, if any, is answered.
            conn.as_mut().graceful_shutdown();
            conn.await
        }
        () = tokio::time::sleep(API_CONNECTION_MAX_AGE) => {
            conn.as_mut().graceful_shutdown();
            match tokio::time::timeout(API_CONNECTION_CLOSE_GRACE, conn.as_mut()).await {
                Ok(ended) => ended,
                Err(_) => return tracing::debug!(listener = name, %peer, "HTTP connection cut: too old and not reading"),
            }
        }
    };
    if let Err(e) = ended {
        // Header timeouts, resets and malformed requests: routine on a public port.
        tracing::debug!(listener = name, %peer, error = %e, "HTTP connection ended");
    }
}
