//! Typed request/reply between services: a request is a contract message, the reply is the
//! expected message or a typed `ServiceError`, within a timeout. The caller's trace context
//! travels in `traceparent`.

use std::collections::HashMap;
use std::time::Duration;

use async_nats::HeaderMap;
use bytes::Bytes;
use slipway_proto::codec::{self, CONTENT_TYPE_HEADER, ContentType, MESSAGE_TYPE_HEADER};
use slipway_proto::v1::{Error as ErrorMessage, ErrorCode};
use slipway_proto::{DecodeError, WireMessage};

/// The NATS service API's error headers.
pub const SERVICE_ERROR_HEADER: &str = "Nats-Service-Error";
pub const SERVICE_ERROR_CODE_HEADER: &str = "Nats-Service-Error-Code";

/// A typed error a service replies with. Its `code` survives every hop; `status` is the
/// numeric `Nats-Service-Error-Code` generic NATS tools show.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}: {message}", code_name(*code))]
pub struct ServiceError {
    pub code: ErrorCode,
    pub message: String,
    pub retry_after_ms: u64,
    pub details: HashMap<String, String>,
}

fn code_name(code: ErrorCode) -> &'static str {
    code.as_str_name()
        .strip_prefix("ERROR_CODE_")
        .unwrap_or("UNSPECIFIED")
}

impl ServiceError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            retry_after_ms: 0,
            details: HashMap::new(),
        }
    }
    pub fn invalid_input(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::InvalidInput, message)
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::NotFound, message)
    }
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Unavailable, message)
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Internal, message)
    }
    pub fn with_detail(mut self, key: &str, value: impl Into<String>) -> Self {
        self.details.insert(key.to_string(), value.into());
        self
    }
    pub fn with_retry_after(mut self, after: Duration) -> Self {
        self.retry_after_ms = u64::try_from(after.as_millis()).unwrap_or(u64::MAX);
        self
    }

    /// The numeric status of `Nats-Service-Error-Code` (HTTP-like).
    pub fn status(&self) -> u16 {
        match self.code {
            ErrorCode::InvalidInput => 400,
            ErrorCode::Unauthorized => 401,
            ErrorCode::QuotaExceeded => 402,
            ErrorCode::Forbidden => 403,
            ErrorCode::NotFound => 404,
            ErrorCode::Conflict => 409,
            ErrorCode::FailedPrecondition => 412,
            ErrorCode::PayloadTooLarge => 413,
            ErrorCode::RateLimited => 429,
            ErrorCode::Unavailable => 503,
            ErrorCode::Timeout => 504,
            ErrorCode::Internal | ErrorCode::Unspecified => 500,
        }
    }

    /// The code a bare numeric status stands for (a reply from a generic NATS service).
    pub fn code_for_status(status: u16) -> ErrorCode {
        match status {
            400 | 422 => ErrorCode::InvalidInput,
            401 => ErrorCode::Unauthorized,
            402 => ErrorCode::QuotaExceeded,
            403 => ErrorCode::Forbidden,
            404 => ErrorCode::NotFound,
            409 => ErrorCode::Conflict,
            412 => ErrorCode::FailedPrecondition,
            413 => ErrorCode::PayloadTooLarge,
            429 => ErrorCode::RateLimited,
            503 => ErrorCode::Unavailable,
            504 => ErrorCode::Timeout,
            _ => ErrorCode::Internal,
        }
    }

    pub fn to_message(&self) -> ErrorMessage {
        ErrorMessage {
            code: self.code.into(),
            message: self.message.clone(),
            retry_after_ms: self.retry_after_ms,
            details: self.details.clone(),
        }
    }

    pub fn from_message(m: ErrorMessage) -> Self {
        Self {
            // Codes this version does not know are kept as INTERNAL, not refused.
            code: ErrorCode::try_from(m.code).unwrap_or(ErrorCode::Internal),
            message: m.message,
            retry_after_ms: m.retry_after_ms,
            details: m.details,
        }
    }
}

impl From<DecodeError> for ServiceError {
    fn from(e: DecodeError) -> Self {
        ServiceError::invalid_input(e.to_string())
    }
}

