//! Preview tokens, previews, preview shares and sandbox shares: the API side of grants (see
//! `grants`); the edge serves what they open.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use serde::Deserialize;
use serde_json::{Value, json};

use super::extract::JsonBody;
use super::{ApiError, AppState};
use crate::clock::{now_ms, rfc3339};
use crate::grants::{Audience, Grant, Once, Scope};
use crate::model::Sandbox;

/// Longest preview token MIOSA mints: a day.
pub const MAX_TOKEN_TTL_SEC: u64 = 86_400;
/// Longest share link: 30 days.
pub const MAX_SHARE_TTL_SEC: u64 = 30 * 86_400;
const DEFAULT_TTL_SEC: u64 = 3600;

fn ttl(value: Option<i64>, max: u64, field: &'static str) -> Result<u64, ApiError> {
    let v = value.unwrap_or(DEFAULT_TTL_SEC as i64);
    match u64::try_from(v) {
        Ok(v) if (1..=max).contains(&v) => Ok(v),
        _ => Err(ApiError::invalid(
            "invalid_expires_in",
            format!("`{field}` must be between 1 and {max} seconds"),
        )),
    }
}

fn port(value: Option<i64>, sandbox: &Sandbox) -> Result<u16, ApiError> {
    match value {
        None => Ok(crate::templates::find(&sandbox.template_id)
            .map(|t| t.preview_port)
            .unwrap_or(3000)),
        Some(p) => u16::try_from(p)
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| ApiError::invalid("invalid_port", "`port` must be 1 to 65535")),
    }
}

fn scope(value: Option<&str>) -> Result<Scope, ApiError> {
    value.map_or(Ok(Scope::Read), |s| {
        Scope::parse(s)
            .ok_or_else(|| ApiError::invalid("invalid_scope", "`scope` is `read` or `interact`"))
    })
}

fn saved(grant: Grant, s: &AppState) -> Result<Grant, ApiError> {
    s.grants
        .insert(grant)
        .map_err(|e| ApiError::internal(format!("saving the grant: {e}")))
}

/// Saves `grant`, or answers the grant an earlier request with the same `Idempotency-Key` made;
/// the same key with another request (`body`) is `409 idempotency_key_reused`.
fn saved_once(
    grant: Grant,
    s: &AppState,
    headers: &HeaderMap,
    body: String,
) -> Result<Grant, ApiError> {
    let key = super::extract::idempotency_key(headers)?;
    match s.grants.insert_once(grant, key, &body) {
        Ok(Once::Made(g) | Once::Seen(g)) => Ok(g),
        Ok(Once::Reused) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "idempotency_key_reused",
            "this Idempotency-Key was used with a different request",
        )),
        Err(e) => Err(ApiError::internal(format!("saving the grant: {e}"))),
    }
}

fn not_found_preview(pid: &str) -> ApiError {
    ApiError::not_found("preview_not_found", format!("preview `{pid}` not found"))
}

#[derive(Deserialize)]
pub struct TokenBody {
    expires_in: Option<i64>,
    scope: Option<String>,
    port: Option<i64>,
}

/// `POST /sandboxes/{id}/preview-token`: an iframe-ready URL that works without cookies.
pub async fn preview_token(
    State(s): State<AppState>,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<TokenBody>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let sandbox = s.host.live(&id)?.snapshot();
    let ttl = ttl(body.expires_in, MAX_TOKEN_TTL_SEC, "expires_in")?;
    let mut grant = Grant::new(
        Audience::PreviewToken,
        &id,
        port(body.port, &sandbox)?,
        scope(body.scope.as_deref())?,
    );
    grant.expires_at_ms = Some(now_ms() + ttl as i64 * 1000);
    let grant = saved(grant, &s)?;
    let token = s.grants.token(&grant);
    let url = s.edge.url(&s.grants.host_label(&grant), "mt", &token);
    Ok((
        StatusCode::CREATED,
        Json(json!({ "data": {
            "token": token,
            "url": url,
            "expires_at": grant.expires_at_ms.map(rfc3339),
            "expires_in": ttl,
            "scope": grant.scope.as_str(),
            "port": grant.port,
            "sandbox_id": id,
        }})),
    ))
}

#[derive(Deserialize)]
pub struct PreviewBody {
    port: Option<i64>,
    name: Option<String>,
    visibility: Option<String>,
}

