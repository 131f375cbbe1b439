//! Sandbox lifecycle beyond create/get/list/destroy: update, pause, resume, readiness,
//! templates, fork, and reap (by run, or every sandbox past its limits).

use reqwest::Method;
use serde_json::{Value, json};
use slipway_common::ServiceError;
use slipway_proto::v1::{
    ForkSandboxRequest, ListTemplatesReply, ListTemplatesRequest, ReadinessReply, ReadinessRequest,
    ReapReply, ReapRequest, SandboxRef, SandboxReply, SandboxState, Template, UpdateSandboxRequest,
};

use super::{Executor, platform_error, required, resource};
use crate::convert::{self, BRANCH_KEY, CREATED_BY_KEY, RUN_KEY};

impl Executor {
    pub async fn update(&self, req: UpdateSandboxRequest) -> Result<SandboxReply, ServiceError> {
        resource("sandbox_id", &req.sandbox_id)?;
        required("idempotency_key", &req.idempotency_key)?;
        let mut patch = json!({});
        if let Some(v) = req.always_on {
            patch["always_on"] = json!(v);
        }
        if let Some(v) = req.timeout_sec {
            patch["timeout_sec"] = json!(v);
        }
        if let Some(v) = req.idle_timeout_sec {
            patch["idle_timeout_sec"] = json!(v);
        }
        if let Some(v) = &req.name {
            patch["name"] = json!(v);
        }
        if !req.metadata.is_empty() {
            patch["metadata"] = json!(req.metadata);
        }
        if patch.as_object().is_some_and(serde_json::Map::is_empty) {
            return Err(ServiceError::invalid_input("nothing to update"));
        }
        let updated = self
            .client
            .update_sandbox(&req.sandbox_id, patch, &req.idempotency_key)
            .await
            .map_err(platform_error)?;
        let sandbox = convert::sandbox(&updated);
        self.remember(&sandbox, &req.idempotency_key).await?;
        Ok(SandboxReply {
            sandbox: Some(sandbox),
        })
    }

    async fn lifecycle(
        &self,
        req: SandboxRef,
        action: &'static str,
    ) -> Result<SandboxReply, ServiceError> {
        resource("sandbox_id", &req.sandbox_id)?;
        required("idempotency_key", &req.idempotency_key)?;
        self.client
            .lifecycle(&req.sandbox_id, action, &req.idempotency_key)
            .await
            .map_err(platform_error)?;
        let got = self
            .client
            .get_sandbox(&req.sandbox_id)
            .await
            .map_err(platform_error)?;
        let sandbox = convert::sandbox(&got);
        self.remember(&sandbox, &req.idempotency_key).await?;
        Ok(SandboxReply {
            sandbox: Some(sandbox),
        })
    }

    pub async fn pause(&self, req: SandboxRef) -> Result<SandboxReply, ServiceError> {
        self.lifecycle(req, "pause").await
    }

    pub async fn resume(&self, req: SandboxRef) -> Result<SandboxReply, ServiceError> {
        self.lifecycle(req, "resume").await
    }

