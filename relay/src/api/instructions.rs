//! `GET /v1/sessions/{id}/instructions`: the remote access instructions a developer opens
//! after "Rebuild with Remote Access". Takes a user token (HS256 JWT), never the admin token;
//! users whose role is in `denied_roles` (Testers/QA by default) never get them, and when
//! `allowed_roles` is set only users with one of those roles do.
//!
//! Order of checks: token (401), role (403, decided before the session is looked up, so a
//! denied user cannot probe which ids exist), id shape and session (404, the same answer
//! for a malformed id as for an unknown one), the token's app (403). A malformed id is never
//! echoed into the answer or the audit log.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, Path, State};
use axum::http::header::CACHE_CONTROL;
use axum::http::{HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use axum::Json;
use porthole_protocol::Service;
use serde::Serialize;

use super::bearer::{bearer_token, NoBearer};
use super::error::ApiError;
use super::sessions::{rfc3339, NO_SESSION};
use super::shell::ssh_command;
use crate::ops::audit::AuditEvent;
use crate::ops::refusals::RefusalKind;
use crate::session::access::Access;
use crate::session::lifecycle::{LifetimePolicy, SessionState};
use crate::session::runtime::Session;
use crate::shared::Relay;
use crate::untrusted::valid_session_id;
use crate::user_token::{RoleDecision, RolePolicy, UserClaims};

/// The message for denied roles, word for word.
pub const DENIED_ROLE_MESSAGE: &str = "Users with the Testers/QA role cannot use remote access";

/// The message when `allowed_roles` is set and names none of the token's roles.
pub const NOT_ALLOWED_ROLE_MESSAGE: &str =
    "Your role on this app is not allowed remote access (ask an admin of the app)";

/// The audit log's `session_id` for a path id that is not a session id's shape.
pub const MALFORMED_ID: &str = "(malformed)";

/// SSH part of the instructions.
#[derive(Debug, Serialize)]
pub struct SshInstructions {
    /// Ready-to-paste command.
    pub command: String,
    /// Relay host.
    pub host: String,
    /// Public port.
    pub port: u16,
    /// Login name.
    pub username: Option<String>,
    /// Password, if the machine uses one.
    pub password: Option<String>,
    /// `known_hosts` lines for the build machine's host keys.
    pub known_hosts: Option<String>,
}

/// Screen sharing part (sessions with VNC).
#[derive(Debug, Serialize)]
pub struct ScreenshareInstructions {
    /// `host:port` for a VNC viewer.
    pub address: String,
    /// Relay host.
    pub host: String,
    /// Public port.
    pub port: u16,
    /// Login name.
    pub username: Option<String>,
    /// Password.
    pub password: Option<String>,
}

/// The whole answer.
#[derive(Debug, Serialize)]
pub struct Instructions {
    /// Session.
    pub session_id: String,
    /// Its state.
    pub state: SessionState,
    /// SSH access.
    pub ssh: Option<SshInstructions>,
    /// Screen sharing, only when the session has VNC.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub screenshare: Option<ScreenshareInstructions>,
    /// Current deadline; null while the build runs and only the hard cap applies.
    pub available_until: Option<String>,
    /// The hard cap.
    pub hard_cap: String,
    /// Which grace rule applies.
    pub lifetime_policy: LifetimePolicy,
}

/// Every answer of this endpoint carries secrets or is about them: never cache.
fn no_store(mut resp: Response) -> Response {
    resp.headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

/// The handler.
pub async fn instructions(
    State(relay): State<Arc<Relay>>,
    Extension(roles): Extension<Arc<RolePolicy>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let source_ip = peer.ip().to_canonical();
    let result = serve(&relay, &roles, &id, &headers).await;
    // Only ids of the issued shape reach the audit log; anything else is a placeholder.
    let id = if valid_session_id(&id) {
        id
    } else {
        MALFORMED_ID.to_owned()
    };
    match result {
        Ok((answer, claims)) => {
            relay
                .metrics
                .instructions
                .with_label_values(&["served"])
                .inc();
            relay.audit.record(AuditEvent::InstructionsServed {
                session_id: id,
                sub: claims.sub,
                role: claims.role.joined(),
                app_id: claims.app_id,
                source_ip,
            });
            no_store(Json(answer).into_response())
        }
        Err(denied) => {
            let (error, claims) = *denied;
            relay
                .metrics
                .instructions
                .with_label_values(&[error.code])
                .inc();
            // Requests without a valid token are strangers: their refusals are aggregated
            // per source and reason like the public ports' (a flood cannot fill the disk).
            if claims.is_none() {
                let kind = RefusalKind::Api {
                    source: Some(crate::edge::source::source_key(source_ip)),
                    reason: error.code,
                };
                if !relay.refusals.note(kind) {
                    return no_store(error.into_response());
                }
            }
            relay.audit.record(AuditEvent::InstructionsDenied {
                session_id: id,
                sub: claims.as_ref().map(|c| c.sub.clone()),
                role: claims.as_ref().map(|c| c.role.joined()),
                app_id: claims.map(|c| c.app_id),
                source_ip,
                reason: error.message.clone(),
            });
            no_store(error.into_response())
        }
    }
}

/// A refusal and the claims of the token, when it was valid (for the audit log).
type Denied = Box<(ApiError, Option<UserClaims>)>;

async fn serve(
    relay: &Relay,
    roles: &RolePolicy,
    id: &str,
    headers: &HeaderMap,
) -> Result<(Instructions, UserClaims), Denied> {
    let token = bearer_token(headers).map_err(|e| {
        let message = match e {
            NoBearer::Missing => "missing `Authorization: Bearer <user token>` header",
            NoBearer::Malformed => "the Authorization header is not `Bearer <user token>`",
        };
        (ApiError::unauthorized(message), None)
    })?;
    let claims = relay
        .user_tokens
        .verify(token)
        .map_err(|e| Box::new((ApiError::unauthorized(e), None)))?;
    let deny = |e: ApiError| Box::new((e, Some(claims.clone())));
    match roles.decide(claims.role.iter()) {
        RoleDecision::Allowed => {}
        RoleDecision::Denied(_) => return Err(deny(ApiError::forbidden(DENIED_ROLE_MESSAGE))),
        RoleDecision::NotAllowed => {
            return Err(deny(ApiError::forbidden(NOT_ALLOWED_ROLE_MESSAGE)))
        }
    }
    let session = relay
        .sessions
        .get(id)
        .ok_or_else(|| deny(ApiError::not_found(NO_SESSION)))?;
    if claims.app_id != session.app_id {
        return Err(deny(ApiError::forbidden(
            "this user token is for another app",
        )));
    }
    let remote = owner_access(relay, &session).await.map_err(deny)?;
    let answer = build(&session, remote).map_err(deny)?;
    Ok((answer, claims))
}

/// Cluster mode: the login details of a session whose agent another node holds, asked of
/// that node over the peer link (they are never stored in etcd), and checked again here.
/// None when this node holds them itself, or nobody does.
async fn owner_access(relay: &Relay, session: &Session) -> Result<Option<Access>, ApiError> {
    let Some(cluster) = relay.cluster.as_ref() else {
        return Ok(None);
    };
    let owner = {
        let inner = session.lock();
        if inner.link.is_some() || inner.access.is_some() || !inner.life.accepts_visitors() {
            return Ok(None);
        }
        match &inner.owner {
            Some(owner) if *owner != cluster.node_name && cluster.members.alive(owner) => {
                owner.clone()
            }
            _ => return Ok(None),
        }
    };
    let unavailable = |why: String| {
        tracing::warn!(session_id = %session.id, owner = %owner, error = %why, "cannot fetch the session's login details from its node");
        ApiError {
            status: axum::http::StatusCode::SERVICE_UNAVAILABLE,
            code: "owner_unavailable",
            message: "the relay node connected to this build machine did not answer: retry in a few seconds".into(),
        }
    };
    let peers = cluster
        .peers
        .get()
        .cloned()
        .ok_or_else(|| unavailable("no peer link".into()))?;
    let got = peers
        .access(&owner, &session.id)
        .await
        .map_err(unavailable)?;
    Access::from_hello(got.credentials, got.host_keys)
        .map(Some)
        .map_err(|e| unavailable(format!("bad login details from node {owner}: {e}")))
}

fn build(session: &Session, remote: Option<Access>) -> Result<Instructions, ApiError> {
    let inner = session.lock();
    let life = &inner.life;
    match life.state() {
        SessionState::Pending => {
            return Err(ApiError::conflict(
                "the build machine has not connected yet: retry in a few seconds",
            ))
        }
        SessionState::Revoked => {
            return Err(ApiError::gone("remote access to this build has ended"))
        }
        _ => {}
    }
    let access = remote.or_else(|| inner.access.clone()).unwrap_or_default();
    let endpoint = |service| session.endpoints.iter().find(|e| e.service == service);
    Ok(Instructions {
        session_id: session.id.clone(),
        state: life.state(),
        ssh: endpoint(Service::Ssh).map(|e| ssh(&access, &e.host, e.port)),
        screenshare: endpoint(Service::Vnc).map(|e| screenshare(&access, &e.host, e.port)),
        available_until: life.available_until().map(rfc3339),
        hard_cap: rfc3339(life.hard_cap),
        lifetime_policy: life.policy,
    })
}

fn login(access: &Access, service: Service) -> (Option<String>, Option<String>) {
    let c = access.credential(service);
    (
        c.map(|c| c.username.clone()),
        c.and_then(|c| c.password.as_ref())
            .map(|p| p.expose().to_owned()),
    )
}

fn ssh(access: &Access, host: &str, port: u16) -> SshInstructions {
    let (username, password) = login(access, Service::Ssh);
    SshInstructions {
        command: ssh_command(username.as_deref(), host, port),
        host: host.to_owned(),
        port,
        username,
        password,
        known_hosts: access.known_hosts(host, port),
    }
}

fn screenshare(access: &Access, host: &str, port: u16) -> ScreenshareInstructions {
    let (username, password) = login(access, Service::Vnc);
    ScreenshareInstructions {
        address: format!("{host}:{port}"),
        host: host.to_owned(),
        port,
        username,
        password,
    }
}
