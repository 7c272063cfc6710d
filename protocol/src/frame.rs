//! The wire codec: frames are a 4-byte big-endian payload length and a JSON payload.
//!
//! Pure: no sockets, no clock. [`decode`] returns `Ok(None)` for "need more bytes", never
//! panics and never reserves more than [`MAX_FRAME_LEN`] plus the header, whatever the bytes.

use bytes::{Buf, BufMut, BytesMut};

use crate::limits::{FRAME_HEADER_LEN, MAX_FRAME_LEN};
use crate::message::Message;

/// Why a frame could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The declared (or encoded) payload is larger than the limit.
    #[error("frame of {len} bytes is larger than the {max}-byte limit")]
    TooLarge {
        /// Declared payload length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The payload is not a valid message.
    #[error("malformed frame: {0}")]
    Malformed(String),
    /// Reading or writing the stream failed (used by [`crate::codec`]).
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Appends `msg` as one frame to `dst`.
pub fn encode(msg: &Message, dst: &mut BytesMut) -> Result<(), FrameError> {
    let payload = serde_json::to_vec(msg).map_err(|e| FrameError::Malformed(e.to_string()))?;
    if payload.len() > MAX_FRAME_LEN {
        return Err(FrameError::TooLarge {
            len: payload.len(),
            max: MAX_FRAME_LEN,
        });
    }
    dst.reserve(FRAME_HEADER_LEN + payload.len());
    // Fits: checked against MAX_FRAME_LEN above.
    dst.put_u32(payload.len() as u32);
    dst.put_slice(&payload);
    Ok(())
}

/// Takes one frame off the front of `src`, if a whole one is there.
pub fn decode(src: &mut BytesMut) -> Result<Option<Message>, FrameError> {
    let Some(header) = src.get(..FRAME_HEADER_LEN) else {
        return Ok(None);
    };
    let len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]) as usize;
    if len > MAX_FRAME_LEN {
        return Err(FrameError::TooLarge {
            len,
            max: MAX_FRAME_LEN,
        });
    }
    if src.len() < FRAME_HEADER_LEN + len {
        src.reserve(FRAME_HEADER_LEN + len - src.len());
        return Ok(None);
    }
    src.advance(FRAME_HEADER_LEN);
    let payload = src.split_to(len);
    serde_json::from_slice(&payload)
        .map(Some)
        .map_err(|e| FrameError::Malformed(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{ErrorCode, HelloAuth, Service};
    use crate::secret::Secret;

    fn roundtrip(msg: Message) {
        let mut buf = BytesMut::new();
        encode(&msg, &mut buf).unwrap_or_else(|e| unreachable!("{e}"));
        let got = decode(&mut buf).unwrap_or_else(|e| unreachable!("{e}"));
        assert_eq!(got, Some(msg));
        assert!(buf.is_empty());
    }

    #[test]
    fn hello_roundtrips() {
        roundtrip(Message::Hello {
            protocol_version: 1,
            agent_version: "0.1.0".into(),
            auth: HelloAuth::Join {
                token: Secret::generate("phj_"),
            },
            services: vec![Service::Ssh, Service::Vnc],
            credentials: vec![],
            host_keys: vec![],
            visitor_reports: true,
            attach_elsewhere: false,
        });
        roundtrip(Message::Finish);
        roundtrip(Message::End);
        roundtrip(Message::Visitors { count: 3 });
        roundtrip(Message::Error {
            code: ErrorCode::BadToken,
            message: "no".into(),
        });
    }

    #[test]
    fn partial_frames_wait_for_more() {
        let mut full = BytesMut::new();
        encode(&Message::Ping { seq: 7 }, &mut full).unwrap_or_else(|e| unreachable!("{e}"));
        for cut in 0..full.len() {
            let mut part = BytesMut::from(&full[..cut]);
            assert!(matches!(decode(&mut part), Ok(None)), "cut at {cut}");
        }
    }

    #[test]
    fn oversized_header_is_refused_before_buffering() {
        let mut buf = BytesMut::from(&[0xff, 0xff, 0xff, 0xff][..]);
        assert!(matches!(decode(&mut buf), Err(FrameError::TooLarge { .. })));
        assert!(buf.capacity() < MAX_FRAME_LEN);
    }

    #[test]
    fn unknown_error_codes_decode_as_other() {
        let mut buf = BytesMut::new();
        let body = br#"{"type":"error","code":"from_the_future","message":"x"}"#;
        buf.put_u32(body.len() as u32);
        buf.put_slice(body);
        let msg = decode(&mut buf).unwrap_or_else(|e| unreachable!("{e}"));
        assert_eq!(
            msg,
            Some(Message::Error {
                code: ErrorCode::Other,
                message: "x".into()
            })
        );
    }

    #[test]
    fn garbage_is_malformed() {
        let mut buf = BytesMut::new();
        buf.put_u32(5);
        buf.put_slice(b"hello");
        assert!(matches!(decode(&mut buf), Err(FrameError::Malformed(_))));
    }
}
