//! `porthole-agent`: runs on the CI build machine, dials out to the relay over TLS, and
//! connects visitors to local services (SSH, VNC).
//!
//! # Layout
//! - [`config`]: flags and `PORTHOLE_*` variables.
//! - [`resolve`]: the flags checked, defaults filled in, credentials gathered: [`Resolved`].
//! - [`credentials`]: user names, passwords (from files) and SSH host keys for the relay.
//! - [`error`]: [`AgentError`], and which errors are worth retrying.
//! - [`events`]: what the agent reports for the build log ([`AgentEvent`], [`Reporter`]).
//! - [`print`](mod@print): those events, and the remote access instructions, as build-log lines.
//! - [`status`]: what the running agent knows about its session ([`status::Status`]),
//!   shared by the control link and the local control socket.
//! - [`link`]: dialing the relay (TCP + verified TLS 1.3).
//! - [`control`]: one control connection: register, heartbeats, open, finish, revoked.
//! - [`visitor`]: one visitor: dial the local service, attach, forward.
//! - [`embedded_ssh`]: the agent's own SSH server (`--embedded-ssh`), served on data
//!   connections.
//! - [`warm`]: warm data connections parked on the relay, handed to visitors at once.
//! - [`pidfile`]: the `--pid-file` (created exclusively, stale ones replaced) and the
//!   check that `finish` signals a porthole-agent.
//! - [`local`]: the local control socket next to the pid file (`status`, `finish`, `wait`:
//!   line-delimited JSON), its server in the agent and its client in the subcommands.
//! - [`early_end`]: `finish --wait-if-nobody-connected`: ends an unvisited session early.
//! - [`detach`]: `--detach`: the agent re-executed in the background, started once it
//!   registered.
//! - [`exit`]: the documented exit codes of the subcommands.
//! - [`prefixed`]: a stream that first yields bytes a frame decoder read ahead.
//! - [`backoff`]: jittered exponential reconnect delays that reset after a healthy link.
//!
//! [`run`] keeps the agent registered until the session is revoked (reconnecting and
//! resuming after lost links) and returns why it ended; [`run_with`] does the same with the
//! controls the binary wires to signals and the local socket.

// The layout above links modules that are crate-private (`pub(crate)`: no other crate
// needs them); `cargo doc --document-private-items` follows those links.
#![allow(rustdoc::private_intra_doc_links)]

pub(crate) mod backoff;
pub mod config;
pub(crate) mod control;
pub(crate) mod credentials;
pub mod detach;
pub(crate) mod early_end;
pub(crate) mod embedded_ssh;
pub(crate) mod error;
pub mod events;
pub mod exit;
pub(crate) mod link;
pub mod local;
pub mod pidfile;
pub(crate) mod prefixed;
pub mod print;
pub(crate) mod resolve;
pub mod status;
pub(crate) mod visitor;
pub(crate) mod warm;

use std::sync::Arc;

pub use config::AgentConfig;
pub use error::AgentError;
pub use events::{AgentEvent, Reporter};
pub use resolve::Resolved;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::backoff::{Backoff, HEALTHY_AFTER};
use crate::control::{Credentials, LinkEnd, Signals};
use crate::link::Dialer;
use crate::status::{State, StatusCell};

/// Data connections the agent opens at once, each held until its first frame is sent. The
/// relay allows 64 pending handshakes per address and counts a connection until it has
/// *read* that frame, which a busy relay may do late: 16 leaves room for that backlog, the
/// control link and resumes (at 32, a burst of 200 visitors on a loaded 2-core machine got
/// a few data connections refused at the cap).
pub const MAX_CONCURRENT_DIALS: usize = 16;

/// What every agent task shares.
pub struct Context {
    /// Settings.
    pub config: Resolved,
    /// Dials the relay.
    pub dialer: Dialer,
    /// Cancelled at shutdown.
    pub cancel: CancellationToken,
    /// Visitor tasks.
    pub tasks: TaskTracker,
    /// Data-connection handshakes in flight: a burst of visitors queues here instead of
    /// exceeding the relay's per-address cap on pending handshakes.
    pub dials: tokio::sync::Semaphore,
    /// What the agent knows about its session (for the local control socket).
    pub status: StatusCell,
    /// Where events go.
    reporter: Box<dyn Reporter>,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("relays", &self.config.relays)
            .finish_non_exhaustive()
    }
}

impl Context {
    /// Reports an event.
    pub fn report(&self, event: AgentEvent) {
        self.reporter.report(&event);
    }
}

/// How the agent ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The relay revoked the session (deadline, API, ...).
    Revoked(String),
    /// Shutdown was requested.
    Shutdown,
}

