//! `/usage` (the rollup by end-user, project or workspace), `/usage/summary`, and per-user
//! quotas under `/quotas/external/{external_user_id}`.

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use serde::Deserialize;
use serde_json::{Value, json};

use super::extract::JsonBody;
use super::{ApiError, AppState};
use crate::clock::now_ms;
use crate::quotas::Limits;
use crate::rollup::{GroupBy, Window, rollup_view, summary_view};

#[derive(Deserialize)]
pub struct RollupQuery {
    group_by: Option<String>,
    period: Option<String>,
    start: Option<String>,
    end: Option<String>,
    external_user_id: Option<String>,
}

pub async fn rollup(
    State(s): State<AppState>,
    Query(q): Query<RollupQuery>,
) -> Result<Json<Value>, ApiError> {
    let window = Window::parse(
        q.period.as_deref(),
        q.start.as_deref(),
        q.end.as_deref(),
        now_ms(),
    )?;
    let group_by = GroupBy::parse(q.group_by.as_deref())?;
    let host = s.host.clone();
    // Sampling first, so the figures include the last few seconds.
    let view = tokio::task::spawn_blocking(move || {
        host.sample_all_usage();
        rollup_view(&host, window, group_by, q.external_user_id.as_deref())
    })
    .await
    .map_err(|e| ApiError::internal(e.to_string()))?;
    Ok(Json(view))
}

#[derive(Deserialize)]
pub struct SummaryQuery {
    period_start: Option<String>,
    period_end: Option<String>,
    period: Option<String>,
}

pub async fn summary(
    State(s): State<AppState>,
    Query(q): Query<SummaryQuery>,
) -> Result<Json<Value>, ApiError> {
    let period = match (&q.period, &q.period_start) {
        (None, None) => Some("mtd"),
        (p, _) => p.as_deref(),
    };
    let window = Window::parse(
        period,
        q.period_start.as_deref(),
        q.period_end.as_deref(),
        now_ms(),
    )?;
    let host = s.host.clone();
    let view = tokio::task::spawn_blocking(move || {
        host.sample_all_usage();
        summary_view(&host, window)
    })
    .await
    .map_err(|e| ApiError::internal(e.to_string()))?;
    Ok(Json(json!({ "data": view })))
}

fn user_id(user: &str) -> Result<(), ApiError> {
    if user.is_empty() || user.len() > 255 || user.chars().any(char::is_control) {
        return Err(ApiError::invalid(
            "invalid_external_user_id",
            "an external_user_id is 1 to 255 characters",
        ));
    }
    Ok(())
}

pub async fn get_quota(
    State(s): State<AppState>,
    Path(user): Path<String>,
) -> Result<Json<Value>, ApiError> {
    user_id(&user)?;
    Ok(Json(json!({ "data": s.host.quota_view(&user) })))
}

/// Creates or replaces the quota; an omitted limit is uncapped.
pub async fn put_quota(
    State(s): State<AppState>,
    Path(user): Path<String>,
    JsonBody(limits): JsonBody<Limits>,
) -> Result<Json<Value>, ApiError> {
    user_id(&user)?;
    s.host
        .quotas
        .set(&user, limits)
        .map_err(|e| ApiError::internal(format!("saving the quota: {e}")))?;
    Ok(Json(json!({ "data": s.host.quota_view(&user) })))
}

pub async fn delete_quota(
    State(s): State<AppState>,
    Path(user): Path<String>,
) -> Result<StatusCode, ApiError> {
    user_id(&user)?;
    s.host
        .quotas
        .delete(&user)
        .map_err(|e| ApiError::internal(format!("saving the quota: {e}")))?;
    Ok(StatusCode::NO_CONTENT)
}
