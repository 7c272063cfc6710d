//! Start-up in cluster mode: connect to etcd (bounded), create or read `cluster.secret`,
//! check the shared files against the cluster's identity, join as a member, and hand back
//! the cluster store.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, ConnectOptions};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::identity::{self, Identity, SharedFiles};
use super::node::Membership;
use super::ClusterState;
use crate::config::RelayConfig;
use crate::error::RelayError;
use crate::limits::{ETCD_CONNECT_TIMEOUT, ETCD_REQUEST_TIMEOUT};
use crate::store::etcd::EtcdStore;

/// The shortest cluster secret accepted (bytes of its file, trimmed).
const MIN_CLUSTER_SECRET: usize = 32;

/// A node that joined its cluster.
#[derive(Debug)]
pub struct Joined {
    /// The cluster store.
    pub store: EtcdStore,
    /// What the relay knows of the cluster.
    pub state: Arc<ClusterState>,
    /// The cluster secret (the peer link's bearer token).
    pub secret: porthole_protocol::Secret,
}

/// What a node shares with the others, read by start-up.
#[derive(Debug)]
pub struct Shared<'a> {
    /// The admin token.
    pub admin_token: &'a [u8],
    /// The user-token secret.
    pub user_token_secret: &'a [u8],
    /// The agent endpoint certificate's SHA-256 fingerprint.
    pub tls_fingerprint: &'a str,
}

/// Joins the cluster on `config.etcd_endpoints`; the membership is kept by a task on
/// `tasks` until `stop`.
pub async fn join(
    config: &RelayConfig,
    shared: Shared<'_>,
    tasks: &TaskTracker,
    stop: CancellationToken,
) -> Result<Joined, RelayError> {
    let cluster_secret = load_or_create_cluster_secret(&config.data_dir.join("cluster.secret"))?;
    let options = ConnectOptions::new()
        .with_connect_timeout(ETCD_CONNECT_TIMEOUT)
        .with_timeout(ETCD_REQUEST_TIMEOUT)
        .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2))
        .with_keep_alive_while_idle(true);
    let endpoints = config.etcd_endpoints.join(",");
    let unreachable = |e: String| {
        RelayError::Config(format!(
            "cannot reach etcd at {endpoints}: {e} (check --etcd-endpoints and that etcd runs)"
        ))
    };
    let client = tokio::time::timeout(
        ETCD_CONNECT_TIMEOUT + ETCD_REQUEST_TIMEOUT,
        Client::connect(&config.etcd_endpoints, Some(options)),
    )
    .await
    .map_err(|_| unreachable("no answer".into()))?
    .map_err(|e| unreachable(e.to_string()))?;
    let mine = Identity::of(&SharedFiles {
        cluster_secret: &cluster_secret,
        admin_token: shared.admin_token,
        user_token_secret: shared.user_token_secret,
        tls_fingerprint: shared.tls_fingerprint,
    });
    identity::check(&client, &mine, &config.data_dir)
        .await
        .map_err(|e| match e {
            RelayError::Store(s) => unreachable(s.to_string()),
            other => other,
        })?;
    let advertise_agent = config.advertise_agent().unwrap_or_default();
    let advertise_peer = config.advertise_peer().unwrap_or_default();
    let state = Arc::new(ClusterState::new(
        config.node_name(),
        advertise_agent,
        advertise_peer,
        client.clone(),
    ));
    let (membership, lease) =
        Membership::join(client.clone(), state.clone(), config.node_lease_ttl).await?;
    tasks.spawn(membership.keep(lease, stop));
    tracing::info!(node = %state.node_name, etcd = %endpoints, "joined the cluster");
    Ok(Joined {
        store: EtcdStore::new(client, config.port_cooldown),
        state,
        secret: porthole_protocol::Secret::new(
            String::from_utf8_lossy(&cluster_secret).into_owned(),
        ),
    })
}

/// Reads `cluster.secret`, or creates it (0600) on a node's first start in cluster mode.
fn load_or_create_cluster_secret(path: &Path) -> Result<Vec<u8>, RelayError> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let secret = text.trim().as_bytes().to_vec();
            if secret.len() < MIN_CLUSTER_SECRET {
                return Err(RelayError::Config(format!(
                    "{}: the cluster secret must be at least {MIN_CLUSTER_SECRET} characters",
                    path.display()
                )));
            }
            crate::ops::bootstrap::warn_if_loose(path, "cluster secret");
            Ok(secret)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let secret = porthole_protocol::Secret::generate("phc_");
            crate::ops::bootstrap::write_private(
                path,
                format!("{}\n", secret.expose()).as_bytes(),
            )?;
            tracing::info!(path = %path.display(), "created the cluster secret: copy it (with admin.token, user-token.secret and tls/) to every other node's data dir");
            Ok(secret.expose().as_bytes().to_vec())
        }
        Err(source) => Err(RelayError::File {
            path: path.to_owned(),
            source,
        }),
    }
}
