//! What `porthole-relay` and `porthole-agent` share.
//!
//! # Layout
//! - [`limits`]: every size limit and protocol constant (frame limit, version, ALPN).
//! - [`message`]: the control messages and their fields, every variant documented.
//! - [`secret`]: the [`Secret`] newtype (redacted `Debug`), generation, hashing and
//!   constant-time comparison.
//! - [`frame`]: the pure wire codec: length-prefixed frames over `BytesMut`, no sockets, no
//!   clock, so it can be property-tested and fuzzed.
//! - [`codec`]: the [`frame`] codec as a `tokio_util::codec` `Decoder`/`Encoder`, for
//!   `Framed` streams whose buffered bytes survive `into_parts()`.
//! - [`forward`]: the one byte forwarder relay and agent both use (both directions,
//!   half-close preserved, reused buffers, byte counts).
//! - [`splice`]: zero-copy `splice(2)` forwarding for the `tcp` data plane, copy-path fallback.
//! - [`time`]: Unix-millisecond conversions (deadlines on the wire, stored records).
//! - [`username`]: the rule for user names shown in instructions (POSIX-portable only).
//! - [`tls`]: rustls configuration for both sides (TLS 1.3 only, ALPN, relay verification by
//!   system roots, CA file or pinned SHA-256 fingerprint) and certificate fingerprints.
//!
//! # Wire format
//! A control frame is a 4-byte big-endian payload length followed by the payload, a JSON
//! object tagged by `"type"` (see [`message::Message`]). The first frame of a connection is
//! `hello` (control connection), `attach` (data connection for one visitor; raw bytes follow)
//! or `park` (a warm data connection waiting for its visitor's `assign`).

pub mod codec;
pub mod forward;
pub mod frame;
pub mod limits;
pub mod message;
pub mod secret;
pub mod splice;
pub mod time;
pub mod tls;
pub mod username;

pub use frame::FrameError;
pub use message::{Credential, DataPlane, Endpoint, ErrorCode, Message, Service};
pub use secret::Secret;
