//! `/sandboxes/{id}/snapshots`, `/restore/{snapshot_id}`, `/fork`, and the legacy `/snapshot`.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use serde_json::{Value, json};

use super::extract::JsonBody;
use super::{ApiError, AppState};
use crate::clock::now_ms;
use crate::snapshots::{ForkRequest, SnapshotRequest};

pub async fn create(
    State(s): State<AppState>,
    Path(id): Path<String>,
    JsonBody(req): JsonBody<SnapshotRequest>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let entry = s.host.live(&id)?;
    let snap = s.host.create_snapshot(&entry, req).await?;
    Ok((StatusCode::CREATED, Json(json!({ "data": snap.view() }))))
}

/// `POST /sandboxes/{id}/snapshot`: the older single-call form.
pub async fn create_legacy(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let entry = s.host.live(&id)?;
    let snap = s
        .host
        .create_snapshot(&entry, SnapshotRequest::default())
        .await?;
    Ok(Json(
        json!({ "snapshot_id": snap.id, "id": snap.id, "data": snap.view() }),
    ))
}

pub async fn list(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    s.host.get(&id)?;
    let snaps: Vec<Value> = s.host.snapshots_of(&id).iter().map(|x| x.view()).collect();
    Ok(Json(json!({ "data": snaps })))
}

pub async fn delete(
    State(s): State<AppState>,
    Path((id, sid)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    s.host.get(&id)?;
    let snap = s.host.snapshot(&sid)?;
    if snap.sandbox_id != id {
        return Err(ApiError::not_found(
            "snapshot_not_found",
            format!("snapshot `{sid}` is not of sandbox `{id}`"),
        ));
    }
    s.host.delete_snapshot(&snap)?;
    Ok(Json(json!({ "data": { "id": sid, "deleted": true } })))
}

pub async fn restore(
    State(s): State<AppState>,
    Path((id, sid)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    let entry = s.host.live(&id)?;
    let snap = s.host.snapshot(&sid)?;
    let record = s.host.restore(&entry, &snap).await?;
    Ok(Json(json!({ "data": record.view(now_ms()) })))
}

pub async fn fork(
    State(s): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    JsonBody(req): JsonBody<ForkRequest>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let parent = s.host.live(&id)?;
    let key = super::extract::idempotency_key(&headers)?;
    let child = s.host.fork(&parent, req, key).await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({ "data": child.view(now_ms()) })),
    ))
}
