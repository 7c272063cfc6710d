//! The session state machine and its deadlines, pure: no clock is read here (methods that
//! need the time take `now`), so the rules are tested without one.
//!
//! ```text
//! pending --agent joins--> active <--link lost / resumed--> disconnected
//!    |                        |  finish: deadline = min(now + grace, hard cap)
//!    |                        v
//!    |                    finishing
//!    |                        |
//!    +--join TTL--------> revoked <-- deadline, hard cap, DELETE, end, agent lost too long
//! ```
//! The state is derived from the facts kept here (joined, link down since, finish deadline,
//! revoked), never stored twice.

use std::time::{Duration, SystemTime};

use serde::Serialize;

/// What a session looks like from outside.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SessionState {
    /// Created; no agent has joined yet.
    Pending,
    /// The agent is connected; visitors are forwarded.
    Active,
    /// The agent's link is lost; ports stay bound, visitors are refused until it resumes.
    Disconnected,
    /// The build finished; visitors are forwarded until the grace deadline.
    Finishing,
    /// Over: ports closed, connections cut.
    Revoked,
}

impl SessionState {
    /// The lowercase name (as in the API), for metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            SessionState::Pending => "pending",
            SessionState::Active => "active",
            SessionState::Disconnected => "disconnected",
            SessionState::Finishing => "finishing",
            SessionState::Revoked => "revoked",
        }
    }
}

/// How the grace after finish applies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LifetimePolicy {
    /// The session ends at min(finish + grace, hard cap).
    GraceAfterFinish,
    /// Like grace after finish, but while a holding visitor (plausibly logged in: see
    /// [`Lifecycle::holding`]) is connected the grace deadline does
    /// not apply (up to the hard cap), and the last visitor leaving starts a fresh grace.
    ExtendWhileConnected,
}

/// The durations and policy a session is created with.
#[derive(Clone, Copy, Debug)]
pub struct LifetimeSettings {
    /// How long the session waits for its agent.
    pub join_ttl: Duration,
    /// Hard cap on the session's life.
    pub max_lifetime: Duration,
    /// Grace after finish.
    pub grace: Duration,
    /// How long a lost agent may take to resume.
    pub resume_window: Duration,
    /// Which grace rule applies.
    pub policy: LifetimePolicy,
}

/// Why a session was revoked.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RevokeReason {
    /// No agent joined within the join TTL.
    JoinTtlExpired,
    /// The session reached its maximum lifetime.
    HardCap,
    /// The grace period after the build finished ended.
    GraceEnded,
    /// The agent did not resume within the resume window.
    AgentLost,
    /// Revoked through the API.
    Deleted,
    /// A public port could not be bound again when the relay restarted.
    PortLost,
    /// The agent ended the session early (`--wait-if-nobody-connected`: nobody came).
    EndedByAgent,
}

impl RevokeReason {
    /// Every reason, for metrics that start at zero.
    pub const ALL: [RevokeReason; 7] = [
        RevokeReason::JoinTtlExpired,
        RevokeReason::HardCap,
        RevokeReason::GraceEnded,
        RevokeReason::AgentLost,
        RevokeReason::Deleted,
        RevokeReason::PortLost,
        RevokeReason::EndedByAgent,
    ];

    /// The snake_case name (as in the API), for metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            RevokeReason::JoinTtlExpired => "join_ttl_expired",
            RevokeReason::HardCap => "hard_cap",
            RevokeReason::GraceEnded => "grace_ended",
            RevokeReason::AgentLost => "agent_lost",
            RevokeReason::Deleted => "deleted",
            RevokeReason::PortLost => "port_lost",
            RevokeReason::EndedByAgent => "ended_by_agent",
        }
    }

    /// A sentence for people (agent output, API).
    pub fn describe(self) -> &'static str {
        match self {
            RevokeReason::JoinTtlExpired => "no build machine joined before the join TTL ran out",
            RevokeReason::HardCap => "the session reached its maximum lifetime",
            RevokeReason::GraceEnded => "the grace period after the build finished is over",
            RevokeReason::AgentLost => {
                "the build machine did not reconnect within the resume window"
            }
            RevokeReason::Deleted => "the session was revoked through the API",
            RevokeReason::PortLost => {
                "a public port could not be bound again after a relay restart"
            }
            RevokeReason::EndedByAgent => {
                "the build machine ended the session: nobody connected after the build finished"
            }
        }
    }
}

