//! What the agent tells the person reading the build log. The library reports events; the
//! binary prints them (no secrets in any of them).

use std::time::SystemTime;

use porthole_protocol::Endpoint;

/// Something worth telling the build log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AgentEvent {
    /// Registered (or resumed) with the relay.
    Registered {
        /// Session id.
        session_id: String,
        /// Public endpoints.
        endpoints: Vec<Endpoint>,
        /// Current deadline.
        deadline: SystemTime,
        /// A resume after a lost link.
        resumed: bool,
    },
    /// The deadline changed (the build finished, or a visitor held the session).
    Deadline {
        /// New deadline.
        deadline: SystemTime,
        /// The build finished: only the grace period remains.
        finishing: bool,
    },
    /// The number of visitors connected now changed (the relay's `visitors` reports).
    Visitors {
        /// Connected now.
        count: u32,
        /// Connected before this report.
        previous: u32,
    },
    /// Something the agent decided about the session (e.g. ending an unvisited session
    /// early), for the log.
    Notice {
        /// One sentence.
        message: String,
    },
    /// The link is down; the agent retries.
    Reconnecting {
        /// Why.
        error: String,
        /// Delay before the next attempt, milliseconds.
        retry_in_ms: u64,
    },
    /// The session is over.
    Revoked {
        /// Why.
        reason: String,
    },
}

/// Receives agent events.
pub trait Reporter: Send + Sync {
    /// Called for every event, in order.
    fn report(&self, event: &AgentEvent);
}

impl<F: Fn(&AgentEvent) + Send + Sync> Reporter for F {
    fn report(&self, event: &AgentEvent) {
        self(event)
    }
}

/// One reporter shared by the agent and its local control socket.
#[derive(Clone)]
pub struct SharedReporter(pub std::sync::Arc<dyn Reporter>);

impl std::fmt::Debug for SharedReporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SharedReporter")
    }
}

impl Reporter for SharedReporter {
    fn report(&self, event: &AgentEvent) {
        self.0.report(event)
    }
}
