//! The browser API on `preview.listen`: what a platform's page may call with a ticket from
//! `ticket` (single use, one run, short-lived), since `EventSource` sends no headers and no
//! Slipway or platform credential may reach a browser.
//!
//! - `GET /v1/runs/{run}/events?ticket=…`: the run's events as Server-Sent Events (`id:` the
//!   stream sequence, `event:` the kind, `data:` the event's JSON), resumable with
//!   `Last-Event-ID` (or `last_event_id=`);
//! - `GET /v1/runs/{run}/previews?ticket=…`: the run's open previews with fresh token URLs.
//!
//! Cross-origin calls are answered for `preview.allowed_origins` only; a request from any other
//! origin is refused before its ticket is looked at.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::{DeliverPolicy, pull};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use futures::StreamExt;
use serde::Deserialize;
use serde_json::json;
use slipway_common::Shutdown;
use slipway_common::subjects::streams;
use slipway_proto::v1::{PreviewState, RunEvent};

use crate::ids::{check_run, pv_key, run_key};
use crate::service::Preview;
use crate::tickets::Refused;

#[derive(Clone)]
struct Api {
    preview: Arc<Preview>,
    shutdown: Shutdown,
}

#[derive(Deserialize)]
struct Params {
    ticket: Option<String>,
    last_event_id: Option<String>,
}

/// An HTTP refusal with a JSON body.
struct Refusal(StatusCode, &'static str, String);

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let body = json!({ "error": { "code": self.1, "message": self.2 } });
        (self.0, Json(body)).into_response()
    }
}

/// Binds `preview.listen` and serves until shutdown; answers the bound address.
pub async fn start(preview: Arc<Preview>, shutdown: Shutdown) -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(preview.settings.listen)
        .await
        .map_err(|e| anyhow::anyhow!("preview.listen {}: {e}", preview.settings.listen))?;
    let addr = listener.local_addr()?;
    let api = Api {
        preview,
        shutdown: shutdown.clone(),
    };
    let app = Router::new()
        .route("/v1/runs/{run}/events", get(events).options(preflight))
        .route("/v1/runs/{run}/previews", get(previews).options(preflight))
        .fallback(|| async { Refusal(StatusCode::NOT_FOUND, "not_found", "no such route".into()) })
        .layer(axum::middleware::from_fn_with_state(api.clone(), cors))
        .with_state(api);
    let stop = shutdown.clone();
    shutdown.tracker().spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move { stop.triggered().await })
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "the browser API stopped");
        }
    });
    Ok(addr)
}

/// CORS for the allowed origins; any other origin is refused (403) before the handler runs,
/// so a page elsewhere cannot even spend a ticket.
async fn cors(
    State(api): State<Api>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let origin = req.headers().get(header::ORIGIN).cloned();
    let allowed = origin.as_ref().map(|o| {
        api.preview
            .settings
            .allowed_origins
            .iter()
            .any(|a| o.as_bytes() == a.as_bytes())
    });
    if allowed == Some(false) {
        return Refusal(
            StatusCode::FORBIDDEN,
            "origin_not_allowed",
            "this origin is not in `preview.allowed_origins`".into(),
        )
        .into_response();
    }
    let mut response = next.run(req).await;
    if let Some(origin) = origin {
        let h = response.headers_mut();
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        h.insert(header::VARY, HeaderValue::from_static("Origin"));
    }
    response
}

/// A dependency failed: logged here, and the browser is told only to retry (no internals).
fn unavailable(detail: impl std::fmt::Display) -> Refusal {
    tracing::warn!(%detail, "the browser API could not answer");
    Refusal(
        StatusCode::SERVICE_UNAVAILABLE,
        "unavailable",
        "the run cannot be read right now; retry".into(),
    )
}

async fn preflight() -> Response {
    (
        StatusCode::NO_CONTENT,
        [
            (header::ACCESS_CONTROL_ALLOW_METHODS, "GET, OPTIONS"),
            (header::ACCESS_CONTROL_ALLOW_HEADERS, "Last-Event-ID"),
            (header::ACCESS_CONTROL_MAX_AGE, "600"),
        ],
    )
        .into_response()
}

