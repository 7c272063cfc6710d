//! Zero-copy forwarding between two TCP sockets for the `tcp` data plane: bytes move
//! socket → pipe → socket with `splice(2)`, one pipe per direction, both directions at once,
//! driven by tokio's readiness, with the same endings as [`forward_until`]: half-close
//! preserved (EOF one way shuts down the write side of the other socket once the pipe is
//! drained; the opposite direction keeps flowing), byte counts on every ending, and
//! cancellation returning what was moved in a [`ForwardError`] of kind `Interrupted`.
//!
//! Readiness: a socket → pipe splice is only attempted when that direction's pipe is empty,
//! so an `EAGAIN` from it can only mean "the socket has nothing to read" and clearing the
//! socket's read readiness is right (a full pipe would also answer `EAGAIN`, and clearing
//! readiness then would stall the direction for good). A pipe → socket splice is only
//! attempted while the pipe holds bytes, so its `EAGAIN` means "the socket's send buffer is
//! full". `SPLICE_F_MORE` is never used: it corks interactive traffic.
//!
//! Pipes are a limited kernel resource (per-user pipe page limits shrink or refuse them after
//! a few hundred), so they are created per connection when forwarding starts and closed when
//! it ends. When they cannot be had, that connection falls back to the copy path
//! ([`forward_until`]); the returned [`Path`] says which path ran, so callers can count
//! fallbacks in a metric.
//!
//! Linux only; elsewhere [`splice_forward_with`] always takes the copy path.

use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::forward::{forward_until, ForwardError, ForwardStats};

/// Which data path forwarded a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Path {
    /// `splice(2)` through a pipe per direction (zero-copy).
    Splice,
    /// The copy path ([`forward_until`]): pipes could not be had, or the platform has no
    /// `splice(2)`, or the caller forced it.
    Copy,
}

/// How [`splice_forward_with`] forwards.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SpliceOptions {
    /// Skip the pipes and take the copy path, as if pipe creation had failed (for tests of
    /// the fallback, and for operators who want the copy path).
    pub force_copy: bool,
    /// Ask the kernel for pipes of this many bytes (`F_SETPIPE_SZ`); `None` keeps the system
    /// default (64 KiB). A refused size is not an error: the default size is used.
    pub pipe_size: Option<usize>,
}

/// Forwards between `a` and `b` with `splice(2)` until both directions have ended or `cancel`
/// fires, falling back to the copy path when pipes cannot be created. Returns the path taken
/// (on every ending, so fallbacks can be counted even when the connection then fails) and the
/// result, with the same meaning as [`forward_until`]'s.
pub async fn splice_forward(
    a: &mut TcpStream,
    b: &mut TcpStream,
    cancel: &CancellationToken,
) -> (Path, Result<ForwardStats, ForwardError>) {
    splice_forward_with(a, b, &[], cancel, SpliceOptions::default()).await
}

/// Like [`splice_forward`], with `b_prefix` (bytes already read from `b`, for example past an
/// `attach` frame, written to `a` first and counted in `b_to_a`) and [`SpliceOptions`].
#[cfg(target_os = "linux")]
pub async fn splice_forward_with(
    a: &mut TcpStream,
    b: &mut TcpStream,
    b_prefix: &[u8],
    cancel: &CancellationToken,
    options: SpliceOptions,
) -> (Path, Result<ForwardStats, ForwardError>) {
    let pipes = if options.force_copy {
        None
    } else {
        match (
            linux::Pipe::new(options.pipe_size),
            linux::Pipe::new(options.pipe_size),
        ) {
            (Ok(ab), Ok(ba)) => Some((ab, ba)),
            (Err(error), _) | (_, Err(error)) => {
                tracing::debug!(%error, "no pipes for splice; forwarding by copy");
                None
            }
        }
    };
    match pipes {
        Some((ab, ba)) => (
            Path::Splice,
            linux::forward(a, b, b_prefix, cancel, ab, ba).await,
        ),
        None => (Path::Copy, forward_until(a, b, b_prefix, cancel).await),
    }
}

/// Like [`splice_forward`], with `b_prefix` and [`SpliceOptions`]. This platform has no
/// `splice(2)`: always the copy path.
#[cfg(not(target_os = "linux"))]
pub async fn splice_forward_with(
    a: &mut TcpStream,
    b: &mut TcpStream,
    b_prefix: &[u8],
    cancel: &CancellationToken,
    _options: SpliceOptions,
) -> (Path, Result<ForwardStats, ForwardError>) {
    (Path::Copy, forward_until(a, b, b_prefix, cancel).await)
}

#[cfg(target_os = "linux")]
mod linux {
    //! The `splice(2)` pump itself.

    use std::io;
    use std::os::fd::{AsFd, AsRawFd, OwnedFd};
    use std::pin::pin;
    use std::sync::atomic::{AtomicU64, Ordering};

    use nix::fcntl::{fcntl, splice, FcntlArg, OFlag, SpliceFFlags};
    use tokio::io::{AsyncWriteExt, Interest};
    use tokio::net::tcp::{ReadHalf, WriteHalf};
    use tokio::net::TcpStream;
    use tokio_util::sync::CancellationToken;

    use crate::forward::{ForwardError, ForwardStats};

    /// Pipe capacity assumed when the kernel does not say (`F_GETPIPE_SZ` fails): the Linux
    /// default.
    const DEFAULT_PIPE_LEN: usize = 64 * 1024;

