//! Unit tests of the session operations on an in-memory store, no sockets: the join-token
//! and resume rules, races between operations, a failing store, restart with deadlines
//! passed, create and purge. No port is bound here: sessions are created with
//! [`Relay::store_new_session`] (the part of create that binds nothing) or by hand when a
//! test needs a session created in the past.

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures_util::future::{BoxFuture, FutureExt};
use futures_util::stream::BoxStream;
use porthole_protocol::tls::CertResolver;
use porthole_protocol::{Endpoint, ErrorCode, Secret, Service};
use tokio::sync::Notify;

use crate::config::RelayConfig;
use crate::edge::visitor::guards::Guards;
use crate::error::RelayError;
use crate::ops::audit::AuditLog;
use crate::ops::metrics::Metrics;
use crate::session::access::Access;
use crate::session::actions::{AgentOffer, NewSession, Registration};
use crate::session::lifecycle::{
    Lifecycle, LifetimePolicy, LifetimeSettings, RevokeReason, SessionState,
};
use crate::session::persist::nonzero;
use crate::session::refusal::Refusal;
use crate::session::runtime::{Session, SessionSpec};
use crate::shared::{Relay, TlsFiles};
use crate::store::{MemoryStore, SessionRecord, SessionStore, StoreChange, StoreError};
use crate::user_token::UserTokens;

/// A [`MemoryStore`] whose writes can be held back (until [`Gate::open`]) and made to fail.
#[derive(Debug, Default)]
struct GatedStore {
    inner: MemoryStore,
    held: AtomicBool,
    failing: AtomicBool,
    gate: Arc<Notify>,
}

impl GatedStore {
    fn hold(&self, fail: bool) {
        self.held.store(true, Ordering::SeqCst);
        self.failing.store(fail, Ordering::SeqCst);
    }

    fn release(&self) {
        self.held.store(false, Ordering::SeqCst);
        self.gate.notify_waiters();
    }
}

impl SessionStore for GatedStore {
    fn put(&self, record: SessionRecord) -> BoxFuture<'static, Result<(), StoreError>> {
        let fail = self.failing.load(Ordering::SeqCst);
        let held = self.held.load(Ordering::SeqCst);
        // A failing write changes nothing; a held one is applied in call order like the real
        // stores and resolves once released.
        let applied = if fail {
            futures_util::future::ready(Err(StoreError::Io("disk full".into()))).boxed()
        } else {
            self.inner.put(record)
        };
        let gate = self.gate.clone();
        async move {
            if held {
                gate.notified().await;
            }
            applied.await
        }
        .boxed()
    }
    fn remove(&self, id: &str) -> BoxFuture<'static, Result<(), StoreError>> {
        self.inner.remove(id)
    }
    fn get(&self, id: &str) -> BoxFuture<'static, Result<Option<SessionRecord>, StoreError>> {
        self.inner.get(id)
    }
    fn find_by_join_hash(
        &self,
        h: &str,
    ) -> BoxFuture<'static, Result<Option<SessionRecord>, StoreError>> {
        self.inner.find_by_join_hash(h)
    }
    fn list(&self) -> BoxFuture<'static, Result<Vec<SessionRecord>, StoreError>> {
        self.inner.list()
    }
    fn changes(&self) -> BoxStream<'static, StoreChange> {
        self.inner.changes()
    }
}

/// A relay on `store` with its files in a temp dir (no listener is bound).
fn relay(store: Arc<dyn SessionStore>) -> (Arc<Relay>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap_or_else(|e| unreachable!("{e}"));
    let config = RelayConfig {
        data_dir: dir.path().to_owned(),
        ..RelayConfig::default()
    };
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()])
        .unwrap_or_else(|e| unreachable!("{e}"));
    let key =
        tokio_rustls::rustls::pki_types::PrivateKeyDer::Pkcs8(cert.key_pair.serialize_der().into());
    let resolver = CertResolver::new(vec![cert.cert.der().clone()], key)
        .unwrap_or_else(|e| unreachable!("{e}"));
    let tls = TlsFiles {
        resolver: Arc::new(resolver),
        cert_path: dir.path().join("cert.pem"),
        key_path: dir.path().join("key.pem"),
    };
    let audit =
        AuditLog::open(&dir.path().join("audit.log")).unwrap_or_else(|e| unreachable!("{e}"));
    let metrics = Metrics::new().unwrap_or_else(|e| unreachable!("{e}"));
    let tokens = UserTokens::new(b"0123456789abcdef0123456789abcdef", &[]);
    let relay = Relay::new(
        config,
        Secret::new("pha_x"),
        tokens,
        audit,
        metrics,
        store,
        tls,
    );
    (Arc::new(relay), dir)
}

