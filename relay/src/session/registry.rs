//! [`SessionRegistry`]: the relay's sessions by id and by join-token hash. The only holder
//! of the maps: other modules look sessions up through it, and only the session operations
//! ([`crate::session::actions`], [`crate::session::persist`]) add or remove them.

use std::sync::Arc;

use dashmap::DashMap;
use porthole_protocol::secret::SecretHash;
use porthole_protocol::Secret;

use crate::session::runtime::Session;
use crate::untrusted::valid_session_id;

/// Sessions by id (revoked ones stay for the retention period) and by join-token hash.
#[derive(Debug, Default)]
pub struct SessionRegistry {
    /// Sessions by id.
    by_id: DashMap<String, Arc<Session>>,
    /// Session ids by join-token hash.
    by_join: DashMap<SecretHash, String>,
    /// Ids of sessions being created on this node (cluster mode: the store's echo of their
    /// first write is not taken for another node's session).
    creating: dashmap::DashSet<String>,
}

impl SessionRegistry {
    /// The session `id`; ids that do not have the relay's format are never looked up.
    pub fn get(&self, id: &str) -> Option<Arc<Session>> {
        if !valid_session_id(id) {
            return None;
        }
        self.by_id.get(id).map(|s| s.value().clone())
    }

    /// The session whose join token is `token`.
    pub fn by_join_token(&self, token: &Secret) -> Option<Arc<Session>> {
        let id = self.by_join.get(&token.hash()).map(|e| e.value().clone())?;
        self.get(&id)
    }

    /// Every session (in no particular order).
    pub fn list(&self) -> Vec<Arc<Session>> {
        self.by_id.iter().map(|e| e.value().clone()).collect()
    }

    /// How many sessions are held (revoked ones included until purged).
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    /// Whether none is held.
    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    /// Adds a session (created, or restored from the store).
    pub(crate) fn insert(&self, session: Arc<Session>) {
        self.by_join.insert(session.join_hash, session.id.clone());
        self.by_id.insert(session.id.clone(), session);
    }

    /// Marks session `id` as being created here.
    pub(crate) fn reserve(&self, id: &str) {
        self.creating.insert(id.to_owned());
    }

    /// Session `id` is created (or failed to be).
    pub(crate) fn unreserve(&self, id: &str) {
        self.creating.remove(id);
    }

    /// Whether session `id` is being created here.
    pub fn is_reserved(&self, id: &str) -> bool {
        self.creating.contains(id)
    }

    /// Forgets a session.
    pub(crate) fn remove(&self, session: &Session) {
        self.by_id.remove(&session.id);
        self.by_join.remove(&session.join_hash);
    }
}
