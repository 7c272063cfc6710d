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
use crate::limits::{FAREWELL_TIMEOUT, VISITOR_REPORT_INTERVAL};
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
    /// Whether the agent takes `open_at` (visitors on other nodes of a cluster).
    pub attach_elsewhere: bool,
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
        attach_elsewhere: hello.attach_elsewhere,
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
    relay: &Arc<Relay>,
    hello: Hello,
    ip: IpAddr,
) -> Result<(Registration, String), Refusal> {
    let (auth, offer, agent_version) = screen(hello, ip)?;
    // In a cluster the agent may reach this node before the session's record does.
    relay.load_if_unknown(&auth).await;
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
    let mut pace = ReportPace::default();
    let mut result = send(&mut framed, registered, limit).await;
    while result.is_ok() {
        tokio::select! {
            () = relay.stopping.cancelled() => {
                return restarting(relay, &mut framed, &session, reg.link.id).await;
            }
            () = reg.link.cancel.cancelled() => {
                // With nothing to drain, a stopping relay cancels every session right after
                // it starts stopping: the agent must still hear that it is coming back.
                if relay.stopping.is_cancelled() {
                    return restarting(relay, &mut framed, &session, reg.link.id).await;
                }
                break;
            }
            Some(msg) = reg.rx.recv() => result = send(&mut framed, msg, limit).await,
            true = visitor_count_changed(&mut reg.visitor_count), if !pace.dirty => pace.dirty = true,
            // Counts wait while `open`s are queued: a count is only news, an `open` has a
            // visitor waiting on it.
            () = tokio::time::sleep_until(pace.not_before), if pace.dirty && reg.rx.is_empty() => {
                if let Some(count) = pace.take(&mut reg.visitor_count) {
                    result = send(&mut framed, Message::Visitors { count }, limit).await;
                }
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
    if session.link_lost(reg.link.id, SystemTime::now()) {
        relay.link_ended(&session);
    }
}

/// Resolves `true` once the visitor count changed; never resolves for agents that did not
/// ask for reports, or once the watch is gone. Cancel-safe: a change it saw is reported by
/// its branch, and one it did not see stays unseen in the watch.
async fn visitor_count_changed(count: &mut Option<tokio::sync::watch::Receiver<u32>>) -> bool {
    if let Some(rx) = count {
        if rx.changed().await.is_ok() {
            return true;
        }
    }
    std::future::pending().await
}

/// Paces `visitors` reports: the first change goes out at once (so an agent always learns
/// that somebody connected), later ones at most every [`VISITOR_REPORT_INTERVAL`] with the
/// latest count, so a busy session costs its agent a few frames a second, not two per
/// visitor.
#[derive(Debug)]
struct ReportPace {
    /// A change is waiting to be reported.
    dirty: bool,
    /// The count last sent.
    last_sent: Option<u32>,
    /// The earliest moment of the next report.
    not_before: tokio::time::Instant,
}

impl Default for ReportPace {
    fn default() -> Self {
        Self {
            dirty: false,
            last_sent: None,
            not_before: tokio::time::Instant::now(),
        }
    }
}

impl ReportPace {
    /// The count to send now, if it differs from the last one sent.
    fn take(&mut self, count: &mut Option<tokio::sync::watch::Receiver<u32>>) -> Option<u32> {
        self.dirty = false;
        let latest = *count.as_mut()?.borrow_and_update();
        if self.last_sent == Some(latest) {
            return None;
        }
        self.last_sent = Some(latest);
        self.not_before = tokio::time::Instant::now() + VISITOR_REPORT_INTERVAL;
        Some(latest)
    }
}

/// The relay is stopping: tell the agent to come back to the restarted relay (its visitors
/// drain) and release the link.
async fn restarting(relay: &Relay, framed: &mut AgentFramed, session: &Arc<Session>, link_id: u64) {
    let msg = "the relay is restarting: reconnect shortly".to_owned();
    farewell(framed, ErrorCode::ShuttingDown, msg).await;
    if session.link_released(link_id, SystemTime::now()) {
        relay.link_ended(session);
    }
}

/// Sends one frame, failing when the agent has not taken it within `limit`.
async fn send(
    framed: &mut AgentFramed,
    msg: Message,
    limit: std::time::Duration,
) -> Result<(), FrameError> {
    send_within(framed, msg, limit, "agent").await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn visitor_reports_are_paced_and_never_repeat_a_count() {
        let (tx, rx) = tokio::sync::watch::channel(0u32);
        let mut count = Some(rx);
        let mut pace = ReportPace::default();
        let start = tokio::time::Instant::now();

        tx.send_replace(1);
        assert!(visitor_count_changed(&mut count).await);
        assert!(
            pace.not_before <= start,
            "the first report goes out at once"
        );
        assert_eq!(pace.take(&mut count), Some(1));
        assert!(pace.not_before >= start + VISITOR_REPORT_INTERVAL);

        // A burst within the interval: only the latest count is sent, once it is due.
        for n in [2, 3, 2] {
            tx.send_replace(n);
        }
        assert!(visitor_count_changed(&mut count).await);
        tokio::time::sleep_until(pace.not_before).await;
        assert_eq!(pace.take(&mut count), Some(2));

        // Back to the count last sent: nothing to say.
        tx.send_replace(5);
        tx.send_replace(2);
        assert!(visitor_count_changed(&mut count).await);
        assert_eq!(pace.take(&mut count), None);
        assert!(!pace.dirty);

        // Agents that did not ask never get a count.
        let mut none = None;
        assert_eq!(pace.take(&mut none), None);
        let silent = tokio::time::timeout(
            std::time::Duration::from_millis(50),
            visitor_count_changed(&mut none),
        );
        assert!(silent.await.is_err());
    }
}