impl From<slipway_proto::validate::ValidationError> for ServiceError {
    fn from(e: slipway_proto::validate::ValidationError) -> Self {
        ServiceError::invalid_input(e.to_string()).with_detail("field", e.field)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RpcError {
    #[error("no reply from `{subject}` within {timeout:?}")]
    Timeout { subject: String, timeout: Duration },
    #[error("no service answers on `{subject}`")]
    NoResponders { subject: String },
    #[error("`{subject}` replied with an error: {error}")]
    Service {
        subject: String,
        #[source]
        error: ServiceError,
    },
    #[error("`{subject}` sent a malformed reply: {source}")]
    MalformedReply {
        subject: String,
        #[source]
        source: DecodeError,
    },
    #[error("request to `{subject}` failed: {message}")]
    Transport { subject: String, message: String },
}

impl RpcError {
    /// The service error, when the service answered with one.
    pub fn service_error(&self) -> Option<&ServiceError> {
        match self {
            RpcError::Service { error, .. } => Some(error),
            _ => None,
        }
    }
}

/// The headers of an outgoing contract message: content type, message type, trace context.
pub fn message_headers<M: WireMessage>(content_type: ContentType) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(CONTENT_TYPE_HEADER, content_type.as_str());
    headers.insert(MESSAGE_TYPE_HEADER, M::full_name().as_str());
    crate::telemetry::inject_current(&mut headers);
    headers
}

/// Decodes a contract message from a NATS message's headers and payload.
pub fn decode_message<M: WireMessage>(
    headers: Option<&HeaderMap>,
    payload: &[u8],
) -> Result<M, DecodeError> {
    let get = |name: &str| headers.and_then(|h| h.get(name)).map(|v| v.as_str());
    codec::decode(get(CONTENT_TYPE_HEADER), get(MESSAGE_TYPE_HEADER), payload)
}

/// A client for other services' operations.
#[derive(Clone, Debug)]
pub struct RpcClient {
    client: async_nats::Client,
    timeout: Duration,
}

impl RpcClient {
    pub fn new(client: async_nats::Client, timeout: Duration) -> Self {
        Self { client, timeout }
    }

    pub fn nats(&self) -> &async_nats::Client {
        &self.client
    }

    /// Sends `request` to `subject` and waits for the typed reply, within the default timeout.
    pub async fn call<Req: WireMessage, Resp: WireMessage>(
        &self,
        subject: &str,
        request: &Req,
    ) -> Result<Resp, RpcError> {
        self.call_with_timeout(subject, request, self.timeout).await
    }

    #[tracing::instrument(name = "rpc.call", skip_all, fields(subject = %subject))]
    pub async fn call_with_timeout<Req: WireMessage, Resp: WireMessage>(
        &self,
        subject: &str,
        request: &Req,
        timeout: Duration,
    ) -> Result<Resp, RpcError> {
        let headers = message_headers::<Req>(ContentType::Protobuf);
        let payload = Bytes::from(codec::encode(request, ContentType::Protobuf));
        let req = async_nats::client::Request::new()
            .headers(headers)
            .payload(payload)
            .timeout(Some(timeout));
        let reply = self
            .client
            .send_request(subject.to_string(), req)
            .await
            .map_err(|e| match e.kind() {
                async_nats::RequestErrorKind::TimedOut => RpcError::Timeout {
                    subject: subject.to_string(),
                    timeout,
                },
                async_nats::RequestErrorKind::NoResponders => RpcError::NoResponders {
                    subject: subject.to_string(),
                },
                _ => RpcError::Transport {
                    subject: subject.to_string(),
                    message: e.to_string(),
                },
            })?;
        read_reply(subject, reply.headers.as_ref(), &reply.payload)
    }
}

/// Interprets a reply: a service error (from the body when it carries one, else from the
/// headers) or the expected message.
pub fn read_reply<Resp: WireMessage>(
    subject: &str,
    headers: Option<&HeaderMap>,
    payload: &[u8],
) -> Result<Resp, RpcError> {
    let status = headers
        .and_then(|h| h.get(SERVICE_ERROR_CODE_HEADER))
        .map(|v| v.as_str().trim().parse::<u16>().unwrap_or(500));
    if let Some(status) = status {
        let error = if payload.is_empty() {
            let message = headers
                .and_then(|h| h.get(SERVICE_ERROR_HEADER))
                .map(|v| v.as_str().to_string())
                .unwrap_or_default();
            ServiceError::new(ServiceError::code_for_status(status), message)
        } else {
            let m: ErrorMessage =
                decode_message(headers, payload).map_err(|source| RpcError::MalformedReply {
                    subject: subject.to_string(),
                    source,
                })?;
            ServiceError::from_message(m)
        };
        return Err(RpcError::Service {
            subject: subject.to_string(),
            error,
        });
    }
    decode_message(headers, payload).map_err(|source| RpcError::MalformedReply {
        subject: subject.to_string(),
        source,
    })
}
