//! Lenient decoding, as MIOSA's SDKs do it: objects with or without the `{"data": ...}`
//! envelope, ids as strings or numbers, and every error-body variant the SDKs read.

use std::time::Duration;

use serde_json::Value;

use super::error::MiosaError;

/// The payload of a success body: `data` when the body is `{"data": ...}` (with at most a
/// `page` or `meta` beside it), else the body itself.
pub fn unwrap_envelope(body: Value) -> Value {
    match body {
        Value::Object(mut map)
            if map.contains_key("data")
                && map
                    .keys()
                    .all(|k| matches!(k.as_str(), "data" | "page" | "meta" | "request_id")) =>
        {
            map.remove("data").unwrap_or(Value::Null)
        }
        other => other,
    }
}

/// A string field that may come as a string or a number (`pid`, `id`).
pub fn string_or_number(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// The error an error response stands for, from its status, headers and whatever body shape it
/// has: `{"error":{"code","message","request_id"}}`, flat `{"error":"msg","code":"C"}`,
/// `{"message","code"}`, `{"detail"}`, `{"errors":[...]}`, a `retry_after` number, or no JSON.
pub fn error_from(
    status: u16,
    retry_after_header: Option<&str>,
    request_id_header: Option<&str>,
    body: &[u8],
) -> MiosaError {
    let json: Option<Value> = serde_json::from_slice(body).ok();
    let text = |v: Option<&Value>| v.and_then(|v| v.as_str()).map(str::to_string);
    let (mut code, mut message, mut request_id, mut retry_body) = (None, None, None, None);
    if let Some(Value::Object(map)) = &json {
        match map.get("error") {
            Some(Value::Object(e)) => {
                code = text(e.get("code"));
                message = text(e.get("message")).or_else(|| text(e.get("detail")));
                request_id = text(e.get("request_id"));
            }
            Some(Value::String(s)) => {
                // Flat: `error` is the message (Elixir) or an upper-case code (Python reads it so).
                if s.chars().all(|c| c.is_ascii_uppercase() || c == '_') && !s.is_empty() {
                    code = Some(s.clone());
                } else {
                    message = Some(s.clone());
                }
            }
            _ => {}
        }
        code = code.or_else(|| text(map.get("code")));
        message = message
            .or_else(|| text(map.get("message")))
            .or_else(|| text(map.get("detail")))
            .or_else(|| text(map.get("reason")))
            .or_else(|| {
                map.get("errors").and_then(|e| e.get(0)).and_then(|e| {
                    e.as_str()
                        .map(str::to_string)
                        .or_else(|| text(e.get("message")))
                })
            });
        request_id = request_id.or_else(|| text(map.get("request_id")));
        retry_body = map.get("retry_after").and_then(Value::as_f64);
    }
    let retry_after = retry_after_header
        .and_then(|h| h.trim().parse::<f64>().ok())
        .or(retry_body)
        .filter(|s| s.is_finite() && *s >= 0.0)
        .map(|s| Duration::from_secs_f64(s.min(30.0)));
    MiosaError::Api {
        status,
        code: code.unwrap_or_else(|| default_code(status).to_string()),
        message: message.unwrap_or_else(|| {
            let raw = String::from_utf8_lossy(body);
            if raw.trim().is_empty() {
                format!("HTTP {status}")
            } else {
                raw.chars().take(200).collect()
            }
        }),
        request_id: request_id.or_else(|| request_id_header.map(str::to_string)),
        retry_after,
    }
}

fn default_code(status: u16) -> &'static str {
    match status {
        401 => "unauthorized",
        402 => "insufficient_credits",
        403 => "forbidden",
        404 => "not_found",
        409 => "conflict",
        422 => "validation_error",
        429 => "rate_limited",
        500..=599 => "server_error",
        _ => "error",
    }
}
