//! What the running agent knows about its session, shared between the control link (which
//! updates it) and the local control socket (which serves it to `porthole-agent status` and
//! `finish --wait`). No secret is ever part of it.

use std::time::{Duration, SystemTime};

use porthole_protocol::Endpoint;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

/// Notices kept for `wait` clients (there are only a few per session).
const MAX_NOTICES: usize = 64;

/// Where the agent is in its session's life.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// Not registered yet (dialing, or retrying the first registration).
    #[default]
    Connecting,
    /// Registered; the build has not finished.
    Active,
    /// Registered; the build finished and the grace period runs.
    Finishing,
    /// The link was lost after registering; the agent is resuming.
    Reconnecting,
    /// The agent is ending (see [`Status::end`]).
    Ended,
}

impl State {
    /// The name, as in the socket's JSON and `porthole-agent status`.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Connecting => "connecting",
            State::Active => "active",
            State::Finishing => "finishing",
            State::Reconnecting => "reconnecting",
            State::Ended => "ended",
        }
    }
}

/// How the agent ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EndKind {
    /// The relay revoked the session (deadline, API, `end`): the normal end.
    Revoked,
    /// The agent was stopped (SIGTERM, Ctrl-C) while the session may still live.
    Stopped,
    /// A fatal error (refused token, wrong pin, ...).
    Failed,
}

/// Why the agent ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct End {
    /// Revoked, stopped or failed.
    pub kind: EndKind,
    /// For people: the relay's reason, or the error.
    pub reason: String,
}

/// The agent's view of its session.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// The agent's process id.
    pub pid: u32,
    /// Where it is.
    pub state: State,
    /// The session, once registered.
    #[serde(default)]
    pub session_id: Option<String>,
    /// Public endpoints, once registered.
    #[serde(default)]
    pub endpoints: Vec<Endpoint>,
    /// The deadline in effect, Unix milliseconds, once registered.
    #[serde(default)]
    pub deadline_unix_ms: Option<u64>,
    /// Visitors connected now (from the relay's `visitors` reports).
    #[serde(default)]
    pub visitors: u32,
    /// Whether any visitor connected during the session.
    #[serde(default)]
    pub visited: bool,
    /// Whether the build was reported finished to this agent (`finish`, SIGUSR1).
    #[serde(default)]
    pub finish_requested: bool,
    /// Whether the relay said the build finished (the grace period runs).
    #[serde(default)]
    pub finishing: bool,
    /// Whether the relay takes `end` (an early end of an unvisited session).
    #[serde(default)]
    pub accepts_end: bool,
    /// The last error of the link (why it is reconnecting).
    #[serde(default)]
    pub last_error: Option<String>,
    /// Set once the agent is ending.
    #[serde(default)]
    pub end: Option<End>,
    /// Things the agent said about the session (e.g. the early end), oldest first.
    #[serde(default)]
    pub notices: Vec<String>,
}

impl Status {
    /// The deadline in effect, once registered.
    pub fn deadline(&self) -> Option<SystemTime> {
        self.deadline_unix_ms
            .map(|ms| SystemTime::UNIX_EPOCH + Duration::from_millis(ms))
    }

    /// Whether the session is (as far as the agent knows) still alive.
    pub fn lives(&self) -> bool {
        self.end.is_none()
    }

    /// Whether the agent is registered now (active or finishing).
    pub fn registered(&self) -> bool {
        matches!(self.state, State::Active | State::Finishing)
    }
}

/// The shared, observable [`Status`] of one agent.
#[derive(Clone, Debug)]
pub struct StatusCell(watch::Sender<Status>);

impl StatusCell {
    /// A fresh status (connecting) for the agent with process id `pid`.
    pub fn new(pid: u32) -> Self {
        let (tx, _) = watch::channel(Status {
            pid,
            ..Status::default()
        });
        Self(tx)
    }

    /// Changes the status in place; observers see the change.
    pub fn update(&self, change: impl FnOnce(&mut Status)) {
        self.0.send_modify(change);
    }

    /// A copy of the status now.
    pub fn get(&self) -> Status {
        self.0.borrow().clone()
    }

    /// A receiver that sees every later change.
    pub fn subscribe(&self) -> watch::Receiver<Status> {
        self.0.subscribe()
    }

    /// Records a notice (kept for `wait` clients, at most 64).
    pub fn notice(&self, message: String) {
        self.update(|s| {
            if s.notices.len() < MAX_NOTICES {
                s.notices.push(message);
            }
        });
    }

    /// Marks the agent as ending, unless it already ended.
    pub fn end(&self, kind: EndKind, reason: String) {
        self.update(|s| {
            if s.end.is_none() {
                s.state = State::Ended;
                s.end = Some(End { kind, reason });
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_end_wins_and_notices_are_bounded() {
        let cell = StatusCell::new(7);
        let mut rx = cell.subscribe();
        cell.end(EndKind::Revoked, "grace over".into());
        cell.end(EndKind::Stopped, "stopped".into());
        assert!(rx.has_changed().unwrap_or(false));
        let now = rx.borrow_and_update().clone();
        assert_eq!(now.pid, 7);
        assert_eq!(now.state, State::Ended);
        assert_eq!(
            now.end,
            Some(End {
                kind: EndKind::Revoked,
                reason: "grace over".into()
            })
        );
        for i in 0..100 {
            cell.notice(format!("n{i}"));
        }
        assert_eq!(cell.get().notices.len(), MAX_NOTICES);
    }

    #[test]
    fn status_round_trips_as_json_with_snake_case_names() {
        let status = Status {
            pid: 1,
            state: State::Finishing,
            deadline_unix_ms: Some(1_000),
            ..Status::default()
        };
        let text = serde_json::to_string(&status).unwrap_or_default();
        assert!(text.contains(r#""state":"finishing""#), "{text}");
        let back: Status = serde_json::from_str(&text).unwrap_or_default();
        assert_eq!(back, status);
        assert_eq!(
            back.deadline(),
            Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1))
        );
    }
}
