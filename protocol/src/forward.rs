//! The byte forwarder relay and agent both use: copies both directions between two streams
//! until both have ended, preserving half-close (EOF one way shuts down the write side of the
//! other stream and the opposite direction keeps flowing), with fixed-size buffers allocated
//! once per connection (not per read), and no idle timeout (an idle SSH session lives as long
//! as its tunnel session does; callers cancel it at revocation).
//!
//! The copy itself is tokio's `copy_bidirectional_with_sizes`; this module adds what a
//! tunnel needs around it: bytes that were already read from one side while it still spoke
//! frames are delivered first, and the counts of both directions come back.

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use crate::limits::FORWARD_BUFFER_LEN;

/// Bytes moved by one forwarded connection.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ForwardStats {
    /// Bytes read from `a` and written to `b`.
    pub a_to_b: u64,
    /// Bytes read from `b` and written to `a` (including the already-buffered prefix).
    pub b_to_a: u64,
}

/// Forwards between `a` and `b` until both directions have ended.
///
/// `b_prefix` holds bytes already read from `b` (for example past an `attach` frame); they
/// are written to `a` before anything else.
pub async fn forward<A, B>(a: &mut A, b: &mut B, b_prefix: &[u8]) -> std::io::Result<ForwardStats>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    if !b_prefix.is_empty() {
        a.write_all(b_prefix).await?;
        a.flush().await?;
    }
    let (a_to_b, b_to_a) =
        tokio::io::copy_bidirectional_with_sizes(a, b, FORWARD_BUFFER_LEN, FORWARD_BUFFER_LEN)
            .await?;
    Ok(ForwardStats {
        a_to_b,
        b_to_a: b_to_a + b_prefix.len() as u64,
    })
}
