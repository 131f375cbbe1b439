//! `/sandboxes`: create (idempotent), get, get by name, list, update, lifecycle, readiness.

use std::time::Duration;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use futures::Stream;
use serde::Deserialize;
use serde_json::{Value, json};

use super::extract::JsonBody;
use super::{ApiError, AppState};
use crate::clock::now_ms;
use crate::host::{CreateRequest, ListFilter};
use crate::model::{Sandbox, State as SbState};

fn one(s: &Sandbox) -> Json<Value> {
    Json(json!({ "data": s.view(now_ms()) }))
}

pub async fn create(
    State(s): State<AppState>,
    headers: HeaderMap,
    JsonBody(req): JsonBody<CreateRequest>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let key = super::extract::idempotency_key(&headers)?;
    let sandbox = s.host.create(req, key).await?;
    Ok((StatusCode::CREATED, one(&sandbox)))
}

pub async fn get(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    Ok(one(&s.host.get(&id)?.snapshot()))
}

pub async fn by_name(
    State(s): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    Ok(one(&s.host.by_name(&name)?.snapshot()))
}

pub async fn list(
    State(s): State<AppState>,
    Query(filter): Query<ListFilter>,
) -> Result<Json<Value>, ApiError> {
    let now = now_ms();
    let items: Vec<Value> = s.host.list(&filter)?.iter().map(|x| x.view(now)).collect();
    let total = items.len();
    Ok(Json(
        json!({ "data": items, "page": { "page": 1, "page_size": total, "total": total } }),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateBody {
    name: Option<String>,
    slug: Option<String>,
    tags: Option<Vec<String>>,
    metadata: Option<serde_json::Map<String, Value>>,
    always_on: Option<bool>,
    timeout_sec: Option<u64>,
    idle_timeout_sec: Option<u64>,
    persistent: Option<bool>,
}

pub async fn update(
    State(s): State<AppState>,
    Path(id): Path<String>,
    JsonBody(b): JsonBody<UpdateBody>,
) -> Result<Json<Value>, ApiError> {
    let entry = s.host.get(&id)?;
    if entry.state() == SbState::Destroyed {
        return Err(ApiError::new(
            StatusCode::GONE,
            "sandbox_destroyed",
            format!("sandbox `{id}` was destroyed"),
        ));
    }
    let name = b.name.or(b.slug);
    if let Some(n) = &name {
        if n.is_empty() || n.len() > 128 || n.chars().any(|c| c.is_control() || c == '/') {
            return Err(ApiError::invalid(
                "invalid_name",
                "a name is 1 to 128 characters, no `/`",
            ));
        }
        if s.host.by_name(n).is_ok_and(|other| other.id != id) {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "name_taken",
                format!("a sandbox named `{n}` exists"),
            ));
        }
    }
    crate::host::check_timeouts(&[
        ("timeout_sec", b.timeout_sec),
        ("idle_timeout_sec", b.idle_timeout_sec),
    ])?;
    let updated = entry.update(|r| {
        if let Some(n) = name {
            r.name = Some(n);
        }
        if let Some(t) = b.tags {
            r.tags = t;
        }
        if let Some(m) = b.metadata {
            r.metadata.extend(m);
        }
        if let Some(a) = b.always_on {
            r.always_on = a;
        }
        if let Some(t) = b.timeout_sec {
            r.timeout_sec = Some(t);
            r.timeout_base_ms = now_ms();
        }
        if let Some(t) = b.idle_timeout_sec {
            r.idle_timeout_sec = Some(t);
        }
        if let Some(p) = b.persistent {
            r.persistent = p;
        }
    })?;
    Ok(one(&updated))
}

pub async fn destroy(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let entry = s.host.get(&id)?;
    Ok(one(&s.host.destroy(&entry).await?))
}

pub async fn pause(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let entry = s.host.get(&id)?;
    Ok(one(&s.host.pause(&entry)?))
}

pub async fn resume(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let entry = s.host.get(&id)?;
    Ok(one(&s.host.resume(&entry)?))
}

pub async fn stop(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let entry = s.host.get(&id)?;
    Ok(one(&s.host.stop(&entry).await?))
}

#[derive(Deserialize, Default)]
pub struct ExtendBody {
    timeout_sec: Option<u64>,
}

pub async fn extend(
    State(s): State<AppState>,
    Path(id): Path<String>,
    JsonBody(b): JsonBody<ExtendBody>,
) -> Result<Json<Value>, ApiError> {
    let entry = s.host.live(&id)?;
    Ok(one(&s.host.extend(&entry, b.timeout_sec)?))
}

fn readiness_of(sb: &Sandbox) -> Value {
    let ready = sb.state == SbState::Running;
    let status = if ready { "ready" } else { "not_ready" };
    let components: serde_json::Map<String, Value> = [
        "command_agent",
        "process_control",
        "resource_contract",
        "clock",
        "identity",
        "durability",
        "filesystem",
        "internal_probe",
    ]
    .iter()
    .map(|c| ((*c).to_string(), json!({ "status": status })))
    .collect();
    json!({ "ready": ready, "status": status, "state": sb.state.as_str(), "sandbox_id": sb.id, "components": components })
}

pub async fn readiness(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(
        json!({ "data": readiness_of(&s.host.get(&id)?.snapshot()) }),
    ))
}

