//! The agent's side of the control socket: accepts same-user clients and answers `status`,
//! `finish` and `wait`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::socket::LocalSocket;
use super::wire::{line, Reply, Request, MAX_REQUEST};
use crate::events::SharedReporter;
use crate::status::{Status, StatusCell};

/// A client must send its request within this.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// `finish` waits this long for the relay to confirm the grace period before answering.
const FINISH_ACK: Duration = Duration::from_secs(5);
/// Pause after a failed `accept` (e.g. out of file descriptors).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// What the server acts on.
#[derive(Clone, Debug)]
pub struct Handles {
    /// The agent's status (read, and `finish_requested` set).
    pub status: StatusCell,
    /// Set to true by `finish` (the same latch SIGUSR1 sets).
    pub finished: watch::Sender<bool>,
    /// Set to true by the early end (`--wait-if-nobody-connected`).
    pub end: watch::Sender<bool>,
    /// Where notices go (the agent's log).
    pub reporter: SharedReporter,
}

/// The running server; the socket file goes when it is dropped.
#[derive(Debug)]
pub struct Server {
    cancel: CancellationToken,
    tasks: TaskTracker,
    _socket: LocalSocket,
}

impl Server {
    /// Serves `listener` (bound by [`LocalSocket::bind`]). Call within the runtime.
    pub fn start(
        socket: LocalSocket,
        listener: std::os::unix::net::UnixListener,
        handles: Handles,
    ) -> Result<Self, String> {
        let shown = socket.path().display().to_string();
        listener
            .set_nonblocking(true)
            .and_then(|()| UnixListener::from_std(listener))
            .map(|listener| {
                let cancel = CancellationToken::new();
                let tasks = TaskTracker::new();
                let armed = Arc::new(AtomicBool::new(false));
                tasks.spawn(accept(
                    listener,
                    handles,
                    armed,
                    cancel.clone(),
                    tasks.clone(),
                ));
                Self {
                    cancel,
                    tasks,
                    _socket: socket,
                }
            })
            .map_err(|e| format!("cannot serve the control socket {shown}: {e}"))
    }

    /// Stops accepting and gives `wait` clients up to `flush` to receive the final status
    /// (set it ended first).
    pub async fn shutdown(self, flush: Duration) {
        self.cancel.cancel();
        self.tasks.close();
        if tokio::time::timeout(flush, self.tasks.wait())
            .await
            .is_err()
        {
            tracing::debug!("control socket clients still busy at exit");
        }
    }
}

async fn accept(
    listener: UnixListener,
    handles: Handles,
    armed: Arc<AtomicBool>,
    cancel: CancellationToken,
    tasks: TaskTracker,
) {
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    tasks.spawn(serve(stream, handles.clone(), armed.clone(), cancel.clone()));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "control socket accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            },
        }
    }
}

/// Whether the peer runs as this user (or root).
fn same_user(stream: &UnixStream) -> bool {
    let me = nix::unistd::geteuid().as_raw();
    stream
        .peer_cred()
        .is_ok_and(|cred| cred.uid() == me || cred.uid() == 0)
}

async fn serve(
    stream: UnixStream,
    handles: Handles,
    armed: Arc<AtomicBool>,
    cancel: CancellationToken,
) {
    let allowed = same_user(&stream);
    let (read, mut write) = stream.into_split();
    if !allowed {
        let refused = Reply::Error {
            message: "the agent answers only its own user".into(),
        };
        let _ = write.write_all(line(&refused).as_bytes()).await;
        return;
    }
    let mut read = BufReader::new(read);
    loop {
        let request = tokio::select! {
            () = cancel.cancelled() => return,
            got = tokio::time::timeout(REQUEST_TIMEOUT, read_request(&mut read)) => match got {
                Ok(Ok(Some(request))) => request,
                Ok(Ok(None)) | Err(_) => return,
                Ok(Err(message)) => {
                    let _ = write.write_all(line(&Reply::Error { message }).as_bytes()).await;
                    return;
                }
            },
        };
        let reply = match request {
            Request::Status => Reply::Status {
                status: handles.status.get(),
            },
            Request::Finish {
                wait_if_nobody_connected_ms,
            } => {
                let within = wait_if_nobody_connected_ms.map(Duration::from_millis);
                Reply::Finished {
                    status: finish(&handles, within, &armed, &cancel).await,
                }
            }
            Request::Wait => {
                stream_status(&handles.status, &mut write).await;
                return;
            }
        };
        if write.write_all(line(&reply).as_bytes()).await.is_err() {
            return;
        }
    }
}

/// One request line: `Ok(None)` at end of stream, `Err` for a bad or oversized line.
async fn read_request<R: AsyncRead + Unpin>(
    read: &mut BufReader<R>,
) -> Result<Option<Request>, String> {
    let mut text = String::new();
    let n = (&mut *read)
        .take(MAX_REQUEST as u64 + 1)
        .read_line(&mut text)
        .await
        .map_err(|e| format!("cannot read the request: {e}"))?;
    if n == 0 {
        return Ok(None);
    }
    if n > MAX_REQUEST {
        return Err(format!("request longer than {MAX_REQUEST} bytes"));
    }
    serde_json::from_str(text.trim_end())
        .map(Some)
        .map_err(|e| format!("bad request: {e}"))
}

/// `finish`: sets the latch, arms the early end (once), and waits a little for the relay to
/// confirm the grace period.
async fn finish(
    handles: &Handles,
    within: Option<Duration>,
    armed: &AtomicBool,
    cancel: &CancellationToken,
) -> Status {
    let mut rx = handles.status.subscribe();
    handles.status.update(|s| s.finish_requested = true);
    handles.finished.send_replace(true);
    if let Some(within) = within {
        if armed.swap(true, Ordering::SeqCst) {
            handles.status.notice(
                "already waiting for a user before ending the session early: ignoring the \
                 second --wait-if-nobody-connected"
                    .into(),
            );
        } else {
            tokio::spawn(crate::early_end::run(
                handles.status.clone(),
                within,
                handles.end.clone(),
                handles.reporter.clone(),
            ));
        }
    }
    tokio::select! {
        () = cancel.cancelled() => {}
        _ = tokio::time::timeout(FINISH_ACK, rx.wait_for(|s| s.finishing || s.end.is_some())) => {}
    }
    handles.status.get()
}

/// `wait`: every notice, then the status now and at each change (notices aside), until the
/// session ended or the client went away.
async fn stream_status<W: AsyncWriteExt + Unpin>(status: &StatusCell, write: &mut W) {
    let mut rx = status.subscribe();
    let mut last: Option<Status> = None;
    let mut notices_sent = 0;
    loop {
        let now = rx.borrow_and_update().clone();
        let mut text = String::new();
        for message in now.notices.iter().skip(notices_sent) {
            text.push_str(&line(&Reply::Notice {
                message: message.clone(),
            }));
        }
        notices_sent = now.notices.len();
        let shown = Status {
            notices: Vec::new(),
            ..now
        };
        if last.as_ref() != Some(&shown) {
            text.push_str(&line(&Reply::Status {
                status: shown.clone(),
            }));
        }
        if !text.is_empty() && write.write_all(text.as_bytes()).await.is_err() {
            return;
        }
        if shown.end.is_some() {
            let _ = write.flush().await;
            return;
        }
        last = Some(shown);
        if rx.changed().await.is_err() {
            return;
        }
    }
}
