//! The edge's own pages: short, human, never cached, and framable (they show inside iframes).

use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::grants::Refusal;

/// A page explaining why a request stops at the edge; `x-slipway-edge` tells tests and
/// operators that the answer came from the edge, not the app.
pub fn error(status: StatusCode, title: &str, detail: &str) -> Response {
    let body = format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>{title}</title>\
         <style>body{{font:16px system-ui,sans-serif;margin:3em auto;max-width:32em;color:#333}}\
         h1{{font-size:1.4em}}</style></head><body><h1>{title}</h1><p>{detail}</p>\
         <p><small>{} &middot; Slipway preview edge</small></p></body></html>",
        status.as_u16(),
        title = escape(title),
        detail = escape(detail),
    );
    (
        status,
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
            (header::HeaderName::from_static("x-slipway-edge"), "refused"),
        ],
        body,
    )
        .into_response()
}

/// Expired links ask for a new one (401, as MIOSA's expired page does); revoked, forged and
/// mismatched ones are refused (403).
pub fn refusal(r: &Refusal) -> Response {
    match r {
        Refusal::Expired => error(
            StatusCode::UNAUTHORIZED,
            "This preview link has expired",
            "Ask for a new link (preview tokens last at most a day).",
        ),
        Refusal::Revoked => error(
            StatusCode::FORBIDDEN,
            "This link was revoked",
            "Its owner turned it off. Ask them for a new one.",
        ),
        Refusal::Forged | Refusal::Mismatch => error(
            StatusCode::FORBIDDEN,
            "This link is not valid",
            "Check that the whole address was copied.",
        ),
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}
