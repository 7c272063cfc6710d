//! Session routes: `POST /v1/sessions`, `GET /v1/sessions[/{id}]`,
//! `POST /v1/sessions/{id}/finish`, `DELETE /v1/sessions/{id}`.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use ipnet::IpNet;
use porthole_protocol::{Endpoint, Service};
use serde::{Deserialize, Serialize};

use super::error::ApiError;
use crate::limits::{MAX_ALLOW_CIDRS, MAX_ID_LEN, MAX_SESSION_LIFETIME, MAX_VISITORS_PER_SESSION};
use crate::session::actions::NewSession;
use crate::session::lifecycle::{LifetimePolicy, RevokeReason, SessionState};
use crate::session::runtime::Session;
use crate::shared::Relay;

/// Body of `POST /v1/sessions`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateRequest {
    /// The CI build.
    pub build_id: String,
    /// The CI app.
    pub app_id: String,
    /// `["ssh"]` or `["ssh", "vnc"]`.
    pub services: Vec<Service>,
    /// Grace after finish, seconds.
    #[serde(default = "default_grace")]
    pub grace_secs: u64,
    /// Hard cap, seconds.
    #[serde(default = "default_max_lifetime")]
    pub max_lifetime_secs: u64,
    /// Stay open past the grace deadline while a visitor is connected (up to the hard cap);
    /// the last visitor leaving starts a fresh grace.
    #[serde(default)]
    pub extend_while_connected: bool,
    /// Source networks allowed to connect, e.g. `["203.0.113.0/24"]` (default: all).
    #[serde(default)]
    pub allow_cidrs: Vec<IpNet>,
    /// Concurrent visitor connections (default: the relay's `--max-visitors`).
    #[serde(default)]
    pub max_visitors: Option<usize>,
}

fn default_grace() -> u64 {
    600
}

fn default_max_lifetime() -> u64 {
    10_800
}

/// Answer of `POST /v1/sessions`.
#[derive(Debug, Serialize)]
pub struct Created {
    /// The new session.
    pub session_id: String,
    /// Single-use token for the agent (shown once).
    pub join_token: String,
    /// The hard cap: the session ends by then whatever happens.
    pub expires_at: String,
    /// Latest time the agent may join.
    pub join_by: String,
    /// Public endpoints, one per service.
    pub endpoints: Vec<Endpoint>,
}

/// A session as the API shows it.
#[derive(Debug, Serialize)]
pub struct SessionView {
    /// Id.
    pub session_id: String,
    /// The CI build.
    pub build_id: String,
    /// The CI app.
    pub app_id: String,
    /// Current state.
    pub state: SessionState,
    /// Public endpoints.
    pub endpoints: Vec<Endpoint>,
    /// The deadline that applies now (the revocation time once revoked).
    pub deadline: String,
    /// The hard cap.
    pub expires_at: String,
    /// Creation time.
    pub created_at: String,
    /// Which grace rule applies.
    pub lifetime_policy: LifetimePolicy,
    /// Visitor connections open now.
    pub visitors: usize,
    /// Of those, the ones that hold an `extend_while_connected` session open (connected
    /// `extend_min_visitor_age`, or reported logged in by the agent's embedded SSH server).
    pub visitors_holding: usize,
    /// Sources allowed to connect (empty: all).
    pub allow_cidrs: Vec<IpNet>,
    /// Why it was revoked, once it was.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub revoke_reason: Option<RevokeReason>,
}

/// RFC 3339 with milliseconds, UTC.
pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

impl SessionView {
    fn of(s: &Session) -> Self {
        let inner = s.lock();
        let life = &inner.life;
        let deadline = life
            .revoked
            .map(|(_, at)| at)
            .unwrap_or_else(|| life.deadline().0);
        Self {
            session_id: s.id.clone(),
            build_id: s.build_id.clone(),
            app_id: s.app_id.clone(),
            state: life.state(),
            endpoints: s.endpoints.clone(),
            deadline: rfc3339(deadline),
            expires_at: rfc3339(life.hard_cap),
            created_at: rfc3339(life.created_at),
            lifetime_policy: life.policy,
            visitors: life.visitors,
            visitors_holding: life.holding,
            allow_cidrs: s.guards.allow_cidrs().to_vec(),
            revoke_reason: life.revoked.map(|(r, _)| r),
        }
    }
}

