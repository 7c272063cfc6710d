//! A shell or command on a session channel: channel data to its input, its output (and
//! stderr, as extended data, without a terminal) to the channel, window changes and signals
//! to the terminal and process group, and its exit status back to the client.

use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::sync::Arc;
use std::time::Duration;

use pty_process::OwnedWritePty;
use russh::server::{Handle, Msg};
use russh::{Channel, ChannelMsg, ChannelReadHalf};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::process::ChildStdin;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::process::{self, Io, Request, Spawned};
use super::session::dimension;
use super::Shared;

/// Output read per turn.
const PUMP_BUFFER: usize = 32 * 1024;
/// After a terminal's shell exits, its output is read until the terminal is idle this
/// long: background jobs may keep the terminal open, and a session must still end.
const TERMINAL_DRAIN_IDLE: Duration = Duration::from_millis(250);
/// `shell -c` exit status when the shell cannot be started (as POSIX shells report it).
const CANNOT_START: u32 = 127;

/// Where channel data goes.
enum Input {
    Terminal(OwnedWritePty),
    Pipe(Option<ChildStdin>),
}

impl Input {
    async fn write(&mut self, data: &[u8]) -> std::io::Result<()> {
        match self {
            Self::Terminal(w) => w.write_all(data).await,
            Self::Pipe(Some(w)) => w.write_all(data).await,
            Self::Pipe(None) => Ok(()),
        }
    }

    /// End of input: closes the pipe (a terminal has no end of input).
    fn close(&mut self) {
        if let Self::Pipe(pipe) = self {
            *pipe = None;
        }
    }

    fn resize(&self, rows: u16, cols: u16) {
        if let Self::Terminal(w) = self {
            if let Err(e) = w.resize(pty_process::Size::new(rows, cols)) {
                tracing::debug!(error = %e, "cannot resize the terminal");
            }
        }
    }
}

/// Runs `request` on `channel` until it exits (then reports its status and closes the
/// channel), the client closes the channel, or the connection ends (then hangs it up).
pub async fn run(channel: Channel<Msg>, handle: Handle, request: Request, shared: Arc<Shared>) {
    let id = channel.id();
    let (mut rx, tx) = channel.split();
    let Spawned {
        mut child,
        group,
        io,
    } = match process::spawn(&shared.settings, &request) {
        Ok(s) => s,
        Err(e) => {
            let message = format!(
                "porthole-agent: cannot start {}: {e}\r\n",
                shared.settings.shell.display()
            );
            tracing::warn!("{}", message.trim_end());
            let _ = tx.extended_data_bytes(1, message.into_bytes()).await;
            let _ = tx.exit_status(CANNOT_START).await;
            let _ = tx.eof().await;
            let _ = tx.close().await;
            return;
        }
    };
    let exited = CancellationToken::new();
    let (mut input, pumps): (Input, Vec<JoinHandle<()>>) = match io {
        Io::Pty { output, input } => (
            Input::Terminal(input),
            vec![shared
                .tasks
                .spawn(pump(output, tx.make_writer(), Some(exited.clone())))],
        ),
        Io::Pipes {
            stdin,
            stdout,
            stderr,
        } => (
            Input::Pipe(Some(stdin)),
            vec![
                shared.tasks.spawn(pump(stdout, tx.make_writer(), None)),
                shared
                    .tasks
                    .spawn(pump(stderr, tx.make_writer_ext(Some(1)), None)),
            ],
        ),
    };
    let mut size = request.terminal.as_ref().map(|t| (t.rows, t.cols));
    let status: Option<ExitStatus> = loop {
        tokio::select! {
            status = child.wait() => break status.ok(),
            msg = rx.wait() => match msg {
                Some(ChannelMsg::Data { data }) => {
                    tokio::select! {
                        r = input.write(&data) => if r.is_err() { input.close() },
                        () = shared.cancel.cancelled() => {}
                    }
                }
                Some(ChannelMsg::Eof) => input.close(),
                Some(ChannelMsg::WindowChange { col_width, row_height, .. }) => {
                    if let Some((rows, cols)) = size.as_mut() {
                        *rows = dimension(row_height, *rows);
                        *cols = dimension(col_width, *cols);
                        input.resize(*rows, *cols);
                    }
                }
                Some(ChannelMsg::Signal { signal }) => {
                    if let Some(signal) = process::signal_from_ssh(&signal) {
                        process::signal_group(group, signal);
                    }
                }
                Some(ChannelMsg::Close) | None => {
                    // The client is gone: nothing more to tell it.
                    process::hang_up(&mut child, group).await;
                    return;
                }
                Some(_) => {}
            },
            () = shared.cancel.cancelled() => {
                process::hang_up(&mut child, group).await;
                return;
            }
        }
    };
    exited.cancel();
    drop(input);
    tokio::select! {
        _ = futures_util::future::join_all(pumps) => {}
        () = until_closed(&mut rx) => {}
        () = shared.cancel.cancelled() => {}
    }
    match status {
        Some(s) => match (s.code(), s.signal()) {
            (Some(code), _) => {
                let _ = tx.exit_status(u32::try_from(code).unwrap_or(255)).await;
            }
            (None, Some(signal)) => {
                let _ = handle
                    .exit_signal_request(
                        id,
                        process::signal_to_ssh(signal),
                        s.core_dumped(),
                        String::new(),
                        String::new(),
                    )
                    .await;
            }
            (None, None) => {}
        },
        None => tracing::debug!("cannot tell how the session's process ended"),
    }
    let _ = tx.eof().await;
    let _ = tx.close().await;
}

/// Waits until the client closes the channel, discarding what it sends meanwhile.
async fn until_closed(rx: &mut ChannelReadHalf) {
    while let Some(msg) = rx.wait().await {
        if matches!(msg, ChannelMsg::Close) {
            return;
        }
    }
}

/// Copies process output to the channel until end of file (a terminal reports EIO when the
/// last process holding it exits). With `exited`, stops once the terminal stays idle for
/// [`TERMINAL_DRAIN_IDLE`] after the shell exited.
async fn pump<R, W>(mut from: R, mut to: W, exited: Option<CancellationToken>)
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; PUMP_BUFFER];
    loop {
        let read = match &exited {
            Some(exited) if exited.is_cancelled() => {
                match tokio::time::timeout(TERMINAL_DRAIN_IDLE, from.read(&mut buf)).await {
                    Ok(r) => r,
                    Err(_) => break,
                }
            }
            Some(exited) => tokio::select! {
                r = from.read(&mut buf) => r,
                () = exited.cancelled() => continue,
            },
            None => from.read(&mut buf).await,
        };
        let n = match read {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.flush().await;
}
