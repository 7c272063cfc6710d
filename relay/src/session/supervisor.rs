//! One task per session that enforces its deadline with the relay's clock: it sleeps until
//! the earliest deadline that applies, wakes early when the lifecycle changes, revokes when a
//! deadline passes, and forgets the session after the retention period.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::limits::SUPERVISOR_MAX_SLEEP;
use crate::session::runtime::Session;
use crate::shared::Relay;

/// Runs until the session is revoked and its retention is over, or the relay shuts down.
pub async fn run(relay: Arc<Relay>, session: Arc<Session>) {
    loop {
        let (at, revoked) = {
            let inner = session.lock();
            (inner.life.deadline().0, inner.life.revoked.is_some())
        };
        if revoked {
            break;
        }
        let wait = at
            .duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO)
            .min(SUPERVISOR_MAX_SLEEP);
        tokio::select! {
            () = tokio::time::sleep(wait) => {
                let due = session.lock().life.due(SystemTime::now());
                if let Some(reason) = due {
                    if relay.decides(&session) {
                        relay.revoke(&session, reason);
                    } else {
                        // The same deadline passes on every node: cut here at once, the
                        // deciding node writes it.
                        relay.revoke_here(&session, Some(reason));
                    }
                }
            }
                        () = session.changed.notified() => {
                if session.deadline_moved.swap(false, std::sync::atomic::Ordering::Relaxed) {
                    relay.announce_deadline(&session).await;
                }
            }
            () = relay.cancel.cancelled() => return,
        }
    }
    // Retention counts from the revocation (which may predate a restart).
    let revoked_at = session.lock().life.revoked.map(|(_, at)| at);
    let age = revoked_at
        .and_then(|at| SystemTime::now().duration_since(at).ok())
        .unwrap_or_default();
    let rest = relay.config.revoked_retention.saturating_sub(age);
    tokio::select! {
        () = tokio::time::sleep(rest) => relay.purge(&session),
        () = relay.cancel.cancelled() => {}
    }
}
