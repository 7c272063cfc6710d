//! The embedded SSH server (`--embedded-ssh`), for build machines without `sshd`: built on
//! `russh`, it speaks SSH directly on the visitor's data connection, so it needs no local
//! port.
//!
//! # Layout
//! - [`settings`]: one-time password, authorized keys, per-session host key, shell,
//!   working directory, environment and login timeout.
//! - [`handler`]: one connection's authentication and channel bookkeeping.
//! - [`session`]: a session channel's requests (pty, env, window size) until it starts.
//! - [`process`]: starting a shell or command on a pty or pipes; hanging it up.
//! - [`exec`]: a running shell or command on its channel (data, resize, signals, status).
//! - [`sftp`]: the SFTP subsystem (`sftp`, OpenSSH's `scp`).
//! - [`forward`]: `ssh -L` to services on the build machine.
//! - [`cut`]: a stream that fails once the connection must end.
//! - [`report`]: telling the relay that a visitor logged in.
//!
//! Everything runs as the agent's user; nothing changes privileges.

pub mod cut;
pub mod exec;
pub mod forward;
pub mod handler;
pub mod process;
pub mod report;
pub mod session;
pub mod settings;
pub mod sftp;

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use russh::server::Config;
use russh::{MethodKind, MethodSet, SshId};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use report::LoginReport;
pub use settings::{Options, Settings};

/// How often an idle client is asked whether it is still there.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// Unanswered keepalives before the connection is dropped.
const KEEPALIVE_MAX: usize = 4;
/// How long a closing connection's disconnect message may take.
const DISCONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long every refused login takes, whatever was wrong.
pub const AUTH_REJECTION_TIME: Duration = Duration::from_secs(1);
/// Failed authentication attempts per connection (OpenSSH's `MaxAuthTries`): the last one
/// closes the connection.
pub const MAX_AUTH_TRIES: usize = 6;

/// What a connection's tasks share.
#[derive(Debug)]
pub struct Shared {
    /// Settings.
    pub settings: Arc<Settings>,
    /// Channel tasks (the agent waits for them at shutdown).
    pub tasks: TaskTracker,
    /// Cancelled when the connection ends: its processes are hung up.
    pub cancel: CancellationToken,
    /// Cancelled once the client logged in.
    pub logged_in: CancellationToken,
    /// Cancelled once the client failed to log in [`MAX_AUTH_TRIES`] times: the connection
    /// is closed.
    pub auth_exhausted: CancellationToken,
}

/// The embedded SSH server of this agent run.
pub struct EmbeddedSsh {
    settings: Arc<Settings>,
    config: Arc<Config>,
}

impl std::fmt::Debug for EmbeddedSsh {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedSsh")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl EmbeddedSsh {
    /// A server with `settings`.
    pub fn new(settings: Settings) -> Self {
        let mut methods = MethodSet::empty();
        methods.push(MethodKind::Password);
        if settings.accepts_keys() {
            methods.push(MethodKind::PublicKey);
        }
        let config = Config {
            server_id: SshId::Standard(Cow::Owned(format!(
                "SSH-2.0-Porthole_{}",
                env!("CARGO_PKG_VERSION")
            ))),
            methods,
            auth_rejection_time: AUTH_REJECTION_TIME,
            // OpenSSH clients open with a "none" attempt to learn the methods.
            auth_rejection_time_initial: Some(Duration::ZERO),
            keys: vec![settings.host_key.clone()],
            // A backstop only: the handler counts failures itself and closes the connection
            // at the last one. russh counts the client's opening "none" attempt too (sshd
            // does not) and refuses only the attempt after its limit.
            max_auth_attempts: MAX_AUTH_TRIES + 1,
            // A developer's shell may sit idle for as long as the session lasts; keepalives
            // find dead clients instead.
            inactivity_timeout: None,
            keepalive_interval: Some(KEEPALIVE_INTERVAL),
            keepalive_max: KEEPALIVE_MAX,
            ..Config::default()
        };
        Self {
            settings: Arc::new(settings),
            config: Arc::new(config),
        }
    }

    /// Serves one SSH connection on `stream` until the client leaves or `cancel` fires;
    /// then hangs up every process the connection started. `login`, when given, is sent
    /// once the client logs in.
    pub async fn serve<S>(
        &self,
        stream: S,
        cancel: &CancellationToken,
        tasks: &TaskTracker,
        login: Option<LoginReport>,
    ) where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let shared = Arc::new(Shared {
            settings: self.settings.clone(),
            tasks: tasks.clone(),
            cancel: cancel.child_token(),
            logged_in: CancellationToken::new(),
            auth_exhausted: CancellationToken::new(),
        });
        let handler = handler::Connection::new(shared.clone(), self.config.methods.clone(), login);
        // Whatever happens below, the connection ends with this function.
        let cut = CancellationToken::new();
        let _cut_at_end = cut.clone().drop_guard();
        let stream = cut::Cut::new(stream, cut.clone());
        let login_deadline = async {
            tokio::time::sleep(shared.settings.login_timeout).await;
            if shared.logged_in.is_cancelled() {
                std::future::pending::<()>().await;
            }
        };
        tokio::pin!(login_deadline);
        let start = russh::server::run_stream(self.config.clone(), stream, handler);
        let running = tokio::select! {
            r = start => r,
            () = &mut login_deadline => {
                tracing::info!("embedded ssh: no SSH handshake in time");
                return;
            }
            () = cancel.cancelled() => return,
        };
        let running = match running {
            Ok(running) => running,
            Err(e) => {
                tracing::info!(error = %e, "embedded ssh: handshake failed");
                return;
            }
        };
        let handle = running.handle();
        let why = tokio::select! {
            r = running => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "embedded ssh: connection ended");
                }
                None
            }
            () = &mut login_deadline => Some((true, "no login in time")),
            // The session task waits in the handler, which answers the last failed login
            // with this: no disconnect message can get out first, the connection is cut.
            () = shared.auth_exhausted.cancelled() => Some((false, "too many authentication failures")),
            () = cancel.cancelled() => Some((true, "the remote access session ended")),
        };
        if let Some((tell, why)) = why {
            tracing::info!("embedded ssh: closing a connection: {why}");
            if tell {
                let bye =
                    handle.disconnect(russh::Disconnect::ByApplication, why.into(), "en".into());
                let _ = tokio::time::timeout(DISCONNECT_TIMEOUT, bye).await;
                // Let the session task send it before its stream is cut.
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        shared.cancel.cancel();
    }
}
