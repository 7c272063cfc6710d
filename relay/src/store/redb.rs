//! [`RedbStore`]: the embedded single-node store, one redb file in the data dir.
//!
//! Why redb: a pure-Rust, single-file embedded database with ACID transactions, where a
//! commit returns only once the data is durable (fsync), which is what "written before the
//! API or the agent is told anything" needs; no C toolchain, no background compaction
//! threads. Records are JSON in one table keyed by session id.
//!
//! Writes go to one writer thread (`porthole-store`), in call order; it takes every write
//! waiting when it starts a transaction and commits them together, so a burst (every agent
//! resuming after a restart) costs a few fsyncs, not one each, and no fsync ever runs on a
//! tokio worker thread. Reads run on the blocking pool.

use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc};

use futures_util::future::{self, BoxFuture, FutureExt};
use futures_util::stream::{self, BoxStream, StreamExt};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::oneshot;

use super::{check_version, SessionRecord, SessionStore, StoreChange, StoreError, FORMAT};
use crate::error::RelayError;

/// Sessions by id.
const SESSIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("sessions");

/// Most writes committed in one transaction.
const MAX_BATCH: usize = 256;

/// One write for the writer thread.
enum Op {
    /// Store a record (compare-and-swap by version).
    Put(Box<SessionRecord>),
    /// Remove a session.
    Remove(String),
}

/// A write and where its outcome goes.
struct Write {
    /// What to write.
    op: Op,
    /// Resolved once the write is durable (or failed).
    done: oneshot::Sender<Result<(), StoreError>>,
}

/// The open store.
pub struct RedbStore {
    /// The database (shared with the writer thread and readers).
    db: Arc<Database>,
    /// The file, for messages.
    path: PathBuf,
    /// Writes, to the writer thread (taken at drop, which ends the thread).
    writes: Option<mpsc::Sender<Write>>,
    /// The writer thread, joined at drop so the file is closed when the store is.
    writer: Option<std::thread::JoinHandle<()>>,
}

impl Drop for RedbStore {
    fn drop(&mut self) {
        // The writer finishes the writes already queued, then ends.
        drop(self.writes.take());
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

impl std::fmt::Debug for RedbStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedbStore")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

fn io(e: impl std::fmt::Display) -> StoreError {
    StoreError::Io(e.to_string())
}

impl RedbStore {
    /// Opens (or creates) the store at `path` and starts its writer thread.
    pub fn open(path: &Path) -> Result<Self, RelayError> {
        let err = |e: &dyn std::fmt::Display| {
            RelayError::Store(StoreError::Io(format!("{}: {e}", path.display())))
        };
        let db = Database::create(path).map_err(|e| err(&e))?;
        let txn = db.begin_write().map_err(|e| err(&e))?;
        txn.open_table(SESSIONS).map_err(|e| err(&e))?;
        txn.commit().map_err(|e| err(&e))?;
        let db = Arc::new(db);
        let (writes, rx) = mpsc::channel();
        let writer_db = db.clone();
        let writer = std::thread::Builder::new()
            .name("porthole-store".into())
            .spawn(move || writer(&writer_db, &rx))
            .map_err(|e| err(&e))?;
        Ok(Self {
            db,
            path: path.to_owned(),
            writes: Some(writes),
            writer: Some(writer),
        })
    }

    fn submit(&self, op: Op) -> BoxFuture<'static, Result<(), StoreError>> {
        let (done, outcome) = oneshot::channel();
        let sent = self.writes.as_ref().map(|w| w.send(Write { op, done }));
        if !matches!(sent, Some(Ok(()))) {
            return future::ready(Err(StoreError::Closed)).boxed();
        }
        async move { outcome.await.unwrap_or(Err(StoreError::Closed)) }.boxed()
    }

    fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Database) -> Result<T, StoreError> + Send + 'static,
    ) -> BoxFuture<'static, Result<T, StoreError>> {
        let db = self.db.clone();
        async move {
            tokio::task::spawn_blocking(move || f(&db))
                .await
                .unwrap_or_else(|e| Err(io(e)))
        }
        .boxed()
    }
}

/// The writer thread: takes the writes waiting, commits them in one transaction, answers
/// each; ends when the store is dropped.
fn writer(db: &Database, rx: &mpsc::Receiver<Write>) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(w) => batch.push(w),
                Err(_) => break,
            }
        }
        commit(db, batch);
    }
}

/// Applies a batch in one transaction; a write whose version check fails is answered with
/// the conflict and left out, the others commit together.
fn commit(db: &Database, batch: Vec<Write>) {
    let mut outcomes: Vec<Result<(), StoreError>> = Vec::with_capacity(batch.len());
    let committed = (|| -> Result<(), StoreError> {
        let txn = db.begin_write().map_err(io)?;
        {
            let mut table = txn.open_table(SESSIONS).map_err(io)?;
            for w in &batch {
                outcomes.push(apply(&mut table, &w.op));
            }
        }
        txn.commit().map_err(io)
    })();
    let mut outcomes = outcomes.into_iter();
    for w in batch {
        let outcome = match &committed {
            Ok(()) => outcomes.next().unwrap_or(Err(StoreError::Closed)),
            Err(e) => Err(e.clone()),
        };
        let _ = w.done.send(outcome);
    }
}