/// A ticket refusal as HTTP: 401 asks for a new ticket, 403 says this one can never work here.
fn refusal(r: Refused) -> Refusal {
    let status = match r {
        Refused::OtherRun => StatusCode::FORBIDDEN,
        Refused::Unavailable(ref detail) => {
            tracing::warn!(%detail, "redeeming a ticket");
            return Refusal(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "tickets cannot be checked right now; retry".into(),
            );
        }
        _ => StatusCode::UNAUTHORIZED,
    };
    Refusal(status, r.code(), r.to_string())
}

async fn redeem(preview: &Preview, run: &str, ticket: Option<&str>) -> Result<(), Refusal> {
    check_run(run).map_err(|e| Refusal(StatusCode::BAD_REQUEST, "invalid_run", e.message))?;
    preview.redeem(run, ticket).await.map_err(refusal)
}

/// Where to resume: the sequence after `Last-Event-ID` (the header, or `last_event_id=`).
fn resume_from(headers: &HeaderMap, params: &Params) -> Result<Option<u64>, Refusal> {
    let raw = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .or_else(|| params.last_event_id.clone())
        .filter(|s| !s.trim().is_empty());
    let Some(raw) = raw else {
        return Ok(None);
    };
    // The next sequence to send: one past the last seen (a number the stream can hold).
    raw.trim()
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_add(1))
        .map(Some)
        .ok_or_else(|| {
            Refusal(
                StatusCode::BAD_REQUEST,
                "invalid_last_event_id",
                "Last-Event-ID is the `id` of an event this stream sent".into(),
            )
        })
}

async fn events(
    State(api): State<Api>,
    Path(run): Path<String>,
    Query(params): Query<Params>,
    headers: HeaderMap,
) -> Result<Response, Refusal> {
    let from = resume_from(&headers, &params)?;
    redeem(&api.preview, &run, params.ticket.as_deref()).await?;
    let filter =
        slipway_common::subjects::run_events(&run).map_err(|e| unavailable(e.to_string()))?;
    let stream = api
        .preview
        .jetstream
        .get_stream_no_info(streams::RUN_EVENTS)
        .await
        .map_err(|e| unavailable(e.to_string()))?;
    let deliver_policy = match from {
        None => DeliverPolicy::All,
        Some(start_sequence) => DeliverPolicy::ByStartSequence { start_sequence },
    };
    let consumer = stream
        .create_consumer(pull::OrderedConfig {
            filter_subject: filter,
            deliver_policy,
            ..Default::default()
        })
        .await
        .map_err(|e| unavailable(e.to_string()))?;
    let messages = consumer
        .messages()
        .await
        .map_err(|e| unavailable(e.to_string()))?;
    let shutdown = api.shutdown.clone();
    let events = messages
        .take_until(async move { shutdown.triggered().await })
        .filter_map(|m| async move {
            let m = m.ok()?;
            let seq = m.info().ok()?.stream_sequence;
            let event: RunEvent =
                slipway_common::rpc::decode_message(m.headers.as_ref(), &m.payload).ok()?;
            let kind = event
                .kind()
                .map(|k| k.token().to_string())
                .unwrap_or_default();
            let data = serde_json::to_string(&event).ok()?;
            Some(Ok::<_, Infallible>(
                Event::default().id(seq.to_string()).event(kind).data(data),
            ))
        });
    let sse = Sse::new(events).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)));
    let mut response = sse.into_response();
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(response)
}

async fn previews(
    State(api): State<Api>,
    Path(run): Path<String>,
    Query(params): Query<Params>,
) -> Result<Response, Refusal> {
    redeem(&api.preview, &run, params.ticket.as_deref()).await?;
    let p = &api.preview;
    let key = run_key(&run).map_err(|e| unavailable(e.message))?;
    let index = p
        .runs
        .get(&key)
        .await
        .map_err(|e| unavailable(e.to_string()))?
        .map(|(r, _)| r)
        .unwrap_or_default();
    let mut out = Vec::new();
    for id in &index.preview_ids {
        let Some((record, _)) = p
            .previews
            .get(&pv_key(id))
            .await
            .map_err(|e| unavailable(e.to_string()))?
        else {
            continue;
        };
        if record.state != PreviewState::Open as i32 {
            continue;
        }
        let token = p
            .mint_token(&record)
            .await
            .map_err(|e| unavailable(e.message))?;
        out.push(json!({
            "preview_id": record.preview_id,
            "branch": record.branch,
            "port": record.port,
            "url": token.url,
            "expires_at": token.expires_at,
        }));
    }
    let mut response = Json(json!({ "run_id": run, "previews": out })).into_response();
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(response)
}
