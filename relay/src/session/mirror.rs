//! Cluster mode: this node's copy of every session of the cluster. Each node binds every
//! live session's public ports and supervises its deadlines; the records other nodes write
//! arrive from the store's change stream and are applied here:
//!
//! - a session this node has not seen yet is adopted (its ports bound, its supervisor
//!   started), as after a restart;
//! - a newer version of a known session replaces its durable facts; a revocation decided
//!   elsewhere cuts it here ([`Relay::revoke_here`]); a new finish deadline is told to the
//!   agent if this node holds its link; a link another node took over is dropped here;
//! - a removed session is forgotten.
//!
//! Whether the agent's link is up is read from the record's owner: while a live node holds
//! it, the session is connected everywhere; when that node loses the link (it writes so) or
//! dies (its lease ends: [`Relay::owner_gone`]), the resume window starts everywhere.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use futures_util::StreamExt;
use porthole_protocol::time::to_unix_ms;

use crate::error::RelayError;
use crate::session::runtime::Session;
use crate::shared::Relay;
use crate::store::{hash_from_hex, hash_hex, SessionRecord, StoreChange};
use crate::untrusted::valid_session_id;
use porthole_protocol::message::HelloAuth;

impl Relay {
    /// Applies the store's changes until the relay stops (cluster mode).
    pub async fn follow_store(self: Arc<Self>) {
        let mut changes = self.store.changes();
        loop {
            let change = tokio::select! {
                () = self.cancel.cancelled() => return,
                change = changes.next() => change,
            };
            match change {
                Some(change) => self.apply_change(change),
                None => return,
            }
        }
    }

    /// Adopts every stored session (cluster start-up); returns how many are live.
    pub async fn mirror_all(self: &Arc<Self>) -> Result<usize, RelayError> {
        let records = self.store.list().await?;
        for record in records {
            self.apply_record(record);
        }
        Ok(self
            .sessions
            .list()
            .iter()
            .filter(|s| s.lock().life.revoked.is_none())
            .count())
    }

    /// Applies one change from the store.
    pub fn apply_change(self: &Arc<Self>, change: StoreChange) {
        match change {
            StoreChange::Put(record) => self.apply_record(*record),
            StoreChange::Removed(id) => {
                if let Some(session) = self.sessions.get(&id) {
                    self.forget_here(&session);
                }
            }
            StoreChange::Reloaded(records) => {
                let ids: HashSet<String> = records.iter().map(|r| r.id.clone()).collect();
                for record in records {
                    self.apply_record(record);
                }
                for session in self.sessions.list() {
                    if !ids.contains(&session.id) && !self.sessions.is_reserved(&session.id) {
                        self.forget_here(&session);
                    }
                }
            }
        }
    }

    /// Applies a record written by any node (its own writes come back too and are older
    /// than or as old as what this node holds).
    pub fn apply_record(self: &Arc<Self>, record: SessionRecord) {
        if self.sessions.is_reserved(&record.id) {
            return;
        }
        match self.sessions.get(&record.id) {
            Some(session) => self.update_from(&session, &record, false),
            None => self.adopt(&record),
        }
    }

