//! The subcommands' side of the control socket (blocking).

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::socket_path;
use super::wire::{line, Reply, Request, MAX_REPLY};

/// Why talking to the agent failed.
#[derive(Debug, PartialEq, Eq)]
pub enum ClientError {
    /// No agent runs for this pid file (no socket, or nobody listens on it).
    NoAgent(String),
    /// No answer in time.
    TimedOut,
    /// Anything else.
    Other(String),
}

impl std::fmt::Display for ClientError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientError::NoAgent(message) | ClientError::Other(message) => f.write_str(message),
            ClientError::TimedOut => f.write_str("the agent did not answer in time"),
        }
    }
}

/// A connection to a running agent's control socket.
#[derive(Debug)]
pub struct Client {
    read: BufReader<UnixStream>,
    write: UnixStream,
    path: PathBuf,
}

impl Client {
    /// Connects to the control socket of the agent whose pid file is `pid_file`. The socket
    /// must belong to this user (or root).
    pub fn connect(pid_file: &Path) -> Result<Self, ClientError> {
        let path = socket_path(pid_file);
        let shown = path.display();
        let no_agent = |why: &str| {
            ClientError::NoAgent(format!(
                "no porthole-agent is running for pid file {} ({why}; pass the agent's \
                 --pid-file)",
                pid_file.display()
            ))
        };
        let meta = match std::fs::symlink_metadata(&path) {
            Ok(meta) => meta,
            Err(e) if e.kind() == ErrorKind::NotFound => {
                return Err(no_agent(&format!("no control socket {shown}")))
            }
            Err(e) => return Err(ClientError::Other(format!("cannot inspect {shown}: {e}"))),
        };
        if !meta.file_type().is_socket() {
            return Err(ClientError::Other(format!("{shown} is not a socket")));
        }
        let me = nix::unistd::geteuid().as_raw();
        if meta.uid() != me && meta.uid() != 0 {
            return Err(ClientError::Other(format!(
                "{shown} belongs to another user (uid {}): not talking to it",
                meta.uid()
            )));
        }
        let stream = match UnixStream::connect(&path) {
            Ok(stream) => stream,
            Err(e) if matches!(e.kind(), ErrorKind::ConnectionRefused | ErrorKind::NotFound) => {
                return Err(no_agent(&format!("nobody listens on {shown}")))
            }
            Err(e) => {
                return Err(ClientError::Other(format!(
                    "cannot connect to {shown}: {e}"
                )))
            }
        };
        let write = stream
            .try_clone()
            .map_err(|e| ClientError::Other(format!("{shown}: {e}")))?;
        Ok(Self {
            read: BufReader::new(stream),
            write,
            path,
        })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Sends one request.
    pub fn send(&mut self, request: &Request) -> Result<(), ClientError> {
        self.write
            .write_all(line(request).as_bytes())
            .map_err(|e| ClientError::Other(format!("cannot talk to the agent: {e}")))
    }

    /// The next answer line; `Ok(None)` when the agent closed the connection. `timeout`
    /// bounds the wait (`None`: wait as long as it takes).
    pub fn next(&mut self, timeout: Option<Duration>) -> Result<Option<Reply>, ClientError> {
        // A zero timeout means "none" to the socket: keep at least a millisecond.
        let timeout = timeout.map(|t| t.max(Duration::from_millis(1)));
        self.read
            .get_ref()
            .set_read_timeout(timeout)
            .map_err(|e| ClientError::Other(e.to_string()))?;
        let mut text = String::new();
        let n = match (&mut self.read)
            .take(MAX_REPLY as u64 + 1)
            .read_line(&mut text)
        {
            Ok(n) => n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return Err(ClientError::TimedOut)
            }
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return Ok(None),
            Err(e) => return Err(ClientError::Other(format!("reading from the agent: {e}"))),
        };
        if n == 0 {
            return Ok(None);
        }
        if n > MAX_REPLY || !text.ends_with('\n') {
            return Err(ClientError::Other("the agent sent a broken answer".into()));
        }
        serde_json::from_str(text.trim_end())
            .map(Some)
            .map_err(|e| ClientError::Other(format!("the agent sent a bad answer: {e}")))
    }

    /// Sends `request` and reads one answer within `timeout`.
    pub fn ask(&mut self, request: &Request, timeout: Duration) -> Result<Reply, ClientError> {
        self.send(request)?;
        match self.next(Some(timeout))? {
            Some(Reply::Error { message }) => Err(ClientError::Other(format!(
                "the agent refused the request: {message}"
            ))),
            Some(reply) => Ok(reply),
            None => Err(ClientError::Other(
                "the agent closed the connection without answering".into(),
            )),
        }
    }
}
