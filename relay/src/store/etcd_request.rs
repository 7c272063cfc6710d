//! What every etcd request of the relay shares: the key prefix of a cluster, and a bound
//! on each request's time ([`bounded`]).

use crate::limits::ETCD_REQUEST_TIMEOUT;
use crate::store::StoreError;

/// The key prefix every node of a cluster uses.
pub const PREFIX: &str = "/porthole/";

/// Runs one etcd request within [`ETCD_REQUEST_TIMEOUT`]; failures become
/// [`StoreError::Unavailable`] (etcd answered with an error, or not at all).
pub async fn bounded<T>(
    what: &str,
    request: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, StoreError> {
    match tokio::time::timeout(ETCD_REQUEST_TIMEOUT, request).await {
        Ok(Ok(answer)) => Ok(answer),
        Ok(Err(e)) => Err(StoreError::Unavailable(format!("{what}: {e}"))),
        Err(_) => Err(StoreError::Unavailable(format!(
            "{what}: no answer within {}",
            humantime::format_duration(ETCD_REQUEST_TIMEOUT)
        ))),
    }
}
