//! Sessions to and from the state store: each change a peer is told about is written first
//! ([`Relay::save`], awaited before telling); on start, stored sessions come back
//! ([`Relay::restore`]) with their ports rebound, their deadlines kept, and their agents
//! expected to resume.

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use futures_util::future::BoxFuture;

use crate::edge::visitor::guards::Guards;
use crate::error::RelayError;
use crate::session::lifecycle::{LifetimePolicy, RevokeReason};
use crate::session::runtime::{Durable, Session, SessionInner, SessionSpec};
use crate::shared::Relay;
use crate::store::{hash_from_hex, hash_hex, SessionRecord, SessionStore, StoreError, FORMAT};

impl Relay {
    /// Queues the session's record as `inner` describes it, with the next version. Call it
    /// under the session lock (one session's writes then stay in order) and await the
    /// returned future after releasing the lock: it resolves once the record is durable.
    pub fn save(
        &self,
        session: &Session,
        inner: &mut SessionInner,
    ) -> BoxFuture<'static, Result<(), StoreError>> {
        let owner = owner_field(self.node_name(), inner);
        save(&self.store, session, inner, owner)
    }

    /// This node's name in its cluster (None: a single node).
    pub fn node_name(&self) -> Option<&str> {
        self.cluster.as_ref().map(|c| c.node_name.as_str())
    }

    /// After a failed write: the next write goes on top of what the store holds, so a lost
    /// write does not make every later one conflict.
    pub async fn resync_version(&self, session: &Session) {
        if self.cluster.is_some() {
            // Another node may have written more than the version: take all of it.
            self.refresh(session).await;
        } else {
            resync_version(&self.store, session).await;
        }
    }

    /// After this node's write of `version` failed: when the store could not be reached,
    /// the version goes back to what it was (nothing was written, and reading the store
    /// again would only wait as long once more); otherwise (another write came first) the
    /// stored record is taken ([`Relay::resync_version`]).
    pub async fn after_failed_write(&self, session: &Session, version: u64, error: &StoreError) {
        if matches!(error, StoreError::Unavailable(_)) {
            let mut inner = session.lock();
            if inner.durable.version == version {
                inner.durable.version = version.saturating_sub(1);
            }
            return;
        }
        self.resync_version(session).await;
    }

    /// Awaits a queued write in the background (for changes that stand in memory whatever
    /// the store says: revocations). On failure it takes the stored version and writes the
    /// session as it is now once more, so the change is not lost to a conflict.
    pub fn save_in_background(
        &self,
        session: &Arc<Session>,
        saved: BoxFuture<'static, Result<(), StoreError>>,
        what: &'static str,
    ) {
        let (store, session) = (self.store.clone(), session.clone());
        let node = self.node_name().map(str::to_owned);
        self.tasks.spawn(async move {
            let Err(e) = saved.await else { return };
            tracing::warn!(session_id = %session.id, error = %e, "cannot save the {what}; retrying once");
            let stored = match store.get(&session.id).await {
                Ok(stored) => stored,
                Err(e) => {
                    return tracing::error!(session_id = %session.id, error = %e, "cannot save the {what}");
                }
            };
            session.lock().durable.version = stored.as_ref().map_or(0, |r| r.version);
            if stored.is_some_and(|r| r.revoked.is_some()) {
                // Another node of the cluster revoked it first: its write stands.
                return;
            }
            let retried = {
                let mut inner = session.lock();
                let owner = owner_field(node.as_deref(), &inner);
                save(&store, &session, &mut inner, owner)
            };
            if let Err(e) = retried.await {
                tracing::error!(session_id = %session.id, error = %e, "cannot save the {what}");
            }
        });
    }

    /// Brings back every stored session: live ones get their ports rebound (a port that
    /// cannot be bound revokes its session) and their supervisors restarted, so deadlines
    /// that passed while the relay was down revoke at once; revoked ones stay visible until
    /// their retention ends and their ports finish cooling down. Returns how many sessions
    /// are live.
    pub async fn restore(self: &Arc<Self>) -> Result<usize, RelayError> {
        if self.cluster.is_some() {
            return self.mirror_all().await;
        }
        let now = SystemTime::now();
        let mut live = 0;
        let records = self.store.list().await?;
        for record in records {
            let mut life = record.lifecycle(now);
            // Visitors of an extend_while_connected session were cut by the restart: that is
            // the last visitor leaving, which starts a fresh grace.
            if life.policy == LifetimePolicy::ExtendWhileConnected && life.revoked.is_none() {
                life.on_visitor_joined();
                life.on_visitor_holding();
                life.on_visitor_left(now, true);
            }
            if let Some((_, revoked_at)) = life.revoked {
                let age = now.duration_since(revoked_at).unwrap_or_default();
                if age >= self.config.revoked_retention {
                    self.store.remove(&record.id).await?;
                    continue;
                }
                let rest = self.config.port_cooldown.saturating_sub(age);
                let ports: Vec<u16> = record.endpoints.iter().map(|e| e.port).collect();
                self.pool.cool(&ports, Instant::now() + rest);
            }
            let session = Arc::new(self.session_from(&record)?);
            session.lock().life = life;
            self.sessions.insert(session.clone());
            let due = session.lock().life.due(now);
            if let Some(reason) = due {
                // The deadline passed while the relay was down: revoke before serving.
                self.revoke(&session, reason);
            } else if session.lock().life.revoked.is_none() {
                match self.pool.claim(&session.ports()) {
                    Ok(listeners) => {
                        live += 1;
                        self.activate(&session, listeners);
                        continue;
                    }
                    Err((port, e)) => {
                        tracing::error!(session_id = %session.id, port, error = %e, "cannot rebind a session port");
                        self.revoke(&session, RevokeReason::PortLost);
                    }
                }
            }
            self.activate(&session, Vec::new());
        }
        Ok(live)
    }

    pub(crate) fn session_from(&self, r: &SessionRecord) -> Result<Session, RelayError> {
        let bad = |what: &'static str| RelayError::BadRecord {
            id: r.id.clone(),
            what,
        };
        let join_hash = hash_from_hex(&r.join_hash).ok_or_else(|| bad("join hash"))?;
        let parse = |h: &Option<String>, what: &'static str| match h {
            Some(h) => hash_from_hex(h).map(Some).ok_or_else(|| bad(what)),
            None => Ok(None),
        };
        let durable = Durable {
            resume_hash: parse(&r.resume_hash, "resume hash")?,
            pending_resume_hash: parse(&r.pending_resume_hash, "pending resume hash")?,
            confirmed: r.confirmed,
            // Records written before `join_spent` existed: a confirmed, joined session's
            // token was spent then too.
            join_spent: r.join_spent || (r.joined && r.confirmed),
            version: r.version,
        };
        let c = &self.config;
        let spec = SessionSpec {
            id: r.id.clone(),
            build_id: r.build_id.clone(),
            app_id: r.app_id.clone(),
            endpoints: r.endpoints.clone(),
            join_hash,
            guards: Guards::new(
                r.allow_cidrs.clone(),
                nonzero(c.visitor_rate_burst),
                nonzero(c.visitor_rate_per_minute),
            ),
            max_visitors: r.max_visitors,
        };
        let session = Session::new(
            spec,
            r.lifecycle(SystemTime::now()),
            self.cancel.child_token(),
        );
        session.lock().durable = durable;
        Ok(session)
    }
}

