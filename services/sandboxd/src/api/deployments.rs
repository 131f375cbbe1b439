//! `POST /sandboxes/{id}/deploy` and `/deployments`: deploy as a job, versions, logs, rollback
//! and promote (see `crate::deployments`).

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::extract::JsonBody;
use super::{ApiError, AppState};
use crate::clock::rfc3339;
use crate::deployments::{Begin, Deployment, Runtime, Version, VersionState};
use crate::host::hex;
use crate::store;

/// The body of a deploy, with the aliases the SDKs send.
#[derive(Debug, Default, Deserialize, Serialize)]
pub struct DeployBody {
    name: Option<String>,
    deployment_id: Option<String>,
    output_path: Option<String>,
    path: Option<String>,
    source_path: Option<String>,
    entrypoint: Option<String>,
    build_command: Option<String>,
    run_command: Option<String>,
    start_command: Option<String>,
    port: Option<u16>,
    #[serde(rename = "type")]
    kind: Option<String>,
    mode: Option<String>,
    deployment_type: Option<String>,
}

#[derive(Serialize, Deserialize)]
struct DeployKey {
    body_sha256: String,
    deployment_id: String,
    version_id: String,
}

pub fn deployment_view(s: &AppState, d: &Deployment) -> Value {
    let versions = s.deployments.versions(&d.id);
    let active = d
        .active_version_id
        .as_ref()
        .and_then(|a| versions.iter().find(|v| &v.id == a));
    let state = if active.is_some() {
        "running"
    } else if versions.iter().any(|v| v.state == VersionState::Building) {
        "building"
    } else if !versions.is_empty() {
        "failed"
    } else {
        "pending"
    };
    let url = s.edge.app_url(&d.slug);
    json!({
        "id": d.id,
        "tenant_id": "local",
        "name": d.name,
        "slug": d.slug,
        "state": state,
        "active_version_id": d.active_version_id,
        "active_release_id": null,
        "running_artifact_sha256": active.and_then(|v| v.artifact_sha256.clone()),
        "public_url": url,
        "url": url,
        "auto_subdomain": d.slug,
        "deployment_product": "miosa_deploy",
        "source_type": "sandbox",
        "source_sandbox_id": d.source_sandbox_id,
        "external_user_id": d.external_user_id,
        "external_project_id": d.external_project_id,
        "external_workspace_id": d.external_workspace_id,
        "metadata": {},
        "created_at": rfc3339(d.created_at_ms),
        "updated_at": rfc3339(d.updated_at_ms),
    })
}

pub fn version_view(v: &Version) -> Value {
    json!({
        "id": v.id,
        "deployment_id": v.deployment_id,
        "tenant_id": "local",
        "version_number": v.version_number,
        "kind": if v.runtime.is_some() { "dynamic" } else { "static" },
        "runtime_command": v.runtime.as_ref().map(|r| r.command.clone()),
        "runtime_port": v.runtime.as_ref().map(|r| r.port),
        "state": v.state.as_str(),
        "source_sandbox_id": v.source_sandbox_id,
        "build_command": v.build_command,
        "output_path": v.output_path,
        "entrypoint": v.entrypoint,
        "artifact_sha256": v.artifact_sha256,
        "artifact_uri": v.artifact_sha256.as_ref().map(|d| format!("sandboxd://artifacts/{d}")),
        "artifact_manifest": { "files": v.artifact_files, "bytes": v.artifact_bytes, "entrypoint": v.entrypoint },
        "build_log_uri": format!("/api/v1/deployments/{}/versions/{}/logs", v.deployment_id, v.id),
        "error": v.error,
        "metadata": {},
        "promoted_at": null,
        "archived_at": null,
        "created_at": rfc3339(v.created_at_ms),
        "updated_at": rfc3339(v.finished_at_ms.unwrap_or(v.created_at_ms)),
    })
}

