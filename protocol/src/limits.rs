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

/// Most SSH host keys an agent may report.
pub const MAX_HOST_KEYS: usize = 16;

/// Longest SSH host key line accepted (an RSA-16384 key fits).
pub const MAX_HOST_KEY_LEN: usize = 4096;

/// Longest user name or password accepted in credentials.
pub const MAX_CREDENTIAL_LEN: usize = 1024;
