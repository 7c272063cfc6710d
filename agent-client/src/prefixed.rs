//! A stream that first yields bytes already read from it (what a frame decoder read past its
//! frame), then reads on; writes pass straight through. `tokio::io::AsyncReadExt::chain`
//! covers reading only, and the embedded SSH server needs one read-write stream.

use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// `prefix`, then `inner`.
#[derive(Debug)]
pub struct Prefixed<S> {
    prefix: Vec<u8>,
    offset: usize,
    inner: S,
}

impl<S> Prefixed<S> {
    /// Reads yield `prefix` before `inner`'s bytes.
    pub fn new(prefix: &[u8], inner: S) -> Self {
        Self {
            prefix: prefix.to_vec(),
            offset: 0,
            inner,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if let Some(rest) = this.prefix.get(this.offset..).filter(|r| !r.is_empty()) {
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            this.offset += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, data)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn prefix_comes_first_then_the_stream_and_writes_pass_through() -> std::io::Result<()> {
        let (a, mut b) = tokio::io::duplex(64);
        let mut p = Prefixed::new(b"hello ", a);
        b.write_all(b"world").await?;
        drop(b.shutdown().await);
        let mut small = [0u8; 4];
        p.read_exact(&mut small).await?;
        assert_eq!(&small, b"hell");
        let mut rest = Vec::new();
        // The peer half stays open for the write below; read exactly what was sent.
        let mut buf = [0u8; 7];
        p.read_exact(&mut buf).await?;
        rest.extend_from_slice(&buf);
        assert_eq!(rest, b"o world");
        p.write_all(b"back").await?;
        let mut got = [0u8; 4];
        b.read_exact(&mut got).await?;
        assert_eq!(&got, b"back");
        Ok(())
    }
}
