//! The state store: sessions, deadlines, port assignments and hashes of join tokens and
//! resume secrets, in an embedded database in the data dir, so a relay restarted (even by
//! `kill -9`) rebinds the ports of live sessions and agents resume on their own.
//!
//! Why redb: a pure-Rust, single-file embedded database with ACID transactions, where a
//! commit returns only once the data is durable (fsync), which is what "written before the
//! API or the agent is told anything" needs; no C toolchain, no background compaction
//! threads. Records are JSON (serde) in one table keyed by session id: the data is tiny, and
//! JSON keeps the file inspectable and the format evolvable with a version field.
//!
//! Passwords are never stored: agents send them again when they resume.

use std::path::Path;
use std::time::{Duration, SystemTime};

use ipnet::IpNet;
use porthole_protocol::secret::SecretHash;
use porthole_protocol::Endpoint;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::error::RelayError;
use crate::lifecycle::{Lifecycle, LifetimePolicy, RevokeReason};

/// Sessions by id.
const SESSIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("sessions");

/// Format of the stored records; a newer relay may read older ones, never the reverse.
pub const FORMAT: u32 = 1;

/// One session as stored.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StoredSession {
    /// Record format.
    pub format: u32,
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
    /// Revocation reason and time.
    pub revoked: Option<(RevokeReason, u64)>,
}

fn yes() -> bool {
    true
}

/// Milliseconds since the Unix epoch.
pub fn to_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A time from Unix milliseconds.
pub fn from_ms(ms: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_millis(ms)
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

impl StoredSession {
    /// The lifecycle as it was stored; a joined session comes back with its link down since
    /// `now` (agents must resume), deadlines unchanged.
    pub fn lifecycle(&self, now: SystemTime) -> Lifecycle {
        Lifecycle {
            created_at: from_ms(self.created_at_ms),
            join_by: from_ms(self.join_by_ms),
            hard_cap: from_ms(self.hard_cap_ms),
            grace: Duration::from_millis(self.grace_ms),
            resume_window: Duration::from_millis(self.resume_window_ms),
            policy: self.policy,
            visitors: 0,
            holding: 0,
            joined: self.joined,
            link_down_since: (self.joined && self.revoked.is_none()).then_some(now),
            finish_deadline: self.finish_deadline_ms.map(from_ms),
            revoked: self.revoked.map(|(r, at)| (r, from_ms(at))),
        }
    }

    /// Copies the lifecycle facts that are stored.
    pub fn set_lifecycle(&mut self, life: &Lifecycle) {
        self.created_at_ms = to_ms(life.created_at);
        self.join_by_ms = to_ms(life.join_by);
        self.hard_cap_ms = to_ms(life.hard_cap);
        self.grace_ms = life.grace.as_millis() as u64;
        self.resume_window_ms = life.resume_window.as_millis() as u64;
        self.policy = life.policy;
        self.joined = life.joined;
        self.finish_deadline_ms = life.finish_deadline.map(to_ms);
        self.revoked = life.revoked.map(|(r, at)| (r, to_ms(at)));
    }
}

/// The open store.
pub struct Store {
    /// The database file.
    db: Database,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Store")
    }
}

fn store_err(path: &Path, e: impl std::fmt::Display) -> RelayError {
    RelayError::Store(format!("{}: {e}", path.display()))
}

impl Store {
    /// Opens (or creates) the store at `path`.
    pub fn open(path: &Path) -> Result<Self, RelayError> {
        let db = Database::create(path).map_err(|e| store_err(path, e))?;
        let txn = db.begin_write().map_err(|e| store_err(path, e))?;
        txn.open_table(SESSIONS).map_err(|e| store_err(path, e))?;
        txn.commit().map_err(|e| store_err(path, e))?;
        Ok(Self { db })
    }

    /// Writes (inserts or replaces) a session durably.
    pub fn put(&self, s: &StoredSession) -> Result<(), RelayError> {
        let bytes = serde_json::to_vec(s).map_err(|e| RelayError::Store(e.to_string()))?;
        self.write(|table| table.insert(s.id.as_str(), bytes.as_slice()).map(drop))
    }

