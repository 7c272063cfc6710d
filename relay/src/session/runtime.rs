//! One session: its fixed facts, its lifecycle, its agent link, its visitors waiting for
//! a data connection, and its warm data connections ([`WarmPool`]).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use porthole_protocol::secret::SecretHash;
use porthole_protocol::{Endpoint, Message, Secret, Service};
use std::time::SystemTime;
use tokio::sync::{mpsc, oneshot, Notify};
use tokio_util::sync::CancellationToken;

use crate::cluster::ClusterState;
use crate::edge::visitor::guards::{Guards, VisitorRefusal};
use crate::session::access::Access;
pub use crate::session::data_conn::{DataConn, DataStream};
use crate::session::lifecycle::Lifecycle;
use crate::session::warm_pool::{Assignment, ParkRefusal, WarmPool};

/// The fixed facts of a new session.
#[derive(Debug)]
pub struct SessionSpec {
    /// Public id.
    pub id: String,
    /// CI build.
    pub build_id: String,
    /// CI app.
    pub app_id: String,
    /// Public endpoints.
    pub endpoints: Vec<Endpoint>,
    /// Hash of the join token.
    pub join_hash: SecretHash,
    /// Visitor guards.
    pub guards: Guards,
    /// Concurrent visitor cap.
    pub max_visitors: usize,
}

/// Counts one visitor of a session while it lives (toward `max_visitors` and its source's
/// cap); once [`VisitorGuard::hold`] was called it also holds an
/// [`crate::session::lifecycle::LifetimePolicy::ExtendWhileConnected`] session open, and dropping it
/// may then start a fresh grace.
#[derive(Debug)]
pub struct VisitorGuard {
    /// The session counted in.
    session: Arc<Session>,
    /// The visitor's source key (IPv4 address, IPv6 /64).
    source: IpAddr,
    /// Whether the visitor holds the session open (plausibly logged in).
    holding: AtomicBool,
}

impl VisitorGuard {
    /// Tells the agent the session's visitor count now that this visitor is on its way to
    /// it: called after the `open` is queued (or a warm connection assigned), so the report,
    /// which is only news, never delays the visitor's `open` on the control link.
    pub fn announce(&self) {
        self.session.lock().report_visitors();
    }

    /// The visitor is plausibly logged in (connected long enough, or reported logged in by
    /// the agent): from now on it holds the session open. Idempotent.
    pub fn hold(&self) {
        if !self.holding.swap(true, Ordering::Relaxed) {
            let mut inner = self.session.lock();
            let before = inner.life.deadline();
            inner.life.on_visitor_holding();
            let moved = inner.life.deadline() != before;
            drop(inner);
            if moved {
                // A finished session now runs to its hard cap: the agent hears of it.
                self.session.deadline_moved.store(true, Ordering::Relaxed);
            }
            self.session.changed.notify_one();
        }
    }
}

impl Drop for VisitorGuard {
    fn drop(&mut self) {
        let holding = self.holding.load(Ordering::Relaxed);
        let changed = {
            let mut inner = self.session.lock();
            if let Some(n) = inner.sources.get_mut(&self.source) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    inner.sources.remove(&self.source);
                }
            }
            let changed = inner.life.on_visitor_left(SystemTime::now(), holding);
            inner.report_visitors();
            changed
        };
        if changed {
            self.session.deadline_moved.store(true, Ordering::Relaxed);
            self.session.changed.notify_one();
        }
    }
}

/// Where an admitted visitor's data connection comes from.
#[derive(Debug)]
pub enum Route {
    /// The agent's link on this node.
    Here(Link),
    /// Cluster mode: the agent's link is on this other node; it sends the agent `open_at`.
    Owner(String),
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
    /// Hash of this link's `park_secret` (warm data connections).
    pub park_hash: SecretHash,
    /// The agent's address on this link (data connections on the plain-TCP data port must
    /// come from it).
    pub ip: IpAddr,
    /// The visitor count for the agent, when it takes `visitors` reports: a watch (not the
    /// message queue), so a burst of visitors coalesces into the latest count and never
    /// crowds out their `open`s.
    pub visitor_count: Option<Arc<tokio::sync::watch::Sender<u32>>>,
    /// Whether the agent takes `open_at` (cluster: visitors waiting on other nodes).
    pub attach_elsewhere: bool,
}

impl SessionInner {
    /// Tells the agent how many visitors are connected now (if it asked to be told).
    fn report_visitors(&self) {
        if let Some(count) = self.link.as_ref().and_then(|l| l.visitor_count.as_ref()) {
            count.send_replace(u32::try_from(self.life.visitors).unwrap_or(u32::MAX));
        }
    }
}

