//! Session operations on the shared [`Relay`]: create, join, resume, finish, revoke.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use porthole_protocol::{Endpoint, Message, Secret, Service};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

use ipnet::IpNet;

use crate::edge::visitor::guards::Guards;
use crate::error::RelayError;
use crate::limits::CONTROL_QUEUE;
use crate::ops::audit::AuditEvent;
use crate::session::access::Access;
use crate::session::lifecycle::{
    Lifecycle, LifetimePolicy, LifetimeSettings, RevokeReason, SessionState,
};
use crate::session::persist::nonzero;
use crate::session::refusal::Refusal;
use crate::session::runtime::{Link, Session, SessionSpec};
use crate::shared::Relay;
use crate::store::StoreError;
use crate::untrusted::valid_session_id;
use crate::{edge::visitor::public, session::supervisor};
use futures_util::future::BoxFuture;
use porthole_protocol::secret::SecretHash;
use porthole_protocol::time::to_unix_ms;

/// How many port picks a create tries when other nodes of the cluster hold the picked ports.
pub const CREATE_ATTEMPTS: usize = 16;

/// How long a port another node's session holds is set aside here, at least.
const TAKEN_PORT_REST: Duration = Duration::from_secs(10);

/// What the API asks for when it creates a session.
#[derive(Clone, Debug)]
pub struct NewSession {
    /// The CI build.
    pub build_id: String,
    /// The CI app.
    pub app_id: String,
    /// Services, distinct, at least one.
    pub services: Vec<Service>,
    /// Grace after finish.
    pub grace: Duration,
    /// Hard cap on the session's life.
    pub max_lifetime: Duration,
    /// Which grace rule applies.
    pub policy: LifetimePolicy,
    /// Sources allowed to connect (empty: all).
    pub allow_cidrs: Vec<IpNet>,
    /// Concurrent visitor cap (None: the relay's setting).
    pub max_visitors: Option<usize>,
}

/// What an agent offers in its `hello`.
#[derive(Debug)]
pub struct AgentOffer {
    /// Services it can reach.
    pub services: Vec<Service>,
    /// Credentials and host keys, checked.
    pub access: Access,
    /// Its address (for the audit log).
    pub ip: IpAddr,
    /// Whether it takes `visitors` reports.
    pub visitor_reports: bool,
    /// Whether it takes `open_at` (cluster: visitors waiting on other nodes).
    pub attach_elsewhere: bool,
}

/// What [`Relay::claim_link`] took under the session lock.
struct Claimed {
    /// The new link.
    link: Link,
    /// Its receiving end.
    rx: mpsc::Receiver<Message>,
    /// The visitor count for the agent, when it asked for reports.
    count_rx: Option<tokio::sync::watch::Receiver<u32>>,
    /// The new resume secret.
    resume_secret: Secret,
    /// The new park secret.
    park_secret: Secret,
    /// The fields to put back if the write fails: pending resume hash, confirmed, joined,
    /// link down since (only what the registration changed, so visitor counts and a
    /// revocation that happened meanwhile are left alone).
    before: (
        Option<SecretHash>,
        bool,
        bool,
        Option<SystemTime>,
        Option<Access>,
    ),
    /// The queued write.
    saved: BoxFuture<'static, Result<(), StoreError>>,
    /// Cluster mode: the node that held the agent's link before this resume, if another.
    rehomed_from: Option<String>,
}

/// A registered agent link.
#[derive(Debug)]
pub struct Registration {
    /// The session.
    pub session: Arc<Session>,
    /// The link; the control task owns its receiving end.
    pub link: Link,
    /// Messages for the agent.
    pub rx: mpsc::Receiver<Message>,
    /// The fresh resume secret, sent once in `registered`.
    pub resume_secret: Secret,
    /// The link's secret for warm data connections, sent once in `registered`.
    pub park_secret: Secret,
    /// Whether this was a resume.
    pub resumed: bool,
    /// The visitor count to report to the agent, when it asked for reports.
    pub visitor_count: Option<tokio::sync::watch::Receiver<u32>>,
}

