//! [`crate::frame`] as a `tokio_util::codec` codec, so a connection can be a
//! `Framed<_, MessageCodec>` while it speaks frames and turn raw with `into_parts()`, which
//! hands back the bytes already read past the last frame (they must be forwarded, not lost).

use bytes::BytesMut;
use tokio_util::codec::{Decoder, Encoder};

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
