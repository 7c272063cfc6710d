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
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::process::{self, dimension, Io, Request, Spawned};
use super::Shared;

/// Output read per turn.
const PUMP_BUFFER: usize = 32 * 1024;
/// Channel data messages (at most 32 KiB each) queued for a process that does not read its
/// input: 2048 = 64 MiB. Past that the channel waits for the process.
const INPUT_QUEUE: usize = 2048;
/// After a terminal's shell exits, its output is still forwarded for at most this long.
const DRAIN_LIMIT: Duration = Duration::from_secs(2);
/// After a terminal's shell exits, its output is read until the terminal is idle this
/// long (or [`DRAIN_LIMIT`]): background jobs may keep the terminal open, and a session
/// must still end.
const TERMINAL_DRAIN_IDLE: Duration = Duration::from_millis(250);
/// `shell -c` exit status when the shell cannot be started (as POSIX shells report it).
const CANNOT_START: u32 = 127;

/// Where the input task writes.
enum Sink {
    Terminal(OwnedWritePty),
    Pipe(ChildStdin),
}

impl Sink {
    /// One write (cancel-safe: nothing is written unless it returns).
    async fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        match self {
            Self::Terminal(w) => w.write(data).await,
            Self::Pipe(w) => w.write(data).await,
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

/// Writes channel data to the process on its own task, so the channel keeps being read
/// (russh's only flow control is the channel's message queue: a session loop blocked on a
/// full queue would stop reading the client's window adjustments, and output waiting for
/// window would never move again). Bounded by [`INPUT_QUEUE`] messages. Window size changes
/// go ahead of queued data, even while a write waits for the terminal.
async fn write_input(
    mut sink: Sink,
    mut queue: mpsc::Receiver<bytes::Bytes>,
    mut size: watch::Receiver<(u16, u16)>,
) {
    loop {
        let data = tokio::select! {
            biased;
            Ok(()) = size.changed() => {
                let (rows, cols) = *size.borrow_and_update();
                sink.resize(rows, cols);
                continue;
            }
            data = queue.recv() => match data {
                Some(data) => data,
                None => break,
            },
        };
        let mut written = 0;
        while written < data.len() {
            tokio::select! {
                biased;
                Ok(()) = size.changed() => {
                    let (rows, cols) = *size.borrow_and_update();
                    sink.resize(rows, cols);
                }
                n = sink.write(&data[written..]) => match n {
                    Ok(0) | Err(_) => return,
                    Ok(n) => written += n,
                },
            }
        }
    }
    // Dropping a pipe's writer is the process's end of input.
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
    let (input_tx, input_rx) = mpsc::channel(INPUT_QUEUE);
    let first_size = request
        .terminal
        .as_ref()
        .map_or((24, 80), |t| (t.rows, t.cols));
    let (size_tx, size_rx) = watch::channel(first_size);
    let cancel = shared.cancel.clone();
    let (sink, mut pumps): (Sink, Vec<JoinHandle<()>>) = match io {
        Io::Pty { output, input } => (
            Sink::Terminal(input),
            vec![shared.tasks.spawn(pump(
                output,
                tx.make_writer(),
                Some(exited.clone()),
                cancel.clone(),
            ))],
        ),
        Io::Pipes {
            stdin,
            stdout,
            stderr,
        } => (
            Sink::Pipe(stdin),
            vec![
                shared
                    .tasks
                    .spawn(pump(stdout, tx.make_writer(), None, cancel.clone())),
                shared.tasks.spawn(pump(
                    stderr,
                    tx.make_writer_ext(Some(1)),
                    None,
                    cancel.clone(),
                )),
            ],
        ),
    };
    let writer = shared.tasks.spawn(write_input(sink, input_rx, size_rx));
    let mut input = Some(input_tx);
    let mut size = request.terminal.as_ref().map(|t| (t.rows, t.cols));
    let terminal = request.terminal.is_some();
    let abort_all = |pumps: &[JoinHandle<()>]| {
        writer.abort();
        pumps.iter().for_each(JoinHandle::abort);
    };
    let status: Option<ExitStatus> = 'run: loop {
        tokio::select! {
            status = child.wait() => break status.ok(),
            msg = rx.wait() => match msg {
                Some(ChannelMsg::Data { data }) => {
                    if let Some(queue) = &input {
                        // A full queue (the process is not reading) holds the channel, but
                        // never hides the process's exit.
                        tokio::select! {
                            r = queue.send(data) => if r.is_err() { input = None },
                            status = child.wait() => break 'run status.ok(),
                            () = shared.cancel.cancelled() => {}
                        }
                    }
                }
                // A terminal has no end of input; a pipe closes once its queue is written.
                Some(ChannelMsg::Eof) if !terminal => input = None,
                Some(ChannelMsg::WindowChange { col_width, row_height, .. }) => {
                    if let Some((rows, cols)) = size.as_mut() {
                        *rows = dimension(row_height, *rows);
                        *cols = dimension(col_width, *cols);
                        let _ = size_tx.send((*rows, *cols));
                    }
                }
                Some(ChannelMsg::Signal { signal }) => {
                    if let Some(signal) = process::signal_from_ssh(&signal) {
                        process::signal_group(group, signal);
                    }
                }
                Some(ChannelMsg::Close) | None => {
                    // The client is gone: nothing more to tell it.
                    abort_all(&pumps);
                    process::hang_up(&mut child, group, terminal).await;
                    return;
                }
                Some(_) => {}
            },
            () = shared.cancel.cancelled() => {
                abort_all(&pumps);
                process::hang_up(&mut child, group, terminal).await;
                return;
            }
        }
    };
    exited.cancel();
    drop(input);
    let drained = async {
        for pump in pumps.iter_mut() {
            let _ = pump.await;
        }
    };
    // A command's output is forwarded to its end, however slow the client (as OpenSSH
    // does); a terminal's for at most DRAIN_LIMIT, since jobs may hold it open for ever.
    let limit = async {
        if terminal {
            tokio::time::sleep(DRAIN_LIMIT).await
        } else {
            std::future::pending().await
        }
    };
    tokio::select! {
        () = drained => {}
        () = until_closed(&mut rx) => {}
        () = shared.cancel.cancelled() => {
            // Jobs may still hold its output: they end with the session too.
            abort_all(&pumps);
            process::hang_up(&mut child, group, terminal).await;
        }
        () = limit => {}
    }
    abort_all(&pumps);
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
async fn pump<R, W>(from: R, to: W, exited: Option<CancellationToken>, cancel: CancellationToken)
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    tokio::select! {
        () = copy_output(from, to, exited) => {}
        () = cancel.cancelled() => {}
    }
}

async fn copy_output<R, W>(mut from: R, mut to: W, exited: Option<CancellationToken>)
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