fn preview_view(s: &AppState, sandbox: &Sandbox, preview: &Grant) -> Value {
    let now = now_ms();
    let share = s
        .grants
        .list(|g| {
            g.audience == Audience::PreviewShare
                && g.preview_id.as_deref() == Some(preview.id.as_str())
                && g.active(now)
        })
        .pop();
    let state = if preview.revoked_at_ms.is_some() {
        "deleted"
    } else if preview.active(now) {
        "active"
    } else {
        "expired"
    };
    json!({
        "id": preview.id,
        "sandbox_id": preview.sandbox_id,
        "name": preview.name,
        "port": preview.port,
        "visibility": preview.visibility.as_deref().unwrap_or("public"),
        "state": state,
        "url": s.edge.url(&s.grants.host_label(preview), "", ""),
        "expires_at": preview.expires_at_ms.map(rfc3339),
        "deleted_at": preview.revoked_at_ms.map(rfc3339),
        "share_token_prefix": share.as_ref().map(|g| s.grants.token(g).chars().take(16).collect::<String>()),
        "share_token_expires_at": share.as_ref().and_then(|g| g.expires_at_ms).map(rfc3339),
        "external_user_id": sandbox.external_user_id,
        "external_project_id": sandbox.external_project_id,
        "external_workspace_id": sandbox.external_workspace_id,
        "metadata": {},
        "created_at": rfc3339(preview.created_at_ms),
        "updated_at": rfc3339(preview.revoked_at_ms.unwrap_or(preview.created_at_ms)),
    })
}

/// The live preview `pid` of sandbox `id`.
fn find_preview(s: &AppState, id: &str, pid: &str) -> Result<Grant, ApiError> {
    s.grants
        .get(pid)
        .filter(|g| {
            g.audience == Audience::Preview && g.sandbox_id == id && g.revoked_at_ms.is_none()
        })
        .ok_or_else(|| not_found_preview(pid))
}

/// `POST /sandboxes/{id}/previews`: a standing URL for a port, until the preview is deleted.
pub async fn create_preview(
    State(s): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<PreviewBody>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let sandbox = s.host.live(&id)?.snapshot();
    let Some(p) = body.port else {
        return Err(ApiError::invalid("invalid_port", "`port` is required"));
    };
    let visibility = match body.visibility.as_deref() {
        None | Some("public") => "public",
        Some("private") => "private",
        Some(_) => {
            return Err(ApiError::invalid(
                "invalid_visibility",
                "`visibility` is `public` or `private`",
            ));
        }
    };
    let mut grant = Grant::new(
        Audience::Preview,
        &id,
        port(Some(p), &sandbox)?,
        Scope::Interact,
    );
    grant.name = body.name.filter(|n| !n.trim().is_empty());
    grant.visibility = Some(visibility.to_string());
    grant.preview_id = Some(grant.id.clone());
    let request = format!("{}|{visibility}|{:?}", grant.port, grant.name);
    let grant = saved_once(grant, &s, &headers, request)?;
    Ok((
        StatusCode::CREATED,
        Json(json!({ "data": preview_view(&s, &sandbox, &grant) })),
    ))
}

pub async fn list_previews(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let sandbox = s.host.get(&id)?.snapshot();
    let previews: Vec<Value> = s
        .grants
        .list(|g| {
            g.audience == Audience::Preview && g.sandbox_id == id && g.revoked_at_ms.is_none()
        })
        .iter()
        .map(|g| preview_view(&s, &sandbox, g))
        .collect();
    Ok(Json(json!({ "data": previews })))
}