/// A pending SSH session created `age` ago, stored, and registered with the relay.
async fn session(relay: &Arc<Relay>, token: &Secret, age: Duration) -> Arc<Session> {
    let id = format!("s_{}", &Secret::generate("").expose()[..20]);
    let spec = SessionSpec {
        id,
        build_id: "b".into(),
        app_id: "a".into(),
        endpoints: vec![Endpoint {
            service: Service::Ssh,
            host: "h".into(),
            port: 20001,
        }],
        join_hash: token.hash(),
        guards: Guards::new(vec![], nonzero(10), nonzero(30)),
        max_visitors: 16,
    };
    let settings = LifetimeSettings {
        join_ttl: Duration::from_secs(900),
        max_lifetime: Duration::from_secs(3600),
        grace: Duration::from_secs(600),
        resume_window: Duration::from_secs(300),
        policy: LifetimePolicy::GraceAfterFinish,
    };
    let life = Lifecycle::new(SystemTime::now() - age, settings);
    let session = Arc::new(Session::new(spec, life, relay.cancel.child_token()));
    let saved = relay.save(&session, &mut session.lock());
    saved.await.unwrap_or_else(|e| unreachable!("{e}"));
    relay.sessions.insert(session.clone());
    session
}

fn agent() -> AgentOffer {
    AgentOffer {
        services: vec![Service::Ssh],
        access: Access::default(),
        ip: IpAddr::from([127, 0, 0, 1]),
        visitor_reports: false,
        attach_elsewhere: false,
    }
}

/// The agent on `reg` goes away without a word.
fn drop_link(reg: &Registration) {
    reg.session.link_lost(reg.link.id, SystemTime::now());
}

/// The agent joins, confirms, and its link drops: the session waits for a resume.
async fn joined_then_gone(relay: &Arc<Relay>, token: &Secret, s: &Arc<Session>) -> Registration {
    let joined = relay
        .join(token, &agent())
        .await
        .unwrap_or_else(|e| unreachable!("{e:?}"));
    relay.confirm_registration(s, joined.link.id).await;
    drop_link(&joined);
    joined
}

fn code<T>(result: &Result<T, Refusal>) -> Option<ErrorCode> {
    result.as_ref().err().map(Refusal::code)
}

#[tokio::test]
async fn a_lost_registered_keeps_the_token_and_a_confirmed_resume_spends_it() {
    let (relay, _dir) = relay(Arc::new(MemoryStore::new()));
    let token = Secret::generate("phj_");
    let s = session(&relay, &token, Duration::ZERO).await;
    // `registered` lost: the same token joins again.
    let first = relay.join(&token, &agent()).await;
    let first = first.unwrap_or_else(|e| unreachable!("{e:?}"));
    drop_link(&first);
    let second = relay
        .join(&token, &agent())
        .await
        .unwrap_or_else(|e| unreachable!("{e:?}"));
    drop_link(&second);
    // The agent resumes with the secret of the second answer and confirms: token spent.
    let resumed = relay.resume(&s.id, &second.resume_secret, &agent()).await;
    let resumed = resumed.unwrap_or_else(|e| unreachable!("{e:?}"));
    relay.confirm_registration(&s, resumed.link.id).await;
    drop_link(&resumed);
    assert_eq!(
        code(&relay.join(&token, &agent()).await),
        Some(ErrorCode::TokenUsed)
    );
    let stored = relay
        .store
        .get(&s.id)
        .await
        .unwrap_or_else(|e| unreachable!("{e}"));
    assert!(stored.is_some_and(|r| r.join_spent && r.version == s.lock().durable.version));
    // The first answer's secret was never confirmed: refused.
    let stale = relay.resume(&s.id, &first.resume_secret, &agent()).await;
    assert_eq!(code(&stale), Some(ErrorCode::BadToken));
}

