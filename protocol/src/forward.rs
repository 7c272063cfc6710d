//! The byte forwarder relay and agent both use: copies both directions between two streams
//! until both have ended, preserving half-close (EOF one way shuts down the write side of the
//! other stream and the opposite direction keeps flowing), with fixed-size buffers allocated
//! once per connection (not per read), and no idle timeout (an idle SSH session lives as long
//! as its tunnel session does; callers cancel it at revocation).
//!
//! The copy itself is tokio's `copy_bidirectional_with_sizes`; this module adds what a
//! tunnel needs around it: bytes that were already read from one side while it still spoke
//! frames are delivered first, and the byte counts of both directions come back even when
//! the connection ends with an error (a visitor's reset, a peer vanishing without
//! close_notify), because audit lines and metrics need them then too.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio_util::sync::CancellationToken;

use crate::limits::{FORWARD_BUFFER_LEN, FORWARD_YIELD_BYTES};

/// Bytes moved by one forwarded connection.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ForwardStats {
    /// Bytes read from `a` and written to `b`.
    pub a_to_b: u64,
    /// Bytes read from `b` and written to `a` (including the already-buffered prefix).
    pub b_to_a: u64,
}

/// A forwarded connection that ended with an I/O error, and what it moved before that.
#[derive(Debug, thiserror::Error)]
#[error("{source}")]
pub struct ForwardError {
    /// Bytes moved before the error (bytes read from a side; the last chunk may not have
    /// been written).
    pub stats: ForwardStats,
    /// The error.
    #[source]
    pub source: io::Error,
}

/// Forwards between `a` and `b` until both directions have ended.
///
/// `b_prefix` holds bytes already read from `b` (for example past an `attach` frame); they
/// are written to `a` before anything else.
pub async fn forward<A, B>(
    a: &mut A,
    b: &mut B,
    b_prefix: &[u8],
) -> Result<ForwardStats, ForwardError>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    forward_until(a, b, b_prefix, &CancellationToken::new()).await
}

/// Like [`forward`], but ends early when `cancel` fires (revocation, lost link), returning
/// the bytes moved so far in a [`ForwardError`] of kind `Interrupted`.
pub async fn forward_until<A, B>(
    a: &mut A,
    b: &mut B,
    b_prefix: &[u8],
    cancel: &CancellationToken,
) -> Result<ForwardStats, ForwardError>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let prefix = b_prefix.len() as u64;
    if !b_prefix.is_empty() {
        let wrote = async {
            a.write_all(b_prefix).await?;
            a.flush().await
        };
        wrote.await.map_err(|source| ForwardError {
            stats: ForwardStats::default(),
            source,
        })?;
    }
    let mut a = Counted::new(a);
    let mut b = Counted::new(b);
    let result = tokio::select! {
        r = tokio::io::copy_bidirectional_with_sizes(&mut a, &mut b, FORWARD_BUFFER_LEN, FORWARD_BUFFER_LEN) => r.map(|_| ()),
        () = cancel.cancelled() => Err(io::Error::new(io::ErrorKind::Interrupted, "forwarding cancelled")),
    };
    let stats = ForwardStats {
        a_to_b: a.read,
        b_to_a: b.read + prefix,
    };
    result
        .map(|()| stats)
        .map_err(|source| ForwardError { stats, source })
}

/// Counts the bytes read through a stream.
/// A stream that counts what is read from it and, every [`FORWARD_YIELD_BYTES`], yields to
/// the runtime once before reading on (see that constant).
struct Counted<'a, S: ?Sized> {
    inner: &'a mut S,
    read: u64,
    since_yield: u64,
    pause: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
}

impl<'a, S: ?Sized> Counted<'a, S> {
    fn new(inner: &'a mut S) -> Self {
        Self {
            inner,
            read: 0,
            since_yield: 0,
            pause: None,
        }
    }
}

impl<S: AsyncRead + Unpin + ?Sized> AsyncRead for Counted<'_, S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if let Some(pause) = self.pause.as_mut() {
            std::task::ready!(pause.as_mut().poll(cx));
            self.pause = None;
        }
        let before = buf.filled().len();
        let poll = Pin::new(&mut *self.inner).poll_read(cx, buf);
        let n = (buf.filled().len() - before) as u64;
        self.read += n;
        self.since_yield += n;
        if self.since_yield >= FORWARD_YIELD_BYTES {
            self.since_yield = 0;
            self.pause = Some(Box::pin(tokio::task::yield_now()));
        }
        poll
    }
}

impl<S: AsyncWrite + Unpin + ?Sized> AsyncWrite for Counted<'_, S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.inner).poll_write(cx, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.inner).poll_shutdown(cx)
    }
}