fn parse_create(body: &[u8]) -> Result<NewSession, ApiError> {
    let de = &mut serde_json::Deserializer::from_slice(body);
    let req: CreateRequest = serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        if path == "." {
            ApiError::bad_request(format!("invalid request body: {}", e.inner()))
        } else {
            ApiError::bad_request(format!("invalid field `{path}`: {}", e.inner()))
        }
    })?;
    for (field, value) in [("build_id", &req.build_id), ("app_id", &req.app_id)] {
        if value.is_empty() || value.len() > MAX_ID_LEN || value.chars().any(char::is_control) {
            return Err(ApiError::bad_request(format!(
                "invalid field `{field}`: must be 1 to {MAX_ID_LEN} printable characters"
            )));
        }
    }
    if req.services.is_empty() {
        return Err(ApiError::bad_request(
            "invalid field `services`: name at least one service (`ssh`, `vnc`)",
        ));
    }
    if req.services.iter().collect::<HashSet<_>>().len() != req.services.len() {
        return Err(ApiError::bad_request(
            "invalid field `services`: a service is listed twice",
        ));
    }
    if req
        .max_visitors
        .is_some_and(|n| n == 0 || n > MAX_VISITORS_PER_SESSION)
    {
        return Err(ApiError::bad_request(format!(
            "invalid field `max_visitors`: must be between 1 and {MAX_VISITORS_PER_SESSION}"
        )));
    }
    if req.allow_cidrs.len() > MAX_ALLOW_CIDRS {
        return Err(ApiError::bad_request(format!(
            "invalid field `allow_cidrs`: at most {MAX_ALLOW_CIDRS} networks"
        )));
    }
    let max_lifetime = Duration::from_secs(req.max_lifetime_secs);
    if max_lifetime.is_zero() || max_lifetime > MAX_SESSION_LIFETIME {
        return Err(ApiError::bad_request(format!(
            "invalid field `max_lifetime_secs`: must be between 1 and {}",
            MAX_SESSION_LIFETIME.as_secs()
        )));
    }
    if req.grace_secs > MAX_SESSION_LIFETIME.as_secs() {
        return Err(ApiError::bad_request(format!(
            "invalid field `grace_secs`: must be at most {}",
            MAX_SESSION_LIFETIME.as_secs()
        )));
    }
    Ok(NewSession {
        build_id: req.build_id,
        app_id: req.app_id,
        services: req.services,
        grace: Duration::from_secs(req.grace_secs),
        max_lifetime,
        policy: if req.extend_while_connected {
            LifetimePolicy::ExtendWhileConnected
        } else {
            LifetimePolicy::GraceAfterFinish
        },
        allow_cidrs: req.allow_cidrs,
        max_visitors: req.max_visitors,
    })
}

/// The 404 message for a session id that is unknown or malformed (the id is not echoed).
pub const NO_SESSION: &str =
    "no session with this id (revoked sessions are forgotten after their retention)";

/// The session `id` names; an id that is not of the issued shape is not looked up and gets
/// the same 404 as an unknown one.
fn find(relay: &Relay, id: &str) -> Result<Arc<Session>, ApiError> {
    relay
        .sessions
        .get(id)
        .ok_or_else(|| ApiError::not_found(NO_SESSION))
}

/// `POST /v1/sessions`.
pub async fn create(
    State(relay): State<Arc<Relay>>,
    body: Bytes,
) -> Result<(StatusCode, Json<Created>), ApiError> {
    if relay.stopping.is_cancelled() {
        return Err(ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            code: "shutting_down",
            message: "the relay is shutting down: create the session on the restarted relay".into(),
        });
    }
    let req = parse_create(&body)?;
    // In a task of its own: a client that hangs up must not cancel it half way (ports
    // allocated, record written, nobody told).
    let owner = relay.clone();
    let created = relay
        .tasks
        .spawn(async move { owner.create_session(req).await });
    let (session, join_token) = created
        .await
        .map_err(|e| ApiError::internal(e.to_string()))??;
    let (hard_cap, join_by) = {
        let inner = session.lock();
        (inner.life.hard_cap, inner.life.join_by)
    };
    let created = Created {
        session_id: session.id.clone(),
        join_token: join_token.expose().to_owned(),
        expires_at: rfc3339(hard_cap),
        join_by: rfc3339(join_by),
        endpoints: session.endpoints.clone(),
    };
    Ok((StatusCode::CREATED, Json(created)))
}

/// `GET /v1/sessions/{id}`.
pub async fn get(
    State(relay): State<Arc<Relay>>,
    Path(id): Path<String>,
) -> Result<Json<SessionView>, ApiError> {
    let session = find(&relay, &id)?;
    Ok(Json(SessionView::of(&session)))
}

/// `GET /v1/sessions`.
pub async fn list(State(relay): State<Arc<Relay>>) -> Json<serde_json::Value> {
    let mut sessions: Vec<Arc<Session>> = relay.sessions.list();
    sessions.sort_by_key(|s| s.lock().life.created_at);
    let views: Vec<SessionView> = sessions.iter().map(|s| SessionView::of(s)).collect();
    Json(serde_json::json!({ "sessions": views }))
}

/// `POST /v1/sessions/{id}/finish`: the build finished; the grace period starts.
pub async fn finish(
    State(relay): State<Arc<Relay>>,
    Path(id): Path<String>,
) -> Result<Json<SessionView>, ApiError> {
    let session = find(&relay, &id)?;
    // In a task of its own, like create: a client hanging up cannot cut it short.
    let (owner, target) = (relay.clone(), session.clone());
    let finished = relay
        .tasks
        .spawn(async move { owner.finish(&target, "api").await });
    finished
        .await
        .map_err(|e| ApiError::internal(e.to_string()))??;
    Ok(Json(SessionView::of(&session)))
}

/// `DELETE /v1/sessions/{id}`: revoke now.
pub async fn revoke(
    State(relay): State<Arc<Relay>>,
    Path(id): Path<String>,
) -> Result<Json<SessionView>, ApiError> {
    let session = find(&relay, &id)?;
    // In a task of its own, like finish: a client hanging up cannot cut it short.
    let (owner, target) = (relay.clone(), session.clone());
    let revoked = relay
        .tasks
        .spawn(async move { owner.revoke_durably(&target, RevokeReason::Deleted).await });
    revoked
        .await
        .map_err(|e| ApiError::internal(e.to_string()))??;
    Ok(Json(SessionView::of(&session)))
}
