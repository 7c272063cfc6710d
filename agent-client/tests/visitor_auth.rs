//! The agent reports visitors who log in to its embedded SSH server (`visitor_authenticated`)
//! to relays that ask for it. The relay here is a fake speaking the protocol from the test,
//! so the test sees exactly what the agent sends: a report with the visitor's `conn_id` for
//! a connection from `open` and for a warm one from `assign`, and nothing for relays that
//! did not ask.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, ensure, Context as _};
use bytes::BytesMut;
use common::agent::Agent;
use futures_util::{SinkExt, StreamExt};
use porthole_protocol::codec::MessageCodec;
use porthole_protocol::tls::{fingerprint_sha256, server_config};
use porthole_protocol::{DataPlane, Message, Secret, Service};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_util::codec::Framed;

type Link = Framed<TlsStream<TcpStream>, MessageCodec>;

const WAIT: Duration = Duration::from_secs(20);
const USER: &str = "dev";

/// A TLS listener that hands over each connection with its first frame.
struct FakeRelay {
    addr: String,
    pin: String,
    conns: mpsc::Receiver<(Message, Link)>,
}

impl FakeRelay {
    async fn start() -> anyhow::Result<Self> {
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()])?;
        let pin = fingerprint_sha256(cert.cert.der());
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(cert.key_pair.serialize_der()));
        let acceptor = TlsAcceptor::from(server_config(vec![cert.cert.der().clone()], key)?);
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?.to_string();
        let (tx, conns) = mpsc::channel(64);
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let mut link = Framed::new(tls, MessageCodec);
                    if let Ok(Some(Ok(first))) = tokio::time::timeout(WAIT, link.next()).await {
                        let _ = tx.send((first, link)).await;
                    }
                });
            }
        });
        Ok(Self { addr, pin, conns })
    }

    async fn next(&mut self) -> anyhow::Result<(Message, Link)> {
        tokio::time::timeout(WAIT, self.conns.recv())
            .await
            .context("no connection from the agent")?
            .context("listener gone")
    }
}

/// The registered control link: answers pings; other frames from the agent come out of
/// `from_agent`, frames for the agent go into `to_agent`.
struct Control {
    to_agent: mpsc::Sender<Message>,
    from_agent: mpsc::Receiver<Message>,
}

impl Control {
    fn run(mut link: Link) -> Self {
        let (to_agent, mut outgoing) = mpsc::channel::<Message>(16);
        let (incoming, from_agent) = mpsc::channel(64);
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    Some(msg) = outgoing.recv() => if link.send(msg).await.is_err() { return },
                    frame = link.next() => match frame {
                        Some(Ok(Message::Ping { seq })) => {
                            if link.send(Message::Pong { seq }).await.is_err() { return }
                        }
                        Some(Ok(msg)) => { let _ = incoming.send(msg).await; }
                        _ => return,
                    },
                }
            }
        });
        Self {
            to_agent,
            from_agent,
        }
    }

    /// The next `visitor_authenticated` within `wait`, if any.
    async fn login_report(&mut self, wait: Duration) -> Option<u64> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match tokio::time::timeout_at(deadline, self.from_agent.recv()).await {
                Ok(Some(Message::VisitorAuthenticated { conn_id })) => return Some(conn_id),
                Ok(Some(other)) => eprintln!("agent sent {}", other.kind()),
                _ => return None,
            }
        }
    }
}

/// Accepts any host key (the test checks reporting, not host keys).
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

/// Logs in over a data connection whose frames are done (`prefix`: bytes read past them).
async fn login(link: Link, password: &str) -> anyhow::Result<russh::client::Handle<AnyHostKey>> {
    let parts = link.into_parts();
    let (mut io, prefix): (_, BytesMut) = (parts.io, parts.read_buf);
    let (client_end, mut bridge) = tokio::io::duplex(64 * 1024);
    tokio::spawn(async move {
        if bridge.write_all(&prefix).await.is_ok() {
            let _ = tokio::io::copy_bidirectional(&mut io, &mut bridge).await;
        }
    });
    let config = Arc::new(russh::client::Config::default());
    let mut client = russh::client::connect_stream(config, client_end, AnyHostKey).await?;
    ensure!(
        !client.authenticate_password(USER, "wrong").await?.success(),
        "a wrong password logged in"
    );
    ensure!(
        client
            .authenticate_password(USER, password)
            .await?
            .success(),
        "the instructions' password did not log in"
    );
    Ok(client)
}

