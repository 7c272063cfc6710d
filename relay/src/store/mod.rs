//! The durable side of sessions, behind one seam: [`SessionStore`]. A relay holds one
//! `Arc<dyn SessionStore>`; the registry writes through it and reads it back on start.
//!
//! - [`record`]: [`SessionRecord`], the durable facts of a session (with a `version`).
//! - [`redb`]: [`RedbStore`], the embedded single-node store (`DATA_DIR/state.redb`): one
//!   writer thread batches commits, so fsyncs never run on the runtime's workers.
//! - `etcd` (feature `cluster`): `EtcdStore`, the cluster store: records, the join index
//!   and cluster-wide port reservations in etcd, compare-and-swap in transactions, changes
//!   from a watch;
//! - `etcd_request` (feature `cluster`): the key prefix and the time bound of every etcd
//!   request;
//! - `etcd_watch` (feature `cluster`): following a key prefix in etcd across reconnections
//!   and compactions (sessions here, node membership in `crate::cluster`).
//! - `memory`: `MemoryStore`, for unit tests of the registry (no disk; built only for tests).
//!
//! The contract, for every implementation:
//! - **Writes are compare-and-swap by version.** [`SessionStore::put`] stores a record only
//!   if the stored version is `record.version - 1` (version 1: not stored yet); otherwise
//!   it fails with [`StoreError::Conflict`], so two writers never both win.
//! - **Writes are ordered by call, durable when awaited.** `put` and `remove` take their
//!   place in the write order when *called* (so a caller may call them while it holds a
//!   session lock, which keeps one session's writes in order) and return a future that
//!   resolves once the write is durable. The caller awaits it after releasing its lock.
//! - **Changes made elsewhere** arrive on [`SessionStore::changes`] (a cluster store); a
//!   single-node store produces none.

#[cfg(feature = "cluster")]
pub mod etcd;
#[cfg(feature = "cluster")]
pub mod etcd_request;
#[cfg(feature = "cluster")]
pub mod etcd_watch;
#[cfg(test)]
pub mod memory;
pub mod record;
pub mod redb;

use futures_util::future::BoxFuture;
use futures_util::stream::BoxStream;

#[cfg(test)]
pub use memory::MemoryStore;
pub use record::{hash_from_hex, hash_hex, SessionRecord, FORMAT};
pub use redb::RedbStore;

/// Why a store operation failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The stored version is not the one the write was based on.
    #[error("session {id}: stored version {stored:?}, the write expected {expected}")]
    Conflict {
        /// Session.
        id: String,
        /// Version found (None: no record).
        stored: Option<u64>,
        /// Version the write was based on.
        expected: u64,
    },
    /// The store could not be read or written (disk, database, encoding).
    #[error("state store: {0}")]
    Io(String),
    /// The store's writer is gone (the relay is shutting down).
    #[error("state store: the writer has stopped")]
    Closed,
    /// The store cannot be reached now (cluster mode: etcd did not answer in time); retrying
    /// later may work.
    #[error("cluster state store (etcd) unavailable: {0}")]
    Unavailable(String),
    /// A new session's public ports belong to another session somewhere in the cluster (or
    /// are still cooling down there): pick others.
    #[error("public ports {0:?} belong to another session of the cluster")]
    PortsTaken(Vec<u16>),
}

/// A change made by another node (cluster stores only).
#[derive(Clone, Debug, PartialEq)]
pub enum StoreChange {
    /// A record was written.
    Put(Box<SessionRecord>),
    /// A record was removed.
    Removed(String),
    /// Changes were lost (the store's history was compacted while this node was away):
    /// here is every record as it is now; records not in it are gone.
    Reloaded(Vec<SessionRecord>),
}

/// Where sessions' durable records live. See the module doc for the contract.
pub trait SessionStore: Send + Sync + std::fmt::Debug {
    /// Writes `record` if the stored version is `record.version - 1` (ordered by call,
    /// durable when the future resolves).
    fn put(&self, record: SessionRecord) -> BoxFuture<'static, Result<(), StoreError>>;

    /// Removes session `id` (ordered by call, durable when the future resolves). Removing a
    /// session that is not stored is not an error.
    fn remove(&self, id: &str) -> BoxFuture<'static, Result<(), StoreError>>;

    /// The stored record of session `id`.
    fn get(&self, id: &str) -> BoxFuture<'static, Result<Option<SessionRecord>, StoreError>>;

    /// The record whose join-token hash is `join_hash` (hex), if any.
    fn find_by_join_hash(
        &self,
        join_hash: &str,
    ) -> BoxFuture<'static, Result<Option<SessionRecord>, StoreError>>;

    /// Every stored record.
    fn list(&self) -> BoxFuture<'static, Result<Vec<SessionRecord>, StoreError>>;

    /// Changes made elsewhere, as they happen (empty for single-node stores).
    fn changes(&self) -> BoxStream<'static, StoreChange>;
}

/// Checks a compare-and-swap: `stored` is the version found (None: absent), `record` the
/// write. Shared by the implementations so they agree to the letter.
pub fn check_version(stored: Option<u64>, record: &SessionRecord) -> Result<(), StoreError> {
    let expected = record.version.saturating_sub(1);
    let ok = match stored {
        None => record.version == 1,
        Some(v) => v == expected,
    };
    if ok {
        Ok(())
    } else {
        Err(StoreError::Conflict {
            id: record.id.clone(),
            stored,
            expected,
        })
    }
}
