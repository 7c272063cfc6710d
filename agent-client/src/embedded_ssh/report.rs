//! Telling the relay that a visitor logged in to the embedded SSH server
//! (`visitor_authenticated`), for relays that asked for such reports in `registered`.

use porthole_protocol::Message;
use tokio::sync::mpsc;

/// The report for one visitor connection: sent at most once, on its first successful login.
#[derive(Debug)]
pub struct LoginReport {
    conn_id: u64,
    to_relay: mpsc::Sender<Message>,
}

impl LoginReport {
    /// A report for the data connection opened as `conn_id` (from `open` or `assign`),
    /// queued on `to_relay`, the control link's queue of visitor reports.
    pub fn new(conn_id: u64, to_relay: mpsc::Sender<Message>) -> Self {
        Self { conn_id, to_relay }
    }

    /// Queues `visitor_authenticated` for the control link. Never waits: with the queue
    /// full or the link gone the report is lost, which only costs the relay the knowledge
    /// that this visitor logged in.
    pub fn send(self) {
        let conn_id = self.conn_id;
        match self
            .to_relay
            .try_send(Message::VisitorAuthenticated { conn_id })
        {
            Ok(()) => tracing::debug!(conn_id, "embedded ssh: login reported to the relay"),
            Err(e) => tracing::debug!(conn_id, error = %e, "embedded ssh: login not reported"),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use russh::keys::ssh_key::private::Ed25519Keypair;
    use russh::keys::{PrivateKey, PrivateKeyWithHashAlg};
    use tokio_util::sync::CancellationToken;
    use tokio_util::task::TaskTracker;

    use super::*;
    use crate::embedded_ssh::{EmbeddedSsh, Options, Settings};

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    /// A client that trusts any host key (the server is in this process).
    struct AnyHostKey;

    impl russh::client::Handler for AnyHostKey {
        type Error = russh::Error;

        async fn check_server_key(
            &mut self,
            _key: &russh::keys::PublicKeyOrCertificate,
        ) -> Result<bool, Self::Error> {
            Ok(true)
        }
    }

    /// One connection to `server` (reported as `conn_id` on `queue`), logged in by `login`;
    /// returns once the connection has ended.
    async fn connect<F, Fut>(
        server: &Arc<EmbeddedSsh>,
        conn_id: u64,
        queue: &mpsc::Sender<Message>,
        login: F,
    ) -> TestResult
    where
        F: FnOnce(russh::client::Handle<AnyHostKey>) -> Fut,
        Fut: std::future::Future<Output = TestResult>,
    {
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        let (cancel, tasks) = (CancellationToken::new(), TaskTracker::new());
        let report = LoginReport::new(conn_id, queue.clone());
        let serving = tokio::spawn({
            let (server, cancel) = (server.clone(), cancel.clone());
            async move { server.serve(server_io, &cancel, &tasks, Some(report)).await }
        });
        let config = Arc::new(russh::client::Config::default());
        let client = russh::client::connect_stream(config, client_io, AnyHostKey).await?;
        let result = tokio::time::timeout(Duration::from_secs(20), login(client)).await?;
        cancel.cancel();
        tokio::time::timeout(Duration::from_secs(10), serving).await??;
        result
    }

    #[tokio::test]
    async fn each_login_is_reported_once_with_its_conn_id() -> TestResult {
        let dir = tempfile::tempdir()?;
        let user_key = PrivateKey::from(Ed25519Keypair::from_seed(&[7; 32]));
        let keys = dir.path().join("authorized_keys");
        std::fs::write(&keys, user_key.public_key().to_openssh()?)?;
        let settings = Settings::generate(&Options {
            username: "dev".into(),
            authorized_keys: Some(keys),
            ..Options::default()
        })?;
        let password = settings.password().expose().to_owned();
        let server = Arc::new(EmbeddedSsh::new(settings));
        let (queue, mut reports) = mpsc::channel(8);

        // A wrong password, then the right one: one report.
        connect(&server, 42, &queue, |mut client| async move {
            assert!(!client
                .authenticate_password("dev", "wrong")
                .await?
                .success());
            assert!(client
                .authenticate_password("dev", &password)
                .await?
                .success());
            Ok(())
        })
        .await?;
        // A key login on another connection.
        let key = PrivateKeyWithHashAlg::new(Arc::new(user_key), None);
        connect(&server, 43, &queue, |mut client| async move {
            assert!(client.authenticate_publickey("dev", key).await?.success());
            Ok(())
        })
        .await?;
        // Failed logins only: nothing.
        connect(&server, 44, &queue, |mut client| async move {
            assert!(!client.authenticate_password("root", "x").await?.success());
            Ok(())
        })
        .await?;
        drop(queue);
        let mut got = Vec::new();
        while let Some(report) = reports.recv().await {
            got.push(report);
        }
        assert!(
            matches!(
                got.as_slice(),
                [
                    Message::VisitorAuthenticated { conn_id: 42 },
                    Message::VisitorAuthenticated { conn_id: 43 }
                ]
            ),
            "{got:?}"
        );
        Ok(())
    }

    #[test]
    fn sends_visitor_authenticated_and_never_blocks() {
        let (tx, mut rx) = mpsc::channel(1);
        LoginReport::new(7, tx.clone()).send();
        // Queue full: dropped, not waited for.
        LoginReport::new(8, tx).send();
        assert!(matches!(
            rx.try_recv(),
            Ok(Message::VisitorAuthenticated { conn_id: 7 })
        ));
        assert!(rx.try_recv().is_err());
        // Link gone: dropped quietly.
        let (tx, rx) = mpsc::channel(1);
        drop(rx);
        LoginReport::new(9, tx).send();
    }
}
