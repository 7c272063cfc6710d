//! Cluster mode: several relay nodes sharing sessions through etcd (`--etcd-endpoints`).
//!
//! - this module: [`ClusterState`], what the rest of the relay knows of the cluster
//!   (this node's name, the live members, whether etcd answers), compiled in every build;
//! - `identity` (feature `cluster`): the files every node of a cluster must share
//!   (admin token, user-token secret, TLS certificate, `cluster.secret`), checked against
//!   the cluster's record in etcd so a node with other files refuses to join;
//! - `join` (feature `cluster`): start-up in cluster mode (etcd connection, the cluster
//!   secret, the identity check, membership), handing back the cluster store;
//! - `node` (feature `cluster`): this node's membership: a lease kept alive, the node's
//!   key under it (`nodes/<name>`, unique), and readiness while etcd answers;
//! - `members` (feature `cluster`): the other nodes, followed in etcd; a node whose lease
//!   expired is gone, and its sessions lose their owner;
//! - `peer` (feature `cluster`): the node-to-node link (`--peer-listen`): opening a visitor
//!   on the node holding the agent's link, fetching the credentials it holds; the
//!   [`Peers`] trait here is what the rest of the relay sees of it.

#[cfg(feature = "cluster")]
pub mod identity;
#[cfg(feature = "cluster")]
pub mod join;
#[cfg(feature = "cluster")]
pub mod members;
#[cfg(feature = "cluster")]
pub mod node;
#[cfg(feature = "cluster")]
pub mod peer;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use futures_util::future::BoxFuture;
use porthole_protocol::{Credential, Secret, Service};
use serde::{Deserialize, Serialize};

/// Store lookups for unknown sessions a node makes at once ([`ClusterState::lookups`]).
const MAX_LOOKUPS: usize = 8;

/// What a node publishes about itself (`nodes/<name>`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// Its agent endpoint, as agents reach it.
    pub agent: String,
    /// Its peer link, as the other nodes reach it.
    #[serde(default)]
    pub peer: String,
    /// Random per process start: the same node name coming back with the same incarnation
    /// is the same process (its lease lapsed while etcd was away, its links held); another
    /// incarnation is a restart (its links are gone).
    #[serde(default)]
    pub incarnation: u64,
    /// When it (last) registered, Unix ms.
    pub since_ms: u64,
}

/// What the relay knows of its cluster.
pub struct ClusterState {
    /// This node's name.
    pub node_name: String,
    /// This node's agent endpoint, as agents reach it.
    pub advertise_agent: String,
    /// Whether the node's lease is alive in etcd (false while etcd cannot be reached).
    etcd_ok: AtomicBool,
    /// The live nodes.
    pub members: Members,
    /// This node's peer address, as the other nodes reach it.
    pub advertise_peer: String,
    /// This process's incarnation (see [`NodeInfo::incarnation`]).
    pub incarnation: u64,
    /// Requests to other nodes (set once the peer link is up).
    pub peers: OnceLock<Arc<dyn Peers>>,
    /// Store lookups for agents presenting a session this node has not heard of yet, at
    /// once: strangers with made-up tokens cannot make the node flood etcd.
    pub lookups: tokio::sync::Semaphore,
    /// The etcd client.
    #[cfg(feature = "cluster")]
    pub client: etcd_client::Client,
}

impl std::fmt::Debug for ClusterState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterState")
            .field("node_name", &self.node_name)
            .field("advertise_agent", &self.advertise_agent)
            .field("etcd_ok", &self.etcd_ok())
            .finish_non_exhaustive()
    }
}

impl ClusterState {
    /// A member named `node_name`, reachable by agents at `advertise_agent`.
    pub fn new(
        node_name: String,
        advertise_agent: String,
        advertise_peer: String,
        #[cfg(feature = "cluster")] client: etcd_client::Client,
    ) -> Self {
        Self {
            members: Members::new(node_name.clone()),
            node_name,
            advertise_agent,
            advertise_peer,
            incarnation: rand::random(),
            peers: OnceLock::new(),
            lookups: tokio::sync::Semaphore::new(MAX_LOOKUPS),
            etcd_ok: AtomicBool::new(true),
            #[cfg(feature = "cluster")]
            client,
        }
    }

    /// Whether etcd answered the node's latest lease renewal.
    pub fn etcd_ok(&self) -> bool {
        self.etcd_ok.load(Ordering::Relaxed)
    }

    /// Records whether etcd answers.
    pub fn set_etcd_ok(&self, ok: bool) {
        self.etcd_ok.store(ok, Ordering::Relaxed);
    }
}

/// A visitor waiting on one node, opened by the node holding the agent's link (peer link).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RemoteOpen {
    /// The session.
    pub session_id: String,
    /// The visitor's service.
    pub service: Service,
    /// The waiting visitor's connection id (unique across the cluster's nodes).
    pub conn_id: u64,
    /// The one-time secret the agent's data connection presents.
    pub secret: Secret,
    /// The asking node's agent endpoint, where the agent attaches.
    pub attach: String,
}

/// The login details the node holding an agent's link keeps in memory, for an
/// instructions request that landed on another node (checked again where they arrive).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PeerAccess {
    /// Credentials per service.
    pub credentials: Vec<Credential>,
    /// SSH host public keys.
    pub host_keys: Vec<String>,
}

