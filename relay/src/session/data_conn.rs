//! A visitor's data connection from the agent ([`DataConn`]), by data plane, with the bytes
//! already read past its first frame. A leaf: pairing, warm connections and forwarding
//! share it.

use bytes::BytesMut;
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

/// A visitor's data connection from the agent, by data plane.
#[derive(Debug)]
pub enum DataStream {
    /// Over TLS on the agent endpoint.
    Tls(Box<TlsStream<TcpStream>>),
    /// Plain TCP on the data port (forwarded with splice(2)).
    Tcp(TcpStream),
}

/// The agent side of one visitor: a data connection, and the bytes already read from it
/// past its `attach` frame (forwarded first, never lost).
#[derive(Debug)]
pub struct DataConn {
    /// The data connection.
    pub stream: DataStream,
    /// Bytes read past the `attach` frame.
    pub prefix: BytesMut,
}
