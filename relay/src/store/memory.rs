//! [`MemoryStore`]: a [`SessionStore`] in a map, for unit tests of the registry. Same
//! contract as the real stores (compare-and-swap, ordered writes), no disk.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use futures_util::future::{self, BoxFuture, FutureExt};
use futures_util::stream::{self, BoxStream, StreamExt};

use super::{check_version, SessionRecord, SessionStore, StoreChange, StoreError};

/// Records in memory.
#[derive(Clone, Debug, Default)]
pub struct MemoryStore {
    /// Records by session id.
    records: Arc<Mutex<HashMap<String, SessionRecord>>>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn with<T>(&self, f: impl FnOnce(&mut HashMap<String, SessionRecord>) -> T) -> T {
        f(&mut self.records.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

impl SessionStore for MemoryStore {
    fn put(&self, record: SessionRecord) -> BoxFuture<'static, Result<(), StoreError>> {
        // Applied when called: ordered by call, like the real stores.
        let result = self.with(|records| {
            check_version(records.get(&record.id).map(|r| r.version), &record)?;
            records.insert(record.id.clone(), record);
            Ok(())
        });
        future::ready(result).boxed()
    }

    fn remove(&self, id: &str) -> BoxFuture<'static, Result<(), StoreError>> {
        self.with(|records| records.remove(id));
        future::ready(Ok(())).boxed()
    }

    fn get(&self, id: &str) -> BoxFuture<'static, Result<Option<SessionRecord>, StoreError>> {
        let found = self.with(|records| records.get(id).cloned());
        future::ready(Ok(found)).boxed()
    }

    fn find_by_join_hash(
        &self,
        join_hash: &str,
    ) -> BoxFuture<'static, Result<Option<SessionRecord>, StoreError>> {
        let found =
            self.with(|records| records.values().find(|r| r.join_hash == join_hash).cloned());
        future::ready(Ok(found)).boxed()
    }

    fn list(&self) -> BoxFuture<'static, Result<Vec<SessionRecord>, StoreError>> {
        let all = self.with(|records| records.values().cloned().collect());
        future::ready(Ok(all)).boxed()
    }

    fn changes(&self) -> BoxStream<'static, StoreChange> {
        stream::empty().boxed()
    }
}
