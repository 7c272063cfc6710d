//! One control connection: `hello`, `registered`, then the link loop (heartbeats, `open`,
//! deadline updates, visitor counts, `finish`, `end`) until the link breaks or the session is
//! revoked. The agent's [`crate::status::Status`] follows what the relay says.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use porthole_protocol::codec::{send_within, MessageCodec};
use porthole_protocol::limits::PROTOCOL_VERSION;
use porthole_protocol::message::HelloAuth;
use porthole_protocol::time::from_unix_ms;
use porthole_protocol::{DataPlane, ErrorCode, FrameError, Message, Secret};
use tokio::sync::{mpsc, watch};
use tokio_util::codec::Framed;

use crate::error::AgentError;
use crate::events::AgentEvent;
use crate::status::State;
use crate::visitor::{self, DataRoute, Open};
use crate::warm::Pool;
use crate::Context;

/// Bounds on the heartbeat interval a relay may ask for.
const MIN_HEARTBEAT_MS: u64 = 100;
/// See [`MIN_HEARTBEAT_MS`].
const MAX_HEARTBEAT_MS: u64 = 3_600_000;

/// Reports (`open_failed`, `visitor_authenticated`) queued from visitor tasks to the link.
const REPORT_QUEUE: usize = 256;

/// How a registered link ended without error.
#[derive(Debug)]
pub enum LinkEnd {
    /// The session was revoked; the agent is done.
    Revoked(String),
    /// The agent is shutting down.
    Shutdown,
}

/// What the agent presents next time it connects.
#[derive(Clone, Debug)]
pub enum Credentials {
    /// The join token (until the first registration).
    Join(Secret),
    /// Session id and resume secret.
    Resume(String, Secret),
}

/// What the agent is told from outside while it runs (latched: a link that comes up later
/// still acts on them).
#[derive(Debug)]
pub struct Signals {
    /// Turns true when the build finished: the link sends `finish`.
    pub finished: watch::Receiver<bool>,
    /// Turns true to end the session early: the link sends `end` (to relays that take it).
    pub end: watch::Receiver<bool>,
}

