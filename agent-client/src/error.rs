//! The agent's error type.

use porthole_protocol::ErrorCode;

/// Why the agent stopped or a link attempt failed.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// Invalid settings.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The relay could not be reached (retried).
    #[error("relay unreachable: {0}")]
    Unreachable(String),
    /// TLS with the relay failed: wrong pin, untrusted certificate (not retried).
    #[error("{0}")]
    Tls(String),
    /// The relay refused the agent.
    #[error("relay refused the agent ({code:?}): {message}")]
    Refused {
        /// The relay's error code.
        code: ErrorCode,
        /// The relay's message.
        message: String,
    },
    /// The link broke after registration (retried).
    #[error("link to the relay lost: {0}")]
    LinkLost(String),
}

impl AgentError {
    /// Whether reconnecting may help.
    pub fn is_retryable(&self) -> bool {
        match self {
            AgentError::Unreachable(_) | AgentError::LinkLost(_) => true,
            AgentError::Refused { code, .. } => matches!(
                code,
                ErrorCode::SessionBusy
                    | ErrorCode::ShuttingDown
                    | ErrorCode::Timeout
                    | ErrorCode::Internal
            ),
            AgentError::Config(_) | AgentError::Tls(_) => false,
        }
    }
}