fn deploy_reply(s: &AppState, d: &Deployment, v: &Version) -> Json<Value> {
    let url = s.edge.app_url(&d.slug);
    Json(json!({ "data": {
        "deployment": deployment_view(s, d),
        "version": version_view(v),
        "deployment_id": d.id,
        "version_id": v.id,
        "state": v.state.as_str(),
        "url": url,
        "public_url": url,
        "deployment_product": "miosa_deploy",
    }}))
}

/// `POST /sandboxes/{id}/deploy`: answers at once; the build goes on in the background.
pub async fn deploy(
    State(s): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<DeployBody>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    if body.deployment_type.as_deref() == Some("docker_deploy") {
        return Err(ApiError::invalid(
            "docker_deploy_not_supported",
            "sandboxd deploys static output or a run_command with a port; docker_deploy needs \
             MIOSA cloud",
        ));
    }
    // A run command (and its port) makes the deployment dynamic.
    let command = body
        .run_command
        .clone()
        .or(body.start_command.clone())
        .filter(|c| !c.trim().is_empty());
    let wants_server = matches!(
        body.kind.as_deref().or(body.mode.as_deref()),
        Some("dynamic" | "server")
    );
    let runtime = match (command, body.port) {
        (Some(command), Some(port)) if port > 0 && !command.contains('\0') => {
            Some(Runtime { command, port })
        }
        (None, None) if !wants_server => None,
        _ => {
            return Err(ApiError::invalid(
                "invalid_runtime",
                "a dynamic deployment needs both `run_command` and `port` (1 to 65535)",
            ));
        }
    };
    let output_path = body
        .output_path
        .clone()
        .or(body.path.clone())
        .or(body.source_path.clone())
        .unwrap_or_else(|| crate::paths::WORKSPACE.into());
    let entrypoint = body.entrypoint.clone().unwrap_or_else(|| {
        if runtime.is_some() {
            String::new()
        } else {
            "index.html".into()
        }
    });
    if (entrypoint.is_empty() && runtime.is_none())
        || entrypoint.starts_with('/')
        || (!entrypoint.is_empty()
            && entrypoint
                .split('/')
                .any(|p| p.is_empty() || p == "." || p == ".."))
        || entrypoint.contains('\0')
    {
        return Err(ApiError::invalid(
            "invalid_entrypoint",
            "`entrypoint` is a relative file path inside the output, like `index.html`",
        ));
    }
    if let Some(cmd) = &body.build_command
        && (cmd.trim().is_empty() || cmd.contains('\0'))
    {
        return Err(ApiError::invalid(
            "invalid_build_command",
            "`build_command` is a non-empty shell command",
        ));
    }
    let entry = s.host.live(&id)?;
    let resolved = crate::paths::resolve(&entry.workspace(), &output_path)
        .map_err(|e| ApiError::new(StatusCode::FORBIDDEN, "FORBIDDEN_PATH", e.to_string()))?;
    if let Some(existing) = &body.deployment_id {
        s.deployments.get(existing)?;
    }

    // The same Idempotency-Key and body: the same deployment and version, not a second build.
    let key_path = super::extract::idempotency_key(&headers)?.map(|k| {
        s.host.data_dir().join("idempotency").join(format!(
            "deploy-{}.json",
            hex(&Sha256::digest(k.as_bytes()))
        ))
    });
    let body_sha256 = hex(&Sha256::digest(
        serde_json::to_vec(&(&id, &body)).unwrap_or_default(),
    ));
    if let Some(path) = &key_path
        && let Some(seen) =
            store::read_json::<DeployKey>(path).map_err(|e| ApiError::internal(e.to_string()))?
    {
        if seen.body_sha256 != body_sha256 {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "idempotency_key_reused",
                "this Idempotency-Key was used with a different request body",
            ));
        }
        let d = s.deployments.get(&seen.deployment_id)?;
        let v = s
            .deployments
            .version(&seen.deployment_id, &seen.version_id)?;
        return Ok((StatusCode::OK, deploy_reply(&s, &d, &v)));
    }

    let begin = Begin {
        name: body.name.clone().filter(|n| !n.trim().is_empty()),
        deployment_id: body.deployment_id.clone(),
        build_command: body.build_command.clone(),
        output_path: resolved.sandbox_path(),
        entrypoint,
        runtime,
    };
    // Taken before the answer, so a destroy sent right after it waits for the build.
    let building = entry.builds.clone().read_owned().await;
    let (d, v) = s.deployments.begin(&begin, &entry.snapshot())?;
    if let Some(path) = &key_path {
        store::write_json(
            path,
            &DeployKey {
                body_sha256,
                deployment_id: d.id.clone(),
                version_id: v.id.clone(),
            },
        )
        .map_err(|e| ApiError::internal(e.to_string()))?;
    }
    let (host, deployments, version) = (s.host.clone(), s.deployments.clone(), v.clone());
    tokio::spawn(async move {
        let done = Arc::clone(&host)
            .build_version(deployments, entry, version, building)
            .await;
        tracing::info!(version = %done.id, state = done.state.as_str(), "deploy build finished");
    });
    Ok((StatusCode::CREATED, deploy_reply(&s, &d, &v)))
}

