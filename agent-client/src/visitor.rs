//! One visitor on the agent side: dial the local service, open a data connection to the
//! relay with `attach`, forward until either side ends.

use std::sync::Arc;

use bytes::BytesMut;
use porthole_protocol::forward::forward_until;
use porthole_protocol::splice::{splice_forward_with, SpliceOptions};
use porthole_protocol::{frame, Message, Secret, Service};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use crate::Context;

/// An `open` from the relay.
#[derive(Debug)]
pub struct Open {
    /// Session id (for `attach`).
    pub session_id: String,
    /// Connection id.
    pub conn_id: u64,
    /// Which service.
    pub service: Service,
    /// One-time secret.
    pub secret: Secret,
    /// Where the data connection goes (the relay said so in `registered`).
    pub route: DataRoute,
}

/// Where a visitor's data connection goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DataRoute {
    /// TLS to the agent endpoint.
    Tls,
    /// Plain TCP to this port on the relay's host; forwarded with splice(2).
    Tcp(u16),
}

/// Serves one visitor; reports `open_failed` on `failures` when the service is unreachable.
pub async fn serve(ctx: Arc<Context>, open: Open, failures: mpsc::Sender<Message>) {
    let conn_id = open.conn_id;
    let fail = |reason: String| {
        tracing::warn!(conn_id, service = %open.service, "{reason}");
        let _ = failures.try_send(Message::OpenFailed { conn_id, reason });
    };
    let Some(target) = ctx.config.services.get(&open.service) else {
        return fail(format!("this agent does not expose `{}`", open.service));
    };
    let mut local =
        match tokio::time::timeout(ctx.config.connect_timeout, TcpStream::connect(target)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return fail(format!("cannot reach {} at {target}: {e}", open.service)),
            Err(_) => {
                return fail(format!(
                    "cannot reach {} at {target}: timed out",
                    open.service
                ))
            }
        };
    let _ = local.set_nodelay(true);
    let dialing = ctx.dials.acquire().await;
    let mut attach = BytesMut::new();
    let msg = Message::Attach {
        session_id: open.session_id,
        conn_id,
        secret: open.secret,
    };
    if let Err(e) = frame::encode(&msg, &mut attach) {
        return fail(format!("cannot encode attach: {e}"));
    }
    if let DataRoute::Tcp(port) = open.route {
        let addr = (ctx.config.relay_host.as_str(), port);
        let mut data = match tokio::time::timeout(
            ctx.config.connect_timeout,
            TcpStream::connect(addr),
        )
        .await
        {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return fail(format!("cannot reach the relay's data port {port}: {e}")),
            Err(_) => {
                return fail(format!(
                    "cannot reach the relay's data port {port}: timed out"
                ))
            }
        };
        drop(dialing);
        let _ = data.set_nodelay(true);
        if let Err(e) = data.write_all(&attach).await {
            return fail(format!("cannot send attach: {e}"));
        }
        let (_, result) = splice_forward_with(
            &mut local,
            &mut data,
            &[],
            &ctx.cancel,
            SpliceOptions::default(),
        )
        .await;
        if let Err(e) = result {
            tracing::debug!(conn_id, error = %e, "visitor connection ended");
        }
        return;
    }
    let mut data = match ctx.dialer.dial().await {
        Ok(d) => d,
        Err(e) => return fail(format!("cannot open a data connection: {e}")),
    };
    drop(dialing);
    if let Err(e) = data.write_all(&attach).await {
        return fail(format!("cannot send attach: {e}"));
    }
    match forward_until(&mut local, &mut data, &[], &ctx.cancel).await {
        Ok(stats) => tracing::debug!(
            conn_id,
            to_relay = stats.a_to_b,
            from_relay = stats.b_to_a,
            "visitor closed"
        ),
        Err(e) => {
            tracing::debug!(conn_id, error = %e, to_relay = e.stats.a_to_b, "visitor connection ended")
        }
    }
}