/// The registration state that is durable: every save writes it to the store (with the
/// session's fixed facts and lifecycle, as a [`crate::store::SessionRecord`]) and a restore
/// reads it back ([`crate::session::persist`]).
#[derive(Clone, Debug, Default)]
pub struct Durable {
    /// Hash of the resume secret the agent is known to hold (confirmed).
    pub resume_hash: Option<SecretHash>,
    /// Hash of the resume secret sent in the latest `registered`, until the agent proves it
    /// got it (its first frame on the new link). Both it and `resume_hash` are accepted
    /// meanwhile, so a lost `registered` never locks the agent out.
    pub pending_resume_hash: Option<SecretHash>,
    /// Whether the agent confirmed its latest registration.
    pub confirmed: bool,
    /// Whether any registration of this session was ever confirmed: from then on the join
    /// token is refused for good. Until then it stays usable while no agent is connected, so
    /// a lost `registered` answer never locks the first agent out.
    pub join_spent: bool,
    /// Version of the latest record written for this session (see [`crate::store`]).
    pub version: u64,
}

/// What changes under the session lock: the durable state ([`SessionInner::life`] without
/// its visitor counts, and [`SessionInner::durable`]) and what lives only in this process
/// (the link, the reported credentials, the visitors per source).
#[derive(Debug)]
pub struct SessionInner {
    /// State facts and deadlines (durable), and this node's visitor counts (not).
    pub life: Lifecycle,
    /// Registration state written with every save.
    pub durable: Durable,
    /// Node-local: the agent's control link, while connected.
    pub link: Option<Link>,
    /// Node-local: credentials and host keys from the agent (memory only; dropped at
    /// revocation; the agent sends them again when it resumes).
    pub access: Option<Access>,
    /// Node-local: connected visitors per source key (for `max_visitors_per_source`).
    pub sources: HashMap<IpAddr, usize>,
    /// Cluster mode: the node holding the agent's link, as this node last heard (its own
    /// name while it holds the link itself).
    pub owner: Option<String>,
    /// Cluster mode: the node that held the agent's link most recently (kept when the link
    /// ends, for the `session_rehomed` audit event).
    pub last_owner: Option<String>,
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
    /// Source CIDRs and per-source rate limits for visitors.
    pub guards: Guards,
    /// Concurrent visitor connections allowed.
    pub max_visitors: usize,
    /// Wakes the deadline supervisor when the lifecycle changes.
    pub changed: Notify,
    /// Lifecycle, link and resume secret.
    inner: Mutex<SessionInner>,
    /// Visitors waiting for a data connection, by connection id.
    pending: Mutex<HashMap<u64, PendingOpen>>,
    /// Forwarded visitors waiting for the agent to report them logged in, by connection id
    /// (at most one per connected visitor).
    auth_waiters: Mutex<HashMap<u64, oneshot::Sender<()>>>,
    /// Warm data connections.
    pub warm: WarmPool,
    /// Next connection id (and link id).
    next_id: AtomicU64,
    /// Whether a visitor was ever forwarded (for the time-to-first-visitor metric).
    had_visitor: AtomicBool,
    /// Set when a visitor leaving moved the deadline; the supervisor saves and announces it.
    pub deadline_moved: AtomicBool,
}

impl Session {
    /// A new pending session.
    pub fn new(spec: SessionSpec, life: Lifecycle, cancel: CancellationToken) -> Self {
        Self {
            id: spec.id,
            build_id: spec.build_id,
            app_id: spec.app_id,
            endpoints: spec.endpoints,
            join_hash: spec.join_hash,
            cancel,
            guards: spec.guards,
            max_visitors: spec.max_visitors,
            changed: Notify::new(),
            inner: Mutex::new(SessionInner {
                life,
                durable: Durable::default(),
                link: None,
                access: None,
                sources: HashMap::new(),
                owner: None,
                last_owner: None,
            }),
            pending: Mutex::new(HashMap::new()),
            auth_waiters: Mutex::new(HashMap::new()),
            warm: WarmPool::default(),
            next_id: AtomicU64::new(1),
            had_visitor: AtomicBool::new(false),
            deadline_moved: AtomicBool::new(false),
        }
    }

    /// Admits a visitor from `ip` that passed the guards and its protocol's opening: the
    /// agent must be connected, the session under its visitor cap and the source under
    /// `per_source`. The returned guard counts the visitor until dropped.
    ///
    /// In a cluster (`cluster`), a session whose agent another live node holds is served
    /// through that node ([`Route::Owner`]).
    pub fn admit_visitor(
        self: &Arc<Self>,
        ip: IpAddr,
        per_source: usize,
        cluster: Option<&ClusterState>,
    ) -> Result<(Route, VisitorGuard), VisitorRefusal> {
        let source = crate::edge::source::source_key(ip.to_canonical());
        let mut inner = self.lock();
        if !inner.life.accepts_visitors() {
            return Err(VisitorRefusal::AgentNotConnected);
        }
        let route = match (&inner.link, &inner.owner, cluster) {
            (Some(link), _, _) => Route::Here(link.clone()),
            (None, Some(owner), Some(cluster))
                if *owner != cluster.node_name && cluster.members.alive(owner) =>
            {
                Route::Owner(owner.clone())
            }
            _ => return Err(VisitorRefusal::AgentNotConnected),
        };
        if inner.life.visitors >= self.max_visitors {
            return Err(VisitorRefusal::TooManyVisitors);
        }
        let from_source = inner.sources.entry(source).or_insert(0);
        if *from_source >= per_source {
            return Err(VisitorRefusal::TooManyFromSource);
        }
        *from_source += 1;
        inner.life.on_visitor_joined();
        // Not reported yet: the caller announces the visitor once the agent has its `open`
        // ([`VisitorGuard::announce`]), so the count never travels ahead of it.
        Ok((
            route,
            VisitorGuard {
                session: self.clone(),
                source,
                holding: AtomicBool::new(false),
            },
        ))
    }

