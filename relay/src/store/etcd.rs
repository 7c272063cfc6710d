//! [`EtcdStore`]: the cluster's [`SessionStore`], in etcd. Every node of a cluster reads and
//! writes the same keys, under one prefix (`/porthole/`):
//!
//! - `sessions/<id>`: the [`SessionRecord`] (JSON). etcd counts a key's puts since its
//!   creation (its `version`), and so do records: a write of version `v` is a transaction
//!   that succeeds only if the key's version is `v - 1` (absent for 1). Two nodes never both
//!   win.
//! - `join/<hash>`: the session id for a join-token hash, created with the session.
//! - `ports/<port>`: the session holding a public port, created in the same transaction
//!   as the session (so no port is ever given twice in the cluster). When the session is
//!   revoked, its port keys are put again on a lease of `port_cooldown`: etcd deletes them
//!   when the cooldown ends, and the port is free again, with no sweeper.
//!
//! Every request is bounded ([`ETCD_REQUEST_TIMEOUT`]): past it the operation fails with
//! [`StoreError::Unavailable`], never hangs. [`SessionStore::changes`] follows `sessions/`
//! from the revision of the latest [`SessionStore::list`] (`etcd_watch`: reconnects with
//! backoff from the last revision seen), and after a compaction re-reads everything
//! ([`StoreChange::Reloaded`]).

use std::collections::HashSet;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, GetOptions, PutOptions, Txn, TxnOp};
use futures_util::future::{BoxFuture, FutureExt};
use futures_util::stream::{BoxStream, StreamExt};
use tokio::sync::{mpsc, oneshot};

use super::etcd_request::{retried, PREFIX};
use super::etcd_watch::{self, PrefixEvent};
use super::{SessionRecord, SessionStore, StoreChange, StoreError};
use crate::limits::{ETCD_RETRY_MAX, ETCD_RETRY_MIN};

/// Key of session `id`.
fn session_key(id: &str) -> String {
    format!("{PREFIX}sessions/{id}")
}

/// Key of a join-token hash (hex).
fn join_key(hash: &str) -> String {
    format!("{PREFIX}join/{hash}")
}

/// Key of a public port.
pub fn port_key(port: u16) -> String {
    format!("{PREFIX}ports/{port}")
}

/// Session records in etcd.
#[derive(Clone)]
pub struct EtcdStore {
    /// What the requests need.
    inner: Arc<Inner>,
    /// Writes, in call order, to the one task that makes them (so writes made under one
    /// session lock reach etcd in that order, whatever order their futures are polled in).
    writes: mpsc::UnboundedSender<Job>,
}

/// The etcd side of the store.
struct Inner {
    /// The etcd client (cheap to clone: one channel).
    client: Client,
    /// How long a revoked session's ports stay reserved.
    cooldown: Duration,
    /// Sessions whose ports this node already put on a cooldown lease.
    cooled: Mutex<HashSet<String>>,
    /// The revision the latest `list` read at; `changes` watches from the next one.
    listed_at: AtomicI64,
}

/// One write for the writer task.
struct Job {
    /// Put a record, or remove a session.
    write: Result<SessionRecord, String>,
    /// Where its outcome goes.
    done: oneshot::Sender<Result<(), StoreError>>,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore")
            .field("cooldown", &self.inner.cooldown)
            .finish_non_exhaustive()
    }
}

impl EtcdStore {
    /// A store on `client`; revoked sessions' ports stay reserved for `cooldown`. Starts
    /// the writer task (it ends when the last clone of the store is dropped).
    pub fn new(client: Client, cooldown: Duration) -> Self {
        let inner = Arc::new(Inner {
            client,
            cooldown,
            cooled: Mutex::default(),
            listed_at: AtomicI64::new(0),
        });
        let (writes, mut jobs) = mpsc::unbounded_channel::<Job>();
        let writer = inner.clone();
        tokio::spawn(async move {
            while let Some(job) = jobs.recv().await {
                let outcome = match job.write {
                    Ok(record) => writer.put_now(record).await,
                    Err(id) => writer.remove_now(&id).await,
                };
                let _ = job.done.send(outcome);
            }
        });
        Self { inner, writes }
    }

    /// Queues a write now; the future resolves with its outcome.
    fn queue(
        &self,
        write: Result<SessionRecord, String>,
    ) -> BoxFuture<'static, Result<(), StoreError>> {
        let (done, outcome) = oneshot::channel();
        let queued = self.writes.send(Job { write, done });
        async move {
            if queued.is_err() {
                return Err(StoreError::Closed);
            }
            outcome.await.unwrap_or(Err(StoreError::Closed))
        }
        .boxed()
    }
}

