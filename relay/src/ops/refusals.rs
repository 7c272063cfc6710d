//! Refusals, aggregated: a flood of refused connections must not fill the disk. The first
//! refusal of a kind (session, service, port, reason and source for visitors; source and
//! reason for agent connections) is written at once, in full; repeats are only counted, and
//! one summary line with the count is written per interval (`refusal_summary_interval`,
//! default 10 s) while they go on. Kinds are remembered up to [`MAX_REFUSAL_KINDS`]; past that,
//! refusals of new sources fold into a per-session (or relay-wide) entry without a source.
//! So a flood writes at most a few lines per kind and interval, to the audit log and the
//! relay log alike, whatever its rate.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;

use porthole_protocol::Service;
use tokio_util::sync::CancellationToken;

use crate::edge::visitor::guards::VisitorRefusal;
use crate::ops::audit::{AuditEvent, AuditLog};
use crate::untrusted::UntrustedMessage;

/// Distinct refusal kinds remembered at once (each is a small map entry).
pub const MAX_REFUSAL_KINDS: usize = 1024;

/// What a refusal is counted under.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum RefusalKind {
    /// A visitor turned away from a session's public port.
    Visitor {
        /// Session.
        session_id: String,
        /// Service of the port.
        service: Service,
        /// Public port.
        port: u16,
        /// Source key (IPv4 address, IPv6 /64); `None` once too many kinds are tracked.
        source: Option<IpAddr>,
        /// Why.
        reason: VisitorRefusal,
    },
    /// An HTTP request refused before its token was accepted (instructions endpoint).
    Api {
        /// Source key; `None` once too many kinds are tracked.
        source: Option<IpAddr>,
        /// The answer's error code (`unauthorized`, ...).
        reason: &'static str,
    },
    /// A connection to the agent endpoint or data port refused before it registered.
    Agent {
        /// Source key; `None` once too many kinds are tracked.
        source: Option<IpAddr>,
        /// Why, as a metric-style label (`tls`, `timeout`, `bad_token`, ...).
        reason: &'static str,
    },
}

impl RefusalKind {
    /// The same kind with the source dropped (the overflow entry).
    fn without_source(&self) -> Self {
        let mut kind = self.clone();
        match &mut kind {
            RefusalKind::Visitor { source, .. }
            | RefusalKind::Api { source, .. }
            | RefusalKind::Agent { source, .. } => *source = None,
        }
        kind
    }
}

/// Refusals seen, by kind: how many since the last summary.
#[derive(Debug, Default)]
pub struct RefusalLog {
    /// Count of repeats since the last summary, by kind.
    seen: Mutex<HashMap<RefusalKind, u64>>,
}

impl RefusalLog {
    /// Notes a refusal; true when it is the first of its kind lately and should be written
    /// in full now (otherwise it is counted for the next summary).
    pub fn note(&self, kind: RefusalKind) -> bool {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = seen.get_mut(&kind) {
            *n += 1;
            return false;
        }
        let kind = if seen.len() >= MAX_REFUSAL_KINDS {
            kind.without_source()
        } else {
            kind
        };
        match seen.get_mut(&kind) {
            Some(n) => {
                *n += 1;
                false
            }
            None => {
                seen.insert(kind, 0);
                true
            }
        }
    }

    /// A connection from `peer` to the agent endpoint or data port was refused for `reason`
    /// (`detail` is the message, peer text in it is escaped and truncated here): logged in
    /// full when it is the first of its kind lately, else counted.
    pub fn agent(&self, peer: IpAddr, reason: &'static str, detail: &str) {
        let source = Some(crate::edge::source::source_key(peer.to_canonical()));
        if self.note(RefusalKind::Agent { source, reason }) {
            tracing::warn!(%peer, reason, "agent connection refused: {}", UntrustedMessage(detail));
        }
    }

    /// The kinds repeated since the last call, with their counts; kinds quiet for a whole
    /// interval are forgotten (their next refusal is written in full again).
    pub fn drain(&self) -> Vec<(RefusalKind, u64)> {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        let mut repeated = Vec::new();
        seen.retain(|kind, n| {
            if *n == 0 {
                return false;
            }
            repeated.push((kind.clone(), *n));
            *n = 0;
            true
        });
        repeated
    }
}