    /// Waits for the agent to report visitor `conn_id` logged in
    /// ([`Session::report_authenticated`]); the entry goes with [`Session::forget_authenticated`].
    pub fn await_authenticated(&self, conn_id: u64) -> oneshot::Receiver<()> {
        let (tx, rx) = oneshot::channel();
        self.auth_waiters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(conn_id, tx);
        rx
    }

    /// The agent reports visitor `conn_id` logged in (unknown ids are ignored).
    pub fn report_authenticated(&self, conn_id: u64) {
        let waiter = self
            .auth_waiters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&conn_id);
        if let Some(tx) = waiter {
            let _ = tx.send(());
        }
    }

    /// Visitor `conn_id` ended: no report is awaited any more.
    pub fn forget_authenticated(&self, conn_id: u64) {
        self.auth_waiters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&conn_id);
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

    /// Records a forwarded visitor; true for the session's first.
    pub fn mark_first_visitor(&self) -> bool {
        !self.had_visitor.swap(true, Ordering::Relaxed)
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
    /// visitors waiting for a data connection are closed. True if it was the current one.
    pub fn link_lost(&self, link_id: u64, now: SystemTime) -> bool {
        self.end_link(link_id, now, true)
    }

    /// Ends link `link_id` for a relay shutdown: like [`Session::link_lost`], but visitors
    /// already forwarded keep draining (their data connections are healthy).
    pub fn link_released(&self, link_id: u64, now: SystemTime) -> bool {
        self.end_link(link_id, now, false)
    }

    /// Ends link `link_id` if it is still the current one; `cut_visitors` also cancels the
    /// visitors forwarded over it. Waiting visitors are closed either way.
    fn end_link(&self, link_id: u64, now: SystemTime, cut_visitors: bool) -> bool {
        let mut inner = self.lock();
        if inner.link.as_ref().is_none_or(|l| l.id != link_id) {
            return false;
        }
        inner.owner = None;
        if let Some(link) = inner.link.take() {
            if cut_visitors {
                link.cancel.cancel();
            }
        }
        inner.life.on_link_down(now);
        drop(inner);
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        self.warm.drop_link(link_id);
        self.changed.notify_one();
        true
    }

    /// Parks a warm data connection presenting `secret` (the current link's park secret):
    /// returns its id, where its visitor will come from, and the link it belongs to (it ends
    /// with the link).
    pub fn park(
        &self,
        secret: &Secret,
    ) -> Result<(u64, oneshot::Receiver<Assignment>, Link), ParkRefusal> {
        // Under the session lock, so a link ending meanwhile cannot miss this entry.
        let inner = self.lock();
        let link = inner
            .link
            .clone()
            .filter(|l| secret.matches(&l.park_hash) && !l.cancel.is_cancelled())
            .ok_or(ParkRefusal::BadSecret)?;
        let (id, rx) = self.warm.park(self.next_id(), link.id)?;
        drop(inner);
        Ok((id, rx, link))
    }

    /// The oldest parked connection of link `link_id` (the visitor's), if any.
    pub fn take_parked(&self, link_id: u64) -> Option<oneshot::Sender<Assignment>> {
        self.warm.take(link_id)
    }

    /// Registers a visitor waiting for a data connection that the node holding the agent's
    /// link opens (cluster mode). Its connection id is random with the top bit set, so it
    /// never meets the owner's own ids (counted from 1) nor, in practice, another node's.
    pub fn register_remote_open(&self, secret: &Secret) -> (u64, oneshot::Receiver<DataConn>) {
        let (tx, rx) = oneshot::channel();
        let conn_id = rand::random::<u64>() | (1 << 63);
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

    /// Takes the waiting visitor `conn_id` if `secret` is its one-time secret (and, with
    /// `from` set, the data connection comes from the control link's address).
    pub fn take_open(
        &self,
        conn_id: u64,
        secret: &Secret,
        from: Option<IpAddr>,
    ) -> Option<oneshot::Sender<DataConn>> {
        if let Some(ip) = from {
            let link_ip = self.lock().link.as_ref().map(|l| l.ip);
            if link_ip != Some(ip.to_canonical()) {
                return None;
            }
        }
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