#[tokio::test]
async fn two_agents_resuming_at_once_one_wins() {
    let (relay, _dir) = relay(Arc::new(MemoryStore::new()));
    let token = Secret::generate("phj_");
    let s = session(&relay, &token, Duration::ZERO).await;
    let joined = joined_then_gone(&relay, &token, &s).await;
    let secret = joined.resume_secret.clone();
    let offer = agent();
    let (a, b) = tokio::join!(
        relay.resume(&s.id, &secret, &offer),
        relay.resume(&s.id, &secret, &offer)
    );
    let codes = [code(&a), code(&b)];
    assert!(
        codes.contains(&None) && codes.contains(&Some(ErrorCode::SessionBusy)),
        "{codes:?}"
    );
    assert_eq!(s.lock().life.state(), SessionState::Active);
}

#[tokio::test]
async fn a_revocation_during_a_failed_registration_write_stands() {
    let store = Arc::new(GatedStore::default());
    let (relay, _dir) = relay(store.clone());
    let token = Secret::generate("phj_");
    let s = session(&relay, &token, Duration::ZERO).await;
    store.hold(true);
    let offer = agent();
    let joining = relay.join(&token, &offer);
    tokio::pin!(joining);
    // The registration is claimed and its write queued; the session is revoked meanwhile.
    assert!(futures_util::poll!(joining.as_mut()).is_pending());
    assert!(
        s.link().is_some(),
        "the link is taken while the write is pending"
    );
    relay.revoke(&s, RevokeReason::Deleted);
    store.release();
    assert_eq!(code(&joining.await), Some(ErrorCode::Internal));
    let inner = s.lock();
    assert!(
        inner.link.is_none(),
        "the failed registration's link is gone"
    );
    assert_eq!(
        inner.life.revoked.map(|(r, _)| r),
        Some(RevokeReason::Deleted)
    );
    assert_eq!(inner.life.state(), SessionState::Revoked);
}

#[tokio::test]
async fn a_finish_during_a_resume_keeps_both() {
    let store = Arc::new(GatedStore::default());
    let (relay, _dir) = relay(store.clone());
    let token = Secret::generate("phj_");
    let s = session(&relay, &token, Duration::ZERO).await;
    let joined = joined_then_gone(&relay, &token, &s).await;
    store.hold(false);
    let offer = agent();
    let resuming = relay.resume(&s.id, &joined.resume_secret, &offer);
    tokio::pin!(resuming);
    assert!(futures_util::poll!(resuming.as_mut()).is_pending());
    let finishing = relay.finish(&s, "api");
    tokio::pin!(finishing);
    assert!(futures_util::poll!(finishing.as_mut()).is_pending());
    store.release();
    let (resumed, finished) = tokio::join!(resuming, finishing);
    assert!(resumed.is_ok(), "{:?}", code(&resumed));
    assert!(finished.is_ok(), "{finished:?}");
    assert_eq!(s.lock().life.state(), SessionState::Finishing);
    let stored = relay
        .store
        .get(&s.id)
        .await
        .unwrap_or_else(|e| unreachable!("{e}"));
    let stored = stored.unwrap_or_else(|| unreachable!("stored"));
    assert!(stored.finish_deadline_ms.is_some() && stored.version == s.lock().durable.version);
}

