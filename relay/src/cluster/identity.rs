//! The files every node of one cluster shares: `admin.token`, the user-token secret, the
//! TLS certificate (`tls/`) and `cluster.secret` (created on a node's first start in
//! cluster mode). Copying them from one node's data dir to the others' provisions a
//! cluster. The first node records their fingerprints in etcd (`cluster/identity`); a node
//! whose files differ refuses to start and names the file.
//!
//! Fingerprints are SHA-256 over the cluster secret and the file's content, so what etcd
//! holds says nothing about the files to someone without the cluster secret.

use std::path::Path;

use etcd_client::{Client, Compare, CompareOp, Txn, TxnOp};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::RelayError;
use crate::store::etcd_request::{retried, PREFIX};

/// The key of the cluster's identity record.
fn identity_key() -> String {
    format!("{PREFIX}cluster/identity")
}

/// Fingerprints of the shared files.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    /// `cluster.secret`.
    pub cluster_secret: String,
    /// `admin.token`.
    pub admin_token: String,
    /// The user-token secret.
    pub user_token_secret: String,
    /// The agent endpoint's TLS certificate (its SHA-256 fingerprint, keyed).
    pub tls_certificate: String,
}

/// The shared files' contents, read at start.
#[derive(Debug)]
pub struct SharedFiles<'a> {
    /// `cluster.secret`.
    pub cluster_secret: &'a [u8],
    /// The admin token.
    pub admin_token: &'a [u8],
    /// The user-token secret.
    pub user_token_secret: &'a [u8],
    /// The certificate's SHA-256 fingerprint (hex).
    pub tls_fingerprint: &'a str,
}

impl Identity {
    /// Fingerprints of `files`.
    pub fn of(files: &SharedFiles<'_>) -> Self {
        let keyed = |name: &str, content: &[u8]| {
            let mut h = Sha256::new();
            h.update(b"porthole cluster identity\0");
            h.update(files.cluster_secret);
            h.update(b"\0");
            h.update(name.as_bytes());
            h.update(b"\0");
            h.update(content);
            hex::encode(h.finalize())
        };
        Self {
            cluster_secret: keyed("cluster.secret", b""),
            admin_token: keyed("admin.token", files.admin_token),
            user_token_secret: keyed("user-token.secret", files.user_token_secret),
            tls_certificate: keyed("tls", files.tls_fingerprint.as_bytes()),
        }
    }

    /// The first file of `self` (this node's) that differs from `cluster`'s, named for the
    /// operator.
    pub fn first_difference(&self, cluster: &Identity) -> Option<&'static str> {
        if self.cluster_secret != cluster.cluster_secret {
            Some("DATA_DIR/cluster.secret")
        } else if self.admin_token != cluster.admin_token {
            Some("DATA_DIR/admin.token")
        } else if self.user_token_secret != cluster.user_token_secret {
            Some("the user-token secret (DATA_DIR/user-token.secret or --user-token-secret-file)")
        } else if self.tls_certificate != cluster.tls_certificate {
            Some("the TLS certificate (DATA_DIR/tls/ or --tls-cert)")
        } else {
            None
        }
    }
}

/// Records `mine` as the cluster's identity if none is recorded yet, or checks it against
/// the recorded one: a node whose shared files differ must not join.
pub async fn check(client: &Client, mine: &Identity, data_dir: &Path) -> Result<(), RelayError> {
    let key = identity_key();
    let value =
        serde_json::to_vec(mine).map_err(|e| RelayError::Config(format!("identity: {e}")))?;
    let txn = Txn::new()
        .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
        .and_then([TxnOp::put(key.clone(), value, None)])
        .or_else([TxnOp::get(key, None)]);
    let answer = retried("record the cluster identity", || {
        let (mut client, txn) = (client.clone(), txn.clone());
        async move { client.txn(txn).await }
    })
    .await?;
    if answer.succeeded() {
        tracing::info!(
            "first node of this cluster: recorded the fingerprints of its shared files in etcd"
        );
        return Ok(());
    }
    let recorded = answer.op_responses().into_iter().find_map(|op| match op {
        etcd_client::TxnOpResponse::Get(get) => get.kvs().first().map(|kv| kv.value().to_vec()),
        _ => None,
    });
    let cluster: Identity = recorded
        .as_deref()
        .and_then(|bytes| serde_json::from_slice(bytes).ok())
        .ok_or_else(|| {
            RelayError::Config(format!(
                "etcd holds an unreadable cluster identity at {PREFIX}cluster/identity"
            ))
        })?;
    match mine.first_difference(&cluster) {
        None => Ok(()),
        Some(file) => Err(RelayError::Config(format!(
            "this node's {file} differs from the cluster's: every node of a cluster shares \
             admin.token, user-token.secret, tls/ and cluster.secret; copy them from another \
             node's data dir into {} and start again",
            data_dir.display()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn differences_are_named_and_fingerprints_are_keyed() {
        let files = |secret: &'static [u8], admin: &'static [u8]| SharedFiles {
            cluster_secret: secret,
            admin_token: admin,
            user_token_secret: b"u",
            tls_fingerprint: "ab",
        };
        let a = Identity::of(&files(b"s1", b"t"));
        assert_eq!(a.first_difference(&a), None);
        let other_secret = Identity::of(&files(b"s2", b"t"));
        assert_eq!(
            a.first_difference(&other_secret),
            Some("DATA_DIR/cluster.secret")
        );
        // Keyed: the same admin token under another cluster secret fingerprints differently.
        assert_ne!(a.admin_token, other_secret.admin_token);
        let other_token = Identity::of(&files(b"s1", b"t2"));
        assert_eq!(
            a.first_difference(&other_token),
            Some("DATA_DIR/admin.token")
        );
    }
}
