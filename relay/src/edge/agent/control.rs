//! A control connection after its `hello`: register (join or resume), then serve the link:
//! queued messages to the agent, heartbeats both ways, `finish`, `end`, `open_failed` and
//! `visitor_authenticated` from the agent, and a `revoked` farewell when the session ends.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use futures_util::{SinkExt, StreamExt};
use porthole_protocol::codec::send_within;
use porthole_protocol::limits::PROTOCOL_VERSION;
use porthole_protocol::message::HelloAuth;
use porthole_protocol::time::to_unix_ms;
use porthole_protocol::{Credential, ErrorCode, FrameError, Message, Service};

use crate::edge::agent::conn::{farewell, refuse, AgentFramed};
use crate::limits::FAREWELL_TIMEOUT;
use crate::session::access::Access;
use crate::session::actions::{AgentOffer, Registration};
use crate::session::lifecycle::RevokeReason;
use crate::session::refusal::Refusal;
use crate::session::runtime::Session;
use crate::shared::Relay;
use crate::untrusted::Untrusted;

/// The fields of a `hello`.
#[derive(Debug)]
pub struct Hello {
    /// The agent's protocol version.
    pub protocol_version: u32,
    /// The agent's release.
    pub agent_version: String,
    /// Join token or resume secret.
    pub auth: HelloAuth,
    /// Services offered.
    pub services: Vec<Service>,
    /// Credentials for the instructions.
    pub credentials: Vec<Credential>,
    /// SSH host keys.
    pub host_keys: Vec<String>,
    /// Whether the agent takes `visitors` reports.
    pub visitor_reports: bool,
}

/// The checks of a `hello` that need no state: protocol version, credentials and host
/// keys. Pure, so it is fuzzed with [`crate::edge::agent::accept::classify`].
pub fn screen(hello: Hello, ip: IpAddr) -> Result<(HelloAuth, AgentOffer, String), Refusal> {
    if hello.protocol_version != PROTOCOL_VERSION {
        return Err(Refusal::VersionMismatch {
            agent_version: Untrusted(&hello.agent_version).to_string(),
            theirs: hello.protocol_version,
        });
    }
    let access = Access::from_hello(hello.credentials, hello.host_keys)
        .map_err(|e| Refusal::BadHello(e.to_string()))?;
    let offer = AgentOffer {
        services: hello.services,
        access,
        ip: ip.to_canonical(),
        visitor_reports: hello.visitor_reports,
    };
    Ok((hello.auth, offer, hello.agent_version))
}

/// Registers the agent and serves its link until it ends.
pub async fn run(relay: Arc<Relay>, mut framed: AgentFramed, hello: Hello, peer: SocketAddr) {
    let (reg, agent_version) = match register(&relay, hello, peer.ip()).await {
        Ok(registered) => registered,
        Err(refusal) => {
            let code = refusal.code();
            relay.metrics.handshake_failed(code.as_str());
            return refuse(&relay, peer.ip(), &mut framed, code, refusal.to_string()).await;
        }
    };
    let session_id = reg.session.id.clone();
    tracing::info!(%session_id, %peer, agent_version = %Untrusted(&agent_version), resumed = reg.resumed,
        "agent {}", if reg.resumed { "resumed" } else { "joined" });
    serve(&relay, peer.ip(), framed, reg).await;
}

/// Screens the `hello` and joins or resumes its session; also returns the agent's version.
async fn register(
    relay: &Relay,
    hello: Hello,
    ip: IpAddr,
) -> Result<(Registration, String), Refusal> {
    let (auth, offer, agent_version) = screen(hello, ip)?;
    let reg = match &auth {
        HelloAuth::Join { token } => relay.join(token, &offer).await?,
        HelloAuth::Resume { session_id, secret } => {
            relay.resume(session_id, secret, &offer).await?
        }
    };
    Ok((reg, agent_version))
}