/// A rate setting as the non-zero the limiter needs (validated non-zero at start).
pub fn nonzero(n: u32) -> std::num::NonZeroU32 {
    std::num::NonZeroU32::new(n).unwrap_or(std::num::NonZeroU32::MIN)
}

/// The record's owner: this node (`node`, in a cluster) while it holds the agent's link;
/// otherwise the owner as this node last heard it (a write by another node, a finish say,
/// must not take the session from the node that holds its agent).
fn owner_field(node: Option<&str>, inner: &SessionInner) -> Option<String> {
    let node = node?;
    if inner.link.is_some() {
        Some(node.to_owned())
    } else {
        inner.owner.clone()
    }
}

/// [`Relay::save`] for a store and a session (also used by background retries).
pub fn save(
    store: &Arc<dyn SessionStore>,
    session: &Session,
    inner: &mut SessionInner,
    owner: Option<String>,
) -> BoxFuture<'static, Result<(), StoreError>> {
    inner.durable.version += 1;
    let d = &inner.durable;
    let mut record = SessionRecord {
        format: FORMAT,
        version: d.version,
        owner,
        id: session.id.clone(),
        build_id: session.build_id.clone(),
        app_id: session.app_id.clone(),
        endpoints: session.endpoints.clone(),
        join_hash: hash_hex(session.join_hash),
        resume_hash: d.resume_hash.map(hash_hex),
        pending_resume_hash: d.pending_resume_hash.map(hash_hex),
        confirmed: d.confirmed,
        join_spent: d.join_spent,
        allow_cidrs: session.guards.allow_cidrs().to_vec(),
        max_visitors: session.max_visitors,
        created_at_ms: 0,
        join_by_ms: 0,
        hard_cap_ms: 0,
        grace_ms: 0,
        resume_window_ms: 0,
        policy: inner.life.policy,
        joined: false,
        finish_deadline_ms: None,
        link_down_ms: None,
        revoked: None,
    };
    record.set_lifecycle(&inner.life);
    store.put(record)
}

/// Sets the session's version to the stored one (after a failed write, so the next write goes
/// on top of what the store holds). False when the store cannot be read.
async fn resync_version(store: &Arc<dyn SessionStore>, session: &Session) -> bool {
    match store.get(&session.id).await {
        Ok(stored) => {
            session.lock().durable.version = stored.map_or(0, |r| r.version);
            true
        }
        Err(e) => {
            tracing::warn!(session_id = %session.id, error = %e, "cannot read the session's stored version");
            false
        }
    }
}
