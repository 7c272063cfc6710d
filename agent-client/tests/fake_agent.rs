//! Attacks by a fake agent speaking the protocol:
//! - a join token is spent for good: once any registration of a session was confirmed, a
//!   `hello` with the join token is refused (`token_used`), even after the agent resumed and
//!   closed before confirming, and across a relay restart; the real agent keeps its session.
//!   (The attack: join, confirm, close; resume and close before sending a frame; then the old
//!   join token re-registered, replaced the credentials shown in the instructions and locked
//!   the real agent out.)
//! - on the plain-TCP data port, where the one-time attach secret travels in clear text, a
//!   data connection is accepted only from the address of the session's control link.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use anyhow::{ensure, Context as _};
use common::raw::{self, confirm, join, registered, resume, wait_for_async};
use common::relay_process::RelaySetup;
use porthole_protocol::{Credential, ErrorCode, Message, Secret, Service};

/// A fake agent's credential, to see whose login the instructions show.
fn intruder() -> Vec<Credential> {
    vec![Credential {
        service: Service::Ssh,
        username: "intruder".into(),
        password: Some(Secret::new("intruder-password")),
    }]
}

/// Retries a `hello` while the relay still holds the previous link (`session_busy`).
async fn answer_when_free(
    addr: &str,
    pin: &str,
    auth: impl Fn() -> porthole_protocol::message::HelloAuth,
    credentials: Vec<Credential>,
) -> anyhow::Result<Message> {
    wait_for_async(|| async {
        let (_, a) = raw::hello_with(addr, pin, auth(), credentials.clone())
            .await
            .ok()?;
        (!matches!(
            a,
            Message::Error {
                code: ErrorCode::SessionBusy,
                ..
            }
        ))
        .then_some(a)
    })
    .await
}

#[test]
fn a_join_token_stays_spent_after_a_resume_and_a_restart() -> anyhow::Result<()> {
    let setup = RelaySetup::new()?;
    let mut relay = setup.start()?;
    let (id, token, _port) = setup.create_session(&relay.api, serde_json::json!({}))?;
    let addr = format!("127.0.0.1:{}", setup.agent_port);
    let rt = tokio::runtime::Runtime::new()?;
    let secret = rt.block_on(async {
        // The real agent joins and confirms.
        let (mut link, answer) = raw::hello(&addr, &relay.pin, join(&token)).await?;
        let (session_id, first) = registered(&answer).context("join")?;
        ensure!(session_id == id);
        confirm(&mut link).await?;
        drop(link);
        // It resumes, and the link drops before it sends a frame (unconfirmed).
        let answer = answer_when_free(&addr, &relay.pin, || resume(&id, &first), vec![]).await?;
        let (_, second) = registered(&answer).context("resume")?;
        // The old join token must not register again.
        let answer = answer_when_free(&addr, &relay.pin, || join(&token), intruder()).await?;
        let Message::Error { code, message } = &answer else {
            anyhow::bail!("the spent join token was accepted: {answer:?}");
        };
        ensure!(*code == ErrorCode::TokenUsed, "{answer:?}");
        ensure!(message.contains("already used"), "{message}");
        // The real agent is not locked out: the pending secret of the lost answer works.
        let (mut link, answer) = raw::hello(&addr, &relay.pin, resume(&id, &second)).await?;
        let (_, third) = registered(&answer).context("real agent resumes")?;
        confirm(&mut link).await?;
        drop(link);
        anyhow::Ok(third)
    })?;
    // The rule survives a restart (it is persisted).
    relay.kill9()?;
    let relay = setup.start()?;
    rt.block_on(async {
        let answer = answer_when_free(&addr, &relay.pin, || join(&token), intruder()).await?;
        ensure!(
            matches!(
                answer,
                Message::Error {
                    code: ErrorCode::TokenUsed,
                    ..
                }
            ),
            "after a restart the spent join token got {answer:?}"
        );
        let answer = answer_when_free(&addr, &relay.pin, || resume(&id, &secret), vec![]).await?;
        ensure!(
            matches!(answer, Message::Registered { resumed: true, .. }),
            "the real agent's resume after the restart: {answer:?}"
        );
        anyhow::Ok(())
    })?;
    Ok(())
}