/// What the agent is told from outside, and where it publishes what it knows.
#[derive(Debug)]
pub struct Controls {
    /// Turning true tells the relay the build finished (also after a reconnect).
    pub finished: watch::Receiver<bool>,
    /// Turning true asks the relay to end the session now (`end`; only relays that said
    /// `accepts_end` get it; the relay refuses while a visitor is connected).
    pub end: watch::Receiver<bool>,
    /// Updated as the session goes; ends as [`status::EndKind::Revoked`] when revoked.
    pub status: StatusCell,
}

/// Runs the agent until the session is revoked, shutdown is requested, or a fatal error.
/// `finished` turning true tells the relay the build finished (also after a reconnect).
pub async fn run(
    config: Resolved,
    reporter: Box<dyn Reporter>,
    finished: watch::Receiver<bool>,
    cancel: CancellationToken,
) -> Result<Outcome, AgentError> {
    let (_end, end) = watch::channel(false);
    let status = StatusCell::new(std::process::id());
    let controls = Controls {
        finished,
        end,
        status,
    };
    run_with(config, reporter, controls, cancel).await
}

/// [`run`] with every control: the build finished, the early end, and the status.
pub async fn run_with(
    config: Resolved,
    reporter: Box<dyn Reporter>,
    controls: Controls,
    cancel: CancellationToken,
) -> Result<Outcome, AgentError> {
    let Controls {
        finished,
        end,
        status,
    } = controls;
    let mut signals = Signals { finished, end };
    let tls = porthole_protocol::tls::client_config(&config.trust)
        .map_err(|e| AgentError::Config(e.to_string()))?;
    let dialer = Dialer::new(
        config.relays.clone(),
        &config.server_name,
        tls,
        config.connect_timeout,
    )?;
    let mut creds = Credentials::Join(config.token.clone());
    let ctx = Arc::new(Context {
        config,
        dialer,
        cancel,
        tasks: TaskTracker::new(),
        dials: tokio::sync::Semaphore::new(MAX_CONCURRENT_DIALS),
        status,
        reporter,
    });
    let mut backoff = Backoff::default();
    let outcome = loop {
        let mut registered_at = None;
        let result = control::run(&ctx, &mut creds, &mut signals, &mut registered_at).await;
        if registered_at.is_some_and(|t| t.elapsed() >= HEALTHY_AFTER) {
            backoff.reset();
        }
        let error = match result {
            Ok(LinkEnd::Revoked(reason)) => {
                ctx.status.end(status::EndKind::Revoked, reason.clone());
                ctx.report(AgentEvent::Revoked {
                    reason: reason.clone(),
                });
                break Ok(Outcome::Revoked(reason));
            }
            Ok(LinkEnd::Shutdown) => break Ok(Outcome::Shutdown),
            // A session revoked while the agent was away: the normal end, seen late.
            Err(AgentError::Refused {
                code: porthole_protocol::ErrorCode::SessionRevoked,
                message,
            }) if matches!(creds, Credentials::Resume(..)) => {
                ctx.status.end(status::EndKind::Revoked, message.clone());
                ctx.report(AgentEvent::Revoked {
                    reason: message.clone(),
                });
                break Ok(Outcome::Revoked(message));
            }
            Err(e) if e.is_retryable() => {
                if matches!(
                    e,
                    AgentError::Refused {
                        code: porthole_protocol::ErrorCode::SessionBusy
                            | porthole_protocol::ErrorCode::ShuttingDown,
                        ..
                    }
                ) {
                    // A relay cluster: another node may hold (or take) the session.
                    ctx.dialer.next_relay();
                }
                e
            }
            Err(e) => break Err(e),
        };
        let busy = matches!(
            error,
            AgentError::Refused {
                code: porthole_protocol::ErrorCode::SessionBusy,
                ..
            }
        );
        let delay = if busy {
            backoff.busy_delay()
        } else {
            backoff.next_delay()
        };
        ctx.status.update(|s| {
            if s.state != State::Connecting {
                s.state = State::Reconnecting;
            }
            s.last_error = Some(error.to_string());
        });
        ctx.report(AgentEvent::Reconnecting {
            error: error.to_string(),
            retry_in_ms: delay.as_millis() as u64,
        });
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = ctx.cancel.cancelled() => break Ok(Outcome::Shutdown),
        }
    };
    match &outcome {
        Ok(Outcome::Shutdown) => ctx
            .status
            .end(status::EndKind::Stopped, "the agent was stopped".into()),
        Err(e) => ctx.status.end(status::EndKind::Failed, e.to_string()),
        Ok(Outcome::Revoked(_)) => {}
    }
    ctx.cancel.cancel();
    ctx.tasks.close();
    ctx.tasks.wait().await;
    outcome
}