impl Relay {
    /// Creates a session: binds its public ports, makes it durable, and activates it on this
    /// node. The ports go back to the pool if the session cannot be stored.
    ///
    /// In a cluster the store also reserves the ports cluster-wide; ports another node's
    /// session holds (or is cooling) are set aside here for a cooldown and others are
    /// tried, up to [`CREATE_ATTEMPTS`] times.
    pub async fn create_session(
        self: &Arc<Self>,
        req: NewSession,
    ) -> Result<(Arc<Session>, Secret), RelayError> {
        let mut attempt = 1;
        loop {
            let listeners = self.pool.allocate(req.services.len())?;
            let ports: Vec<u16> = listeners.iter().map(|(p, _)| *p).collect();
            match self.store_new_session(req.clone(), &ports).await {
                Ok((session, join_token)) => {
                    self.activate(&session, listeners);
                    return Ok((session, join_token));
                }
                Err(e) => {
                    drop(listeners);
                    let taken = match &e {
                        RelayError::Store(StoreError::PortsTaken(taken)) => taken.clone(),
                        _ => Vec::new(),
                    };
                    let free: Vec<u16> = ports
                        .iter()
                        .copied()
                        .filter(|p| !taken.contains(p))
                        .collect();
                    self.pool.release_now(&free);
                    if taken.is_empty() || attempt >= CREATE_ATTEMPTS {
                        self.pool.release_now(&taken);
                        return Err(e);
                    }
                    // Held elsewhere in the cluster (or still cooling there: etcd counts a
                    // cooldown in whole seconds, this node may count it shorter): not offered
                    // again for a while; this node binds them once it hears of their session.
                    self.pool.release_now(&taken);
                    let rest = self.config.port_cooldown.max(TAKEN_PORT_REST);
                    self.pool.cool(&taken, std::time::Instant::now() + rest);
                    attempt += 1;
                }
            }
        }
    }

    /// The part of [`Relay::create_session`] that binds nothing: a new pending session on
    /// `ports` (one per service, in order), durable before it is returned, then in the
    /// registry, counted and audited.
    pub async fn store_new_session(
        &self,
        req: NewSession,
        ports: &[u16],
    ) -> Result<(Arc<Session>, Secret), RelayError> {
        let join_token = Secret::generate("phj_");
        let id = format!("s_{}", &Secret::generate("").expose()[..20]);
        let endpoints = req
            .services
            .iter()
            .zip(ports)
            .map(|(service, port)| Endpoint {
                service: *service,
                host: self.public_host.clone(),
                port: *port,
            })
            .collect();
        let c = &self.config;
        let settings = LifetimeSettings {
            join_ttl: c.join_ttl,
            max_lifetime: req.max_lifetime,
            grace: req.grace,
            resume_window: c.resume_window,
            policy: req.policy,
        };
        let spec = SessionSpec {
            id: id.clone(),
            build_id: req.build_id,
            app_id: req.app_id,
            endpoints,
            join_hash: join_token.hash(),
            guards: Guards::new(
                req.allow_cidrs,
                nonzero(c.visitor_rate_burst),
                nonzero(c.visitor_rate_per_minute),
            ),
            max_visitors: req.max_visitors.unwrap_or(c.max_visitors),
        };
        let life = Lifecycle::new(SystemTime::now(), settings);
        let session = Arc::new(Session::new(spec, life, self.cancel.child_token()));
        // Durable before the API answers.
        self.sessions.reserve(&id);
        let saved = self.save(&session, &mut session.lock());
        if let Err(e) = saved.await {
            self.sessions.unreserve(&id);
            return Err(e.into());
        }
        self.sessions.insert(session.clone());
        self.sessions.unreserve(&id);
        tracing::info!(session_id = %id, build_id = %session.build_id, app_id = %session.app_id,
            ports = ?session.ports(), "session created");
        self.metrics.sessions_created.inc();
        self.audit.record(AuditEvent::SessionCreated {
            session_id: id,
            build_id: session.build_id.clone(),
            app_id: session.app_id.clone(),
            ports: session.ports(),
        });
        Ok((session, join_token))
    }