pub async fn get_preview(
    State(s): State<AppState>,
    Path((id, pid)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    let sandbox = s.host.get(&id)?.snapshot();
    let preview = find_preview(&s, &id, &pid)?;
    Ok(Json(
        json!({ "data": preview_view(&s, &sandbox, &preview) }),
    ))
}

/// `DELETE …/previews/{pid}`: the preview's URL and every share of it stop working.
pub async fn delete_preview(
    State(s): State<AppState>,
    Path((id, pid)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    s.host.get(&id)?;
    find_preview(&s, &id, &pid)?;
    s.grants
        .revoke(|g| g.preview_id.as_deref() == Some(pid.as_str()))
        .map_err(|e| ApiError::internal(format!("saving the grants: {e}")))?;
    Ok(Json(json!({ "data": { "id": pid, "deleted": true } })))
}

/// Both spellings the SDKs send (TS/PY `ttl_seconds`, GO/EX `expires_in_sec`).
#[derive(Deserialize)]
pub struct PreviewShareBody {
    ttl_seconds: Option<i64>,
    expires_in_sec: Option<i64>,
}

/// `POST …/previews/{pid}/share`: a public link to the preview; the token is shown once.
pub async fn share_preview(
    State(s): State<AppState>,
    Path((id, pid)): Path<(String, String)>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<PreviewShareBody>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let sandbox = s.host.live(&id)?.snapshot();
    let preview = find_preview(&s, &id, &pid)?;
    if let (Some(a), Some(b)) = (body.ttl_seconds, body.expires_in_sec)
        && a != b
    {
        return Err(ApiError::invalid(
            "invalid_expires_in",
            "`ttl_seconds` and `expires_in_sec` disagree",
        ));
    }
    let ttl = ttl(
        body.ttl_seconds.or(body.expires_in_sec),
        MAX_SHARE_TTL_SEC,
        "ttl_seconds",
    )?;
    let mut grant = Grant::new(Audience::PreviewShare, &id, preview.port, Scope::Read);
    grant.preview_id = Some(pid.clone());
    grant.expires_at_ms = Some(now_ms() + ttl as i64 * 1000);
    let grant = saved_once(grant, &s, &headers, format!("{pid}|{ttl}"))?;
    let token = s.grants.token(&grant);
    let share_url = s
        .edge
        .url(&s.grants.host_label(&grant), "preview_token", &token);
    let view = preview_view(&s, &sandbox, &preview);
    Ok((
        StatusCode::CREATED,
        Json(json!({
            "data": view,
            "preview": view,
            "preview_token": token,
            "share_url": share_url,
            "share_id": grant.id,
            "expires_at": grant.expires_at_ms.map(rfc3339),
        })),
    ))
}

/// `DELETE …/previews/{pid}/share`: revokes every share of the preview (not the preview).
pub async fn revoke_preview_shares(
    State(s): State<AppState>,
    Path((id, pid)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    s.host.get(&id)?;
    find_preview(&s, &id, &pid)?;
    let revoked = s
        .grants
        .revoke(|g| {
            g.audience == Audience::PreviewShare && g.preview_id.as_deref() == Some(pid.as_str())
        })
        .map_err(|e| ApiError::internal(format!("saving the grants: {e}")))?;
    Ok(Json(
        json!({ "data": { "preview_id": pid, "revoked": revoked.len() } }),
    ))
}

#[derive(Deserialize)]
pub struct ShareBody {
    expires_in: Option<i64>,
    scope: Option<String>,
    port: Option<i64>,
}

fn share_view(grant: &Grant) -> Value {
    json!({
        "share_id": grant.id,
        "id": grant.id,
        "sandbox_id": grant.sandbox_id,
        "port": grant.port,
        "scope": grant.scope.as_str(),
        "expires_at": grant.expires_at_ms.map(rfc3339),
        "created_at": rfc3339(grant.created_at_ms),
    })
}

/// `POST /sandboxes/{id}/shares`: a public read-only link to the sandbox's app.
pub async fn create_share(
    State(s): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<ShareBody>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let sandbox = s.host.live(&id)?.snapshot();
    if body.scope.as_deref().is_some_and(|x| x != "read") {
        return Err(ApiError::invalid(
            "invalid_scope",
            "a sandbox share is read-only: `scope` is `read`",
        ));
    }
    let ttl = ttl(body.expires_in, MAX_SHARE_TTL_SEC, "expires_in")?;
    let mut grant = Grant::new(
        Audience::SandboxShare,
        &id,
        port(body.port, &sandbox)?,
        Scope::Read,
    );
    grant.expires_at_ms = Some(now_ms() + ttl as i64 * 1000);
    let request = format!("{}|{ttl}", grant.port);
    let grant = saved_once(grant, &s, &headers, request)?;
    let token = s.grants.token(&grant);
    let mut view = share_view(&grant);
    view["share_url"] = json!(s.edge.url(&s.grants.host_label(&grant), "ms", &token));
    view["token"] = json!(token);
    Ok((StatusCode::CREATED, Json(view)))
}

/// `GET /sandboxes/{id}/shares`: the active shares (their links are not shown again).
pub async fn list_shares(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    s.host.get(&id)?;
    let now = now_ms();
    let shares: Vec<Value> = s
        .grants
        .list(|g| g.audience == Audience::SandboxShare && g.sandbox_id == id && g.active(now))
        .iter()
        .map(share_view)
        .collect();
    Ok(Json(json!({ "data": shares })))
}

/// `DELETE /sandboxes/{id}/shares/{share_id}`: that link answers 403 from now on.
pub async fn revoke_share(
    State(s): State<AppState>,
    Path((id, share_id)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    s.host.get(&id)?;
    let known = s
        .grants
        .get(&share_id)
        .is_some_and(|g| g.audience == Audience::SandboxShare && g.sandbox_id == id);
    if !known {
        return Err(ApiError::not_found(
            "share_not_found",
            format!("share `{share_id}` not found"),
        ));
    }
    s.grants
        .revoke(|g| g.id == share_id)
        .map_err(|e| ApiError::internal(format!("saving the grants: {e}")))?;
    Ok(StatusCode::NO_CONTENT)
}
