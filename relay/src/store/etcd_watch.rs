//! Following a key prefix in etcd: one watch from a revision, re-established with backoff
//! from the last revision delivered when the connection fails; when that revision was
//! compacted away, the caller is told to re-read everything ([`PrefixEvent::Reset`]).
//! The session store and the member list both follow their prefix this way.

use std::time::Duration;

use etcd_client::{Client, EventType, WatchOptions};
use tokio::sync::mpsc;

use super::etcd_request::bounded;
use crate::limits::{ETCD_RETRY_MAX, ETCD_RETRY_MIN};

/// What happened under the prefix.
#[derive(Debug)]
pub enum PrefixEvent {
    /// A key was written.
    Put {
        /// The key, without the prefix.
        name: String,
        /// The value.
        value: Vec<u8>,
    },
    /// A key was deleted (or its lease expired).
    Deleted {
        /// The key, without the prefix.
        name: String,
    },
    /// History from the requested revision is gone: re-read the prefix, then call
    /// [`follow`] again from the revision of that read.
    Reset,
}

/// Delivers the events under `prefix` from revision `from` on `tx` until `tx` closes or
/// history is compacted ([`PrefixEvent::Reset`] is then the last event). `what` names the
/// prefix in logs. Returns the last revision delivered.
pub async fn follow(
    client: Client,
    prefix: String,
    from: i64,
    what: &'static str,
    tx: mpsc::Sender<PrefixEvent>,
) -> i64 {
    let mut next = from;
    let mut backoff = ETCD_RETRY_MIN;
    loop {
        match follow_once(client.clone(), &prefix, next, &tx).await {
            Ended::Closed(seen) => return seen,
            Ended::Compacted(seen) => {
                let _ = tx.send(PrefixEvent::Reset).await;
                return seen;
            }
            Ended::Lost { seen, error } => {
                if seen >= next {
                    next = seen + 1;
                    backoff = ETCD_RETRY_MIN;
                }
                tracing::warn!(error = %error, retry_in = ?backoff, "lost the etcd watch of {what}; reconnecting");
                tokio::select! {
                    () = tx.closed() => return next - 1,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(ETCD_RETRY_MAX);
            }
        }
    }
}

/// How one watch ended; each carries the last revision delivered.
enum Ended {
    Closed(i64),
    Compacted(i64),
    Lost { seen: i64, error: String },
}

async fn follow_once(
    mut client: Client,
    prefix: &str,
    from: i64,
    tx: &mpsc::Sender<PrefixEvent>,
) -> Ended {
    let mut seen = from - 1;
    let options = WatchOptions::new()
        .with_prefix()
        .with_start_revision(from)
        .with_progress_notify();
    let mut stream = match bounded("watch", client.watch(prefix, Some(options))).await {
        Ok(stream) => stream,
        Err(e) => {
            return Ended::Lost {
                seen,
                error: e.to_string(),
            }
        }
    };
    loop {
        // A watch on a healthy connection hears progress notifications (etcd sends them
        // every few minutes when idle) and keepalives keep the channel honest; silence for
        // this long means the connection is gone without a word.
        let message = tokio::select! {
            () = tx.closed() => return Ended::Closed(seen),
            message = tokio::time::timeout(WATCH_SILENCE, stream.message()) => message,
        };
        let message = match message {
            Ok(Ok(Some(message))) => message,
            Ok(Ok(None)) => {
                return Ended::Lost {
                    seen,
                    error: "the watch ended".into(),
                }
            }
            Ok(Err(e)) => {
                return Ended::Lost {
                    seen,
                    error: e.to_string(),
                }
            }
            Err(_) => {
                return Ended::Lost {
                    seen,
                    error: "no word from etcd for too long".into(),
                }
            }
        };
        if message.compact_revision() > 0 {
            return Ended::Compacted(seen);
        }
        if message.canceled() {
            return Ended::Lost {
                seen,
                error: format!("the watch was cancelled: {}", message.cancel_reason()),
            };
        }
        for event in message.events() {
            let Some(kv) = event.kv() else { continue };
            seen = seen.max(kv.mod_revision());
            let name = String::from_utf8_lossy(kv.key())
                .strip_prefix(prefix)
                .unwrap_or_default()
                .to_owned();
            let event = match event.event_type() {
                EventType::Put => PrefixEvent::Put {
                    name,
                    value: kv.value().to_vec(),
                },
                EventType::Delete => PrefixEvent::Deleted { name },
            };
            if tx.send(event).await.is_err() {
                return Ended::Closed(seen);
            }
        }
    }
}

/// How long a watch may stay silent before it is taken for lost (etcd's progress
/// notifications come every 10 minutes by default; the keepalives of the channel detect a
/// dead connection much sooner and end the stream with an error).
const WATCH_SILENCE: Duration = Duration::from_secs(15 * 60);