    /// Polls the platform's readiness until ready or `wait_ms` passes.
    pub async fn readiness(&self, req: ReadinessRequest) -> Result<ReadinessReply, ServiceError> {
        resource("sandbox_id", &req.sandbox_id)?;
        let deadline = tokio::time::Instant::now()
            + std::time::Duration::from_millis(req.wait_ms.min(300_000));
        loop {
            let got = self
                .client
                .get_sandbox(&req.sandbox_id)
                .await
                .map_err(platform_error)?;
            let sandbox = convert::sandbox(&got);
            let ready = got
                .get("ready")
                .and_then(Value::as_bool)
                .unwrap_or(sandbox.state == i32::from(SandboxState::Running));
            if ready || tokio::time::Instant::now() >= deadline {
                return Ok(ReadinessReply {
                    ready,
                    state: sandbox.state,
                    detail: got
                        .get("status")
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_string(),
                });
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }

    pub async fn templates(
        &self,
        _req: ListTemplatesRequest,
    ) -> Result<ListTemplatesReply, ServiceError> {
        let got = self
            .platform_get("templates.list", "/sandbox-templates".into(), vec![])
            .await?;
        let items = super::items(&got, &["data", "templates"]);
        let text = |v: &Value, k: &str| v.get(k).and_then(Value::as_str).unwrap_or("").to_string();
        Ok(ListTemplatesReply {
            default_template_id: got
                .get("default_template_id")
                .and_then(Value::as_str)
                .unwrap_or("miosa-sandbox")
                .to_string(),
            templates: items
                .iter()
                .map(|t| Template {
                    id: text(t, "id"),
                    name: text(t, "name"),
                    workdir: text(t, "workdir"),
                    preview_port: t
                        .get("preview_port")
                        .and_then(Value::as_u64)
                        .and_then(|p| u32::try_from(p).ok())
                        .unwrap_or(0),
                    install_command: text(t, "install_command"),
                    start_command: text(t, "start_command"),
                    readiness_url: t
                        .get("readiness_probe")
                        .map(|p| text(p, "url"))
                        .unwrap_or_default(),
                })
                .collect(),
        })
    }

    /// An independent sandbox from the live one or a snapshot, recorded like a create.
    pub async fn fork(&self, req: ForkSandboxRequest) -> Result<SandboxReply, ServiceError> {
        resource("sandbox_id", &req.sandbox_id)?;
        required("idempotency_key", &req.idempotency_key)?;
        let mut metadata: serde_json::Map<String, Value> = req
            .metadata
            .iter()
            .map(|(k, v)| (k.clone(), json!(v)))
            .collect();
        if !req.run_id.is_empty() {
            metadata.insert(RUN_KEY.into(), json!(req.run_id));
        }
        if !req.branch.is_empty() {
            metadata.insert(BRANCH_KEY.into(), json!(req.branch));
        }
        metadata.insert(CREATED_BY_KEY.into(), json!(req.idempotency_key));
        let mut body = json!({ "metadata": metadata });
        if !req.snapshot_id.is_empty() {
            body["snapshot_id"] = json!(req.snapshot_id);
        }
        if !req.name.is_empty() {
            body["name"] = json!(req.name);
        }
        super::attribute(&mut body, req.attribution.as_ref());
        let forked = self
            .client
            .request(
                "sandbox.fork",
                Method::POST,
                format!("/sandboxes/{}/fork", req.sandbox_id),
                vec![],
                Some(body),
                Some(&req.idempotency_key),
            )
            .await
            .map_err(platform_error)?;
        let forked = forked.get("sandbox").cloned().unwrap_or(forked);
        let sandbox = convert::sandbox(&forked);
        if sandbox.id.is_empty() {
            return Err(ServiceError::unavailable(
                "the platform's fork answer has no sandbox id",
            ));
        }
        self.remember(&sandbox, &req.idempotency_key).await?;
        self.count_created(&sandbox, &req.idempotency_key).await?;
        Ok(SandboxReply {
            sandbox: Some(sandbox),
        })
    }

    /// Destroys the run's sandboxes, or (without a run) every sandbox the registry knows that
    /// is past its timeout at the platform. Sandboxes are found at the platform, so one created
    /// but never recorded is reaped too (and recorded as destroyed).
    pub async fn reap(&self, req: ReapRequest) -> Result<ReapReply, ServiceError> {
        let all = self
            .client
            .list_sandboxes(&[])
            .await
            .map_err(platform_error)?;
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let mut destroyed = Vec::new();
        for v in &all {
            let s = convert::sandbox(v);
            if s.state == i32::from(SandboxState::Destroyed) || s.id.is_empty() {
                continue;
            }
            let chosen = if req.run_id.is_empty() {
                // Past its limit: a timeout whose remaining time ran out.
                let remaining = v.get("timeout_remaining_ms").and_then(Value::as_i64);
                let expired_at = v
                    .get("expires_at")
                    .and_then(|e| convert::timestamp(Some(e)))
                    .map(|t| t.seconds);
                !s.always_on
                    && !s.run_id.is_empty()
                    && (remaining == Some(0) || expired_at.is_some_and(|t| t <= now))
            } else {
                s.run_id == req.run_id
            };
            if !chosen {
                continue;
            }
            if !req.dry_run {
                let key = format!("reap:{}", s.id);
                self.client
                    .destroy_sandbox(&s.id, &key)
                    .await
                    .map_err(platform_error)?;
                let gone = slipway_proto::v1::Sandbox {
                    state: SandboxState::Destroyed.into(),
                    ..s.clone()
                };
                self.remember(&gone, &key).await?;
            }
            destroyed.push(s.id);
        }
        Ok(ReapReply { destroyed })
    }
}