#[tokio::test]
async fn a_restart_with_deadlines_passed_revokes_at_once() {
    let store = Arc::new(MemoryStore::new());
    let token = Secret::generate("phj_");
    let id = {
        let (before, _dir) = relay(store.clone());
        // Created two hours ago with a one-hour hard cap: its deadline passed while "down".
        session(&before, &token, Duration::from_secs(7200))
            .await
            .id
            .clone()
    };
    let (after, _dir) = relay(store.clone());
    let live = after
        .restore()
        .await
        .unwrap_or_else(|e| unreachable!("{e}"));
    assert_eq!(live, 0);
    let s = after
        .sessions
        .get(&id)
        .unwrap_or_else(|| unreachable!("restored"));
    assert_eq!(
        s.lock().life.revoked.map(|(r, _)| r),
        Some(RevokeReason::JoinTtlExpired)
    );
    // The revocation is written (in the background) on top of the stored version.
    for _ in 0..100 {
        let stored = store.get(&id).await.unwrap_or_else(|e| unreachable!("{e}"));
        if stored.is_some_and(|r| r.revoked.is_some()) {
            return;
        }
        tokio::task::yield_now().await;
    }
    unreachable!("the revocation was not stored");
}

fn new_session() -> NewSession {
    NewSession {
        build_id: "b".into(),
        app_id: "a".into(),
        services: vec![Service::Ssh, Service::Vnc],
        grace: Duration::from_secs(600),
        max_lifetime: Duration::from_secs(3600),
        policy: LifetimePolicy::GraceAfterFinish,
        allow_cidrs: vec![],
        max_visitors: None,
    }
}

#[tokio::test]
async fn a_created_session_is_durable_before_it_is_returned_and_its_token_joins() {
    let (relay, _dir) = relay(Arc::new(MemoryStore::new()));
    let (s, token) = relay
        .store_new_session(new_session(), &[20001, 20002])
        .await
        .unwrap_or_else(|e| unreachable!("{e}"));
    let stored = relay.store.get(&s.id).await;
    let stored = stored
        .unwrap_or_else(|e| unreachable!("{e}"))
        .unwrap_or_else(|| unreachable!("stored"));
    assert_eq!(stored.version, 1);
    assert_eq!(
        stored
            .endpoints
            .iter()
            .map(|e| (e.service, e.port))
            .collect::<Vec<_>>(),
        [(Service::Ssh, 20001), (Service::Vnc, 20002)]
    );
    assert_eq!(stored.join_hash, crate::store::hash_hex(token.hash()));
    assert_eq!(stored.max_visitors, relay.config.max_visitors);
    assert!(relay
        .sessions
        .get(&s.id)
        .is_some_and(|r| Arc::ptr_eq(&r, &s)));
    assert_eq!(s.lock().life.state(), SessionState::Pending);
    let offer = AgentOffer {
        services: vec![Service::Ssh, Service::Vnc],
        ..agent()
    };
    let joined = relay.join(&token, &offer).await;
    assert!(joined.is_ok(), "{:?}", code(&joined));
    assert_eq!(s.lock().life.state(), SessionState::Active);
}

#[tokio::test]
async fn a_create_whose_write_fails_leaves_nothing_behind() {
    let store = Arc::new(GatedStore::default());
    let (relay, _dir) = relay(store.clone());
    store.failing.store(true, Ordering::SeqCst);
    let created = relay
        .store_new_session(new_session(), &[20001, 20002])
        .await;
    assert!(
        matches!(created, Err(RelayError::Store(_))),
        "{:?}",
        created.map(|(s, _)| s.id.clone())
    );
    assert!(relay.sessions.list().is_empty());
    let stored = store.list().await.unwrap_or_else(|e| unreachable!("{e}"));
    assert!(stored.is_empty());
}

#[tokio::test]
async fn purge_forgets_a_revoked_session_and_leaves_a_live_one() {
    let (relay, _dir) = relay(Arc::new(MemoryStore::new()));
    let (s, _token) = relay
        .store_new_session(new_session(), &[20001, 20002])
        .await
        .unwrap_or_else(|e| unreachable!("{e}"));
    relay.purge(&s);
    assert!(relay.sessions.get(&s.id).is_some(), "a live session stays");
    relay.revoke(&s, RevokeReason::Deleted);
    relay.purge(&s);
    assert!(relay.sessions.get(&s.id).is_none());
    // The store forgets it too (the removal runs in the background).
    for _ in 0..100 {
        let stored = relay.store.get(&s.id).await;
        if stored.unwrap_or_else(|e| unreachable!("{e}")).is_none() {
            return;
        }
        tokio::task::yield_now().await;
    }
    unreachable!("the purged session is still stored");
}
