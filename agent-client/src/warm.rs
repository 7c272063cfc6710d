//! Warm data connections: while a control link lives, the agent keeps a few data
//! connections parked on the relay (`park`), authenticated and idle, so a visitor is paired
//! at once (`assign`) instead of waiting for a new connection and its TLS handshake. Each
//! one assigned is replaced in the background; failures back off.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use porthole_protocol::codec::MessageCodec;
use porthole_protocol::{Message, Secret};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;

use crate::embedded_ssh::LoginReport;
use crate::visitor::{self, DataConn, DataRoute};
use crate::Context;

/// After asking the relay to retire a parked connection, how long an `assign` that crossed
/// the request is still served.
const RETIRE_GRACE: Duration = Duration::from_secs(5);
/// A parked connection that ends sooner than this (refused, unreachable) counts as a failure
/// and the next one waits.
const HEALTHY_AFTER: Duration = Duration::from_secs(5);
/// Longest wait between failed attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// How a parked connection ended.
#[derive(Debug)]
enum Ended {
    /// A visitor took it.
    Assigned,
    /// Retired after its idle time.
    Retired,
    /// It closed or was refused after `lived`.
    Closed { lived: Duration },
}

/// What one link's warm connections need.
#[derive(Clone, Debug)]
pub struct Pool {
    /// The session.
    pub session_id: String,
    /// The link's park secret.
    pub secret: Secret,
    /// How data connections reach the relay.
    pub route: DataRoute,
    /// How many to keep.
    pub size: usize,
    /// A parked connection idle this long is retired (so no middlebox silently drops it
    /// while it looks usable) and replaced.
    pub idle: Duration,
    /// The control link's queue of visitor reports, when the relay takes
    /// `visitor_authenticated`.
    pub login_reports: Option<mpsc::Sender<Message>>,
}

/// Keeps `pool.size` connections parked until `link` is cancelled (the control link ended).
pub async fn keep(ctx: Arc<Context>, pool: Pool, link: CancellationToken) {
    let (done_tx, mut done_rx) = mpsc::channel(pool.size.max(1) * 2);
    let mut live = 0usize;
    let mut failures = 0u32;
    loop {
        while live < pool.size {
            live += 1;
            let task = parked(ctx.clone(), pool.clone(), link.clone(), done_tx.clone());
            ctx.tasks.spawn(task);
        }
        let ended = tokio::select! {
            () = link.cancelled() => return,
            ended = done_rx.recv() => ended,
        };
        let Some(ended) = ended else { return };
        live = live.saturating_sub(1);
        match ended {
            Ended::Closed { lived } if lived < HEALTHY_AFTER => {
                failures = failures.saturating_add(1);
                let delay = Duration::from_millis(250u64 << failures.min(7)).min(MAX_BACKOFF);
                tracing::debug!(?delay, "warm data connection failed; retrying later");
                tokio::select! {
                    () = link.cancelled() => return,
                    () = tokio::time::sleep(delay) => {}
                }
            }
            _ => failures = 0,
        }
    }
}

/// Tells the pool how a parked connection ended, also if its task ends unexpectedly.
struct Report {
    done: Option<mpsc::Sender<Ended>>,
    started: Instant,
    /// Retired for idleness (not a failure, whatever its age).
    retired: bool,
}

impl Report {
    async fn assigned(mut self) {
        if let Some(done) = self.done.take() {
            let _ = done.send(Ended::Assigned).await;
        }
    }
}

impl Drop for Report {
    fn drop(&mut self) {
        if let Some(done) = self.done.take() {
            let _ = done.try_send(if self.retired {
                Ended::Retired
            } else {
                Ended::Closed {
                    lived: self.started.elapsed(),
                }
            });
        }
    }
}

/// One parked connection: dial, `park`, wait for `assign`, then serve that visitor.
async fn parked(ctx: Arc<Context>, pool: Pool, link: CancellationToken, done: mpsc::Sender<Ended>) {
    let mut report = Report {
        done: Some(done),
        started: Instant::now(),
        retired: false,
    };
    let park = Message::Park {
        session_id: pool.session_id.clone(),
        secret: pool.secret.clone(),
    };
    let dialed = tokio::select! {
        d = visitor::dial_data(&ctx, pool.route, &park) => d,
        () = link.cancelled() => return,
    };
    let assigned = match dialed {
        Ok(DataConn::Tls(s)) => wait_assign(*s, &link, pool.idle, &mut report.retired)
            .await
            .map(|(id, service, s, rest)| (id, service, DataConn::Tls(Box::new(s)), rest)),
        Ok(DataConn::Tcp(s)) => wait_assign(s, &link, pool.idle, &mut report.retired)
            .await
            .map(|(id, service, s, rest)| (id, service, DataConn::Tcp(s), rest)),
        Err(reason) => {
            tracing::debug!("warm data connection: {reason}");
            None
        }
    };
    let Some((conn_id, service, data, prefix)) = assigned else {
        return; // `report` tells the pool.
    };
    report.assigned().await;
    match visitor::local_side(&ctx, service).await {
        Ok(local) => {
            let login = pool
                .login_reports
                .clone()
                .map(|queue| LoginReport::new(conn_id, queue));
            visitor::forward(&ctx, conn_id, local, data, &prefix, login).await
        }
        // Closing the data connection closes the visitor.
        Err(reason) => tracing::warn!(conn_id, %service, "{reason}"),
    }
}

/// Waits on a parked connection for `assign`; `None` when it closes, the relay refuses it,
/// it is retired after `idle`, or the link ends.
async fn wait_assign<S>(
    stream: S,
    link: &CancellationToken,
    idle: Duration,
    retired: &mut bool,
) -> Option<(u64, porthole_protocol::Service, S, bytes::BytesMut)>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut framed = Framed::new(stream, MessageCodec);
    let frame = tokio::select! {
        frame = framed.next() => frame,
        () = link.cancelled() => return None,
        () = tokio::time::sleep(idle) => {
            // Retire it: any frame makes the relay forget it and close it; an `assign` sent
            // before the relay saw ours still arrives and is served.
            *retired = true;
            let _ = framed.send(Message::Ping { seq: 0 }).await;
            tokio::select! {
                frame = tokio::time::timeout(RETIRE_GRACE, framed.next()) => frame.ok().flatten(),
                () = link.cancelled() => return None,
            }
        }
    };
    match frame {
        Some(Ok(Message::Assign { conn_id, service })) => {
            let parts = framed.into_parts();
            Some((conn_id, service, parts.io, parts.read_buf))
        }
        Some(Ok(Message::Error { code, message })) => {
            tracing::warn!(?code, "the relay refused a warm data connection: {message}");
            None
        }
        Some(Ok(other)) => {
            tracing::warn!(
                kind = other.kind(),
                "unexpected frame on a warm data connection"
            );
            None
        }
        Some(Err(e)) => {
            tracing::warn!(error = %e, "bad frame on a warm data connection");
            None
        }
        None => None,
    }
}
