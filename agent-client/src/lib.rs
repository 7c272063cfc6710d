//! `porthole-agent`: runs on the CI build machine, dials out to the relay over TLS, and
//! connects visitors to local services (SSH, VNC).
//!
//! # Layout
//! - [`config`]: flags and `PORTHOLE_*` variables, checked into [`config::Resolved`].
//! - [`credentials`]: user names, passwords (from files) and SSH host keys for the relay.
//! - [`error`]: [`AgentError`], and which errors are worth retrying.
//! - [`events`]: what the agent reports for the build log ([`AgentEvent`], [`Reporter`]).
//! - [`link`]: dialing the relay (TCP + verified TLS 1.3).
//! - [`control`]: one control connection: register, heartbeats, open, finish, revoked.
//! - [`visitor`]: one visitor: dial the local service, attach, forward.
//! - [`embedded_ssh`]: the agent's own SSH server (`--embedded-ssh`), served on data
//!   connections.
//! - [`warm`]: warm data connections parked on the relay, handed to visitors at once.
//! - [`pidfile`]: the `--pid-file` (created exclusively, stale ones replaced) and the
//!   check that `finish` signals a porthole-agent.
//! - [`prefixed`]: a stream that first yields bytes a frame decoder read ahead.
//! - [`backoff`]: jittered exponential reconnect delays that reset after a healthy link.
//!
//! [`run`] keeps the agent registered until the session is revoked (reconnecting and
//! resuming after lost links) and returns why it ended.

pub mod backoff;
pub mod config;
pub mod control;
pub mod credentials;
pub mod embedded_ssh;
pub mod error;
pub mod events;
pub mod link;
pub mod pidfile;
pub mod prefixed;
pub mod visitor;
pub mod warm;

use std::sync::Arc;

pub use config::{AgentConfig, Resolved};
pub use error::AgentError;
pub use events::{AgentEvent, Reporter};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::backoff::{Backoff, HEALTHY_AFTER};
use crate::control::{Credentials, LinkEnd};
use crate::link::Dialer;

/// Data connections the agent opens at once (the relay allows 64 pending handshakes per
/// address; the control link and resumes need some of them).
pub const MAX_CONCURRENT_DIALS: usize = 32;

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
    /// Where events go.
    reporter: Box<dyn Reporter>,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("relay", &self.config.relay)
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

/// Runs the agent until the session is revoked, shutdown is requested, or a fatal error.
/// `finished` turning true tells the relay the build finished (also after a reconnect).
pub async fn run(
    config: Resolved,
    reporter: Box<dyn Reporter>,
    mut finished: watch::Receiver<bool>,
    cancel: CancellationToken,
) -> Result<Outcome, AgentError> {
    let tls = porthole_protocol::tls::client_config(&config.trust)
        .map_err(|e| AgentError::Config(e.to_string()))?;
    let dialer = Dialer::new(
        config.relay.clone(),
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
        reporter,
    });
    let mut backoff = Backoff::default();
    let outcome = loop {
        let mut registered_at = None;
        let result = control::run(&ctx, &mut creds, &mut finished, &mut registered_at).await;
        if registered_at.is_some_and(|t| t.elapsed() >= HEALTHY_AFTER) {
            backoff.reset();
        }
        let error = match result {
            Ok(LinkEnd::Revoked(reason)) => {
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
                ctx.report(AgentEvent::Revoked {
                    reason: message.clone(),
                });
                break Ok(Outcome::Revoked(message));
            }
            Err(e) if e.is_retryable() => e,
            Err(e) => break Err(e),
        };
        let delay = backoff.next_delay();
        ctx.report(AgentEvent::Reconnecting {
            error: error.to_string(),
            retry_in_ms: delay.as_millis() as u64,
        });
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = ctx.cancel.cancelled() => break Ok(Outcome::Shutdown),
        }
    };
    ctx.cancel.cancel();
    ctx.tasks.close();
    ctx.tasks.wait().await;
    outcome
}