/// Runs an agent with the embedded SSH server against a fake relay that answers
/// `visitor_auth_reports: reports`; logs in once through `open` (conn 7) and once through a
/// warm connection's `assign` (conn 9); returns the reports the agent sent.
async fn scenario(reports: bool) -> anyhow::Result<Vec<Option<u64>>> {
    let mut relay = FakeRelay::start().await?;
    let agent = Agent::spawn(
        &[
            "--relay".into(),
            relay.addr.clone(),
            "--pin-sha256".into(),
            relay.pin.clone(),
            "--embedded-ssh".into(),
            "--ssh-user".into(),
            USER.into(),
        ],
        "phj_test",
    )?;
    let (hello, mut link) = relay.next().await?;
    let Message::Hello { credentials, .. } = hello else {
        bail!("first frame: {}", hello.kind());
    };
    let password = credentials
        .iter()
        .find(|c| c.service == Service::Ssh && c.username == USER)
        .and_then(|c| c.password.clone())
        .context("no SSH password in hello")?;
    let deadline = SystemTime::now().duration_since(UNIX_EPOCH)? + Duration::from_secs(3600);
    link.send(Message::Registered {
        session_id: "s_fake".into(),
        resume_secret: Secret::new("resume"),
        endpoints: vec![],
        deadline_unix_ms: u64::try_from(deadline.as_millis())?,
        heartbeat_ms: 1000,
        resumed: false,
        data_plane: DataPlane::Tls,
        data_port: None,
        park_secret: Some(Secret::new("park")),
        visitor_auth_reports: reports,
        accepts_end: false,
    })
    .await?;
    let mut control = Control::run(link);
    agent.wait_registered()?;
    let quiet = Duration::from_secs(2);
    let mut got = Vec::new();

    // A visitor through `open`.
    control
        .to_agent
        .send(Message::Open {
            conn_id: 7,
            service: Service::Ssh,
            secret: Secret::new("one-time"),
        })
        .await?;
    let mut parked = Vec::new();
    let attached = loop {
        match relay.next().await? {
            (Message::Attach { conn_id: 7, .. }, data) => break data,
            (Message::Park { .. }, data) => parked.push(data),
            (other, _) => bail!("unexpected first frame {}", other.kind()),
        }
    };
    let _first = login(attached, password.expose()).await?;
    got.push(
        control
            .login_report(if reports { WAIT } else { quiet })
            .await,
    );

    // A visitor through a warm connection.
    let mut warm = match parked.pop() {
        Some(link) => link,
        None => match relay.next().await? {
            (Message::Park { .. }, data) => data,
            (other, _) => bail!("unexpected first frame {}", other.kind()),
        },
    };
    warm.send(Message::Assign {
        conn_id: 9,
        service: Service::Ssh,
    })
    .await?;
    let _second = login(warm, password.expose()).await?;
    got.push(
        control
            .login_report(if reports { WAIT } else { quiet })
            .await,
    );
    // No second report for either connection.
    got.push(control.login_report(quiet).await);
    drop(agent);
    Ok(got)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logins_are_reported_with_their_conn_id_to_relays_that_ask() -> anyhow::Result<()> {
    let got = scenario(true).await?;
    ensure!(got == [Some(7), Some(9), None], "reports: {got:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relays_that_do_not_ask_get_no_reports() -> anyhow::Result<()> {
    let got = scenario(false).await?;
    ensure!(got == [None, None, None], "reports: {got:?}");
    Ok(())
}
