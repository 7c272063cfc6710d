//! `porthole-agent finish --wait-if-nobody-connected DURATION` (opt-in): a session that no
//! visitor used ends soon after the build instead of at the end of its grace period.
//!
//! When the build finishes with this set: if a visitor connected at any time during the
//! session (a `visitors` report above 0), nothing changes. Otherwise the agent waits
//! DURATION; a visitor connecting meanwhile keeps the grace period too. If nobody came, the
//! agent sends `end` (the relay revokes the session as `ended_by_agent`, unless a visitor is
//! connected right then) — only to a relay that said it takes `end`; with an older relay it
//! says so and the session keeps its grace period. Each decision is a notice in the agent's
//! log and in `finish --wait`'s output.

use std::time::Duration;

use tokio::sync::watch;

use crate::events::{AgentEvent, Reporter, SharedReporter};
use crate::status::StatusCell;

/// Waits `within` for a visitor and then ends the session if nobody came (see the module
/// documentation). `end` is the latch the control link sends `end` on.
pub async fn run(
    status: StatusCell,
    within: Duration,
    end: watch::Sender<bool>,
    reporter: SharedReporter,
) {
    let say = |message: String| {
        reporter.report(&AgentEvent::Notice {
            message: message.clone(),
        });
        status.notice(message);
    };
    const KEEP: &str = "the session stays open for its grace period";
    if status.get().visited {
        say(format!("a user connected during the session: {KEEP}"));
        return;
    }
    let shown = humantime::format_duration(within);
    say(format!(
        "nobody has connected yet: the session ends early unless a user connects within {shown}"
    ));
    let mut rx = status.subscribe();
    let waited = tokio::time::timeout(within, rx.wait_for(|s| s.visited || s.end.is_some()))
        .await
        .map(|got| got.map(|s| s.end.is_some()));
    match waited {
        // The session ended meanwhile, or the agent is going away.
        Ok(Ok(true)) | Ok(Err(_)) => return,
        Ok(Ok(false)) => {
            say(format!("a user connected: {KEEP}"));
            return;
        }
        Err(_) => {}
    }
    let now = status.get();
    if now.end.is_some() {
        return;
    }
    if now.visited {
        say(format!("a user connected: {KEEP}"));
    } else if !now.accepts_end {
        say(format!(
            "nobody connected, but the relay cannot end sessions early (it does not take \
             `end`): {KEEP}"
        ));
    } else {
        say(format!(
            "nobody connected during the session nor within {shown} after the build finished: \
             ending the session"
        ));
        end.send_replace(true);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    fn recorder() -> (SharedReporter, Arc<Mutex<Vec<String>>>) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = seen.clone();
        let reporter = SharedReporter(Arc::new(move |e: &AgentEvent| {
            if let AgentEvent::Notice { message } = e {
                sink.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(message.clone());
            }
        }));
        (reporter, seen)
    }

    fn last(seen: &Mutex<Vec<String>>) -> String {
        seen.lock()
            .unwrap_or_else(|p| p.into_inner())
            .last()
            .cloned()
            .unwrap_or_default()
    }

    #[tokio::test]
    async fn an_unvisited_session_ends_when_the_relay_takes_end() {
        let status = StatusCell::new(1);
        status.update(|s| s.accepts_end = true);
        let (end, mut ended) = watch::channel(false);
        let (reporter, seen) = recorder();
        run(status.clone(), Duration::from_millis(20), end, reporter).await;
        assert!(*ended.borrow_and_update());
        assert!(last(&seen).contains("ending the session"), "{seen:?}");
        assert_eq!(status.get().notices.len(), 2);
    }

    #[tokio::test]
    async fn an_older_relay_keeps_the_grace_period() {
        let status = StatusCell::new(1);
        let (end, ended) = watch::channel(false);
        let (reporter, seen) = recorder();
        run(status, Duration::from_millis(20), end, reporter).await;
        assert!(!*ended.borrow());
        assert!(
            last(&seen).contains("cannot end sessions early"),
            "{seen:?}"
        );
    }

    #[tokio::test]
    async fn a_visited_session_is_kept() {
        let status = StatusCell::new(1);
        status.update(|s| {
            s.accepts_end = true;
            s.visited = true;
        });
        let (end, ended) = watch::channel(false);
        let (reporter, seen) = recorder();
        run(status, Duration::from_secs(3600), end, reporter).await;
        assert!(!*ended.borrow());
        assert!(last(&seen).contains("a user connected during the session"));
    }

    #[tokio::test]
    async fn a_visitor_within_the_wait_keeps_the_session() {
        let status = StatusCell::new(1);
        status.update(|s| s.accepts_end = true);
        let (end, ended) = watch::channel(false);
        let (reporter, seen) = recorder();
        let waiting = tokio::spawn(run(
            status.clone(),
            Duration::from_secs(3600),
            end,
            reporter,
        ));
        // Once it announced the wait, a visitor arrives.
        let mut rx = status.subscribe();
        let _ = rx.wait_for(|s| !s.notices.is_empty()).await;
        status.update(|s| {
            s.visitors = 1;
            s.visited = true;
        });
        let _ = waiting.await;
        assert!(!*ended.borrow());
        assert!(last(&seen).contains("a user connected: "), "{seen:?}");
    }
}
