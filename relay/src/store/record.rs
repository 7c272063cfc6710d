//! The durable record of a session ([`SessionRecord`]): what survives a restart, and what a
//! store holds. Passwords are never in it: agents send them again when they resume.
//! Records are JSON: the data is tiny, JSON keeps stores inspectable and the format
//! evolvable with a version field ([`FORMAT`]).

use std::time::{Duration, SystemTime};

use ipnet::IpNet;
use porthole_protocol::secret::SecretHash;
use porthole_protocol::time::{from_unix_ms, to_unix_ms};
use porthole_protocol::Endpoint;
use serde::{Deserialize, Serialize};

use crate::session::lifecycle::{Lifecycle, LifetimePolicy, RevokeReason};

/// Format of the stored records; a newer relay may read older ones, never the reverse.
pub const FORMAT: u32 = 1;

/// One session's durable facts.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SessionRecord {
    /// Record format.
    pub format: u32,
    /// Incremented by every write; a store takes a write only on top of the version before
    /// it (compare-and-swap), so two writers never both win. Records written before versions
    /// existed read as 0.
    #[serde(default)]
    pub version: u64,
    /// The relay node holding the agent's link (cluster mode; `None` on a single node).
    #[serde(default)]
    pub owner: Option<String>,
    /// Session id.
    pub id: String,
    /// CI build.
    pub build_id: String,
    /// CI app.
    pub app_id: String,
    /// Public endpoints (the ports to rebind).
    pub endpoints: Vec<Endpoint>,
    /// SHA-256 of the join token, hex.
    pub join_hash: String,
    /// SHA-256 of the confirmed resume secret, hex.
    pub resume_hash: Option<String>,
    /// SHA-256 of the resume secret awaiting the agent's confirmation, hex.
    #[serde(default)]
    pub pending_resume_hash: Option<String>,
    /// Whether the agent confirmed its latest registration.
    #[serde(default = "yes")]
    pub confirmed: bool,
    /// Whether any registration was ever confirmed: the join token is refused for good.
    #[serde(default)]
    pub join_spent: bool,
    /// Allowed sources.
    pub allow_cidrs: Vec<IpNet>,
    /// Concurrent visitor cap.
    pub max_visitors: usize,
    /// Lifecycle facts (times in Unix milliseconds).
    pub created_at_ms: u64,
    /// Join deadline.
    pub join_by_ms: u64,
    /// Hard cap.
    pub hard_cap_ms: u64,
    /// Grace after finish.
    pub grace_ms: u64,
    /// Resume window.
    pub resume_window_ms: u64,
    /// Grace rule.
    pub policy: LifetimePolicy,
    /// An agent joined.
    pub joined: bool,
    /// Grace deadline once finished.
    pub finish_deadline_ms: Option<u64>,
    /// Since when the agent link has been down (cluster mode: written by the owner when it
    /// loses the link, so every node starts the resume window at the same time).
    #[serde(default)]
    pub link_down_ms: Option<u64>,
    /// Revocation reason and time.
    pub revoked: Option<(RevokeReason, u64)>,
}

fn yes() -> bool {
    true
}

/// Hex of a hash.
pub fn hash_hex(h: SecretHash) -> String {
    hex::encode(h.to_bytes())
}

/// A hash from hex.
pub fn hash_from_hex(s: &str) -> Option<SecretHash> {
    let mut bytes = [0u8; 32];
    hex::decode_to_slice(s, &mut bytes).ok()?;
    Some(SecretHash::from_bytes(bytes))
}

impl SessionRecord {
    /// The lifecycle as it was stored; a joined session comes back with its link down since
    /// `now` (agents must resume), deadlines unchanged.
    pub fn lifecycle(&self, now: SystemTime) -> Lifecycle {
        Lifecycle {
            created_at: from_unix_ms(self.created_at_ms),
            join_by: from_unix_ms(self.join_by_ms),
            hard_cap: from_unix_ms(self.hard_cap_ms),
            grace: Duration::from_millis(self.grace_ms),
            resume_window: Duration::from_millis(self.resume_window_ms),
            policy: self.policy,
            visitors: 0,
            holding: 0,
            joined: self.joined,
            link_down_since: (self.joined && self.revoked.is_none()).then_some(now),
            finish_deadline: self.finish_deadline_ms.map(from_unix_ms),
            revoked: self.revoked.map(|(r, at)| (r, from_unix_ms(at))),
        }
    }

