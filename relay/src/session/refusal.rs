//! Why an agent's registration is refused ([`Refusal`]): one variant per rule, each with the
//! protocol's error code and a message that tells the agent's user what to do. Peer text in a
//! message is already escaped ([`crate::untrusted::Untrusted`]) where it enters.

use porthole_protocol::{ErrorCode, Service};

use crate::session::lifecycle::RevokeReason;

/// A refused `hello` (join or resume).
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    /// The agent speaks another protocol version.
    #[error("porthole-agent {agent_version} speaks protocol {theirs}, this relay (porthole-relay {}) speaks protocol {}: install the porthole-agent release that matches the relay", env!("CARGO_PKG_VERSION"), porthole_protocol::limits::PROTOCOL_VERSION)]
    VersionMismatch {
        /// The agent's version, escaped for display.
        agent_version: String,
        /// The protocol version it speaks.
        theirs: u32,
    },
    /// The `hello`'s credentials or host keys are malformed.
    #[error("hello refused: {0}")]
    BadHello(String),
    /// No session has this join token.
    #[error("unknown join token: check it was copied whole, or create a new session")]
    UnknownJoinToken,
    /// The resume names no well-formed session id.
    #[error("malformed session id in the resume: it is `s_` and 20 hex digits")]
    MalformedSessionId,
    /// No session with this id, or the resume secret is not its.
    #[error("unknown session `{0}` or wrong resume secret")]
    BadResume(String),
    /// The agent does not offer a service the session has.
    #[error("session {session_id} needs service `{missing}` but the agent offers none: add --service {missing}=HOST:PORT")]
    ServiceMissing {
        /// The session.
        session_id: String,
        /// The service not offered.
        missing: Service,
    },
    /// The session was revoked.
    #[error("session {session_id} was revoked: {}", reason.describe())]
    Revoked {
        /// The session.
        session_id: String,
        /// Why it was revoked.
        reason: RevokeReason,
    },
    /// The join token was spent by a confirmed registration.
    #[error("join token of session {0} was already used by an agent; a reconnecting agent resumes with its resume secret")]
    TokenUsed(String),
    /// Another agent's link is live.
    #[error("session {0} already has a connected agent; retry once its link is gone (dead links are dropped after three missed heartbeats)")]
    Busy(String),
    /// The registration could not be made durable.
    #[error("the relay could not save the session; retrying may help")]
    NotSaved,
}

impl Refusal {
    /// The protocol's error code for this refusal.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::VersionMismatch { .. } => ErrorCode::VersionMismatch,
            Self::BadHello(_) => ErrorCode::BadFrame,
            Self::UnknownJoinToken | Self::MalformedSessionId | Self::BadResume(_) => {
                ErrorCode::BadToken
            }
            Self::ServiceMissing { .. } => ErrorCode::ServiceMismatch,
            Self::Revoked { .. } => ErrorCode::SessionRevoked,
            Self::TokenUsed(_) => ErrorCode::TokenUsed,
            Self::Busy(_) => ErrorCode::SessionBusy,
            Self::NotSaved => ErrorCode::Internal,
        }
    }
}