impl Inner {
    async fn put_now(&self, record: SessionRecord) -> Result<(), StoreError> {
        let key = session_key(&record.id);
        let value = serde_json::to_vec(&record).map_err(|e| StoreError::Io(e.to_string()))?;
        let expected = record.version.saturating_sub(1);
        let version = i64::try_from(expected).unwrap_or(i64::MAX);
        let mut compares = vec![Compare::version(key.clone(), CompareOp::Equal, version)];
        let mut ops = vec![TxnOp::put(key.clone(), value, None)];
        let ports: Vec<u16> = record.endpoints.iter().map(|e| e.port).collect();
        if record.version == 1 {
            let join = join_key(&record.join_hash);
            compares.push(Compare::create_revision(join.clone(), CompareOp::Equal, 0));
            ops.push(TxnOp::put(join, record.id.clone(), None));
            for &port in &ports {
                compares.push(Compare::create_revision(
                    port_key(port),
                    CompareOp::Equal,
                    0,
                ));
                ops.push(TxnOp::put(port_key(port), record.id.clone(), None));
            }
        } else if record.revoked.is_some() && !self.is_cooled(&record.id) {
            // The ports stay reserved for the cooldown, then etcd frees them.
            let lease = self.cooldown_lease().await?;
            for &port in &ports {
                let keep = PutOptions::new().with_lease(lease);
                ops.push(TxnOp::put(port_key(port), record.id.clone(), Some(keep)));
            }
        }
        let txn = Txn::new().when(compares).and_then(ops);
        let answer = retried("write a session", || {
            let (mut client, txn) = (self.client.clone(), txn.clone());
            async move { client.txn(txn).await }
        })
        .await?;
        if answer.succeeded() {
            if record.revoked.is_some() && record.version > 1 {
                self.cooled
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(record.id.clone());
            }
            return Ok(());
        }
        // Why not: a port taken elsewhere (new sessions), or another write first, or this
        // very write, applied on an attempt whose answer was lost.
        let stored = self.get_now(&record.id).await?;
        if stored.as_ref() == Some(&record) {
            return Ok(());
        }
        if record.version == 1 {
            let taken = self.taken_ports(&ports, &record.id).await?;
            if !taken.is_empty() {
                return Err(StoreError::PortsTaken(taken));
            }
        }
        let stored = stored.map(|r| r.version);
        Err(StoreError::Conflict {
            id: record.id,
            stored,
            expected,
        })
    }

    fn is_cooled(&self, id: &str) -> bool {
        self.cooled
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(id)
    }

    /// A lease of the port cooldown (at least 1 s: etcd counts in whole seconds).
    async fn cooldown_lease(&self) -> Result<i64, StoreError> {
        let ttl = i64::try_from(self.cooldown.as_secs().max(1)).unwrap_or(i64::MAX);
        let granted = retried("grant a port cooldown lease", || {
            let mut client = self.client.clone();
            async move { client.lease_grant(ttl, None).await }
        })
        .await?;
        Ok(granted.id())
    }

    /// Which of `ports` are held by a session other than `id`.
    async fn taken_ports(&self, ports: &[u16], id: &str) -> Result<Vec<u16>, StoreError> {
        let mut taken = Vec::new();
        for &port in ports {
            let found = retried("read a port", || {
                let mut client = self.client.clone();
                async move { client.get(port_key(port), None).await }
            })
            .await?;
            if found.kvs().iter().any(|kv| kv.value() != id.as_bytes()) {
                taken.push(port);
            }
        }
        Ok(taken)
    }

    async fn get_now(&self, id: &str) -> Result<Option<SessionRecord>, StoreError> {
        let found = retried("read a session", || {
            let mut client = self.client.clone();
            async move { client.get(session_key(id), None).await }
        })
        .await?;
        found.kvs().first().map(|kv| decode(kv.value())).transpose()
    }

    async fn remove_now(&self, id: &str) -> Result<(), StoreError> {
        let Some(record) = self.get_now(id).await? else {
            return Ok(());
        };
        // Ports still reserved without a lease (a session removed without a revocation
        // written) start their cooldown now instead of staying taken for good.
        let lease = self.cooldown_lease().await?;
        let ops = vec![
            TxnOp::delete(session_key(id), None),
            TxnOp::delete(join_key(&record.join_hash), None),
        ];
        let txn = Txn::new().and_then(ops);
        retried("remove a session", || {
            let (mut client, txn) = (self.client.clone(), txn.clone());
            async move { client.txn(txn).await }
        })
        .await?;
        for endpoint in &record.endpoints {
            // Only a port key still this session's: after its cooldown another session
            // may hold the port.
            let key = port_key(endpoint.port);
            let txn = Txn::new()
                .when([
                    Compare::value(key.clone(), CompareOp::Equal, id),
                    Compare::lease(key.clone(), CompareOp::Equal, 0),
                ])
                .and_then([TxnOp::put(
                    key,
                    id,
                    Some(PutOptions::new().with_lease(lease)),
                )]);
            retried("cool a removed session's port", || {
                let (mut client, txn) = (self.client.clone(), txn.clone());
                async move { client.txn(txn).await }
            })
            .await?;
        }
        self.cooled
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
        Ok(())
    }