/// Runs one control connection. `registered_at` is set once registration succeeds (the
/// caller uses it to reset backoff after a healthy link).
pub async fn run(
    ctx: &Arc<Context>,
    creds: &mut Credentials,
    signals: &mut Signals,
    registered_at: &mut Option<Instant>,
) -> Result<LinkEnd, AgentError> {
    let tls = ctx.dialer.dial_control().await?;
    let mut framed = Framed::new(tls, MessageCodec);
    let auth = match creds.clone() {
        Credentials::Join(token) => HelloAuth::Join { token },
        Credentials::Resume(session_id, secret) => HelloAuth::Resume { session_id, secret },
    };
    let hello = Message::Hello {
        protocol_version: PROTOCOL_VERSION,
        agent_version: env!("CARGO_PKG_VERSION").to_owned(),
        auth,
        services: ctx.config.services.keys().copied().collect(),
        credentials: ctx.config.credentials.clone(),
        host_keys: ctx.config.host_keys.clone(),
        visitor_reports: true,
        attach_elsewhere: true,
    };
    framed
        .send(hello)
        .await
        .map_err(|e| AgentError::Unreachable(e.to_string()))?;
    let answer = tokio::time::timeout(ctx.config.connect_timeout, framed.next()).await;
    let plane: DataRoute;
    let warm: Option<Pool>;
    let report_logins: bool;
    let takes_end: bool;
    // Visitor tasks queue their reports here; the link loop sends them.
    let (to_relay, mut reports) = mpsc::channel(REPORT_QUEUE);
    let (session_id, heartbeat) = match answer {
        Ok(Some(Ok(Message::Registered {
            session_id,
            resume_secret,
            endpoints,
            deadline_unix_ms,
            heartbeat_ms,
            resumed,
            data_plane,
            data_port,
            park_secret,
            visitor_auth_reports,
            accepts_end,
        }))) => {
            report_logins = visitor_auth_reports;
            takes_end = accepts_end;
            plane = match (data_plane, data_port) {
                (DataPlane::Tcp, Some(port)) => DataRoute::Tcp(port),
                _ => DataRoute::Tls,
            };
            *creds = Credentials::Resume(session_id.clone(), resume_secret);
            warm = park_secret
                .filter(|_| ctx.config.warm_connections > 0)
                .map(|secret| Pool {
                    session_id: session_id.clone(),
                    secret,
                    route: plane.clone(),
                    size: ctx.config.warm_connections,
                    idle: ctx.config.warm_idle,
                    login_reports: visitor_auth_reports.then(|| to_relay.clone()),
                });
            *registered_at = Some(Instant::now());
            let deadline = from_unix_ms(deadline_unix_ms);
            ctx.status.update(|s| {
                s.state = if s.finishing {
                    State::Finishing
                } else {
                    State::Active
                };
                s.session_id = Some(session_id.clone());
                s.endpoints = endpoints.clone();
                s.deadline_unix_ms = Some(deadline_unix_ms);
                // The relay closes the visitors of a lost link: nobody is connected now.
                s.visitors = 0;
                s.accepts_end = accepts_end;
                s.last_error = None;
            });
            ctx.report(AgentEvent::Registered {
                session_id: session_id.clone(),
                endpoints,
                deadline,
                resumed,
            });
            (
                session_id,
                Duration::from_millis(heartbeat_ms.clamp(MIN_HEARTBEAT_MS, MAX_HEARTBEAT_MS)),
            )
        }
        Ok(Some(Ok(Message::Error { code, message }))) => {
            return Err(AgentError::Refused { code, message })
        }
        Ok(Some(Ok(other))) => {
            return Err(AgentError::LinkLost(format!(
                "relay sent `{}` instead of `registered`",
                other.kind()
            )))
        }
        Ok(Some(Err(e))) => return Err(AgentError::LinkLost(format!("bad frame from relay: {e}"))),
        Ok(None) => {
            return Err(AgentError::LinkLost(
                "relay closed the connection during registration".into(),
            ))
        }
        Err(_) => {
            return Err(AgentError::Unreachable(
                "relay did not answer hello in time".into(),
            ))
        }
    };
    if *signals.finished.borrow_and_update() {
        framed
            .send(Message::Finish)
            .await
            .map_err(|e| AgentError::LinkLost(e.to_string()))?;
    }
    if *signals.end.borrow_and_update() && takes_end {
        framed
            .send(Message::End)
            .await
            .map_err(|e| AgentError::LinkLost(e.to_string()))?;
    }
    // Warm data connections live as long as this link.
    let link = ctx.cancel.child_token();
    let _end_warm = link.clone().drop_guard();
    if let Some(pool) = warm {
        ctx.tasks
            .spawn(crate::warm::keep(ctx.clone(), pool, link.clone()));
    }
    let mut ticker = tokio::time::interval(heartbeat);
    let mut last_heard = Instant::now();
    let mut seq = 0u64;
    loop {
        // A relay that stops reading must not freeze the loop either.
        let limit = heartbeat.saturating_mul(3);
        let sent = tokio::select! {
            () = ctx.cancel.cancelled() => return Ok(LinkEnd::Shutdown),
            Ok(()) = signals.finished.changed() => send(&mut framed, Message::Finish, limit).await,
            Ok(()) = signals.end.changed() => {
                if *signals.end.borrow_and_update() && takes_end {
                    send(&mut framed, Message::End, limit).await
                } else {
                    Ok(())
                }
            }
            Some(msg) = reports.recv() => send(&mut framed, msg, limit).await,
            _ = ticker.tick() => {
                if last_heard.elapsed() > limit {
                    return Err(AgentError::LinkLost("no frame from the relay for three heartbeat intervals".into()));
                }
                seq += 1;
                send(&mut framed, Message::Ping { seq }, limit).await
            }
            frame = framed.next() => {
                last_heard = Instant::now();
                match frame {
                    Some(Ok(Message::Open { conn_id, service, secret })) => {
                        let open = Open { session_id: session_id.clone(), conn_id, service, secret, route: plane.clone(), report_login: report_logins };
                        ctx.tasks.spawn(visitor::serve(ctx.clone(), open, to_relay.clone()));
                        Ok(())
                    }
                    // A relay cluster: the visitor waits on another node.
                    Some(Ok(Message::OpenAt { conn_id, service, secret, relay })) => {
                        let open = Open { session_id: session_id.clone(), conn_id, service, secret, route: DataRoute::TlsAt(relay), report_login: report_logins };
                        ctx.tasks.spawn(visitor::serve(ctx.clone(), open, to_relay.clone()));
                        Ok(())
                    }
                    Some(Ok(Message::Ping { seq })) => send(&mut framed, Message::Pong { seq }, limit).await,
                    Some(Ok(Message::Pong { .. })) => Ok(()),
                    Some(Ok(Message::Deadline { deadline_unix_ms, finishing })) => {
                        ctx.status.update(|s| {
                            s.deadline_unix_ms = Some(deadline_unix_ms);
                            if finishing {
                                s.finishing = true;
                                if s.state == State::Active {
                                    s.state = State::Finishing;
                                }
                            }
                        });
                        ctx.report(AgentEvent::Deadline { deadline: from_unix_ms(deadline_unix_ms), finishing });
                        Ok(())
                    }
                    Some(Ok(Message::Visitors { count })) => {
                        let mut previous = 0;
                        ctx.status.update(|s| {
                            previous = s.visitors;
                            s.visitors = count;
                            s.visited |= count > 0;
                        });
                        if count != previous {
                            ctx.report(AgentEvent::Visitors { count, previous });
                        }
                        Ok(())
                    }
                    Some(Ok(Message::Revoked { reason })) => return Ok(LinkEnd::Revoked(reason)),
                    // A relay going down for a restart: a lost link, to be resumed.
                    Some(Ok(Message::Error { code: ErrorCode::ShuttingDown, message })) => {
                        return Err(AgentError::LinkLost(message))
                    }
                    Some(Ok(Message::Error { code, message })) => return Err(AgentError::Refused { code, message }),
                    Some(Ok(other)) => {
                        tracing::warn!(kind = other.kind(), "ignoring unexpected message from the relay");
                        Ok(())
                    }
                    Some(Err(e)) => return Err(AgentError::LinkLost(format!("bad frame from relay: {e}"))),
                    None => return Err(AgentError::LinkLost("relay closed the control connection".into())),
                }
            }
        };
        sent.map_err(|e| AgentError::LinkLost(e.to_string()))?;
    }
}

/// Sends one frame, failing when the relay has not taken it within `limit`.
async fn send<S>(
    framed: &mut Framed<S, MessageCodec>,
    msg: Message,
    limit: Duration,
) -> Result<(), FrameError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    send_within(framed, msg, limit, "relay").await
}
