//! The agent endpoint: TLS 1.3 accept, then the first frame decides what the connection is
//! (`hello`: control connection; `attach`: data connection for one visitor; `park`: warm
//! data connection waiting for a visitor).
//!
//! Accepting and admission (pending-handshake limits) are [`crate::edge::preauth::accept_loop`]'s;
//! the TLS handshake and first frame run in the connection's own task under one deadline,
//! never in the accept loop, holding a pending slot until the first frame.

use std::net::SocketAddr;
use std::sync::Arc;

use futures_util::StreamExt;
use porthole_protocol::codec::MessageCodec;
use porthole_protocol::limits::ALPN;
use porthole_protocol::{ErrorCode, FrameError, Message, Secret};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::codec::Framed;

use crate::edge::preauth::{accept_loop, PendingGuard};
use crate::session::runtime::DataStream;
use crate::shared::Relay;
use crate::{edge::agent::attach, edge::agent::control};

use crate::edge::agent::conn::refuse;
pub use crate::edge::agent::conn::AgentFramed;

/// Accepts agent connections until shutdown.
pub async fn serve(relay: Arc<Relay>, listener: TcpListener, acceptor: TlsAcceptor) {
    let owner = relay.clone();
    accept_loop(relay, listener, "agent", move |tcp, peer, guard| {
        handle(owner.clone(), acceptor.clone(), tcp, peer, guard)
    })
    .await;
}

async fn handle(
    relay: Arc<Relay>,
    acceptor: TlsAcceptor,
    tcp: TcpStream,
    peer: SocketAddr,
    pending: PendingGuard,
) {
    let handshake = async {
        let tls = acceptor.accept(tcp).await?;
        // rustls accepts clients that offer no ALPN at all; only `porthole/1` speaks to us.
        if tls.get_ref().1.alpn_protocol() != Some(ALPN) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "client did not negotiate ALPN porthole/1",
            ));
        }
        let mut framed = Framed::new(tls, MessageCodec);
        let first = framed.next().await;
        Ok::<_, std::io::Error>((framed, first))
    };
    let outcome = tokio::select! {
        outcome = tokio::time::timeout(relay.config.handshake_timeout, handshake) => outcome,
        // Shutdown does not wait for strangers' handshakes.
        () = relay.cancel.cancelled() => return,
        () = pending.evicted() => {
            tracing::debug!("agent connection closed: a newer handshake needed its slot");
            return;
        }
    };
    drop(pending);
    let (mut framed, first) = match outcome {
        Ok(Ok(got)) => got,
        Ok(Err(e)) => {
            relay.metrics.handshake_failed("tls");
            let detail = format!("TLS handshake failed: {e}");
            relay.refusals.agent(peer.ip(), "tls", &detail);
            return;
        }
        Err(_) => {
            relay.metrics.handshake_failed("timeout");
            let detail = format!(
                "no TLS handshake and first frame within {:?}",
                relay.config.handshake_timeout
            );
            relay.refusals.agent(peer.ip(), "timeout", &detail);
            return;
        }
    };
    match classify(first) {
        FirstFrame::Control(hello) => control::run(relay, framed, hello, peer).await,
        FirstFrame::Data {
            session_id,
            conn_id,
            secret,
        } => {
            attach::run(
                &relay,
                peer.ip(),
                false,
                framed,
                &session_id,
                conn_id,
                &secret,
                |s| DataStream::Tls(Box::new(s)),
            )
            .await;
        }
        FirstFrame::Park { session_id, secret } => {
            crate::edge::agent::park::run(&relay, peer.ip(), framed, &session_id, &secret, |s| {
                DataStream::Tls(Box::new(s))
            })
            .await;
        }
        FirstFrame::Refused(code, msg) => {
            relay.metrics.handshake_failed(code.as_str());
            refuse(&relay, peer.ip(), &mut framed, code, msg).await;
        }
        FirstFrame::Closed => tracing::debug!("agent connection closed before its first frame"),
    }
}

/// What a connection's first frame makes it.
#[derive(Debug)]
pub enum FirstFrame {
    /// A `hello`: a control connection.
    Control(control::Hello),
    /// An `attach`: the data connection of one visitor.
    Data {
        /// Session named.
        session_id: String,
        /// Visitor connection named.
        conn_id: u64,
        /// Its one-time secret.
        secret: Secret,
    },
    /// A `park`: a warm data connection waiting for a visitor.
    Park {
        /// Session named.
        session_id: String,
        /// The link's park secret.
        secret: Secret,
    },
    /// Refused with this code and message.
    Refused(ErrorCode, String),
    /// The peer closed before sending a frame.
    Closed,
}

/// Decides what a first frame makes a connection. Pure (no sockets, no state), so it is
/// fuzzed on its own (`fuzz/fuzz_targets/first_frame.rs`).
pub fn classify(first: Option<Result<Message, FrameError>>) -> FirstFrame {
    match first {
        Some(Ok(Message::Hello {
            protocol_version,
            agent_version,
            auth,
            services,
            credentials,
            host_keys,
            visitor_reports,
            attach_elsewhere,
        })) => FirstFrame::Control(control::Hello {
            protocol_version,
            agent_version,
            auth,
            services,
            credentials,
            host_keys,
            visitor_reports,
            attach_elsewhere,
        }),
        Some(Ok(Message::Attach {
            session_id,
            conn_id,
            secret,
        })) => FirstFrame::Data {
            session_id,
            conn_id,
            secret,
        },
        Some(Ok(Message::Park { session_id, secret })) => FirstFrame::Park { session_id, secret },
        Some(Ok(other)) => FirstFrame::Refused(
            ErrorCode::UnexpectedMessage,
            format!(
                "first frame must be `hello`, `attach` or `park`, got `{}`",
                other.kind()
            ),
        ),
        Some(Err(e)) => {
            let code = match e {
                FrameError::TooLarge { .. } => ErrorCode::FrameTooLarge,
                _ => ErrorCode::BadFrame,
            };
            FirstFrame::Refused(code, format!("first frame refused: {e}"))
        }
        None => FirstFrame::Closed,
    }
}