#[test]
fn the_tcp_data_port_takes_attaches_only_from_the_control_links_address() -> anyhow::Result<()> {
    use futures_util::{SinkExt, StreamExt};
    use std::io::{Read, Write};
    let relay = common::relay::TestRelay::start_with(|c| {
        c.data_plane = porthole_protocol::DataPlane::Tcp;
        c.data_listen = "127.0.0.1:0"
            .parse()
            .unwrap_or_else(|e| unreachable!("{e}"));
    })?;
    let session = relay.create(&["ssh"], None)?;
    let data_port = *relay.handle.relay.data_port.get().context("data port")?;
    let (addr, pin) = (relay.agent_addr(), relay.pin());
    let (mut link, answer) = relay
        .rt
        .block_on(raw::hello(&addr, &pin, join(&session.token)))?;
    let (session_id, _) = registered(&answer).context("join")?;
    relay.rt.block_on(confirm(&mut link))?;
    // A visitor arrives; the relay asks the (fake) agent to open a data connection.
    let mut visitor = relay.connect_from("127.0.0.1".parse()?, session.port("ssh"))?;
    let (conn_id, secret) = relay.rt.block_on(async {
        loop {
            match tokio::time::timeout(std::time::Duration::from_secs(10), link.next()).await? {
                Some(Ok(Message::Open {
                    conn_id, secret, ..
                })) => return anyhow::Ok((conn_id, secret)),
                Some(Ok(_)) => continue,
                other => anyhow::bail!("no open: {other:?}"),
            }
        }
    })?;
    let attach = |source: &str| -> anyhow::Result<Option<Message>> {
        let source: std::net::IpAddr = source.parse()?;
        relay.rt.block_on(async {
            let socket = tokio::net::TcpSocket::new_v4()?;
            socket.bind((source, 0).into())?;
            let tcp = socket.connect(([127, 0, 0, 1], data_port).into()).await?;
            let mut framed =
                tokio_util::codec::Framed::new(tcp, porthole_protocol::codec::MessageCodec);
            framed
                .send(Message::Attach {
                    session_id: session_id.clone(),
                    conn_id,
                    secret: secret.clone(),
                })
                .await?;
            // Accepted: the visitor's bytes follow (its SSH line first); refused: an error
            // frame.
            let mut io = framed.into_parts().io;
            let mut head = [0u8; 4];
            tokio::time::timeout(
                std::time::Duration::from_secs(10),
                tokio::io::AsyncReadExt::read_exact(&mut io, &mut head),
            )
            .await??;
            if &head == b"SSH-" {
                tokio::io::AsyncWriteExt::write_all(&mut io, b"from the agent\n").await?;
                // Keep the connection open for the visitor's read below.
                std::mem::forget(io.into_std()?);
                return Ok(None);
            }
            let len = u32::from_be_bytes(head) as usize;
            ensure!(
                len < 65536,
                "neither the visitor's bytes nor a frame: {head:?}"
            );
            let mut payload = vec![0u8; len];
            tokio::io::AsyncReadExt::read_exact(&mut io, &mut payload).await?;
            Ok(Some(serde_json::from_slice::<Message>(&payload)?))
        })
    };
    let refused = attach("127.0.0.2")?;
    ensure!(
        matches!(
            refused,
            Some(Message::Error {
                code: ErrorCode::BadAttach,
                ..
            })
        ),
        "an attach from another address with the right secret: {refused:?}"
    );
    // From the control link's address the same secret still pairs the visitor.
    let accepted = attach("127.0.0.1")?;
    ensure!(
        accepted.is_none(),
        "the agent's own attach was refused: {accepted:?}"
    );
    visitor.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
    let mut got = [0u8; 15];
    visitor
        .read_exact(&mut got)
        .context("the visitor gets the agent's bytes")?;
    ensure!(&got == b"from the agent\n", "{got:?}");
    visitor.write_all(b"bye")?;
    Ok(())
}

#[test]
fn the_relay_refuses_hellos_whose_user_names_are_not_portable() -> anyhow::Result<()> {
    // The agent checks its flags, but a fake agent can send anything: the relay checks the
    // names again before they can reach the `ssh` command in the instructions.
    let relay = common::relay::TestRelay::start()?;
    let session = relay.create(&["ssh"], None)?;
    let (addr, pin) = (relay.agent_addr(), relay.pin());
    for name in [
        "$(touch /tmp/porthole-pwned)dev",
        "`id`",
        "a;b",
        "a b",
        "a'b",
        "-oProxyCommand=nc",
        "dév",
    ] {
        let credentials = vec![Credential {
            service: Service::Ssh,
            username: name.into(),
            password: Some(Secret::new("pw")),
        }];
        let (_, answer) = relay.rt.block_on(raw::hello_with(
            &addr,
            &pin,
            join(&session.token),
            credentials,
        ))?;
        let Message::Error { code, message } = &answer else {
            anyhow::bail!("user name {name:?} was accepted: {answer:?}");
        };
        ensure!(*code == ErrorCode::BadFrame, "{name:?}: {answer:?}");
        ensure!(message.contains("POSIX-portable"), "{name:?}: {message}");
    }
    // A portable name registers, and the instructions show it in the command.
    let credentials = vec![Credential {
        service: Service::Ssh,
        username: "vagrant".into(),
        password: Some(Secret::new("pw")),
    }];
    let (mut link, answer) = relay.rt.block_on(raw::hello_with(
        &addr,
        &pin,
        join(&session.token),
        credentials,
    ))?;
    registered(&answer).context("a portable name")?;
    relay.rt.block_on(confirm(&mut link))?;
    let token = relay.user_token("u-dev", "app-7", &["developer"])?;
    let got = relay.instructions(&session.id, Some(&token))?;
    ensure!(got.status == 200, "{}", got.body);
    let command = got.body["ssh"]["command"].as_str().unwrap_or_default();
    ensure!(
        command == format!("ssh -p {} vagrant@127.0.0.1", session.port("ssh")),
        "{command}"
    );
    Ok(())
}

