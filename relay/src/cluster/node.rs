//! This node's membership in the cluster: a lease of `--node-lease-ttl`, renewed every
//! third of it, and the node's key `nodes/<name>` under it. The name is unique: a node
//! whose name is held by a live lease refuses to start (a crashed earlier run of the same
//! node frees it when its lease expires, which start-up waits for). When etcd cannot be
//! reached, [`ClusterState::etcd_ok`] turns false (readiness says so) and renewal goes on
//! with backoff; if the lease expired meanwhile, the node registers again on a new one.

use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, PutOptions, Txn, TxnOp};
use tokio_util::sync::CancellationToken;

use super::{ClusterState, NodeInfo};
use crate::error::RelayError;
use crate::limits::{ETCD_RETRY_MAX, ETCD_RETRY_MIN};
use crate::store::etcd_request::{bounded, retried, PREFIX};
use crate::store::StoreError;

/// Key of node `name`.
pub fn node_key(name: &str) -> String {
    format!("{PREFIX}nodes/{name}")
}

/// A live membership.
pub struct Membership {
    client: Client,
    state: Arc<ClusterState>,
    ttl: Duration,
}

impl std::fmt::Debug for Membership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Membership")
            .field("node", &self.state.node_name)
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

impl Membership {
    /// Joins: a lease, and the node's key under it. Waits up to one lease TTL (and a
    /// little) for an earlier run's key to expire; a name held longer belongs to another
    /// live node.
    pub async fn join(
        client: Client,
        state: Arc<ClusterState>,
        ttl: Duration,
    ) -> Result<(Self, i64), RelayError> {
        let me = Self { client, state, ttl };
        let deadline = tokio::time::Instant::now() + ttl + Duration::from_secs(2);
        loop {
            let lease = me.grant().await?;
            if me.register(lease).await? {
                return Ok((me, lease));
            }
            me.revoke(lease).await;
            if tokio::time::Instant::now() >= deadline {
                return Err(RelayError::Config(format!(
                    "node name `{}` is in use by a live node of this cluster: give every node its own --node-name",
                    me.state.node_name
                )));
            }
            tracing::info!(node = %me.state.node_name, "the node's name is still held in etcd (an earlier run's lease?); waiting for it to expire");
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    async fn grant(&self) -> Result<i64, StoreError> {
        let ttl = i64::try_from(self.ttl.as_secs().max(1)).unwrap_or(i64::MAX);
        let granted = retried("grant the node lease", || {
            let mut client = self.client.clone();
            async move { client.lease_grant(ttl, None).await }
        })
        .await?;
        Ok(granted.id())
    }

    /// Puts the node's key under `lease` if no other lease holds it; false if one does.
    async fn register(&self, lease: i64) -> Result<bool, StoreError> {
        let key = node_key(&self.state.node_name);
        let info = NodeInfo {
            agent: self.state.advertise_agent.clone(),
            peer: self.state.advertise_peer.clone(),
            incarnation: self.state.incarnation,
            since_ms: porthole_protocol::time::to_unix_ms(std::time::SystemTime::now()),
        };
        let value = serde_json::to_vec(&info).map_err(|e| StoreError::Io(e.to_string()))?;
        let txn = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                key,
                value,
                Some(PutOptions::new().with_lease(lease)),
            )]);
        let answer = retried("register the node", || {
            let (mut client, txn) = (self.client.clone(), txn.clone());
            async move { client.txn(txn).await }
        })
        .await?;
        Ok(answer.succeeded())
    }

    async fn revoke(&self, lease: i64) {
        let mut client = self.client.clone();
        if let Err(e) = bounded("revoke the node lease", client.lease_revoke(lease)).await {
            tracing::warn!(error = %e, "could not revoke the node's lease; it expires by itself");
        }
    }

    /// Renews `lease` until `stop`; then revokes it, so the other nodes see this one leave
    /// at once instead of after the TTL.
    pub async fn keep(self, mut lease: i64, stop: CancellationToken) {
        let every = self.ttl / 3;
        let mut backoff = ETCD_RETRY_MIN;
        loop {
            let renewed = tokio::select! {
                () = stop.cancelled() => break,
                renewed = self.renew(lease) => renewed,
            };
            let wait = match renewed {
                Ok(true) => {
                    if !self.state.etcd_ok() {
                        tracing::info!("etcd answers again; the node's lease is renewed");
                    }
                    self.state.set_etcd_ok(true);
                    backoff = ETCD_RETRY_MIN;
                    every
                }
                Ok(false) => {
                    // The lease expired while etcd was away: join again on a new one.
                    tracing::warn!(
                        "the node's lease expired while etcd was unreachable; registering again"
                    );
                    match self.rejoin().await {
                        Ok(new) => {
                            lease = new;
                            self.state.set_etcd_ok(true);
                            every
                        }
                        Err(e) => {
                            self.state.set_etcd_ok(false);
                            tracing::warn!(error = %e, "cannot register the node again");
                            backoff = (backoff * 2).min(ETCD_RETRY_MAX);
                            backoff
                        }
                    }
                }
                Err(e) => {
                    if self.state.etcd_ok() {
                        tracing::warn!(error = %e, "etcd unreachable: live sessions keep forwarding; creating, finishing and deleting sessions fail until it is back");
                    }
                    self.state.set_etcd_ok(false);
                    let wait = backoff;
                    backoff = (backoff * 2).min(ETCD_RETRY_MAX);
                    wait
                }
            };
            tokio::select! {
                () = stop.cancelled() => break,
                () = tokio::time::sleep(wait) => {}
            }
        }
        self.revoke(lease).await;
    }

    /// One renewal: Ok(false) when the lease no longer exists.
    async fn renew(&self, lease: i64) -> Result<bool, StoreError> {
        let mut client = self.client.clone();
        let (mut keeper, mut answers) =
            bounded("renew the node lease", client.lease_keep_alive(lease)).await?;
        bounded("renew the node lease", keeper.keep_alive()).await?;
        let answer = bounded("renew the node lease", answers.message()).await?;
        Ok(answer.is_some_and(|a| a.ttl() > 0))
    }

    async fn rejoin(&self) -> Result<i64, StoreError> {
        let lease = self.grant().await?;
        if self.register(lease).await? {
            Ok(lease)
        } else {
            self.revoke(lease).await;
            Err(StoreError::Unavailable(format!(
                "node name `{}` is held by another lease",
                self.state.node_name
            )))
        }
    }
}
