//! What every etcd request of the relay shares: the key prefix of a cluster, a bound on each
//! request's time ([`bounded`]), and for single requests a retry when the connection it
//! went out on was dead ([`retried`]: with several etcd members, the client may still send
//! a request to a member that just died; the next attempt goes to a live one).

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

/// First pause between two attempts of a [`retried`] request; it doubles up to
/// [`MAX_PAUSE`].
const FIRST_PAUSE: std::time::Duration = std::time::Duration::from_millis(50);

/// Longest wait for one attempt of a [`retried`] request.
const ATTEMPT_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(1500);

/// Longest pause between two attempts.
const MAX_PAUSE: std::time::Duration = std::time::Duration::from_millis(500);

/// Runs the request `request` makes, again when it failed on the way (the connection or
/// the member was gone, or the etcd cluster was electing a leader; etcd's own answers are
/// not retried), all within [`ETCD_REQUEST_TIMEOUT`]. Only for requests that may run
/// twice: reads, and writes that are transactions guarded by a compare (a repeat of one
/// that did apply fails its compare, and the caller checks what is stored).
pub async fn retried<T, F, Fut>(what: &str, mut request: F) -> Result<T, StoreError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
{
    let deadline = tokio::time::Instant::now() + ETCD_REQUEST_TIMEOUT;
    let mut pause = FIRST_PAUSE;
    loop {
        // One attempt may wait on a member that lost its leader: past ATTEMPT_TIMEOUT the
        // next attempt may find a new leader, or another member.
        let attempt_ends = (tokio::time::Instant::now() + ATTEMPT_TIMEOUT).min(deadline);
        let again = match tokio::time::timeout_at(attempt_ends, request()).await {
            Ok(Ok(answer)) => return Ok(answer),
            Ok(Err(e)) if on_the_way(&e) => format!("{e}"),
            Ok(Err(e)) => return Err(StoreError::Unavailable(format!("{what}: {e}"))),
            Err(_) => "no answer yet".to_owned(),
        };
        if tokio::time::Instant::now() + pause >= deadline {
            return Err(StoreError::Unavailable(format!(
                "{what}: no answer within {} (last: {again})",
                humantime::format_duration(ETCD_REQUEST_TIMEOUT)
            )));
        }
        tracing::debug!(error = %again, "etcd request not answered; trying again");
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(MAX_PAUSE);
    }
}

/// Whether a request failed before etcd could answer it (a connection or member gone, or
/// no leader for a moment).
fn on_the_way(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => true,
        etcd_client::Error::GRpcStatus(status) => {
            // UNAVAILABLE: no ready connection, a member stopping, no leader, leader changed.
            status.code() as i32 == 14
        }
        _ => false,
    }
}
