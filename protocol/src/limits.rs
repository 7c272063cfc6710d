//! Protocol constants and limits, in one place.

/// Version of the wire protocol. A relay refuses a `hello` with another version, with an
/// error that says which side to upgrade.
pub const PROTOCOL_VERSION: u32 = 1;

/// ALPN protocol id negotiated on the agent endpoint.
pub const ALPN: &[u8] = b"porthole/1";

/// Bytes in a frame header (the big-endian payload length).
pub const FRAME_HEADER_LEN: usize = 4;

/// Largest control frame payload accepted or produced. A decoder never buffers more than
/// this plus the header for one frame.
pub const MAX_FRAME_LEN: usize = 64 * 1024;

/// Length of generated secrets, in bytes (256 bits).
pub const SECRET_BYTES: usize = 32;

/// Longest secret string accepted from a peer (hex of [`SECRET_BYTES`] plus a prefix).
pub const MAX_SECRET_LEN: usize = 128;

/// Size of each of the two buffers the copy path of the forwarder uses per connection.
pub const FORWARD_BUFFER_LEN: usize = 64 * 1024;

/// The copy path of the forwarder gives the runtime back to other connections after moving
/// this many bytes, so a bulk transfer cannot hold a worker thread while an interactive
/// session on the same thread waits (tokio's own budget allows 128 socket operations, up to
/// 4 MiB with 64 KiB buffers, between yields). Measured on 2 cores (`tls` plane, ping-pong
/// p99 while 8 bulk streams run / single-stream bulk): no extra yield 41-50 ms / 11.0-11.5
/// Gbit/s; 1 MiB 22 ms / 10.7-11.1 Gbit/s; 256 KiB 12-14 ms / 10.0-10.3 Gbit/s.
pub const FORWARD_YIELD_BYTES: u64 = 1024 * 1024;

/// Most SSH host keys an agent may report.
pub const MAX_HOST_KEYS: usize = 16;

/// Longest SSH host key line accepted (an RSA-16384 key fits).
pub const MAX_HOST_KEY_LEN: usize = 4096;

/// Longest user name or password accepted in credentials.
pub const MAX_CREDENTIAL_LEN: usize = 1024;