/// Writes the summaries of `log` every `interval`, and once more when `stop` is cancelled.
pub async fn summarise(
    log: &RefusalLog,
    audit: &AuditLog,
    interval: Duration,
    stop: CancellationToken,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.tick().await;
    let secs = interval.as_secs().max(1);
    loop {
        tokio::select! {
            _ = ticker.tick() => write_summaries(log, audit, secs),
            () = stop.cancelled() => return write_summaries(log, audit, secs),
        }
    }
}

/// One summary line per repeated kind (`secs`: the interval they cover).
fn write_summaries(log: &RefusalLog, audit: &AuditLog, secs: u64) {
    for (kind, count) in log.drain() {
        match kind {
            RefusalKind::Visitor {
                session_id,
                service,
                port,
                source,
                reason,
            } => {
                tracing::info!(%session_id, %service, port, source = ?source, ?reason, count,
                    "visitors refused {count} more times in the last {secs}s");
                audit.record(AuditEvent::VisitorRefused {
                    session_id,
                    service,
                    port,
                    source_ip: source,
                    reason,
                    count,
                    summary_secs: Some(secs),
                });
            }
            RefusalKind::Api { source, reason } => {
                tracing::info!(source = ?source, reason, count,
                    "instructions requests refused {count} more times in the last {secs}s");
                audit.record(AuditEvent::InstructionsDenied {
                    session_id: "(aggregated)".into(),
                    sub: None,
                    role: None,
                    app_id: None,
                    source_ip: source.unwrap_or(IpAddr::from([0u8; 4])),
                    reason: format!("{count} more requests refused ({reason}) in the last {secs}s"),
                });
            }
            RefusalKind::Agent { source, reason } => {
                tracing::warn!(source = ?source, reason, count,
                    "agent connections refused {count} more times in the last {secs}s");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn visitor(source: u8) -> RefusalKind {
        RefusalKind::Visitor {
            session_id: "s_0123456789abcdef0123".into(),
            service: Service::Ssh,
            port: 20001,
            source: Some(IpAddr::from([127, 0, 0, source])),
            reason: VisitorRefusal::RateLimited,
        }
    }

    #[test]
    fn the_first_is_written_repeats_are_counted_and_quiet_kinds_forgotten() {
        let log = RefusalLog::default();
        assert!(log.note(visitor(1)));
        for _ in 0..99_999 {
            assert!(!log.note(visitor(1)));
        }
        assert!(log.note(visitor(2)), "another source is another kind");
        assert_eq!(log.drain(), vec![(visitor(1), 99_999)]);
        // Still flooding: counted, not written.
        assert!(!log.note(visitor(1)));
        assert_eq!(log.drain(), vec![(visitor(1), 1)]);
        // Quiet for an interval: forgotten, so the next one is written again.
        assert_eq!(log.drain(), vec![]);
        assert!(log.note(visitor(1)));
    }

    #[test]
    fn past_the_kind_limit_new_sources_fold_into_one_entry() {
        let log = RefusalLog::default();
        let agent = |i: usize| RefusalKind::Agent {
            source: Some(IpAddr::from([10, (i >> 16) as u8, (i >> 8) as u8, i as u8])),
            reason: "tls",
        };
        for i in 0..MAX_REFUSAL_KINDS {
            assert!(log.note(agent(i)));
        }
        assert!(
            log.note(agent(MAX_REFUSAL_KINDS)),
            "the overflow entry's first"
        );
        for i in MAX_REFUSAL_KINDS + 1..MAX_REFUSAL_KINDS + 5000 {
            assert!(!log.note(agent(i)));
        }
        let drained = log.drain();
        assert_eq!(drained.len(), 1);
        assert_eq!(drained[0].0, agent(0).without_source());
        assert_eq!(drained[0].1, 4999);
        assert!(log.seen.lock().map(|s| s.len()).unwrap_or(0) <= MAX_REFUSAL_KINDS + 1);
    }
}
