//! The wire decoder on arbitrary bytes: never panics, never buffers past one frame's
//! limit, and whatever it decodes encodes and decodes back to the same message.

#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use porthole_protocol::frame::{decode, encode};
use porthole_protocol::limits::{FRAME_HEADER_LEN, MAX_FRAME_LEN};

fuzz_target!(|data: &[u8]| {
    let mut buf = BytesMut::from(data);
    while let Ok(Some(msg)) = decode(&mut buf) {
        let mut again = BytesMut::new();
        if encode(&msg, &mut again).is_ok() {
            assert_eq!(decode(&mut again).ok().flatten(), Some(msg));
        }
    }
    assert!(buf.capacity() <= data.len().max(64) + FRAME_HEADER_LEN + MAX_FRAME_LEN);
});