fn apply(table: &mut redb::Table<&str, &[u8]>, op: &Op) -> Result<(), StoreError> {
    match op {
        Op::Put(record) => {
            let stored = match table.get(record.id.as_str()).map_err(io)? {
                Some(value) => Some(decode(record.id.as_str(), value.value())?.version),
                None => None,
            };
            check_version(stored, record)?;
            let bytes = serde_json::to_vec(record).map_err(io)?;
            table
                .insert(record.id.as_str(), bytes.as_slice())
                .map_err(io)?;
            Ok(())
        }
        Op::Remove(id) => table.remove(id.as_str()).map(drop).map_err(io),
    }
}

/// A stored record. One from a newer relay, or one that does not parse, is an error:
/// starting without it would silently drop a live session.
fn decode(key: &str, bytes: &[u8]) -> Result<SessionRecord, StoreError> {
    let record: SessionRecord =
        serde_json::from_slice(bytes).map_err(|e| StoreError::Io(format!("session {key}: {e}")))?;
    if record.format > FORMAT {
        return Err(StoreError::Io(format!(
            "session {} was written by a newer porthole-relay (format {}); upgrade this relay",
            record.id, record.format
        )));
    }
    Ok(record)
}

fn all(db: &Database) -> Result<Vec<SessionRecord>, StoreError> {
    let txn = db.begin_read().map_err(io)?;
    let table = txn.open_table(SESSIONS).map_err(io)?;
    let mut out = Vec::new();
    for row in table.iter().map_err(io)? {
        let (key, value) = row.map_err(io)?;
        out.push(decode(key.value(), value.value())?);
    }
    Ok(out)
}

impl SessionStore for RedbStore {
    fn put(&self, record: SessionRecord) -> BoxFuture<'static, Result<(), StoreError>> {
        self.submit(Op::Put(Box::new(record)))
    }

    fn remove(&self, id: &str) -> BoxFuture<'static, Result<(), StoreError>> {
        self.submit(Op::Remove(id.to_owned()))
    }

    fn get(&self, id: &str) -> BoxFuture<'static, Result<Option<SessionRecord>, StoreError>> {
        let id = id.to_owned();
        self.read(move |db| {
            let txn = db.begin_read().map_err(io)?;
            let table = txn.open_table(SESSIONS).map_err(io)?;
            let found = table.get(id.as_str()).map_err(io)?;
            found.map(|v| decode(&id, v.value())).transpose()
        })
    }

    fn find_by_join_hash(
        &self,
        join_hash: &str,
    ) -> BoxFuture<'static, Result<Option<SessionRecord>, StoreError>> {
        let join_hash = join_hash.to_owned();
        self.read(move |db| Ok(all(db)?.into_iter().find(|r| r.join_hash == join_hash)))
    }

    fn list(&self) -> BoxFuture<'static, Result<Vec<SessionRecord>, StoreError>> {
        self.read(all)
    }

    fn changes(&self) -> BoxStream<'static, StoreChange> {
        stream::empty().boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::record::sample;

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap_or_else(|e| unreachable!("{e}"))
    }

    #[test]
    fn records_survive_reopening_and_writes_are_compare_and_swap() -> Result<(), StoreError> {
        let dir = tempfile::tempdir().map_err(io)?;
        let path = dir.path().join("state.redb");
        let rt = rt();
        let mut s = sample("s_1");
        {
            let store = RedbStore::open(&path).map_err(io)?;
            rt.block_on(store.put(s.clone()))?;
            // A second writer based on the same version loses.
            let stale = s.clone();
            s.version = 2;
            s.joined = true;
            rt.block_on(store.put(s.clone()))?;
            let lost = rt.block_on(store.put(stale));
            assert!(
                matches!(
                    lost,
                    Err(StoreError::Conflict {
                        stored: Some(2),
                        ..
                    })
                ),
                "{lost:?}"
            );
        }
        let store = RedbStore::open(&path).map_err(io)?;
        assert_eq!(rt.block_on(store.list())?, vec![s.clone()]);
        assert_eq!(rt.block_on(store.get("s_1"))?, Some(s.clone()));
        assert_eq!(
            rt.block_on(store.find_by_join_hash(&s.join_hash))?,
            Some(s.clone())
        );
        rt.block_on(store.remove("s_1"))?;
        assert!(rt.block_on(store.list())?.is_empty());
        Ok(())
    }

    #[test]
    fn many_writes_in_flight_all_land_in_order() -> Result<(), StoreError> {
        let dir = tempfile::tempdir().map_err(io)?;
        let store = RedbStore::open(&dir.path().join("state.redb")).map_err(io)?;
        let rt = rt();
        // 200 sessions, three versions each, all submitted before any is awaited: the
        // writer batches them, and the per-session order holds.
        let mut pending = Vec::new();
        for i in 0..200 {
            let mut r = sample(&format!("s_{i}"));
            for v in 1..=3 {
                r.version = v;
                pending.push(store.put(r.clone()));
            }
        }
        for p in pending {
            rt.block_on(p)?;
        }
        let all = rt.block_on(store.list())?;
        assert_eq!(all.len(), 200);
        assert!(all.iter().all(|r| r.version == 3));
        Ok(())
    }

    #[test]
    fn records_from_a_newer_relay_stop_the_start() -> Result<(), StoreError> {
        let dir = tempfile::tempdir().map_err(io)?;
        let store = RedbStore::open(&dir.path().join("state.redb")).map_err(io)?;
        let rt = rt();
        rt.block_on(store.put(SessionRecord {
            format: FORMAT + 1,
            ..sample("s_1")
        }))?;
        let err = rt
            .block_on(store.list())
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("newer porthole-relay"), "{err}");
        Ok(())
    }
}