    /// Deletes a session.
    pub fn remove(&self, id: &str) -> Result<(), RelayError> {
        self.write(|table| table.remove(id).map(drop))
    }

    /// Runs `change` on the sessions table in one durable write transaction.
    fn write(
        &self,
        change: impl FnOnce(&mut redb::Table<&str, &[u8]>) -> Result<(), redb::StorageError>,
    ) -> Result<(), RelayError> {
        let err = |e: &dyn std::fmt::Display| RelayError::Store(e.to_string());
        let txn = self.db.begin_write().map_err(|e| err(&e))?;
        {
            let mut table = txn.open_table(SESSIONS).map_err(|e| err(&e))?;
            change(&mut table).map_err(|e| err(&e))?;
        }
        txn.commit().map_err(|e| err(&e))
    }

    /// Every stored session. A record from a newer relay, or one that does not parse, is an
    /// error: starting without it would silently drop a live session.
    pub fn load_all(&self) -> Result<Vec<StoredSession>, RelayError> {
        let txn = self
            .db
            .begin_read()
            .map_err(|e| RelayError::Store(e.to_string()))?;
        let table = txn
            .open_table(SESSIONS)
            .map_err(|e| RelayError::Store(e.to_string()))?;
        let mut out = Vec::new();
        for row in table.iter().map_err(|e| RelayError::Store(e.to_string()))? {
            let (key, value) = row.map_err(|e| RelayError::Store(e.to_string()))?;
            let s: StoredSession = serde_json::from_slice(value.value())
                .map_err(|e| RelayError::Store(format!("session {}: {e}", key.value())))?;
            if s.format > FORMAT {
                return Err(RelayError::Store(format!(
                    "session {} was written by a newer porthole-relay (format {}); upgrade this relay",
                    s.id, s.format
                )));
            }
            out.push(s);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lifecycle::LifetimeSettings;
    use porthole_protocol::{Secret, Service};

    fn sample() -> StoredSession {
        let life = Lifecycle::new(
            from_ms(1_800_000_000_000),
            LifetimeSettings {
                join_ttl: Duration::from_secs(900),
                max_lifetime: Duration::from_secs(10_800),
                grace: Duration::from_secs(600),
                resume_window: Duration::from_secs(300),
                policy: LifetimePolicy::GraceAfterFinish,
            },
        );
        let mut s = StoredSession {
            format: FORMAT,
            id: "s_1".into(),
            build_id: "b".into(),
            app_id: "a".into(),
            endpoints: vec![Endpoint {
                service: Service::Ssh,
                host: "h".into(),
                port: 20001,
            }],
            join_hash: hash_hex(Secret::new("phj_x").hash()),
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
            revoked: None,
        };
        s.set_lifecycle(&life);
        s
    }

    #[test]
    fn sessions_survive_reopening_and_come_back_disconnected() -> Result<(), RelayError> {
        let dir = tempfile::tempdir().map_err(|e| RelayError::Store(e.to_string()))?;
        let path = dir.path().join("state.redb");
        let mut s = sample();
        s.joined = true;
        {
            let store = Store::open(&path)?;
            store.put(&s)?;
        }
        let store = Store::open(&path)?;
        let all = store.load_all()?;
        assert_eq!(all, vec![s.clone()]);
        let now = from_ms(1_800_000_100_000);
        let life = all[0].lifecycle(now);
        assert_eq!(life.link_down_since, Some(now));
        assert_eq!(life.hard_cap, from_ms(s.hard_cap_ms));
        assert!(hash_from_hex(&s.join_hash).is_some_and(|h| Secret::new("phj_x").matches(&h)));
        store.remove("s_1")?;
        assert!(store.load_all()?.is_empty());
        Ok(())
    }

    #[test]
    fn records_from_a_newer_relay_stop_the_start() -> Result<(), RelayError> {
        let dir = tempfile::tempdir().map_err(|e| RelayError::Store(e.to_string()))?;
        let store = Store::open(&dir.path().join("state.redb"))?;
        store.put(&StoredSession {
            format: FORMAT + 1,
            ..sample()
        })?;
        let err = store
            .load_all()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("newer porthole-relay"), "{err}");
        Ok(())
    }
}
