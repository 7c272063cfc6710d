//! What every handler of an agent connection shares, before and after registration: the
//! framed connection type and how a connection is refused or told goodbye. A leaf below the
//! agent endpoint, the control link, attach, warm connections and the data port.

use std::net::IpAddr;

use futures_util::SinkExt;
use porthole_protocol::codec::MessageCodec;
use porthole_protocol::{ErrorCode, Message};
use tokio::net::TcpStream;
use tokio_util::codec::Framed;

use crate::limits::FAREWELL_TIMEOUT;
use crate::shared::Relay;

/// A framed agent connection.
pub type AgentFramed = Framed<tokio_rustls::server::TlsStream<TcpStream>, MessageCodec>;

/// Sends a typed error to the connection from `peer`, logs it (aggregated, see
/// [`crate::ops::refusals`]), and closes the connection.
pub async fn refuse<S>(
    relay: &Relay,
    peer: IpAddr,
    framed: &mut Framed<S, MessageCodec>,
    code: ErrorCode,
    message: String,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    relay.refusals.agent(peer, code.as_str(), &message);
    farewell(framed, code, message).await;
}

/// Sends a typed error and closes the connection, within [`FAREWELL_TIMEOUT`] (no log: for
/// notices that are not refusals, such as a shutdown).
pub async fn farewell<S>(framed: &mut Framed<S, MessageCodec>, code: ErrorCode, message: String)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let farewell = async {
        let _ = framed.send(Message::Error { code, message }).await;
        let _ = framed.close().await;
    };
    let _ = tokio::time::timeout(FAREWELL_TIMEOUT, farewell).await;
}
