//! The wire codec: protobuf (`application/x-protobuf`) or its canonical proto3 JSON
//! (`application/json`). A body without a content type that starts with `{` is JSON, so
//! `nats pub slipway.prompts '{"prompt":"...","user_id":"u1"}'` works.

use serde::Serialize;
use serde::de::DeserializeOwned;

/// The content type header's name (NATS headers, like HTTP's).
pub const CONTENT_TYPE_HEADER: &str = "Content-Type";
/// Names the protobuf message in the body, for example `slipway.v1.PromptSubmitted`.
pub const MESSAGE_TYPE_HEADER: &str = "Slipway-Message-Type";
pub const PROTOBUF: &str = "application/x-protobuf";
pub const JSON: &str = "application/json";

/// A message of the contract: protobuf, named, and with its JSON form.
pub trait WireMessage:
    prost::Message + prost::Name + Default + Serialize + DeserializeOwned
{
}
impl<T> WireMessage for T where
    T: prost::Message + prost::Name + Default + Serialize + DeserializeOwned
{
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ContentType {
    Protobuf,
    Json,
}

impl ContentType {
    /// The content type of a body from its header, or by sniffing when there is none.
    pub fn detect(header: Option<&str>, body: &[u8]) -> Result<Self, DecodeError> {
        match header.map(|h| {
            h.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        }) {
            Some(h) if h.is_empty() => Ok(Self::sniff(body)),
            None => Ok(Self::sniff(body)),
            Some(h) => match h.as_str() {
                PROTOBUF | "application/protobuf" | "application/vnd.google.protobuf" => {
                    Ok(Self::Protobuf)
                }
                JSON => Ok(Self::Json),
                _ => Err(DecodeError::UnsupportedContentType(h)),
            },
        }
    }

    fn sniff(body: &[u8]) -> Self {
        match body.iter().find(|b| !b.is_ascii_whitespace()) {
            Some(b'{') => Self::Json,
            _ => Self::Protobuf,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Protobuf => PROTOBUF,
            Self::Json => JSON,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("unsupported content type `{0}` (use {PROTOBUF} or {JSON})")]
    UnsupportedContentType(String),
    #[error("expected a `{expected}` message, got `{got}`")]
    WrongMessageType { expected: String, got: String },
    #[error("invalid protobuf for `{message}`: {source}")]
    Protobuf {
        message: String,
        #[source]
        source: prost::DecodeError,
    },
    #[error("invalid JSON for `{message}`: {source}")]
    Json {
        message: String,
        #[source]
        source: serde_json::Error,
    },
}

/// Decodes a body given its content type and message type headers (either may be absent).
pub fn decode<M: WireMessage>(
    content_type: Option<&str>,
    message_type: Option<&str>,
    body: &[u8],
) -> Result<M, DecodeError> {
    if let Some(got) = message_type.map(str::trim).filter(|t| !t.is_empty()) {
        let expected = M::full_name();
        if got != expected {
            return Err(DecodeError::WrongMessageType {
                expected,
                got: got.to_string(),
            });
        }
    }
    match ContentType::detect(content_type, body)? {
        ContentType::Protobuf => M::decode(body).map_err(|source| DecodeError::Protobuf {
            message: M::full_name(),
            source,
        }),
        ContentType::Json => serde_json::from_slice(body).map_err(|source| DecodeError::Json {
            message: M::full_name(),
            source,
        }),
    }
}

/// Encodes a message in the given form.
pub fn encode<M: WireMessage>(message: &M, content_type: ContentType) -> Vec<u8> {
    match content_type {
        ContentType::Protobuf => message.encode_to_vec(),
        // Serialising a generated message into memory cannot fail: every field has a JSON form.
        ContentType::Json => serde_json::to_vec(message).unwrap_or_default(),
    }
}
