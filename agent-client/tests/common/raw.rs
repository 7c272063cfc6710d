//! A raw control connection that speaks the protocol from the test (a fake agent): for the
//! rules about join tokens and resume secrets, and for attacks a real agent never makes.

use std::time::Duration;

use anyhow::Context as _;
use futures_util::{SinkExt, StreamExt};
use porthole_protocol::codec::MessageCodec;
use porthole_protocol::limits::PROTOCOL_VERSION;
use porthole_protocol::message::HelloAuth;
use porthole_protocol::tls::{client_config, parse_pin, RelayTrust};
use porthole_protocol::{Credential, Message, Secret, Service};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::TlsConnector;
use tokio_util::codec::Framed;

/// A raw control link.
pub type RawLink = Framed<TlsStream<TcpStream>, MessageCodec>;

/// Opens a control connection to the agent endpoint `addr` (pinned `pin`), sends a `hello`
/// offering SSH with `credentials`, and returns the link and the relay's answer.
pub async fn hello_with(
    addr: &str,
    pin: &str,
    auth: HelloAuth,
    credentials: Vec<Credential>,
) -> anyhow::Result<(RawLink, Message)> {
    hello_reporting(addr, pin, auth, credentials, false).await
}

/// [`hello_with`], saying whether the fake agent takes `visitors` reports.
pub async fn hello_reporting(
    addr: &str,
    pin: &str,
    auth: HelloAuth,
    credentials: Vec<Credential>,
    visitor_reports: bool,
) -> anyhow::Result<(RawLink, Message)> {
    let config = client_config(&RelayTrust::Pin(parse_pin(pin)?))?;
    let tcp = TcpStream::connect(addr).await?;
    let tls = TlsConnector::from(config)
        .connect(ServerName::try_from("localhost")?, tcp)
        .await?;
    let mut framed = Framed::new(tls, MessageCodec);
    let hello = Message::Hello {
        protocol_version: PROTOCOL_VERSION,
        agent_version: "test".into(),
        auth,
        services: vec![Service::Ssh],
        credentials,
        host_keys: vec![],
        visitor_reports,
        attach_elsewhere: false,
    };
    framed.send(hello).await?;
    let answer = tokio::time::timeout(Duration::from_secs(10), framed.next()).await?;
    Ok((framed, answer.context("closed without an answer")??))
}

/// [`hello_with`] without credentials.
pub async fn hello(addr: &str, pin: &str, auth: HelloAuth) -> anyhow::Result<(RawLink, Message)> {
    hello_with(addr, pin, auth, vec![]).await
}

/// Polls `f` for up to 10 s until it yields a value.
pub async fn wait_for_async<T, F: std::future::Future<Output = Option<T>>>(
    mut f: impl FnMut() -> F,
) -> anyhow::Result<T> {
    for _ in 0..100 {
        if let Some(v) = f().await {
            return Ok(v);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::bail!("timed out after 10 s")
}

/// Sends a ping on a registered raw link and waits for the pong: the relay then knows the
/// agent got its `registered`.
pub async fn confirm(framed: &mut RawLink) -> anyhow::Result<()> {
    framed.send(Message::Ping { seq: 7 }).await?;
    loop {
        match tokio::time::timeout(Duration::from_secs(5), framed.next()).await? {
            Some(Ok(Message::Pong { seq: 7 })) => return Ok(()),
            Some(Ok(_)) => continue,
            other => anyhow::bail!("no pong: {other:?}"),
        }
    }
}

/// The session id and resume secret of a `registered` answer.
pub fn registered(answer: &Message) -> Option<(String, Secret)> {
    match answer {
        Message::Registered {
            session_id,
            resume_secret,
            ..
        } => Some((session_id.clone(), resume_secret.clone())),
        _ => None,
    }
}

/// A join with `token`.
pub fn join(token: &str) -> HelloAuth {
    HelloAuth::Join {
        token: Secret::new(token),
    }
}

/// A resume of `session_id` with `secret`.
pub fn resume(session_id: &str, secret: &Secret) -> HelloAuth {
    HelloAuth::Resume {
        session_id: session_id.to_owned(),
        secret: secret.clone(),
    }
}