    /// The lifecycle as another node of a cluster sees it: the link is up while the owner
    /// (`owner_alive`) holds it, and down since the owner said so (or since `now`, when the
    /// owner is gone or never said).
    pub fn mirror_lifecycle(&self, now: SystemTime, owner_alive: bool) -> Lifecycle {
        let mut life = self.lifecycle(now);
        life.link_down_since = (self.joined && self.revoked.is_none() && !owner_alive)
            .then(|| self.link_down_ms.map_or(now, from_unix_ms));
        life
    }

    /// Copies the lifecycle facts that are stored.
    pub fn set_lifecycle(&mut self, life: &Lifecycle) {
        self.created_at_ms = to_unix_ms(life.created_at);
        self.join_by_ms = to_unix_ms(life.join_by);
        self.hard_cap_ms = to_unix_ms(life.hard_cap);
        self.grace_ms = life.grace.as_millis() as u64;
        self.resume_window_ms = life.resume_window.as_millis() as u64;
        self.policy = life.policy;
        self.joined = life.joined;
        self.finish_deadline_ms = life.finish_deadline.map(to_unix_ms);
        self.link_down_ms = life.link_down_since.map(to_unix_ms);
        self.revoked = life.revoked.map(|(r, at)| (r, to_unix_ms(at)));
    }
}

/// A sample record for tests: a pending SSH session on port 20001.
#[cfg(test)]
pub fn sample(id: &str) -> SessionRecord {
    use crate::session::lifecycle::LifetimeSettings;
    use porthole_protocol::{Secret, Service};
    let life = Lifecycle::new(
        from_unix_ms(1_800_000_000_000),
        LifetimeSettings {
            join_ttl: Duration::from_secs(900),
            max_lifetime: Duration::from_secs(10_800),
            grace: Duration::from_secs(600),
            resume_window: Duration::from_secs(300),
            policy: LifetimePolicy::GraceAfterFinish,
        },
    );
    let mut s = SessionRecord {
        format: FORMAT,
        version: 1,
        owner: None,
        id: id.into(),
        build_id: "b".into(),
        app_id: "a".into(),
        endpoints: vec![Endpoint {
            service: Service::Ssh,
            host: "h".into(),
            port: 20001,
        }],
        join_hash: hash_hex(Secret::new(format!("phj_{id}")).hash()),
        resume_hash: None,
        pending_resume_hash: None,
        confirmed: false,
        join_spent: false,
        allow_cidrs: vec![],
        max_visitors: 16,
        created_at_ms: 0,
        join_by_ms: 0,
        hard_cap_ms: 0,
        grace_ms: 0,
        resume_window_ms: 0,
        policy: LifetimePolicy::GraceAfterFinish,
        joined: false,
        finish_deadline_ms: None,
        link_down_ms: None,
        revoked: None,
    };
    s.set_lifecycle(&life);
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use porthole_protocol::Secret;

    #[test]
    fn a_joined_record_comes_back_disconnected_with_its_deadlines() {
        let mut s = sample("s_1");
        s.joined = true;
        let now = from_unix_ms(1_800_000_100_000);
        let life = s.lifecycle(now);
        assert_eq!(life.link_down_since, Some(now));
        assert_eq!(life.hard_cap, from_unix_ms(s.hard_cap_ms));
        assert!(hash_from_hex(&s.join_hash).is_some_and(|h| Secret::new("phj_s_1").matches(&h)));
    }

    #[test]
    fn records_without_a_version_read_as_version_0() {
        let mut json = serde_json::to_value(sample("s_1")).unwrap_or_default();
        if let Some(map) = json.as_object_mut() {
            map.remove("version");
            map.remove("owner");
            map.remove("join_spent");
        }
        let back: SessionRecord =
            serde_json::from_value(json).unwrap_or_else(|e| unreachable!("{e}"));
        assert_eq!(back.version, 0);
        assert_eq!(back.owner, None);
        assert!(!back.join_spent);
    }
}