    /// Brings a session up on this node: serves each of its public `listeners` (in the order
    /// of its endpoints) and starts its deadline supervisor. Creating and restoring a session
    /// both come here; a revoked session that is only kept for its retention gets no
    /// listeners, only the supervisor that forgets it.
    pub fn activate(self: &Arc<Self>, session: &Arc<Session>, listeners: Vec<(u16, TcpListener)>) {
        self.listen(session, listeners);
        self.tasks
            .spawn(supervisor::run(self.clone(), session.clone()));
    }

    /// Serves each of a session's public `listeners` (in the order of its endpoints).
    pub fn listen(self: &Arc<Self>, session: &Arc<Session>, listeners: Vec<(u16, TcpListener)>) {
        for ((port, listener), endpoint) in listeners.into_iter().zip(&session.endpoints) {
            self.tasks.spawn(public::serve_port(
                self.clone(),
                session.clone(),
                endpoint.service,
                port,
                listener,
            ));
        }
    }

    /// Registers an agent that presents a join token.
    pub async fn join(&self, token: &Secret, agent: &AgentOffer) -> Result<Registration, Refusal> {
        let session = self
            .sessions
            .by_join_token(token)
            .ok_or(Refusal::UnknownJoinToken)?;
        self.register(session, agent, false).await
    }

    /// Registers an agent that presents a session id and resume secret.
    pub async fn resume(
        &self,
        session_id: &str,
        secret: &Secret,
        agent: &AgentOffer,
    ) -> Result<Registration, Refusal> {
        if !valid_session_id(session_id) {
            return Err(Refusal::MalformedSessionId);
        }
        let bad = || Refusal::BadResume(session_id.to_owned());
        let session = self.sessions.get(session_id).ok_or_else(bad)?;
        let known = {
            let inner = session.lock();
            [inner.durable.resume_hash, inner.durable.pending_resume_hash]
        };
        if !known.iter().flatten().any(|h| secret.matches(h)) {
            return Err(bad());
        }
        self.register(session, agent, true).await
    }

    async fn register(
        &self,
        session: Arc<Session>,
        agent: &AgentOffer,
        resume: bool,
    ) -> Result<Registration, Refusal> {
        if let Some(missing) = session
            .services()
            .into_iter()
            .find(|s| !agent.services.contains(s))
        {
            return Err(Refusal::ServiceMissing {
                session_id: session.id.clone(),
                missing,
            });
        }
        let Claimed {
            link,
            rx,
            count_rx,
            resume_secret,
            park_secret,
            before,
            saved,
            rehomed_from,
        } = self.claim_link(&session, agent, resume)?;
        if let Err(e) = saved.await {
            tracing::error!(session_id = %session.id, error = %e, "cannot save the registration");
            {
                let mut inner = session.lock();
                if inner.link.as_ref().is_some_and(|l| l.id == link.id) {
                    inner.link = None;
                    inner.owner = None;
                    let (pending, confirmed, joined, down_since, access);
                    (pending, confirmed, joined, down_since, access) = before;
                    inner.durable.pending_resume_hash = pending;
                    inner.durable.confirmed = confirmed;
                    inner.life.joined = joined;
                    inner.life.link_down_since = down_since;
                    // The refused agent's credentials are not shown (a revocation meanwhile
                    // has dropped them for good).
                    inner.access = access.filter(|_| inner.life.revoked.is_none());
                }
            }
            link.cancel.cancel();
            self.resync_version(&session).await;
            return Err(Refusal::NotSaved);
        }
        session.changed.notify_one();
        let kind = if resume { "resume" } else { "join" };
        self.metrics.registrations.with_label_values(&[kind]).inc();
        let (session_id, agent_ip) = (session.id.clone(), agent.ip);
        if let (Some(from_node), Some(to_node)) = (rehomed_from, self.node_name()) {
            tracing::info!(session_id = %session.id, from = %from_node, "the session's agent resumed on this node");
            self.audit.record(AuditEvent::SessionRehomed {
                session_id: session.id.clone(),
                from_node,
                to_node: to_node.to_owned(),
            });
        }
        self.audit.record(if resume {
            AuditEvent::SessionResumed {
                session_id,
                agent_ip,
            }
        } else {
            AuditEvent::SessionJoined {
                session_id,
                agent_ip,
            }
        });
        Ok(Registration {
            session,
            link,
            rx,
            resume_secret,
            park_secret,
            resumed: resume,
            visitor_count: count_rx,
        })
    }