    /// One direction's pipe.
    #[derive(Debug)]
    pub(super) struct Pipe {
        /// The read end (drained into the destination socket).
        read: OwnedFd,
        /// The write end (filled from the source socket).
        write: OwnedFd,
        /// Capacity in bytes: the most one socket → pipe splice asks for.
        len: usize,
    }

    impl Pipe {
        /// A non-blocking, close-on-exec pipe, resized to `size` bytes when asked and allowed.
        pub(super) fn new(size: Option<usize>) -> io::Result<Self> {
            let (read, write) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
            let fd = write.as_raw_fd();
            if let Some(size) = size.and_then(|s| i32::try_from(s).ok()) {
                if let Err(error) = fcntl(fd, FcntlArg::F_SETPIPE_SZ(size)) {
                    tracing::debug!(%error, size, "pipe size refused; keeping the default");
                }
            }
            let len = fcntl(fd, FcntlArg::F_GETPIPE_SZ)
                .ok()
                .and_then(|n| usize::try_from(n).ok())
                .filter(|&n| n > 0)
                .unwrap_or(DEFAULT_PIPE_LEN);
            Ok(Self { read, write, len })
        }
    }

    /// Never `SPLICE_F_MORE`: it corks interactive traffic.
    fn flags() -> SpliceFFlags {
        SpliceFFlags::SPLICE_F_NONBLOCK | SpliceFFlags::SPLICE_F_MOVE
    }

    /// Both directions until both have ended, one fails, or `cancel` fires.
    pub(super) async fn forward(
        a: &mut TcpStream,
        b: &mut TcpStream,
        b_prefix: &[u8],
        cancel: &CancellationToken,
        ab_pipe: Pipe,
        ba_pipe: Pipe,
    ) -> Result<ForwardStats, ForwardError> {
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
        let a_to_b = AtomicU64::new(0);
        let b_to_a = AtomicU64::new(0);
        let result = {
            let (ar, aw) = a.split();
            let (br, bw) = b.split();
            let mut ab = pin!(pump(ar, bw, ab_pipe, &a_to_b));
            let mut ba = pin!(pump(br, aw, ba_pipe, &b_to_a));
            let (mut ab_done, mut ba_done) = (false, false);
            loop {
                if ab_done && ba_done {
                    break Ok(());
                }
                let ended = tokio::select! {
                    r = &mut ab, if !ab_done => { ab_done = true; r }
                    r = &mut ba, if !ba_done => { ba_done = true; r }
                    () = cancel.cancelled() => Err(io::Error::new(
                        io::ErrorKind::Interrupted,
                        "forwarding cancelled",
                    )),
                };
                if let Err(error) = ended {
                    break Err(error);
                }
            }
        };
        let stats = ForwardStats {
            a_to_b: a_to_b.load(Ordering::Relaxed),
            b_to_a: b_to_a.load(Ordering::Relaxed) + prefix,
        };
        result
            .map(|()| stats)
            .map_err(|source| ForwardError { stats, source })
    }

    /// One direction: `src` → pipe → `dst` until EOF from `src` and an empty pipe, then shuts
    /// down `dst`'s write side. `moved` counts bytes read from `src`.
    async fn pump(
        src: ReadHalf<'_>,
        mut dst: WriteHalf<'_>,
        pipe: Pipe,
        moved: &AtomicU64,
    ) -> io::Result<()> {
        let mut in_pipe = 0usize;
        loop {
            if in_pipe == 0 {
                match fill(src.as_ref(), &pipe).await? {
                    0 => break,
                    n => {
                        in_pipe = n;
                        moved.fetch_add(n as u64, Ordering::Relaxed);
                    }
                }
            } else {
                // No extra yield here (unlike the copy path): measured on 2 cores, a
                // `yield_now` every 256 KiB-2 MiB cut single-stream splice throughput by
                // 15-25 %; tokio's own budget yields about every 4 MiB.
                in_pipe -= drain(dst.as_ref(), &pipe, in_pipe).await?;
            }
        }
        dst.shutdown().await
    }

    /// Socket → empty pipe: waits for data and moves what is there (up to the pipe's
    /// capacity); `Ok(0)` is EOF. The pipe is empty, so `EAGAIN` comes from the socket and
    /// clearing its read readiness is correct.
    async fn fill(src: &TcpStream, pipe: &Pipe) -> io::Result<usize> {
        loop {
            src.readable().await?;
            let spliced = src.try_io(Interest::READABLE, || {
                splice(
                    src.as_fd(),
                    None,
                    pipe.write.as_fd(),
                    None,
                    pipe.len,
                    flags(),
                )
                .map_err(io::Error::from)
            });
            match spliced {
                Ok(n) => return Ok(n),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                    ) => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Pipe holding `in_pipe` bytes → socket: waits for room and moves what fits. The pipe
    /// has bytes, so `EAGAIN` comes from the socket's full send buffer.
    async fn drain(dst: &TcpStream, pipe: &Pipe, in_pipe: usize) -> io::Result<usize> {
        loop {
            dst.writable().await?;
            let spliced = dst.try_io(Interest::WRITABLE, || {
                splice(pipe.read.as_fd(), None, dst.as_fd(), None, in_pipe, flags())
                    .map_err(io::Error::from)
            });
            match spliced {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::WriteZero,
                        "splice wrote nothing to the socket",
                    ))
                }
                Ok(n) => return Ok(n),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                    ) => {}
                Err(e) => return Err(e),
            }
        }
    }
}
