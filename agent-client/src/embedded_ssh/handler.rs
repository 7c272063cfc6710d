//! One SSH connection's `russh` handler: authentication, channel opens (each channel gets
//! its own task) and the answers to channel requests.

use std::collections::HashMap;
use std::sync::Arc;

use russh::keys::ssh_key;
use russh::server::{Auth, ChannelOpenHandle, Msg, PublicKeyOffer, Session, VerifiedPublicKey};
use russh::{Channel, ChannelId, ChannelOpenFailure, MethodSet};
use tokio::sync::Semaphore;

use super::process::Request;
use super::report::LoginReport;
use super::{forward, session, sftp, Shared, AUTH_REJECTION_TIME, MAX_AUTH_TRIES};

/// Session channels (shells, commands, SFTP) one connection may hold open, as OpenSSH's
/// default `MaxSessions`.
pub const MAX_SESSIONS: usize = 10;
/// `ssh -L` channels one connection may hold open.
pub const MAX_FORWARDS: usize = 256;

/// The handler of one connection.
#[derive(Debug)]
pub struct Connection {
    shared: Arc<Shared>,
    methods: MethodSet,
    /// `env` requests per channel, as the channel tasks record them.
    env: HashMap<ChannelId, Request>,
    sessions: Arc<Semaphore>,
    forwards: Arc<Semaphore>,
    /// Sent at the first successful login, if the relay takes such reports.
    login: Option<LoginReport>,
    /// Failed password and key logins so far. Keys declined when offered do not count: a
    /// client may offer several before its password.
    failures: usize,
}

impl Connection {
    /// A handler for a new connection; `login` is sent once the client logs in.
    pub fn new(shared: Arc<Shared>, methods: MethodSet, login: Option<LoginReport>) -> Self {
        Self {
            shared,
            methods,
            login,
            failures: 0,
            env: HashMap::new(),
            sessions: Arc::new(Semaphore::new(MAX_SESSIONS)),
            forwards: Arc::new(Semaphore::new(MAX_FORWARDS)),
        }
    }

    /// A refusal that keeps every method on offer, so a mistyped password can be retried
    /// (russh's plain `Auth::reject()` withdraws the method that failed).
    fn reject(&self) -> Auth {
        Auth::Reject {
            proceed_with_methods: Some(self.methods.clone()),
            partial_success: false,
        }
    }

    /// Counts a failed login. Before the [`MAX_AUTH_TRIES`]-th it is answered with every
    /// method still on offer; the last one is not answered: the connection is closed after
    /// the same delay as any refusal. So, as with sshd's `MaxAuthTries`, the last try is a
    /// real one and no prompt follows it (OpenSSH prompts again on any answer before it
    /// reads a disconnect, even on one that lists no method: it then falls back to its own).
    async fn failed(&mut self) -> Result<Auth, russh::Error> {
        self.failures += 1;
        if self.failures < MAX_AUTH_TRIES {
            return Ok(self.reject());
        }
        tokio::time::sleep(AUTH_REJECTION_TIME).await;
        self.shared.auth_exhausted.cancel();
        // The connection's `serve` closes it, then cancels this.
        self.shared.cancel.cancelled().await;
        Err(russh::Error::Disconnect)
    }
}

impl russh::server::Handler for Connection {
    type Error = russh::Error;

    async fn auth_password(&mut self, user: &str, password: &str) -> Result<Auth, Self::Error> {
        if self.shared.settings.password_matches(user, password) {
            tracing::info!(user, "embedded ssh: password login");
            return Ok(Auth::Accept);
        }
        tracing::info!(user, "embedded ssh: wrong user or password");
        self.failed().await
    }

    async fn auth_publickey_offered(
        &mut self,
        user: &str,
        offer: PublicKeyOffer<'_>,
    ) -> Result<Auth, Self::Error> {
        if self.shared.settings.key_matches(user, offer.public_key) {
            return Ok(Auth::Accept);
        }
        Ok(self.reject())
    }

    async fn auth_publickey(
        &mut self,
        user: &str,
        key: VerifiedPublicKey<'_>,
    ) -> Result<Auth, Self::Error> {
        if self.shared.settings.key_matches(user, key.public_key) {
            let fingerprint = key.public_key.fingerprint(ssh_key::HashAlg::Sha256);
            tracing::info!(user, %fingerprint, "embedded ssh: key login");
            return Ok(Auth::Accept);
        }
        self.failed().await
    }

    async fn auth_succeeded(&mut self, _session: &mut Session) -> Result<(), Self::Error> {
        self.shared.logged_in.cancel();
        if let Some(login) = self.login.take() {
            login.send();
        }
        Ok(())
    }

    async fn channel_close(
        &mut self,
        channel: ChannelId,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.env.remove(&channel);
        Ok(())
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: ChannelOpenHandle,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let Ok(permit) = self.sessions.clone().try_acquire_owned() else {
            reply.reject(ChannelOpenFailure::ResourceShortage).await;
            return Ok(());
        };
        reply.accept().await;
        let handle = session.handle();
        let shared = self.shared.clone();
        self.shared.tasks.spawn(async move {
            session::serve(channel, handle, shared).await;
            drop(permit);
        });
        Ok(())
    }

    async fn channel_open_direct_tcpip(
        &mut self,
        channel: Channel<Msg>,
        host_to_connect: &str,
        port_to_connect: u32,
        _originator_address: &str,
        _originator_port: u32,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        let Ok(permit) = self.forwards.clone().try_acquire_owned() else {
            reply.reject(ChannelOpenFailure::ResourceShortage).await;
            return Ok(());
        };
        let (host, shared) = (host_to_connect.to_owned(), self.shared.clone());
        self.shared.tasks.spawn(async move {
            forward::serve(channel, reply, host, port_to_connect, shared).await;
            drop(permit);
        });
        Ok(())
    }

    async fn pty_request(
        &mut self,
        channel: ChannelId,
        _term: &str,
        _col_width: u32,
        _row_height: u32,
        _pix_width: u32,
        _pix_height: u32,
        _modes: &[(russh::Pty, u32)],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.channel_success(channel)
    }

    async fn env_request(
        &mut self,
        channel: ChannelId,
        variable_name: &str,
        variable_value: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        // The same checks the channel task applies to its own copy, so the answer matches
        // what the task keeps.
        let accepted = self
            .env
            .entry(channel)
            .or_default()
            .add_env(variable_name, variable_value);
        if accepted {
            session.channel_success(channel)
        } else {
            session.channel_failure(channel)
        }
    }

    async fn x11_request(
        &mut self,
        channel: ChannelId,
        _single_connection: bool,
        _x11_auth_protocol: &str,
        _x11_auth_cookie: &str,
        _x11_screen_number: u32,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        // Not offered; answered, so the client's later requests get their own answers.
        session.channel_failure(channel)
    }

    async fn shell_request(
        &mut self,
        channel: ChannelId,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.channel_success(channel)
    }

    async fn exec_request(
        &mut self,
        channel: ChannelId,
        _data: &[u8],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.channel_success(channel)
    }

    async fn subsystem_request(
        &mut self,
        channel: ChannelId,
        name: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        if name == sftp::SUBSYSTEM {
            session.channel_success(channel)
        } else {
            session.channel_failure(channel)
        }
    }
}
