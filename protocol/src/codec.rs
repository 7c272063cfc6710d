//! [`crate::frame`] as a `tokio_util::codec` codec, so a connection can be a
//! `Framed<_, MessageCodec>` while it speaks frames and turn raw with `into_parts()`, which
//! hands back the bytes already read past the last frame (they must be forwarded, not lost).

use std::time::Duration;

use bytes::BytesMut;
use futures_util::SinkExt;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::codec::{Decoder, Encoder, Framed};

use crate::frame::{self, FrameError};
use crate::message::Message;

/// Stateless codec for control frames.
#[derive(Clone, Copy, Debug, Default)]
pub struct MessageCodec;

impl Decoder for MessageCodec {
    type Item = Message;
    type Error = FrameError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Message>, FrameError> {
        frame::decode(src)
    }
}

impl Encoder<Message> for MessageCodec {
    type Error = FrameError;

    fn encode(&mut self, item: Message, dst: &mut BytesMut) -> Result<(), FrameError> {
        frame::encode(&item, dst)
    }
}

/// Sends one frame, failing with `TimedOut` when the peer (`who`: "agent", "relay") has not
/// taken it within `limit`: a peer that stops reading cannot hold the sender.
pub async fn send_within<S>(
    framed: &mut Framed<S, MessageCodec>,
    msg: Message,
    limit: Duration,
    who: &str,
) -> Result<(), FrameError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    match tokio::time::timeout(limit, framed.send(msg)).await {
        Ok(sent) => sent,
        Err(_) => Err(FrameError::Io(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("the {who} stopped reading the connection"),
        ))),
    }
}
