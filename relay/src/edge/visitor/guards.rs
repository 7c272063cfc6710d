//! Public-port guards, checked before anything reaches the agent: the session's allowed
//! source CIDRs and a token bucket of new connections per source IP (so password guessing
//! through the relay is slowed per attacker: every visitor reaches the VM's sshd from the
//! agent's address, so sshd cannot tell attackers apart). The concurrent-visitor cap lives
//! with the session's visitor count ([`crate::session::runtime::Session::admit_visitor`]).

use std::net::IpAddr;
use std::num::NonZeroU32;

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use ipnet::IpNet;
use serde::Serialize;

/// Source IPs remembered per session before idle ones are forgotten.
const MAX_TRACKED_SOURCES: usize = 10_000;

/// Why a visitor was turned away.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum VisitorRefusal {
    /// The source address is outside the session's `allow_cidrs`.
    SourceNotAllowed,
    /// Too many new connections from this source IP.
    RateLimited,
    /// The session already has `max_visitors` connections.
    TooManyVisitors,
    /// This source already holds `max_visitors_per_source` of the session's connections.
    TooManyFromSource,
    /// The build machine is not connected (pending or disconnected).
    AgentNotConnected,
    /// The agent's link could not take another `open`.
    AgentBusy,
    /// The agent could not reach the service, or did not attach in time.
    AgentFailed,
    /// An SSH port got something other than an SSH client's identification in time.
    NotSsh,
    /// A VNC port got something other than a VNC client's `RFB 003.00x` version reply in
    /// time.
    NotVnc,
    /// Too many visitors (relay-wide, or from this source) are still completing their
    /// protocol's opening.
    TooManyPending,
}

impl VisitorRefusal {
    /// Every reason, for metrics that start at zero.
    pub const ALL: [VisitorRefusal; 10] = [
        VisitorRefusal::SourceNotAllowed,
        VisitorRefusal::RateLimited,
        VisitorRefusal::TooManyVisitors,
        VisitorRefusal::TooManyFromSource,
        VisitorRefusal::AgentNotConnected,
        VisitorRefusal::AgentBusy,
        VisitorRefusal::AgentFailed,
        VisitorRefusal::NotSsh,
        VisitorRefusal::NotVnc,
        VisitorRefusal::TooManyPending,
    ];

    /// The snake_case name (as in the audit log), for metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            VisitorRefusal::SourceNotAllowed => "source_not_allowed",
            VisitorRefusal::RateLimited => "rate_limited",
            VisitorRefusal::TooManyVisitors => "too_many_visitors",
            VisitorRefusal::TooManyFromSource => "too_many_from_source",
            VisitorRefusal::AgentNotConnected => "agent_not_connected",
            VisitorRefusal::AgentBusy => "agent_busy",
            VisitorRefusal::AgentFailed => "agent_failed",
            VisitorRefusal::NotSsh => "not_ssh",
            VisitorRefusal::NotVnc => "not_vnc",
            VisitorRefusal::TooManyPending => "too_many_pending",
        }
    }
}

/// The per-session guards.
pub struct Guards {
    /// Allowed sources; empty means everyone.
    allow: Vec<IpNet>,
    /// New connections per source IP.
    limiter: DefaultKeyedRateLimiter<IpAddr>,
}

impl std::fmt::Debug for Guards {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guards")
            .field("allow", &self.allow)
            .finish_non_exhaustive()
    }
}

impl Guards {
    /// Guards allowing `allow` (empty: all) at `per_minute` new connections per source IP
    /// with bursts of `burst`.
    pub fn new(allow: Vec<IpNet>, burst: NonZeroU32, per_minute: NonZeroU32) -> Self {
        let quota = Quota::per_minute(per_minute).allow_burst(burst);
        Self {
            allow,
            limiter: RateLimiter::dashmap(quota),
        }
    }

    /// The allowed sources.
    pub fn allow_cidrs(&self) -> &[IpNet] {
        &self.allow
    }

    /// Checks a new connection from `ip`.
    pub fn admit(&self, ip: IpAddr) -> Result<(), VisitorRefusal> {
        let ip = ip.to_canonical();
        let source = crate::edge::source::source_key(ip);
        if !self.allow.is_empty() && !self.allow.iter().any(|net| net.contains(&ip)) {
            return Err(VisitorRefusal::SourceNotAllowed);
        }
        if self.limiter.len() > MAX_TRACKED_SOURCES {
            self.limiter.retain_recent();
        }
        self.limiter
            .check_key(&source)
            .map_err(|_| VisitorRefusal::RateLimited)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nz(n: u32) -> NonZeroU32 {
        NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN)
    }

    #[test]
    fn cidrs_filter_sources_including_mapped_ipv6() {
        let net: IpNet = "127.0.0.1/32"
            .parse()
            .unwrap_or_else(|e| unreachable!("{e}"));
        let g = Guards::new(vec![net], nz(10), nz(30));
        assert_eq!(
            g.admit("127.0.0.1".parse().unwrap_or_else(|e| unreachable!("{e}"))),
            Ok(())
        );
        assert_eq!(
            g.admit(
                "::ffff:127.0.0.1"
                    .parse()
                    .unwrap_or_else(|e| unreachable!("{e}"))
            ),
            Ok(())
        );
        assert_eq!(
            g.admit("127.0.0.2".parse().unwrap_or_else(|e| unreachable!("{e}"))),
            Err(VisitorRefusal::SourceNotAllowed)
        );
    }

    #[test]
    fn bursts_past_the_bucket_are_refused_per_source() {
        let g = Guards::new(vec![], nz(3), nz(1));
        let a: IpAddr = "10.0.0.1".parse().unwrap_or_else(|e| unreachable!("{e}"));
        let b: IpAddr = "10.0.0.2".parse().unwrap_or_else(|e| unreachable!("{e}"));
        for _ in 0..3 {
            assert_eq!(g.admit(a), Ok(()));
        }
        assert_eq!(g.admit(a), Err(VisitorRefusal::RateLimited));
        assert_eq!(g.admit(b), Ok(()), "another source still gets in");
    }
}
