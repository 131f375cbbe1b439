//! Errors of the MIOSA client, with MIOSA's meaning kept: what the platform said (status, code,
//! message, request id, when to retry), or why it could not be asked. The API key never appears.

use std::time::Duration;

use slipway_proto::v1::ErrorCode;

#[derive(Debug, Clone, thiserror::Error)]
pub enum MiosaError {
    /// The platform answered with an error.
    #[error("MIOSA {status} {code}: {message}")]
    Api {
        status: u16,
        code: String,
        message: String,
        request_id: Option<String>,
        retry_after: Option<Duration>,
    },
    /// The platform could not be reached (connection refused, reset, DNS).
    #[error("MIOSA unreachable at {url}: {message}")]
    Unreachable { url: String, message: String },
    /// No answer within the operation's timeout.
    #[error("MIOSA did not answer {operation} within {timeout:?}")]
    Timeout {
        operation: String,
        timeout: Duration,
    },
    /// An answer that is not what the API documents.
    #[error("MIOSA sent a malformed answer to {operation}: {message}")]
    Malformed { operation: String, message: String },
}

impl MiosaError {
    /// A short name for metrics: `api`, `unreachable`, `timeout` or `malformed`.
    pub fn kind(&self) -> &'static str {
        match self {
            MiosaError::Api { .. } => "api",
            MiosaError::Unreachable { .. } => "unreachable",
            MiosaError::Timeout { .. } => "timeout",
            MiosaError::Malformed { .. } => "malformed",
        }
    }

    /// Whether the same call may succeed if repeated (429, 5xx, connection errors, timeouts).
    pub fn is_retryable(&self) -> bool {
        match self {
            MiosaError::Api { status, .. } => *status == 429 || *status >= 500,
            MiosaError::Unreachable { .. } | MiosaError::Timeout { .. } => true,
            MiosaError::Malformed { .. } => false,
        }
    }

    /// The contract's error code for this error (what the executor replies with over NATS).
    pub fn code(&self) -> ErrorCode {
        match self {
            MiosaError::Api { status, code, .. } => match *status {
                400 | 422 => ErrorCode::InvalidInput,
                401 => ErrorCode::Unauthorized,
                402 => ErrorCode::QuotaExceeded,
                403 if code.to_ascii_lowercase().contains("quota") => ErrorCode::QuotaExceeded,
                403 => ErrorCode::Forbidden,
                404 | 410 => ErrorCode::NotFound,
                409 => ErrorCode::Conflict,
                413 => ErrorCode::PayloadTooLarge,
                429 => ErrorCode::RateLimited,
                500..=599 => ErrorCode::Unavailable,
                _ => ErrorCode::Internal,
            },
            MiosaError::Unreachable { .. } => ErrorCode::Unavailable,
            MiosaError::Timeout { .. } => ErrorCode::Timeout,
            MiosaError::Malformed { .. } => ErrorCode::Internal,
        }
    }

    pub fn status(&self) -> Option<u16> {
        match self {
            MiosaError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }
}
