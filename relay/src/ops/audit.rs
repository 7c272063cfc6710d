//! The audit log: one JSON object per line, appended to `DATA_DIR/audit.log` (or stdout).
//!
//! Lines are written synchronously under a lock, so an event is on its way to disk before
//! the action it records is answered. Events carry ids, addresses, roles and counts, never a
//! secret: no type here holds one. Refusals are aggregated before they get here
//! ([`crate::ops::refusals`]), so a flood writes a few lines, not one per connection.
//!
//! Rotation: the file is reopened on SIGUSR2 ([`AuditLog::reopen`]), so `logrotate` can
//! rename it and signal the relay (`docs/security.md` has a logrotate example). A write that fails (a full
//! disk) is logged once when the failures start and once when they end; the action it
//! records goes ahead, so live sessions keep working.

use std::fs::OpenOptions;
use std::io::{LineWriter, Write};
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Mutex;
use std::time::SystemTime;

use porthole_protocol::Service;
use serde::Serialize;

use crate::edge::visitor::guards::VisitorRefusal;
use crate::error::RelayError;
use crate::session::lifecycle::RevokeReason;

/// Something worth an audit line.
#[derive(Clone, Debug, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum AuditEvent {
    /// A session was created through the API.
    SessionCreated {
        /// Session.
        session_id: String,
        /// CI build.
        build_id: String,
        /// CI app.
        app_id: String,
        /// Public ports.
        ports: Vec<u16>,
    },
    /// An agent joined with the join token.
    SessionJoined {
        /// Session.
        session_id: String,
        /// The agent's address.
        agent_ip: IpAddr,
    },
    /// An agent resumed after a lost link.
    SessionResumed {
        /// Session.
        session_id: String,
        /// The agent's address.
        agent_ip: IpAddr,
    },
    /// Cluster mode: the agent resumed on this node after another node held its link (that
    /// node died, or the agent's link to it broke).
    SessionRehomed {
        /// Session.
        session_id: String,
        /// The node that held the link before.
        from_node: String,
        /// This node.
        to_node: String,
    },
    /// The build finished; the grace period started.
    SessionFinished {
        /// Session.
        session_id: String,
        /// `agent` or `api`.
        by: &'static str,
    },
    /// The session ended.
    SessionRevoked {
        /// Session.
        session_id: String,
        /// Why.
        reason: RevokeReason,
    },
    /// Instructions were handed to a user.
    InstructionsServed {
        /// Session.
        session_id: String,
        /// User id.
        sub: String,
        /// Roles.
        role: String,
        /// App in the token.
        app_id: String,
        /// Where the request came from.
        source_ip: IpAddr,
    },
    /// Instructions were refused.
    InstructionsDenied {
        /// Session asked for.
        session_id: String,
        /// User id, when the token was valid.
        sub: Option<String>,
        /// Roles, when the token was valid.
        role: Option<String>,
        /// App in the token, when valid.
        app_id: Option<String>,
        /// Where the request came from.
        source_ip: IpAddr,
        /// Why.
        reason: String,
    },
    /// A visitor was paired with the build machine.
    VisitorConnected {
        /// Session.
        session_id: String,
        /// Service.
        service: Service,
        /// Public port.
        port: u16,
        /// Visitor address.
        source_ip: IpAddr,
    },
    /// A visitor connection closed.
    VisitorClosed {
        /// Session.
        session_id: String,
        /// Service.
        service: Service,
        /// Public port.
        port: u16,
        /// Visitor address.
        source_ip: IpAddr,
        /// Bytes from the visitor to the build machine.
        bytes_in: u64,
        /// Bytes from the build machine to the visitor.
        bytes_out: u64,
        /// How long it lasted.
        duration_secs: f64,
    },
    /// A visitor was turned away: the first of its kind at once (`count` 1), repeats as one
    /// summary line per interval (`count` repeats in the last `summary_secs`); see
    /// [`crate::ops::refusals`].
    VisitorRefused {
        /// Session.
        session_id: String,
        /// Service.
        service: Service,
        /// Public port.
        port: u16,
        /// Visitor address (IPv6: its /64 in summaries); absent in a summary over many
        /// sources.
        #[serde(skip_serializing_if = "Option::is_none")]
        source_ip: Option<IpAddr>,
        /// Why.
        reason: VisitorRefusal,
        /// Refusals this line stands for.
        count: u64,
        /// Set on summary lines: the interval the count covers.
        #[serde(skip_serializing_if = "Option::is_none")]
        summary_secs: Option<u64>,
    },
}

#[derive(Serialize)]
struct Line<'a> {
    ts: String,
    #[serde(flatten)]
    event: &'a AuditEvent,
}

/// Where audit lines go.
pub struct AuditLog {
    /// The file's path (`-`: stdout).
    path: std::path::PathBuf,
    /// The open file or stdout.
    sink: Mutex<Box<dyn Write + Send>>,
    /// Whether the last write failed (so a full disk is reported once, not per line).
    failing: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AuditLog")
    }
}

impl AuditLog {
    /// Opens `path` for appending (created 0600), or stdout when `path` is `-`.
    pub fn open(path: &Path) -> Result<Self, RelayError> {
        Ok(Self {
            path: path.to_owned(),
            sink: Mutex::new(open_sink(path)?),
            failing: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Opens the file again at its path (after `logrotate` renamed it; SIGUSR2). On error the
    /// current file stays in use.
    pub fn reopen(&self) -> Result<(), RelayError> {
        if self.path == Path::new("-") {
            return Ok(());
        }
        let fresh = open_sink(&self.path)?;
        let mut sink = self.sink.lock().unwrap_or_else(|p| p.into_inner());
        let _ = sink.flush();
        *sink = fresh;
        Ok(())
    }

    /// Appends one event. A failed write is logged; it never fails the action it records.
    pub fn record(&self, event: AuditEvent) {
        let line = Line {
            ts: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
            event: &event,
        };
        let mut text = match serde_json::to_string(&line) {
            Ok(t) => t,
            Err(e) => return tracing::error!(error = %e, "cannot encode an audit event"),
        };
        text.push('\n');
        let mut sink = self.sink.lock().unwrap_or_else(|p| p.into_inner());
        let written = sink.write_all(text.as_bytes()).and_then(|()| sink.flush());
        drop(sink);
        let was_failing = self.failing.swap(written.is_err(), Ordering::Relaxed);
        match written {
            Err(e) if !was_failing => tracing::error!(path = %self.path.display(), error = %e,
                "cannot write the audit log (disk full?): audit lines are lost until it can be written again; sessions keep working"),
            Ok(()) if was_failing => {
                tracing::warn!(path = %self.path.display(), "the audit log can be written again")
            }
            _ => {}
        }
    }
}

/// The audit log's writer for `path` (`-`: stdout).
fn open_sink(path: &Path) -> Result<Box<dyn Write + Send>, RelayError> {
    if path == Path::new("-") {
        return Ok(Box::new(LineWriter::new(std::io::stdout())));
    }
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
        .map_err(|source| RelayError::File {
            path: path.to_owned(),
            source,
        })?;
    Ok(Box::new(LineWriter::new(file)))
}