/// The facts a session's state and deadline are derived from.
#[derive(Clone, Debug)]
pub struct Lifecycle {
    /// When the session was created.
    pub created_at: SystemTime,
    /// Latest time an agent may join.
    pub join_by: SystemTime,
    /// The hard cap: created_at + max lifetime.
    pub hard_cap: SystemTime,
    /// Grace after finish.
    pub grace: Duration,
    /// How long a lost agent may take to resume.
    pub resume_window: Duration,
    /// Which grace rule applies.
    pub policy: LifetimePolicy,
    /// Visitor connections open now.
    pub visitors: usize,
    /// Of those, the ones plausibly logged in (connected long enough, or reported logged in
    /// by the agent's embedded SSH server): only they hold an
    /// [`LifetimePolicy::ExtendWhileConnected`] session open.
    pub holding: usize,
    /// An agent has joined (the join token itself is spent only once a registration is
    /// confirmed: `SessionInner::join_spent`).
    pub joined: bool,
    /// Since when the agent link has been down (None while up, or before joining).
    pub link_down_since: Option<SystemTime>,
    /// Set once the build finished.
    pub finish_deadline: Option<SystemTime>,
    /// Set once revoked.
    pub revoked: Option<(RevokeReason, SystemTime)>,
}

impl Lifecycle {
    /// A new pending session.
    pub fn new(now: SystemTime, settings: LifetimeSettings) -> Self {
        let hard_cap = now + settings.max_lifetime;
        Self {
            created_at: now,
            join_by: (now + settings.join_ttl).min(hard_cap),
            hard_cap,
            grace: settings.grace,
            resume_window: settings.resume_window,
            policy: settings.policy,
            visitors: 0,
            holding: 0,
            joined: false,
            link_down_since: None,
            finish_deadline: None,
            revoked: None,
        }
    }

    /// The state, derived.
    pub fn state(&self) -> SessionState {
        if self.revoked.is_some() {
            SessionState::Revoked
        } else if !self.joined {
            SessionState::Pending
        } else if self.link_down_since.is_some() {
            SessionState::Disconnected
        } else if self.finish_deadline.is_some() {
            SessionState::Finishing
        } else {
            SessionState::Active
        }
    }

    /// The earliest deadline that applies now, and what revokes the session when it passes.
    pub fn deadline(&self) -> (SystemTime, RevokeReason) {
        let mut best = (self.hard_cap, RevokeReason::HardCap);
        let mut consider = |at: Option<SystemTime>, why| {
            if let Some(at) = at {
                if at < best.0 {
                    best = (at, why);
                }
            }
        };
        if !self.joined {
            consider(Some(self.join_by), RevokeReason::JoinTtlExpired);
        }
        if !self.held_open_by_visitors() {
            consider(self.finish_deadline, RevokeReason::GraceEnded);
        }
        consider(
            self.link_down_since.map(|t| t + self.resume_window),
            RevokeReason::AgentLost,
        );
        best
    }

    /// Whether connected visitors currently suspend the grace deadline.
    fn held_open_by_visitors(&self) -> bool {
        self.policy == LifetimePolicy::ExtendWhileConnected && self.holding > 0
    }

    /// The deadline users are told: `None` while the build runs and only the hard cap
    /// applies.
    pub fn available_until(&self) -> Option<SystemTime> {
        let (at, why) = self.deadline();
        (self.finish_deadline.is_some() || why != RevokeReason::HardCap).then_some(at)
    }

    /// A visitor connection opened.
    pub fn on_visitor_joined(&mut self) {
        self.visitors += 1;
    }

    /// A connected visitor is now plausibly logged in: it holds the session open.
    pub fn on_visitor_holding(&mut self) {
        self.holding = (self.holding + 1).min(self.visitors);
    }

    /// A visitor connection closed (`was_holding`: it had been counted by
    /// [`Lifecycle::on_visitor_holding`]). Under [`LifetimePolicy::ExtendWhileConnected`]
    /// the last holding visitor leaving after the build finished starts a fresh grace.
    /// Returns whether the deadline changed.
    pub fn on_visitor_left(&mut self, now: SystemTime, was_holding: bool) -> bool {
        self.visitors = self.visitors.saturating_sub(1);
        if !was_holding {
            return false;
        }
        self.holding = self.holding.saturating_sub(1);
        if self.holding > 0
            || self.policy != LifetimePolicy::ExtendWhileConnected
            || self.revoked.is_some()
        {
            return false;
        }
        let Some(existing) = self.finish_deadline else {
            return false;
        };
        let fresh = (now + self.grace).min(self.hard_cap);
        self.finish_deadline = Some(existing.max(fresh));
        self.finish_deadline != Some(existing)
    }