    async fn list_now(&self) -> Result<Vec<SessionRecord>, StoreError> {
        let found = retried("list sessions", || {
            let mut client = self.client.clone();
            let options = GetOptions::new().with_prefix();
            async move {
                client
                    .get(format!("{PREFIX}sessions/"), Some(options))
                    .await
            }
        })
        .await?;
        if let Some(header) = found.header() {
            self.listed_at.store(header.revision(), Ordering::Relaxed);
        }
        found.kvs().iter().map(|kv| decode(kv.value())).collect()
    }
}

/// A record from its stored JSON.
fn decode(bytes: &[u8]) -> Result<SessionRecord, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Io(format!("a stored session: {e}")))
}

impl SessionStore for EtcdStore {
    fn put(&self, record: SessionRecord) -> BoxFuture<'static, Result<(), StoreError>> {
        self.queue(Ok(record))
    }

    fn remove(&self, id: &str) -> BoxFuture<'static, Result<(), StoreError>> {
        self.queue(Err(id.to_owned()))
    }

    fn get(&self, id: &str) -> BoxFuture<'static, Result<Option<SessionRecord>, StoreError>> {
        let (store, id) = (self.inner.clone(), id.to_owned());
        async move { store.get_now(&id).await }.boxed()
    }

    fn find_by_join_hash(
        &self,
        join_hash: &str,
    ) -> BoxFuture<'static, Result<Option<SessionRecord>, StoreError>> {
        let (store, key) = (self.inner.clone(), join_key(join_hash));
        async move {
            let found = retried("read the join index", || {
                let (mut client, key) = (store.client.clone(), key.clone());
                async move { client.get(key, None).await }
            })
            .await?;
            let Some(kv) = found.kvs().first() else {
                return Ok(None);
            };
            let id = String::from_utf8_lossy(kv.value()).into_owned();
            store.get_now(&id).await
        }
        .boxed()
    }

    fn list(&self) -> BoxFuture<'static, Result<Vec<SessionRecord>, StoreError>> {
        let store = self.inner.clone();
        async move { store.list_now().await }.boxed()
    }

    fn changes(&self) -> BoxStream<'static, StoreChange> {
        let (tx, mut rx) = mpsc::channel(1024);
        let store = self.inner.clone();
        tokio::spawn(async move { store.follow(tx).await });
        futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx)).boxed()
    }
}

impl Inner {
    /// Delivers the changes to `sessions/` from the latest listed revision until `tx`
    /// closes; after a compaction, re-reads every record ([`StoreChange::Reloaded`]).
    async fn follow(self: Arc<Self>, tx: mpsc::Sender<StoreChange>) {
        let prefix = format!("{PREFIX}sessions/");
        loop {
            let from = self.listed_at.load(Ordering::Relaxed) + 1;
            let (events_tx, mut events) = mpsc::channel(1024);
            let watch = tokio::spawn(etcd_watch::follow(
                self.client.clone(),
                prefix.clone(),
                from,
                "sessions",
                events_tx,
            ));
            let mut reset = false;
            while let Some(event) = events.recv().await {
                let change = match event {
                    PrefixEvent::Put { value, .. } => match decode(&value) {
                        Ok(record) => StoreChange::Put(Box::new(record)),
                        Err(e) => {
                            tracing::warn!(error = %e, "ignoring an unreadable session record from etcd");
                            continue;
                        }
                    },
                    PrefixEvent::Deleted { name } => StoreChange::Removed(name),
                    PrefixEvent::Reset => {
                        reset = true;
                        break;
                    }
                };
                if tx.send(change).await.is_err() {
                    watch.abort();
                    return;
                }
            }
            if !reset {
                return;
            }
            let mut backoff = ETCD_RETRY_MIN;
            let records = loop {
                match self.list_now().await {
                    Ok(records) => break records,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot re-read the sessions from etcd");
                        if tx.is_closed() {
                            return;
                        }
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(ETCD_RETRY_MAX);
                    }
                }
            };
            tracing::warn!(
                "etcd's history was compacted while this node was away: re-read every session"
            );
            if tx.send(StoreChange::Reloaded(records)).await.is_err() {
                return;
            }
        }
    }
}