    /// Cluster mode: an agent presents a join token or session id this node has not heard
    /// of yet (it reached this node before the record's change did): read it from the
    /// store and adopt it, so the registration does not fail on a race.
    pub async fn load_if_unknown(self: &Arc<Self>, auth: &HelloAuth) {
        let Some(cluster) = self.cluster.as_ref() else {
            return;
        };
        // Bounded: past it, an unknown token is simply unknown (the agent retries).
        let Ok(_lookup) = cluster.lookups.try_acquire() else {
            return;
        };
        let found = match auth {
            HelloAuth::Join { token } => {
                if self.sessions.by_join_token(token).is_some() {
                    return;
                }
                self.store.find_by_join_hash(&hash_hex(token.hash())).await
            }
            HelloAuth::Resume { session_id, .. } => {
                if !valid_session_id(session_id) || self.sessions.get(session_id).is_some() {
                    return;
                }
                self.store.get(session_id).await
            }
        };
        match found {
            Ok(Some(record)) => self.apply_record(record),
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "cannot look up an agent's session in the store"),
        }
    }

    /// Takes the stored record of `session` as it is (after this node's write failed: another
    /// node wrote first, and what it wrote counts).
    pub async fn refresh(&self, session: &Session) {
        match self.store.get(&session.id).await {
            Ok(Some(record)) => self.update_from(session, &record, true),
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(session_id = %session.id, error = %e, "cannot read the session's stored record");
            }
        }
    }

    /// A session first heard of: bound and supervised here like one of this node's own.
    fn adopt(self: &Arc<Self>, record: &SessionRecord) {
        let now = SystemTime::now();
        let owner_alive = self.owner_alive(record.owner.as_deref());
        let session = match self.session_from(record) {
            Ok(session) => Arc::new(session),
            Err(e) => {
                return tracing::error!(session_id = %record.id, error = %e, "ignoring a session record this node cannot read");
            }
        };
        {
            let mut inner = session.lock();
            inner.life = record.mirror_lifecycle(now, owner_alive);
            inner.owner = record.owner.clone();
            inner.last_owner = record.owner.clone();
        }
        if let Some((_, revoked_ms)) = record.revoked {
            let revoked_at = porthole_protocol::time::from_unix_ms(revoked_ms);
            let age = now.duration_since(revoked_at).unwrap_or_default();
            if age >= self.config.revoked_retention {
                return;
            }
            let rest = self.config.port_cooldown.saturating_sub(age);
            self.pool.cool(&session.ports(), Instant::now() + rest);
            self.sessions.insert(session.clone());
            self.activate(&session, Vec::new());
            return;
        }
        self.sessions.insert(session.clone());
        match self.pool.claim(&session.ports()) {
            Ok(listeners) => self.activate(&session, listeners),
            Err((port, e)) => {
                // A create of this node's own may hold the port for a moment (it loses to
                // this session in etcd and lets go): try again for a while. Another program
                // holding it: the session still works through the other nodes.
                tracing::warn!(session_id = %session.id, port, error = %e, "cannot bind a cluster session's port on this node yet");
                self.activate(&session, Vec::new());
                self.tasks.spawn(claim_later(self.clone(), session.clone()));
            }
        }
    }

    /// Applies a newer record of a known session (`force`: also one of the same version,
    /// after this node's own write lost).
    fn update_from(&self, session: &Session, record: &SessionRecord, force: bool) {
        let now = SystemTime::now();
        let me = self.node_name();
        let owner_alive = self.owner_alive(record.owner.as_deref());
        // A link held here that another node took over ends here.
        if let Some(link) = session.link() {
            let newer = record.version > session.lock().durable.version;
            if newer && record.owner.as_deref() != me {
                tracing::info!(session_id = %session.id, owner = ?record.owner, "another node took the agent's link");
                session.link_lost(link.id, now);
            }
        }
        let mut inner = session.lock();
        // Forced (this node's write failed): the stored record is the truth, even when it is
        // older than the version this node had counted up to for its lost write.
        if !force && record.version <= inner.durable.version {
            return;
        }
        let parse = |h: &Option<String>| h.as_deref().and_then(hash_from_hex);
        inner.durable.resume_hash = parse(&record.resume_hash);
        inner.durable.pending_resume_hash = parse(&record.pending_resume_hash);
        inner.durable.confirmed = record.confirmed;
        inner.durable.join_spent = record.join_spent || (record.joined && record.confirmed);
        inner.durable.version = record.version;
        let stored = record.mirror_lifecycle(now, owner_alive);
        let before_finish = inner.life.finish_deadline;
        let was_revoked = inner.life.revoked.is_some();
        inner.life.joined = stored.joined;
        inner.life.finish_deadline = stored.finish_deadline;
        if inner.link.is_none() {
            // A record naming this node while it holds no link is from an earlier run of it
            // (or a link it lost): nobody holds the agent.
            inner.owner = record.owner.clone().filter(|o| Some(o.as_str()) != me);
            if record.owner.is_some() {
                inner.last_owner = record.owner.clone();
            }
            // Down since the owner said, or (no word: its node is gone) since this node
            // first noticed; a record that says nothing new does not restart the window.
            let noticed = inner.life.link_down_since;
            inner.life.link_down_since = match stored.link_down_since {
                Some(now_seen) if record.link_down_ms.is_none() => {
                    Some(noticed.unwrap_or(now_seen))
                }
                other => other,
            };
        }
        if !was_revoked {
            inner.life.revoked = stored.revoked;
        }
        let newly_revoked = !was_revoked && inner.life.revoked.is_some();
        let finish_moved = inner.life.finish_deadline != before_finish;
        let (deadline, link) = (inner.life.deadline().0, inner.link.clone());
        drop(inner);
        if newly_revoked {
            self.revoke_here(session, None);
            return;
        }
        session.changed.notify_one();
        if finish_moved {
            // Finished through another node: the agent hears its deadline from this one.
            super::actions::tell_deadline(session, link, deadline, true);
        }
    }

    /// Whether `owner` names another live node (None: no owner; this node: an earlier run
    /// of it, whose links are gone).
    fn owner_alive(&self, owner: Option<&str>) -> bool {
        match (&self.cluster, owner) {
            (Some(cluster), Some(owner)) => {
                owner != cluster.node_name && cluster.members.alive(owner)
            }
            _ => false,
        }
    }

    /// Node `node` is back with the same process (its entry lapsed while etcd was away):
    /// the sessions whose agent it still holds are connected again.
    pub fn owner_back(&self, node: &str) {
        for session in self.sessions.list() {
            let mut inner = session.lock();
            if inner.link.is_none()
                && inner.owner.as_deref() == Some(node)
                && inner.life.revoked.is_none()
                && inner.life.link_down_since.take().is_some()
            {
                drop(inner);
                session.changed.notify_one();
            }
        }
    }

    /// Node `node` restarted: the links it held are gone for sure, so the sessions it owned
    /// have no owner any more (any node may take their agents) and wait for them to resume.
    pub fn owner_restarted(&self, node: &str) {
        self.owner_gone(node);
        for session in self.sessions.list() {
            let mut inner = session.lock();
            if inner.link.is_none() && inner.owner.as_deref() == Some(node) {
                inner.owner = None;
            }
        }
    }

    /// Node `node` left the cluster (its lease ended): the sessions whose agent it held are
    /// disconnected from now on (their resume window starts), and their agents may resume
    /// on any node. The owner stays named, so its return ([`Relay::owner_back`]) undoes this.
    pub fn owner_gone(&self, node: &str) {
        let now = SystemTime::now();
        for session in self.sessions.list() {
            let mut inner = session.lock();
            if inner.link.is_none() && inner.owner.as_deref() == Some(node) {
                inner.life.on_link_down(now);
                drop(inner);
                tracing::info!(session_id = %session.id, node, since = to_unix_ms(now), "the session's node is gone: waiting for its agent to resume");
                session.changed.notify_one();
            }
        }
    }

    /// A session removed from the store: cut (if it was not) and forgotten here.
    fn forget_here(&self, session: &Arc<Session>) {
        if session.lock().life.revoked.is_none() {
            self.revoke_here(
                session,
                Some(crate::session::lifecycle::RevokeReason::Deleted),
            );
        }
        self.sessions.remove(session);
    }
}

/// Binds an adopted session's ports once they are free on this node (up to
/// [`CLAIM_PATIENCE`]), and serves them.
async fn claim_later(relay: Arc<Relay>, session: Arc<Session>) {
    let give_up = tokio::time::Instant::now() + CLAIM_PATIENCE;
    while tokio::time::Instant::now() < give_up {
        tokio::select! {
            () = session.cancel.cancelled() => return,
            () = tokio::time::sleep(std::time::Duration::from_millis(100)) => {}
        }
        if let Ok(listeners) = relay.pool.claim(&session.ports()) {
            tracing::info!(session_id = %session.id, "bound the cluster session's ports on this node");
            relay.listen(&session, listeners);
            return;
        }
    }
    tracing::error!(session_id = %session.id, ports = ?session.ports(), "cannot bind a cluster session's ports on this node: it is served through the other nodes only");
}

/// How long an adopted session's ports are tried on this node.
const CLAIM_PATIENCE: std::time::Duration = std::time::Duration::from_secs(10);
