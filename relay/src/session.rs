//! One session: its fixed facts, its lifecycle, its agent link and its visitors waiting for
//! a data connection.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use bytes::BytesMut;
use porthole_protocol::secret::SecretHash;
use porthole_protocol::{Endpoint, Message, Secret, Service};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, Notify};
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;

use crate::lifecycle::Lifecycle;

/// The agent side of one visitor: a data connection, and the bytes already read from it
/// past its `attach` frame (forwarded first, never lost).
#[derive(Debug)]
pub struct DataConn {
    /// The TLS data connection.
    pub stream: TlsStream<TcpStream>,
    /// Bytes read past the `attach` frame.
    pub prefix: BytesMut,
}

/// The live control connection of a session's agent.
#[derive(Clone, Debug)]
pub struct Link {
    /// Distinguishes successive links of one session.
    pub id: u64,
    /// Messages to the agent.
    pub tx: mpsc::Sender<Message>,
    /// Cancelled when this link ends; visitors forwarded over it end too.
    pub cancel: CancellationToken,
}

/// What changes under the session lock.
#[derive(Debug)]
pub struct SessionInner {
    /// State facts and deadlines.
    pub life: Lifecycle,
    /// The agent's control link, while connected.
    pub link: Option<Link>,
    /// Hash of the current resume secret (set when an agent registers).
    pub resume_hash: Option<SecretHash>,
}

/// A visitor waiting for the agent's data connection.
#[derive(Debug)]
struct PendingOpen {
    /// Hash of the one-time secret sent in `open`.
    secret: SecretHash,
    /// Where the data connection goes.
    tx: oneshot::Sender<DataConn>,
}

/// One remote access session.
#[derive(Debug)]
pub struct Session {
    /// Public id (not a secret).
    pub id: String,
    /// The CI build this session belongs to.
    pub build_id: String,
    /// The CI app the build belongs to.
    pub app_id: String,
    /// Public endpoints, one per service, fixed at creation.
    pub endpoints: Vec<Endpoint>,
    /// Hash of the single-use join token.
    pub join_hash: SecretHash,
    /// Cancelled at revocation: listeners, links and visitors all end.
    pub cancel: CancellationToken,
    /// Wakes the deadline supervisor when the lifecycle changes.
    pub changed: Notify,
    /// Lifecycle, link and resume secret.
    inner: Mutex<SessionInner>,
    /// Visitors waiting for a data connection, by connection id.
    pending: Mutex<HashMap<u64, PendingOpen>>,
    /// Next connection id (and link id).
    next_id: AtomicU64,
}

impl Session {
    /// A new pending session.
    pub fn new(
        id: String,
        build_id: String,
        app_id: String,
        endpoints: Vec<Endpoint>,
        join_token: &Secret,
        life: Lifecycle,
        cancel: CancellationToken,
    ) -> Self {
        Self {
            id,
            build_id,
            app_id,
            endpoints,
            join_hash: join_token.hash(),
            cancel,
            changed: Notify::new(),
            inner: Mutex::new(SessionInner {
                life,
                link: None,
                resume_hash: None,
            }),
            pending: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
        }
    }

    /// Locks the mutable part. A poisoned lock is taken over: the data is plain facts.
    pub fn lock(&self) -> MutexGuard<'_, SessionInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The services of the session.
    pub fn services(&self) -> Vec<Service> {
        self.endpoints.iter().map(|e| e.service).collect()
    }

    /// The public ports of the session.
    pub fn ports(&self) -> Vec<u16> {
        self.endpoints.iter().map(|e| e.port).collect()
    }

    /// A fresh id for a link or a visitor connection.
    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// The current link, if the agent is connected.
    pub fn link(&self) -> Option<Link> {
        self.lock().link.clone()
    }

    /// Ends link `link_id` if it is still the current one: the session goes `disconnected`,
    /// visitors waiting for a data connection are closed.
    pub fn link_lost(&self, link_id: u64, now: std::time::SystemTime) {
        let mut inner = self.lock();
        if inner.link.as_ref().is_some_and(|l| l.id == link_id) {
            if let Some(link) = inner.link.take() {
                link.cancel.cancel();
            }
            inner.life.on_link_down(now);
            drop(inner);
            self.pending
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clear();
            self.changed.notify_one();
        }
    }

    /// Registers a visitor waiting for a data connection; returns its connection id.
    pub fn register_open(&self, secret: &Secret) -> (u64, oneshot::Receiver<DataConn>) {
        let (tx, rx) = oneshot::channel();
        let conn_id = self.next_id();
        let open = PendingOpen {
            secret: secret.hash(),
            tx,
        };
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(conn_id, open);
        (conn_id, rx)
    }

    /// Takes the waiting visitor `conn_id` if `secret` is its one-time secret.
    pub fn take_open(&self, conn_id: u64, secret: &Secret) -> Option<oneshot::Sender<DataConn>> {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        if !pending
            .get(&conn_id)
            .is_some_and(|o| secret.matches(&o.secret))
        {
            return None;
        }
        pending.remove(&conn_id).map(|o| o.tx)
    }

    /// Forgets a waiting visitor (timed out, or the agent could not dial).
    pub fn cancel_open(&self, conn_id: u64) {
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&conn_id);
    }
}
