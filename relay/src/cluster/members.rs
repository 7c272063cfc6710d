//! The other nodes, followed in etcd (`nodes/`): a node's key lives on its lease, so a node
//! that stops renewing (killed, cut off) disappears when its lease expires. Its sessions
//! then lose their owner here ([`Relay::owner_gone`]): their resume window starts, and
//! their agents resume on another node.

use std::collections::BTreeMap;
use std::sync::Arc;

use etcd_client::GetOptions;
use tokio::sync::mpsc;

use super::node::node_key;
use super::{Arrival, ClusterState, NodeInfo};
use crate::limits::{ETCD_RETRY_MAX, ETCD_RETRY_MIN};
use crate::shared::Relay;
use crate::store::etcd_request::retried;
use crate::store::etcd_watch::{self, PrefixEvent};
use crate::store::StoreError;

/// Reads every node; returns the names that left since the last read and the revision
/// of this one.
pub async fn load(
    state: &ClusterState,
) -> Result<(Vec<String>, Vec<(String, Arrival)>, i64), StoreError> {
    let prefix = node_key("");
    let found = retried("list the nodes", || {
        let (mut client, prefix) = (state.client.clone(), prefix.clone());
        async move {
            client
                .get(prefix, Some(GetOptions::new().with_prefix()))
                .await
        }
    })
    .await?;
    let revision = found.header().map_or(0, |h| h.revision());
    let mut all = BTreeMap::new();
    for kv in found.kvs() {
        let name = String::from_utf8_lossy(kv.key())
            .strip_prefix(&prefix)
            .unwrap_or_default()
            .to_owned();
        if let Ok(info) = serde_json::from_slice::<NodeInfo>(kv.value()) {
            all.insert(name, info);
        }
    }
    let (gone, arrivals) = state.members.set(all);
    Ok((gone, arrivals, revision))
}

/// Follows `nodes/` from revision `from` until the relay stops.
pub async fn follow(relay: Arc<Relay>, state: Arc<ClusterState>, mut from: i64) {
    let prefix = node_key("");
    loop {
        let (tx, mut events) = mpsc::channel(256);
        let watch = tokio::spawn(etcd_watch::follow(
            state.client.clone(),
            prefix.clone(),
            from,
            "nodes",
            tx,
        ));
        loop {
            let event = tokio::select! {
                () = relay.cancel.cancelled() => {
                    watch.abort();
                    return;
                }
                event = events.recv() => event,
            };
            match event {
                Some(PrefixEvent::Put { name, value }) => {
                    if let Ok(info) = serde_json::from_slice::<NodeInfo>(&value) {
                        if !state.members.alive(&name) {
                            tracing::info!(node = %name, agent = %info.agent, "a node joined the cluster");
                        }
                        let arrival = state.members.put(name.clone(), info);
                        arrived(&relay, &name, arrival);
                    }
                }
                Some(PrefixEvent::Deleted { name }) => {
                    if state.members.gone(&name) && name != state.node_name {
                        tracing::warn!(node = %name, "a node left the cluster (its lease ended): its sessions wait for their agents to resume elsewhere");
                        relay.owner_gone(&name);
                    }
                }
                Some(PrefixEvent::Reset) => break,
                None => return,
            }
        }
        // History was compacted: read the nodes again.
        let mut backoff = ETCD_RETRY_MIN;
        from = loop {
            match load(&state).await {
                Ok((gone, arrivals, revision)) => {
                    for name in gone {
                        relay.owner_gone(&name);
                    }
                    for (name, arrival) in arrivals {
                        arrived(&relay, &name, arrival);
                    }
                    break revision + 1;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the cluster's nodes");
                    tokio::select! {
                        () = relay.cancel.cancelled() => return,
                        () = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(ETCD_RETRY_MAX);
                }
            }
        };
    }
}

/// A node's entry appeared: the same process back keeps its sessions connected; a
/// restarted one lost them.
fn arrived(relay: &Relay, name: &str, arrival: Arrival) {
    match arrival {
        Arrival::Nothing => {}
        Arrival::Back => {
            tracing::info!(node = %name, "a node is back in the cluster (its lease lapsed while etcd was away)");
            relay.owner_back(name);
        }
        Arrival::Restarted => {
            tracing::info!(node = %name, "a node restarted: its sessions wait for their agents to resume");
            relay.owner_restarted(name);
        }
    }
}
