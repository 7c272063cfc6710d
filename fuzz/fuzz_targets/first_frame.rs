//! The relay's handling of a connection's first frame, as the agent endpoint runs it:
//! decode, classify (control / data / refused), and the stateless checks of a `hello`
//! (protocol version, credentials, host keys). Nothing may panic, whatever the bytes.

#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use porthole_protocol::frame::decode;
use porthole_relay::edge::agent::accept::{classify, FirstFrame};
use porthole_relay::edge::agent::control::screen;

fuzz_target!(|data: &[u8]| {
    let mut buf = BytesMut::from(data);
    let first = match decode(&mut buf) {
        Ok(Some(msg)) => Some(Ok(msg)),
        Ok(None) => None,
        Err(e) => Some(Err(e)),
    };
    if let FirstFrame::Control(hello) = classify(first) {
        let _ = screen(hello, [127, 0, 0, 1].into());
    }
});