    /// Whether visitors are forwarded now.
    pub fn accepts_visitors(&self) -> bool {
        matches!(self.state(), SessionState::Active | SessionState::Finishing)
    }

    /// The agent joined with the join token.
    pub fn on_join(&mut self) {
        self.joined = true;
        self.link_down_since = None;
    }

    /// The agent resumed after a lost link.
    pub fn on_resume(&mut self) {
        self.link_down_since = None;
    }

    /// The agent link was lost.
    pub fn on_link_down(&mut self, now: SystemTime) {
        if self.joined && self.revoked.is_none() && self.link_down_since.is_none() {
            self.link_down_since = Some(now);
        }
    }

    /// The build finished: the grace period starts (a second finish never extends it).
    /// Returns whether the deadline changed.
    pub fn on_finish(&mut self, now: SystemTime) -> bool {
        if self.revoked.is_some() {
            return false;
        }
        let candidate = (now + self.grace).min(self.hard_cap);
        match self.finish_deadline {
            Some(existing) if existing <= candidate => false,
            _ => {
                self.finish_deadline = Some(candidate);
                true
            }
        }
    }

    /// Revokes; returns false when it already was.
    pub fn revoke(&mut self, reason: RevokeReason, now: SystemTime) -> bool {
        if self.revoked.is_some() {
            return false;
        }
        self.revoked = Some((reason, now));
        true
    }