async fn serve(relay: &Relay, peer: IpAddr, mut framed: AgentFramed, mut reg: Registration) {
    let session = reg.session.clone();
    let deadline = session.lock().life.deadline().0;
    let registered = Message::Registered {
        session_id: session.id.clone(),
        resume_secret: reg.resume_secret.clone(),
        endpoints: session.endpoints.clone(),
        deadline_unix_ms: to_unix_ms(deadline),
        heartbeat_ms: relay.config.heartbeat_interval.as_millis() as u64,
        resumed: reg.resumed,
        data_plane: relay.config.data_plane,
        data_port: relay.data_port.get().copied(),
        // Warm data connections only where the data plane is encrypted: a park secret is
        // reusable for the link's lifetime, and on the plain-TCP data port anyone who saw one
        // `park` could park connections of their own and be handed visitors.
        park_secret: (relay.config.data_plane == porthole_protocol::DataPlane::Tls)
            .then(|| reg.park_secret.clone()),
        visitor_auth_reports: true,
        accepts_end: true,
    };
    let interval = relay.config.heartbeat_interval;
    let mut ticker = tokio::time::interval(interval);
    let mut last_heard = Instant::now();
    let mut seq = 0u64;
    // A peer that stops reading must not freeze the loop: every send gets the same limit
    // as silence, three heartbeat intervals.
    let limit = interval.saturating_mul(3);
    let mut confirmed = false;
    let mut result = send(&mut framed, registered, limit).await;
    while result.is_ok() {
        tokio::select! {
            () = relay.stopping.cancelled() => {
                return restarting(&mut framed, &session, reg.link.id).await;
            }
            () = reg.link.cancel.cancelled() => {
                // With nothing to drain, a stopping relay cancels every session right after
                // it starts stopping: the agent must still hear that it is coming back.
                if relay.stopping.is_cancelled() {
                    return restarting(&mut framed, &session, reg.link.id).await;
                }
                break;
            }
            Some(msg) = reg.rx.recv() => result = send(&mut framed, msg, limit).await,
            Some(count) = visitor_count_changed(&mut reg.visitor_count) => {
                result = send(&mut framed, Message::Visitors { count }, limit).await;
            }
            _ = ticker.tick() => {
                if last_heard.elapsed() > limit {
                    tracing::warn!(session_id = %session.id, "agent link dead: no frame for three heartbeat intervals");
                    break;
                }
                seq += 1;
                result = send(&mut framed, Message::Ping { seq }, limit).await;
            }
            frame = framed.next() => {
                last_heard = Instant::now();
                if !confirmed && matches!(frame, Some(Ok(_))) {
                    relay.confirm_registration(&session, reg.link.id).await;
                    confirmed = true;
                }
                match frame {
                    Some(Ok(Message::Ping { seq })) => result = send(&mut framed, Message::Pong { seq }, limit).await,
                    Some(Ok(Message::Pong { .. })) => {}
                    Some(Ok(Message::End)) => {
                        if session.lock().life.visitors > 0 {
                            tracing::info!(session_id = %session.id, "the agent asked to end the session, but a visitor is connected: not ended");
                        } else {
                            relay.revoke(&session, RevokeReason::EndedByAgent);
                        }
                    }
                    Some(Ok(Message::Finish)) => {
                        if let Err(e) = relay.finish(&session, "agent").await {
                            tracing::error!(session_id = %session.id, error = %e, "cannot save the finish");
                        }
                    }
                    Some(Ok(Message::VisitorAuthenticated { conn_id })) => session.report_authenticated(conn_id),
                    Some(Ok(Message::OpenFailed { conn_id, reason })) => {
                        tracing::info!(session_id = %session.id, conn_id, reason = %Untrusted(&reason), "agent could not reach the local service");
                        session.cancel_open(conn_id);
                    }
                    Some(Ok(other)) => {
                        let msg = format!("`{}` is not allowed on a control connection", other.kind());
                        refuse(relay, peer, &mut framed, ErrorCode::UnexpectedMessage, msg).await;
                        break;
                    }
                    Some(Err(e)) => {
                        refuse(relay, peer, &mut framed, ErrorCode::BadFrame, format!("control frame refused: {e}")).await;
                        break;
                    }
                    None => {
                        tracing::info!(session_id = %session.id, "agent closed its control connection");
                        break;
                    }
                }
            }
        }
    }
    if let Err(e) = result {
        tracing::info!(session_id = %session.id, error = %e, "agent link failed");
    }
    let revoked = session.lock().life.revoked;
    if let Some((reason, _)) = revoked {
        let farewell = async {
            let _ = framed
                .send(Message::Revoked {
                    reason: reason.describe().to_owned(),
                })
                .await;
            let _ = framed.close().await;
        };
        let _ = tokio::time::timeout(FAREWELL_TIMEOUT, farewell).await;
    }
    session.link_lost(reg.link.id, SystemTime::now());
}

/// The visitor count once it changes (the latest, coalesced); never resolves for agents
/// that did not ask for reports, or once the watch is gone.
async fn visitor_count_changed(
    count: &mut Option<tokio::sync::watch::Receiver<u32>>,
) -> Option<u32> {
    let Some(rx) = count else {
        return std::future::pending().await;
    };
    if rx.changed().await.is_err() {
        return std::future::pending().await;
    }
    Some(*rx.borrow_and_update())
}

/// The relay is stopping: tell the agent to come back to the restarted relay (its visitors
/// drain) and release the link.
async fn restarting(framed: &mut AgentFramed, session: &Session, link_id: u64) {
    let msg = "the relay is restarting: reconnect shortly".to_owned();
    farewell(framed, ErrorCode::ShuttingDown, msg).await;
    session.link_released(link_id, SystemTime::now());
}

/// Sends one frame, failing when the agent has not taken it within `limit`.
async fn send(
    framed: &mut AgentFramed,
    msg: Message,
    limit: std::time::Duration,
) -> Result<(), FrameError> {
    send_within(framed, msg, limit, "agent").await
}
