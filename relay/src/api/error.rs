//! API errors: a status code and `{"error": code, "message": text}`.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::error::RelayError;

/// An error answer.
#[derive(Debug)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Short machine-readable code.
    pub code: &'static str,
    /// What was wrong and what to do.
    pub message: String,
}

impl ApiError {
    /// 400.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            code: "bad_request",
            message: message.into(),
        }
    }
    /// 401.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::UNAUTHORIZED,
            code: "unauthorized",
            message: message.into(),
        }
    }
    /// 403.
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::FORBIDDEN,
            code: "forbidden",
            message: message.into(),
        }
    }
    /// 409: not yet possible.
    pub fn conflict(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::CONFLICT,
            code: "not_connected",
            message: message.into(),
        }
    }
    /// 410: over.
    pub fn gone(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::GONE,
            code: "gone",
            message: message.into(),
        }
    }
    /// 404.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            code: "not_found",
            message: message.into(),
        }
    }
    /// 500: the relay failed (the message says how; retrying may help).
    pub fn internal(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            code: "internal",
            message: message.into(),
        }
    }
}

impl From<RelayError> for ApiError {
    fn from(e: RelayError) -> Self {
        match e {
            RelayError::PoolExhausted { .. } => Self {
                status: StatusCode::SERVICE_UNAVAILABLE,
                code: "ports_exhausted",
                message: e.to_string(),
            },
            RelayError::Store(crate::store::StoreError::PortsTaken(_)) => Self {
                status: StatusCode::SERVICE_UNAVAILABLE,
                code: "ports_exhausted",
                message: format!("{e}: every port tried is held or cooling elsewhere in the cluster; retry, or widen --port-range"),
            },
            RelayError::Store(crate::store::StoreError::Unavailable(_)) => Self {
                status: StatusCode::SERVICE_UNAVAILABLE,
                code: "store_unavailable",
                message: format!("{e}; live sessions keep working, retry this request later"),
            },
            other => {
                tracing::error!(error = %other, "API request failed");
                Self {
                    status: StatusCode::INTERNAL_SERVER_ERROR,
                    code: "internal",
                    message: other.to_string(),
                }
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({ "error": self.code, "message": self.message });
        (self.status, Json(body)).into_response()
    }
}
