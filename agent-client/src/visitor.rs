//! One visitor on the agent side: dial the local service (or hand the connection to the
//! embedded SSH server), open a data connection to the relay with `attach`, forward until
//! either side ends.

use std::sync::Arc;

use bytes::BytesMut;
use porthole_protocol::forward::forward_until;
use porthole_protocol::splice::{splice_forward_with, SpliceOptions};
use porthole_protocol::{frame, Message, Secret, Service};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_rustls::client::TlsStream;

use crate::config::Target;
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

/// A data connection to the relay, `attach` already sent.
enum DataConn {
    Tls(Box<TlsStream<TcpStream>>),
    Tcp(TcpStream),
}

/// Serves one visitor; reports `open_failed` on `failures` when the service is unreachable.
pub async fn serve(ctx: Arc<Context>, open: Open, failures: mpsc::Sender<Message>) {
    let conn_id = open.conn_id;
    let fail = |reason: String| {
        tracing::warn!(conn_id, service = %open.service, "{reason}");
        let _ = failures.try_send(Message::OpenFailed { conn_id, reason });
    };
    let target = match ctx.config.services.get(&open.service) {
        Some(Target::Dial(addr)) => addr,
        Some(Target::EmbeddedSsh) => {
            let Some(server) = ctx.config.embedded_ssh.clone() else {
                return fail("the embedded SSH server is not set up".into());
            };
            let data = match attach(&ctx, &open).await {
                Ok(data) => data,
                Err(reason) => return fail(reason),
            };
            match data {
                DataConn::Tls(s) => server.serve(s, &ctx.cancel, &ctx.tasks).await,
                DataConn::Tcp(s) => server.serve(s, &ctx.cancel, &ctx.tasks).await,
            }
            return;
        }
        None => return fail(format!("this agent does not expose `{}`", open.service)),
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
    let data = match attach(&ctx, &open).await {
        Ok(data) => data,
        Err(reason) => return fail(reason),
    };
    match data {
        DataConn::Tcp(mut data) => {
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
        }
        DataConn::Tls(mut data) => {
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
    }
}

/// Opens a data connection for `open` the way the relay said (TLS to the agent endpoint or
/// plain TCP to the data port) and sends `attach` on it.
async fn attach(ctx: &Context, open: &Open) -> Result<DataConn, String> {
    let mut attach = BytesMut::new();
    let msg = Message::Attach {
        session_id: open.session_id.clone(),
        conn_id: open.conn_id,
        secret: open.secret.clone(),
    };
    frame::encode(&msg, &mut attach).map_err(|e| format!("cannot encode attach: {e}"))?;
    let dialing = ctx.dials.acquire().await;
    let mut data = match open.route {
        DataRoute::Tcp(port) => {
            let addr = (ctx.config.relay_host.as_str(), port);
            let data =
                match tokio::time::timeout(ctx.config.connect_timeout, TcpStream::connect(addr))
                    .await
                {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        return Err(format!("cannot reach the relay's data port {port}: {e}"))
                    }
                    Err(_) => {
                        return Err(format!(
                            "cannot reach the relay's data port {port}: timed out"
                        ))
                    }
                };
            let _ = data.set_nodelay(true);
            DataConn::Tcp(data)
        }
        DataRoute::Tls => match ctx.dialer.dial().await {
            Ok(d) => DataConn::Tls(Box::new(d)),
            Err(e) => return Err(format!("cannot open a data connection: {e}")),
        },
    };
    drop(dialing);
    let sent = match &mut data {
        DataConn::Tcp(s) => s.write_all(&attach).await,
        DataConn::Tls(s) => s.write_all(&attach).await,
    };
    sent.map_err(|e| format!("cannot send attach: {e}"))?;
    Ok(data)
}