/// Requests to other nodes over the peer link; errors say why, for logs.
pub trait Peers: Send + Sync + std::fmt::Debug {
    /// Asks node `node` (the owner) to open a visitor waiting here.
    fn open(&self, node: &str, open: RemoteOpen) -> BoxFuture<'static, Result<(), String>>;
    /// Asks node `node` (the owner) for the login details of session `session_id`.
    fn access(
        &self,
        node: &str,
        session_id: &str,
    ) -> BoxFuture<'static, Result<PeerAccess, String>>;
}

/// The live nodes of the cluster, as this node last heard from etcd.
#[derive(Debug)]
pub struct Members {
    /// This node's name (always counted live).
    me: String,
    /// The live nodes by name.
    nodes: Mutex<BTreeMap<String, NodeInfo>>,
    /// The latest incarnation seen of every node that ever was live.
    incarnations: Mutex<BTreeMap<String, u64>>,
}

/// What a node's entry appearing means for the sessions it owned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arrival {
    /// First seen, or already live: nothing changes.
    Nothing,
    /// The same process is back after its entry lapsed (etcd was away): its links held.
    Back,
    /// Another process under the same name: the links the old one held are gone.
    Restarted,
}

impl Members {
    /// Only this node, named `me`, so far.
    pub fn new(me: String) -> Self {
        Self {
            me,
            nodes: Mutex::new(BTreeMap::new()),
            incarnations: Mutex::new(BTreeMap::new()),
        }
    }

    fn nodes(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, NodeInfo>> {
        self.nodes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether node `name` is live (this node always is).
    pub fn alive(&self, name: &str) -> bool {
        name == self.me || self.nodes().contains_key(name)
    }

    /// How many nodes are live.
    pub fn count(&self) -> usize {
        let nodes = self.nodes();
        nodes.len() + usize::from(!nodes.contains_key(&self.me))
    }

    /// The node that decides for sessions without a live owner (deadlines of sessions
    /// whose agent is gone): the live node with the smallest name.
    pub fn sweeper(&self) -> String {
        match self.nodes().keys().next() {
            Some(first) if *first < self.me => first.clone(),
            _ => self.me.clone(),
        }
    }

    /// The peer address of live node `name`.
    pub fn peer_addr(&self, name: &str) -> Option<String> {
        self.nodes()
            .get(name)
            .map(|n| n.peer.clone())
            .filter(|p| !p.is_empty())
    }

    /// Sets the live nodes to `all`; returns the names that left, and those that came
    /// back or restarted meanwhile.
    pub fn set(&self, all: BTreeMap<String, NodeInfo>) -> (Vec<String>, Vec<(String, Arrival)>) {
        let gone = {
            let nodes = self.nodes();
            nodes
                .keys()
                .filter(|name| !all.contains_key(*name))
                .cloned()
                .collect::<Vec<_>>()
        };
        for name in &gone {
            self.gone(name);
        }
        let arrivals = all
            .into_iter()
            .map(|(name, info)| {
                let arrival = self.put(name.clone(), info);
                (name, arrival)
            })
            .filter(|(_, a)| *a != Arrival::Nothing)
            .collect();
        (gone, arrivals)
    }

    /// Node `name` joined (or updated its entry); what that means for its old sessions.
    pub fn put(&self, name: String, info: NodeInfo) -> Arrival {
        let before = self.incarnations().insert(name.clone(), info.incarnation);
        let was_live = self.nodes().insert(name, info.clone()).is_some();
        match before {
            Some(before) if before != info.incarnation => Arrival::Restarted,
            Some(_) if !was_live => Arrival::Back,
            _ => Arrival::Nothing,
        }
    }

    fn incarnations(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, u64>> {
        self.incarnations.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Node `name` left; true if it was live.
    pub fn gone(&self, name: &str) -> bool {
        self.nodes().remove(name).is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sweeper_is_the_live_node_with_the_smallest_name() {
        let members = Members::new("n2".into());
        assert_eq!(members.sweeper(), "n2");
        let info = NodeInfo {
            agent: "a:1".into(),
            peer: "a:2".into(),
            incarnation: 7,
            since_ms: 0,
        };
        assert_eq!(members.put("n3".into(), info.clone()), Arrival::Nothing);
        assert_eq!(members.sweeper(), "n2");
        assert_eq!(members.put("n1".into(), info.clone()), Arrival::Nothing);
        assert_eq!(members.sweeper(), "n1");
        assert!(members.alive("n1") && members.alive("n2") && !members.alive("n4"));
        assert!(members.gone("n1"));
        assert!(!members.gone("n1"));
        assert_eq!(members.sweeper(), "n2");
        assert_eq!(members.count(), 2);
        assert_eq!(members.peer_addr("n3").as_deref(), Some("a:2"));
        assert_eq!(members.peer_addr("n1"), None);
        let (gone, arrivals) = members.set(BTreeMap::from([("n2".into(), info.clone())]));
        assert_eq!(gone, vec!["n3".to_owned()]);
        assert_eq!(arrivals, vec![]);
        assert_eq!(members.count(), 1);
        // n3 comes back as the same process (its lease lapsed), then restarts.
        assert_eq!(members.put("n3".into(), info.clone()), Arrival::Back);
        assert_eq!(members.put("n3".into(), info.clone()), Arrival::Nothing);
        let restarted = NodeInfo {
            incarnation: 8,
            ..info
        };
        assert_eq!(members.put("n3".into(), restarted), Arrival::Restarted);
    }
}