    /// The part of a registration done under the session lock: checks, the new link and
    /// secrets, the lifecycle change, and the record queued for the store.
    fn claim_link(
        &self,
        session: &Arc<Session>,
        agent: &AgentOffer,
        resume: bool,
    ) -> Result<Claimed, Refusal> {
        let mut inner = session.lock();
        if let Some((reason, _)) = inner.life.revoked {
            return Err(Refusal::Revoked {
                session_id: session.id.clone(),
                reason,
            });
        }
        // A join token is spent for good once any registration of the session was confirmed
        // (by join or resume); before that (the `registered` answer may have been lost) it
        // may join again.
        if !resume && inner.durable.join_spent {
            return Err(Refusal::TokenUsed(session.id.clone()));
        }
        if inner
            .link
            .as_ref()
            .is_some_and(|l| !l.cancel.is_cancelled())
        {
            return Err(Refusal::Busy(session.id.clone()));
        }
        // In a cluster, another live node may hold the agent's link.
        if let (Some(cluster), Some(owner)) = (&self.cluster, &inner.owner) {
            if *owner != cluster.node_name && cluster.members.alive(owner) {
                return Err(Refusal::Busy(session.id.clone()));
            }
        }
        let (tx, rx) = mpsc::channel(CONTROL_QUEUE);
        let park_secret = Secret::generate("php_");
        let (visitor_count, count_rx) = if agent.visitor_reports {
            let (tx, rx) = tokio::sync::watch::channel(0u32);
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        let link = Link {
            id: session.next_id(),
            tx,
            cancel: session.cancel.child_token(),
            park_hash: park_secret.hash(),
            ip: agent.ip,
            visitor_count: visitor_count.map(Arc::new),
            attach_elsewhere: agent.attach_elsewhere,
        };
        let resume_secret = Secret::generate("phr_");
        let before = (
            inner.durable.pending_resume_hash,
            inner.durable.confirmed,
            inner.life.joined,
            inner.life.link_down_since,
            inner.access.clone(),
        );
        inner.durable.pending_resume_hash = Some(resume_secret.hash());
        inner.durable.confirmed = false;
        if resume {
            inner.life.on_resume()
        } else {
            inner.life.on_join()
        }
        // The link is taken now (a second agent meanwhile is `session_busy`); the new resume
        // secret is durable before the agent hears `registered`.
        inner.link = Some(link.clone());
        let me = self.node_name().map(str::to_owned);
        inner.owner = me.clone();
        let rehomed_from = match me {
            Some(me) => inner
                .last_owner
                .replace(me.clone())
                .filter(|before| resume && *before != me),
            None => None,
        };
        inner.access = Some(agent.access.clone());
        let saved = self.save(session, &mut inner);
        Ok(Claimed {
            link,
            rx,
            count_rx,
            resume_secret,
            park_secret,
            before,
            saved,
            rehomed_from,
        })
    }

    /// The agent on link `link_id` proved it got its `registered` (it sent a frame on the
    /// new link): its new resume secret becomes the only valid one, and a join token is
    /// spent for good.
    pub async fn confirm_registration(&self, session: &Session, link_id: u64) {
        let saved = {
            let mut inner = session.lock();
            if inner.durable.confirmed || inner.link.as_ref().is_none_or(|l| l.id != link_id) {
                return;
            }
            if let Some(pending) = inner.durable.pending_resume_hash.take() {
                inner.durable.resume_hash = Some(pending);
            }
            inner.durable.confirmed = true;
            inner.durable.join_spent = true;
            self.save(session, &mut inner)
        };
        if let Err(e) = saved.await {
            tracing::warn!(session_id = %session.id, error = %e, "cannot save the confirmed registration");
            self.resync_version(session).await;
        }
    }

    /// A deadline moved by itself (the last visitor of an `extend_while_connected` session
    /// left): save it and tell the agent.
    pub async fn announce_deadline(&self, session: &Session) {
        let (saved, deadline, finishing, link) = {
            let mut inner = session.lock();
            if inner.life.revoked.is_some() {
                return;
            }
            let saved = self.save(session, &mut inner);
            let finishing = inner.life.finish_deadline.is_some();
            (
                saved,
                inner.life.deadline().0,
                finishing,
                inner.link.clone(),
            )
        };
        if let Err(e) = saved.await {
            tracing::warn!(session_id = %session.id, error = %e, "cannot save the new deadline");
            self.resync_version(session).await;
        }
        tell_deadline(session, link, deadline, finishing);
    }

    /// The build finished (`by`: `agent` or `api`): start the grace period and tell the
    /// agent the new deadline.
    pub async fn finish(&self, session: &Session, by: &'static str) -> Result<(), RelayError> {
        let (before, saved, version) = {
            let mut inner = session.lock();
            let before = inner.life.finish_deadline;
            if !inner.life.on_finish(SystemTime::now()) {
                return Ok(());
            }
            let saved = self.save(session, &mut inner);
            (before, saved, inner.durable.version)
        };
        if let Err(e) = saved.await {
            session.lock().life.finish_deadline = before;
            self.after_failed_write(session, version, &e).await;
            return Err(e.into());
        }
        self.audit.record(AuditEvent::SessionFinished {
            session_id: session.id.clone(),
            by,
        });
        let inner = session.lock();
        let deadline = inner.life.deadline().0;
        let link = inner.link.clone();
        drop(inner);
        session.changed.notify_one();
        tracing::info!(session_id = %session.id, deadline = %humantime::format_rfc3339_seconds(deadline), "session finishing");
        tell_deadline(session, link, deadline, true);
        Ok(())
    }

    /// Revokes a session: listeners, agent link and every visitor connection close; its
    /// ports cool down.
    pub fn revoke(&self, session: &Arc<Session>, reason: RevokeReason) {
        let created_at = {
            let mut inner = session.lock();
            if !inner.life.revoke(reason, SystemTime::now()) {
                return;
            }
            // Passwords are forgotten at revocation.
            inner.access = None;
            // Revocation stands even if the store fails: access ends now either way.
            let saved = self.save(session, &mut inner);
            self.save_in_background(session, saved, "revocation");
            inner.life.created_at
        };
        self.revoked_effects(session, reason, created_at);
    }

    /// A revocation asked through the API. On a single node, [`Relay::revoke`]. In a
    /// cluster it is written first: every node cuts the session when the record changes,
    /// and a revocation etcd did not take would hold on this node only. So when the store
    /// cannot take it, nothing changes and the error says why (the API answers 503).
    pub async fn revoke_durably(
        &self,
        session: &Arc<Session>,
        reason: RevokeReason,
    ) -> Result<(), RelayError> {
        if self.cluster.is_none() {
            self.revoke(session, reason);
            return Ok(());
        }
        let mut attempt = 0;
        loop {
            attempt += 1;
            let at = SystemTime::now();
            let (saved, version) = {
                let mut inner = session.lock();
                if inner.life.revoked.is_some() {
                    return Ok(());
                }
                // Revoked in this node's state at once (so no other write of this node goes
                // out without it, and no new visitor is admitted), cut once it is durable.
                inner.life.revoke(reason, at);
                let saved = self.save(session, &mut inner);
                (saved, inner.durable.version)
            };
            match saved.await {
                Ok(()) => break,
                Err(e) => {
                    {
                        let mut inner = session.lock();
                        if inner.life.revoked == Some((reason, at)) {
                            inner.life.revoked = None;
                        }
                    }
                    self.after_failed_write(session, version, &e).await;
                    let retry = matches!(e, StoreError::Conflict { .. }) && attempt < 3;
                    if !retry {
                        return Err(e.into());
                    }
                }
            }
        }
        let created_at = {
            let mut inner = session.lock();
            inner.access = None;
            inner.life.created_at
        };
        self.revoked_effects(session, reason, created_at);
        Ok(())
    }

    /// What follows a revocation this node decided: metrics, the audit line, listeners and
    /// connections cut, ports cooling.
    fn revoked_effects(
        &self,
        session: &Arc<Session>,
        reason: RevokeReason,
        created_at: SystemTime,
    ) {
        self.metrics
            .sessions_revoked
            .with_label_values(&[reason.as_str()])
            .inc();
        let lived = SystemTime::now()
            .duration_since(created_at)
            .unwrap_or_default();
        self.metrics.session_duration.observe(lived.as_secs_f64());
        self.audit.record(AuditEvent::SessionRevoked {
            session_id: session.id.clone(),
            reason,
        });
        session.cancel.cancel();
        self.pool.release(&session.ports());
        session.changed.notify_one();
        tracing::info!(session_id = %session.id, reason = ?reason, "session revoked: {}", reason.describe());
    }

    /// Whether this node decides for `session` (writes its deadline revocation): on a
    /// single node always; in a cluster, the node holding the agent's link, or, for a
    /// session whose owner is gone, the cluster's sweeper. The others only cut it
    /// locally ([`Relay::revoke_here`]) and hear the decision from the store.
    pub fn decides(&self, session: &Session) -> bool {
        let Some(cluster) = &self.cluster else {
            return true;
        };
        let inner = session.lock();
        match &inner.owner {
            // A revoked session's record is removed by the sweeper (its owner may have
            // forgotten it owned it).
            Some(owner) if cluster.members.alive(owner) && inner.life.revoked.is_none() => {
                *owner == cluster.node_name
            }
            _ => cluster.members.sweeper() == cluster.node_name,
        }
    }

    /// Cuts `session` on this node only (cluster mode: another node decided, or decides,
    /// its revocation): ports close, the link and visitors end. Nothing is written or
    /// audited here. `reason`: revoke the lifecycle too (None: already revoked).
    pub fn revoke_here(&self, session: &Session, reason: Option<RevokeReason>) {
        {
            let mut inner = session.lock();
            if let Some(reason) = reason {
                if !inner.life.revoke(reason, SystemTime::now()) {
                    return;
                }
            }
            inner.access = None;
        }
        session.cancel.cancel();
        self.pool.release(&session.ports());
        session.changed.notify_one();
        tracing::info!(session_id = %session.id, "session revoked (decided by the cluster)");
    }

    /// The agent's link ended on this node ([`Session::link_lost`] returned true): in a
    /// cluster, the record says so (no owner, link down since now), so every node starts
    /// the resume window, and another node may take the agent.
    pub fn link_ended(&self, session: &Arc<Session>) {
        if self.cluster.is_none() {
            return;
        }
        let saved = {
            let mut inner = session.lock();
            if inner.life.revoked.is_some() || inner.link.is_some() {
                return;
            }
            self.save(session, &mut inner)
        };
        self.save_in_background(session, saved, "lost agent link");
    }

    /// Forgets a revoked session (after its retention).
    pub fn purge(&self, session: &Arc<Session>) {
        if session.lock().life.state() == SessionState::Revoked {
            self.sessions.remove(session);
            if !self.decides(session) {
                // Another node of the cluster removes it from the store.
                return;
            }
            let removed = self.store.remove(&session.id);
            let session_id = session.id.clone();
            self.tasks.spawn(async move {
                if let Err(e) = removed.await {
                    tracing::warn!(%session_id, error = %e, "cannot remove a purged session from the store");
                }
            });
        }
    }
}

/// Tells the agent on `link` (if connected) the session's deadline, without waiting: a full
/// queue drops the update (the agent hears the next one, and the relay enforces the deadline
/// either way).
pub(crate) fn tell_deadline(
    session: &Session,
    link: Option<Link>,
    deadline: SystemTime,
    finishing: bool,
) {
    let Some(link) = link else { return };
    let msg = Message::Deadline {
        deadline_unix_ms: to_unix_ms(deadline),
        finishing,
    };
    if link.tx.try_send(msg).is_err() {
        tracing::debug!(session_id = %session.id, "could not queue deadline update for the agent");
    }
}
