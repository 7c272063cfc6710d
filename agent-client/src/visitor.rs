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
use crate::embedded_ssh::{EmbeddedSsh, LoginReport};
use crate::prefixed::Prefixed;
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
    /// Whether to report an embedded SSH login (`visitor_authenticated`): the relay said it
    /// takes such reports in `registered`.
    pub report_login: bool,
}

/// Where a visitor's data connection goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DataRoute {
    /// TLS to the agent endpoint.
    Tls,
    /// TLS to another node of a relay cluster (its agent endpoint, HOST:PORT), where the
    /// visitor waits.
    TlsAt(String),
    /// Plain TCP to this port on the relay's host; forwarded with splice(2).
    Tcp(u16),
}

/// A data connection to the relay, its first frame (`attach` or `park`) already sent.
#[derive(Debug)]
pub enum DataConn {
    /// TLS to the agent endpoint.
    Tls(Box<TlsStream<TcpStream>>),
    /// Plain TCP to the data port.
    Tcp(TcpStream),
}

/// What serves a visitor on the build machine.
#[derive(Debug)]
pub enum Local {
    /// A connection to the local service.
    Dialed(TcpStream),
    /// The embedded SSH server.
    Embedded(Arc<EmbeddedSsh>),
}

/// Serves one visitor; reports `open_failed` on `to_relay` (the control link's queue) when
/// the service is unreachable, and `visitor_authenticated` when asked to.
pub async fn serve(ctx: Arc<Context>, open: Open, to_relay: mpsc::Sender<Message>) {
    let conn_id = open.conn_id;
    let fail = |reason: String| {
        tracing::warn!(conn_id, service = %open.service, "{reason}");
        let _ = to_relay.try_send(Message::OpenFailed { conn_id, reason });
    };
    let local = match local_side(&ctx, open.service).await {
        Ok(local) => local,
        Err(reason) => return fail(reason),
    };
    let attach = Message::Attach {
        session_id: open.session_id.clone(),
        conn_id,
        secret: open.secret.clone(),
    };
    let data = match dial_data(&ctx, open.route, &attach).await {
        Ok(data) => data,
        Err(reason) => return fail(reason),
    };
    let login = open
        .report_login
        .then(|| LoginReport::new(conn_id, to_relay.clone()));
    forward(&ctx, conn_id, local, data, &[], login).await;
}

/// Reaches what serves `service` here: dials the local service, or picks the embedded SSH
/// server.
pub async fn local_side(ctx: &Context, service: Service) -> Result<Local, String> {
    let target = match ctx.config.services.get(&service) {
        Some(Target::Dial(addr)) => addr,
        Some(Target::EmbeddedSsh) => {
            return ctx
                .config
                .embedded_ssh
                .clone()
                .map(Local::Embedded)
                .ok_or_else(|| "the embedded SSH server is not set up".into())
        }
        None => return Err(format!("this agent does not expose `{service}`")),
    };
    match tokio::time::timeout(ctx.config.connect_timeout, TcpStream::connect(target)).await {
        Ok(Ok(s)) => {
            let _ = s.set_nodelay(true);
            Ok(Local::Dialed(s))
        }
        Ok(Err(e)) => Err(format!("cannot reach {service} at {target}: {e}")),
        Err(_) => Err(format!("cannot reach {service} at {target}: timed out")),
    }
}

/// Forwards between the local side and the data connection until either ends; `prefix`
/// holds bytes already read from the relay (they go to the local side first). `login` is
/// sent when a visitor of the embedded SSH server logs in.
pub async fn forward(
    ctx: &Context,
    conn_id: u64,
    local: Local,
    data: DataConn,
    prefix: &[u8],
    login: Option<LoginReport>,
) {
    let mut local = match local {
        Local::Dialed(s) => s,
        Local::Embedded(server) => {
            match data {
                DataConn::Tls(s) => {
                    server
                        .serve(Prefixed::new(prefix, s), &ctx.cancel, &ctx.tasks, login)
                        .await
                }
                DataConn::Tcp(s) => {
                    server
                        .serve(Prefixed::new(prefix, s), &ctx.cancel, &ctx.tasks, login)
                        .await
                }
            }
            return;
        }
    };
    match data {
        DataConn::Tcp(mut data) => {
            let (_, result) = splice_forward_with(
                &mut local,
                &mut data,
                prefix,
                &ctx.cancel,
                SpliceOptions::default(),
            )
            .await;
            if let Err(e) = result {
                tracing::debug!(conn_id, error = %e, "visitor connection ended");
            }
        }
        DataConn::Tls(mut data) => {
            match forward_until(&mut local, &mut data, prefix, &ctx.cancel).await {
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

/// Opens a data connection the way the relay said (TLS to the agent endpoint or plain TCP
/// to the data port) and sends `first` (`attach` or `park`) on it.
pub async fn dial_data(
    ctx: &Context,
    route: DataRoute,
    first: &Message,
) -> Result<DataConn, String> {
    let mut frame_bytes = BytesMut::new();
    frame::encode(first, &mut frame_bytes)
        .map_err(|e| format!("cannot encode {}: {e}", first.kind()))?;
    let dialing = ctx.dials.acquire().await;
    let mut data = match route {
        DataRoute::Tcp(port) => {
            // The data port of the node holding the control link.
            let addr = (ctx.dialer.current_ip(), port);
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
        DataRoute::TlsAt(relay) => match ctx.dialer.dial_at(&relay).await {
            Ok(d) => DataConn::Tls(Box::new(d)),
            Err(e) => return Err(format!("cannot open a data connection: {e}")),
        },
    };
    let sent = match &mut data {
        DataConn::Tcp(s) => s.write_all(&frame_bytes).await,
        DataConn::Tls(s) => s.write_all(&frame_bytes).await,
    };
    // The relay counts a connection as a pending handshake until its first frame arrives:
    // hold the dial slot until that frame is sent, so the agent's own burst stays under the
    // relay's per-address cap even when the relay is slow to read.
    drop(dialing);
    sent.map_err(|e| format!("cannot send {}: {e}", first.kind()))?;
    Ok(data)
}