    /// The reason to revoke now, if a deadline has passed.
    pub fn due(&self, now: SystemTime) -> Option<RevokeReason> {
        if self.revoked.is_some() {
            return None;
        }
        let (at, why) = self.deadline();
        (now >= at).then_some(why)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: Duration = Duration::from_secs(60);

    fn t0() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000)
    }

    fn with(policy: LifetimePolicy) -> Lifecycle {
        let settings = LifetimeSettings {
            join_ttl: 15 * MIN,
            max_lifetime: 180 * MIN,
            grace: 10 * MIN,
            resume_window: 5 * MIN,
            policy,
        };
        Lifecycle::new(t0(), settings)
    }

    fn fresh() -> Lifecycle {
        with(LifetimePolicy::GraceAfterFinish)
    }

    #[test]
    fn available_until_is_null_while_only_the_hard_cap_applies() {
        let mut l = fresh();
        assert_eq!(
            l.available_until(),
            Some(t0() + 15 * MIN),
            "pending: join deadline"
        );
        l.on_join();
        assert_eq!(l.available_until(), None);
        l.on_finish(t0() + MIN);
        assert_eq!(l.available_until(), Some(t0() + 11 * MIN));
    }

    #[test]
    fn grace_after_finish_ignores_visitors() {
        let mut l = fresh();
        l.on_join();
        l.on_visitor_joined();
        l.on_visitor_holding();
        l.on_finish(t0());
        assert_eq!(l.deadline(), (t0() + 10 * MIN, RevokeReason::GraceEnded));
        assert!(!l.on_visitor_left(t0() + 20 * MIN, true));
        assert_eq!(l.due(t0() + 10 * MIN), Some(RevokeReason::GraceEnded));
    }

    #[test]
    fn extend_while_connected_holds_past_grace_and_restarts_it() {
        let mut l = with(LifetimePolicy::ExtendWhileConnected);
        l.on_join();
        l.on_visitor_joined();
        l.on_visitor_holding();
        l.on_finish(t0());
        // Grace would end at +10 min; a connected visitor holds the session (hard cap only).
        assert_eq!(l.deadline(), (t0() + 180 * MIN, RevokeReason::HardCap));
        assert_eq!(l.due(t0() + 30 * MIN), None);
        l.on_visitor_joined();
        l.on_visitor_holding();
        assert!(
            !l.on_visitor_left(t0() + 40 * MIN, true),
            "one visitor still connected"
        );
        // The last visitor leaves at +60 min: a fresh grace from then.
        assert!(l.on_visitor_left(t0() + 60 * MIN, true));
        assert_eq!(l.deadline(), (t0() + 70 * MIN, RevokeReason::GraceEnded));
    }

    #[test]
    fn extend_while_connected_still_stops_at_the_hard_cap() {
        let mut l = with(LifetimePolicy::ExtendWhileConnected);
        l.on_join();
        l.on_visitor_joined();
        l.on_visitor_holding();
        l.on_finish(t0());
        assert_eq!(l.due(t0() + 180 * MIN), Some(RevokeReason::HardCap));
        l.on_visitor_left(t0() + 175 * MIN, true);
        assert_eq!(l.deadline().0, t0() + 180 * MIN);
    }

    #[test]
    fn extend_before_finish_changes_nothing() {
        let mut l = with(LifetimePolicy::ExtendWhileConnected);
        l.on_join();
        l.on_visitor_joined();
        l.on_visitor_holding();
        assert!(!l.on_visitor_left(t0(), true));
        assert_eq!(l.finish_deadline, None);
    }

    #[test]
    fn visitors_not_yet_holding_never_extend() {
        // A stranger that connected but never logged in (not promoted) does not hold the
        // session open, and its leaving starts no fresh grace.
        let mut l = with(LifetimePolicy::ExtendWhileConnected);
        l.on_join();
        l.on_visitor_joined();
        l.on_finish(t0());
        assert_eq!(l.deadline(), (t0() + 10 * MIN, RevokeReason::GraceEnded));
        assert_eq!(l.due(t0() + 10 * MIN), Some(RevokeReason::GraceEnded));
        assert!(!l.on_visitor_left(t0() + 9 * MIN, false));
        assert_eq!(l.deadline(), (t0() + 10 * MIN, RevokeReason::GraceEnded));
        // Holding never exceeds the connected count.
        l.on_visitor_holding();
        assert_eq!(l.holding, 0);
    }

    #[test]
    fn pending_expires_at_join_ttl() {
        let l = fresh();
        assert_eq!(l.state(), SessionState::Pending);
        assert_eq!(
            l.deadline(),
            (t0() + 15 * MIN, RevokeReason::JoinTtlExpired)
        );
        assert_eq!(l.due(t0() + 14 * MIN), None);
        assert_eq!(l.due(t0() + 15 * MIN), Some(RevokeReason::JoinTtlExpired));
        assert!(!l.accepts_visitors());
    }

    #[test]
    fn active_runs_to_hard_cap_and_finish_starts_grace() {
        let mut l = fresh();
        l.on_join();
        assert_eq!(l.state(), SessionState::Active);
        assert!(l.accepts_visitors());
        assert_eq!(l.deadline(), (t0() + 180 * MIN, RevokeReason::HardCap));
        assert!(l.on_finish(t0() + 60 * MIN));
        assert_eq!(l.state(), SessionState::Finishing);
        assert_eq!(l.deadline(), (t0() + 70 * MIN, RevokeReason::GraceEnded));
        // A later finish never extends the grace.
        assert!(!l.on_finish(t0() + 65 * MIN));
        assert_eq!(l.deadline().0, t0() + 70 * MIN);
    }

    #[test]
    fn grace_never_passes_the_hard_cap() {
        let mut l = fresh();
        l.on_join();
        l.on_finish(t0() + 175 * MIN);
        assert_eq!(l.deadline(), (t0() + 180 * MIN, RevokeReason::HardCap));
    }

    #[test]
    fn lost_link_revokes_after_resume_window_unless_resumed() {
        let mut l = fresh();
        l.on_join();
        l.on_link_down(t0() + 10 * MIN);
        assert_eq!(l.state(), SessionState::Disconnected);
        assert!(!l.accepts_visitors());
        assert_eq!(l.deadline(), (t0() + 15 * MIN, RevokeReason::AgentLost));
        l.on_resume();
        assert_eq!(l.state(), SessionState::Active);
        assert_eq!(l.deadline().1, RevokeReason::HardCap);
    }

    #[test]
    fn link_loss_before_join_changes_nothing() {
        let mut l = fresh();
        l.on_link_down(t0());
        assert_eq!(l.state(), SessionState::Pending);
    }

    #[test]
    fn revoked_is_final() {
        let mut l = fresh();
        l.on_join();
        assert!(l.revoke(RevokeReason::Deleted, t0()));
        assert!(!l.revoke(RevokeReason::HardCap, t0()));
        assert_eq!(l.state(), SessionState::Revoked);
        assert!(!l.on_finish(t0()));
        assert_eq!(l.due(t0() + 1000 * MIN), None);
    }
}