#[derive(Deserialize)]
pub struct WaitQuery {
    timeout: Option<f64>,
}

/// `event: ready` as soon as the sandbox is ready (at once if it is), or `event: timeout`.
pub async fn readiness_stream(
    State(s): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<WaitQuery>,
) -> Result<Sse<impl Stream<Item = Result<Event, std::convert::Infallible>>>, ApiError> {
    let entry = s.host.get(&id)?;
    let wait = Duration::from_secs_f64(
        q.timeout
            .filter(|t| t.is_finite() && *t > 0.0)
            .unwrap_or(30.0)
            .min(300.0),
    );
    let stream = crate::files::async_stream(move |tx| async move {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let sb = entry.snapshot();
            if sb.state == SbState::Running {
                let _ = tx
                    .send(
                        Event::default()
                            .event("ready")
                            .data(readiness_of(&sb).to_string()),
                    )
                    .await;
                return;
            }
            if sb.state == SbState::Destroyed || tokio::time::Instant::now() >= deadline {
                let _ = tx
                    .send(
                        Event::default()
                            .event("timeout")
                            .data(readiness_of(&sb).to_string()),
                    )
                    .await;
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

#[derive(Deserialize)]
pub struct StreamQuery {
    types: Option<String>,
}

/// `GET /events/stream[?types=sandbox.*]`: the tenant's lifecycle events; with `Last-Event-ID`
/// it resumes after that event, otherwise it starts now.
pub async fn tenant_events(
    State(s): State<AppState>,
    headers: HeaderMap,
    Query(q): Query<StreamQuery>,
) -> Result<Sse<impl Stream<Item = Result<Event, std::convert::Infallible>>>, ApiError> {
    let after = match headers.get("last-event-id").and_then(|v| v.to_str().ok()) {
        Some(raw) => raw
            .trim()
            .trim_start_matches("evt_")
            .parse::<u64>()
            .map_err(|_| {
                ApiError::invalid(
                    "invalid_last_event_id",
                    format!("`{raw}` is not an event id"),
                )
            })?,
        None => s.host.events.last_seq(),
    };
    let patterns: Vec<String> = q
        .types
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(str::to_string)
        .collect();
    let wanted = move |kind: &str| {
        patterns.is_empty()
            || patterns.iter().any(|p| match p.strip_suffix('*') {
                Some(prefix) => kind.starts_with(prefix),
                None => kind == p,
            })
    };
    let (backlog, mut live) = s
        .host
        .events
        .replay_and_subscribe(after)
        .map_err(|e| ApiError::internal(e.to_string()))?;
    let host = s.host.clone();
    let stream = crate::files::async_stream(move |tx| async move {
        let frame = |e: &crate::events::TenantEvent| {
            let mut data = serde_json::Map::new();
            data.insert("type".into(), e.kind.clone().into());
            data.insert("id".into(), e.id.clone().into());
            data.insert("tenant_id".into(), "local".into());
            data.insert("ts".into(), e.ts.clone().into());
            data.extend(e.data.clone());
            Event::default()
                .id(e.event_id())
                .event(e.kind.clone())
                .data(Value::Object(data).to_string())
        };
        let mut sent = after;
        for e in backlog.iter().filter(|e| wanted(&e.kind)) {
            if tx.send(frame(e)).await.is_err() {
                return;
            }
            sent = e.seq;
        }
        sent = sent.max(backlog.last().map(|e| e.seq).unwrap_or(0));
        loop {
            match live.recv().await {
                Ok(e) if e.seq > sent => {
                    sent = e.seq;
                    if wanted(&e.kind) && tx.send(frame(&e)).await.is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                    // Fell behind the live channel: catch up from the log.
                    for e in host.events.replay(sent).unwrap_or_default() {
                        sent = e.seq;
                        if wanted(&e.kind) && tx.send(frame(&e)).await.is_err() {
                            return;
                        }
                    }
                }
                Err(_) => return,
            }
        }
    });
    Ok(Sse::new(stream).keep_alive(
        KeepAlive::new()
            .interval(Duration::from_secs(15))
            .text("heartbeat"),
    ))
}