/// Reads a raw link until `want` picks a message, answering pings and noting the conn ids
/// of `open`s (left unanswered: the visitor waits).
async fn read_until<T>(
    link: &mut raw::RawLink,
    opens: &mut Vec<u64>,
    want: impl Fn(&Message) -> Option<T>,
) -> anyhow::Result<T> {
    use futures_util::{SinkExt, StreamExt};
    loop {
        let msg = tokio::time::timeout(std::time::Duration::from_secs(10), link.next())
            .await?
            .context("the link closed")??;
        if let Some(found) = want(&msg) {
            return Ok(found);
        }
        match msg {
            Message::Ping { seq } => link.send(Message::Pong { seq }).await?,
            Message::Open { conn_id, .. } => opens.push(conn_id),
            _ => {}
        }
    }
}

fn count(m: &Message) -> Option<u32> {
    match m {
        Message::Visitors { count } => Some(*count),
        _ => None,
    }
}

#[test]
fn the_relay_reports_visitor_counts_and_ends_unvisited_sessions_on_request() -> anyhow::Result<()> {
    use futures_util::SinkExt;
    let relay = common::relay::TestRelay::start()?;
    let session = relay.create(&["ssh"], None)?;
    let (addr, pin) = (relay.agent_addr(), relay.pin());
    let (mut link, answer) = relay.rt.block_on(raw::hello_reporting(
        &addr,
        &pin,
        join(&session.token),
        vec![],
        true,
    ))?;
    ensure!(
        matches!(
            answer,
            Message::Registered {
                accepts_end: true,
                ..
            }
        ),
        "{answer:?}"
    );
    relay.rt.block_on(confirm(&mut link))?;
    // A visitor connects: the agent is told 1 (on admission, before any data connection).
    let mut opens = Vec::new();
    let visitor = relay.connect_from("127.0.0.1".parse()?, session.port("ssh"))?;
    let first = relay
        .rt
        .block_on(read_until(&mut link, &mut opens, count))?;
    ensure!(first == 1, "count after one visitor: {first}");
    // `end` while the visitor is connected (its `open` unanswered) changes nothing: a ping
    // after it comes back only once the relay handled the `end`.
    relay.rt.block_on(async {
        link.send(Message::End).await?;
        link.send(Message::Ping { seq: 99 }).await?;
        let pong = |m: &Message| matches!(m, Message::Pong { seq: 99 }).then_some(());
        read_until(&mut link, &mut opens, pong).await
    })?;
    ensure!(
        relay.state(&session.id)? == "active",
        "end with a visitor connected ended the session"
    );
    // The fake agent refuses the visitor's `open`: it leaves, 0.
    relay.rt.block_on(async {
        let open = |m: &Message| match m {
            Message::Open { conn_id, .. } => Some(*conn_id),
            _ => None,
        };
        let conn_id = match opens.first() {
            Some(id) => *id,
            None => read_until(&mut link, &mut opens, open).await?,
        };
        let reason = "the fake agent serves nobody".into();
        link.send(Message::OpenFailed { conn_id, reason }).await?;
        let mut last = 1;
        while last != 0 {
            last = read_until(&mut link, &mut opens, count).await?;
        }
        anyhow::Ok(())
    })?;
    drop(visitor);
    // With nobody connected, `end` revokes the session.
    relay.rt.block_on(link.send(Message::End))?;
    let view = relay.wait_state(&session.id, "revoked", std::time::Duration::from_secs(10))?;
    ensure!(view["revoke_reason"] == "ended_by_agent", "{view}");
    Ok(())
}