pub async fn list(State(s): State<AppState>) -> Json<Value> {
    let all: Vec<Value> = s
        .deployments
        .list()
        .iter()
        .map(|d| deployment_view(&s, d))
        .collect();
    Json(json!({ "data": all }))
}

pub async fn get(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let d = s.deployments.get(&id)?;
    Ok(Json(json!({ "data": deployment_view(&s, &d) })))
}

/// `DELETE /deployments/{id}` (MIOSA's): stops serving it at once; 204.
pub async fn delete(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> Result<axum::http::StatusCode, ApiError> {
    for sandbox in s.deployments.delete(&id)? {
        if let Ok(entry) = s.host.live(&sandbox)
            && let Err(e) = s.host.destroy(&entry).await
        {
            tracing::warn!(%sandbox, error = %e.message, "destroying a deleted deployment's runtime");
        }
    }
    Ok(axum::http::StatusCode::NO_CONTENT)
}

pub async fn versions(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    s.deployments.get(&id)?;
    let all: Vec<Value> = s
        .deployments
        .versions(&id)
        .iter()
        .map(version_view)
        .collect();
    Ok(Json(json!({ "data": all })))
}

pub async fn version(
    State(s): State<AppState>,
    Path((id, vid)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    let v = s.deployments.version(&id, &vid)?;
    Ok(Json(json!({ "data": version_view(&v) })))
}

/// The build log as plain text (empty while the build has written nothing).
pub async fn version_logs(
    State(s): State<AppState>,
    Path((id, vid)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let v = s.deployments.version(&id, &vid)?;
    let log = std::fs::read_to_string(s.deployments.log_path(&v)).unwrap_or_default();
    Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], log).into_response())
}

#[derive(Deserialize)]
pub struct VersionBody {
    version_id: Option<String>,
}

/// Re-points the deployment at an earlier version (the one before the served one by default).
pub async fn rollback(
    State(s): State<AppState>,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<VersionBody>,
) -> Result<Json<Value>, ApiError> {
    let vid = match body.version_id {
        Some(v) => v,
        None => s.deployments.previous_ready(&id)?.id,
    };
    let d = s.deployments.point(&id, &vid)?;
    Ok(Json(json!({ "data": deployment_view(&s, &d) })))
}

pub async fn promote(
    State(s): State<AppState>,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<VersionBody>,
) -> Result<Json<Value>, ApiError> {
    let Some(vid) = body.version_id else {
        return Err(ApiError::invalid(
            "invalid_version",
            "`version_id` is required",
        ));
    };
    let d = s.deployments.point(&id, &vid)?;
    Ok(Json(json!({ "data": deployment_view(&s, &d) })))
}

pub async fn promote_version(
    State(s): State<AppState>,
    Path((id, vid)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    let d = s.deployments.point(&id, &vid)?;
    Ok(Json(json!({ "data": deployment_view(&s, &d) })))
}
