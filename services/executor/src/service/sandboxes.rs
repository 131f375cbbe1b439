//! Sandbox lifecycle beyond create/get/list/destroy: update, pause, resume, readiness,
//! templates, fork, and reap (by run, or every sandbox past its limits).

use reqwest::Method;
use serde_json::{Value, json};
use slipway_common::ServiceError;
use slipway_proto::v1::{
    ExtendSandboxRequest, ForkSandboxRequest, ListTemplatesReply, ListTemplatesRequest,
    ReadinessReply, ReadinessRequest, ReapReply, ReapRequest, SandboxRef, SandboxReply,
    SandboxState, Template, UpdateSandboxRequest,
};

use super::{Executor, platform_error, required, resource};

/// Slipway's metadata on a sandbox made for a run: the caller's, then the run, branch and the
/// key that made it (so a sandbox made just before a crash is found and adopted).
pub(crate) fn slipway_metadata(
    run_id: &str,
    branch: &str,
    extra: &std::collections::HashMap<String, String>,
    key: &str,
) -> serde_json::Map<String, Value> {
    let mut metadata: serde_json::Map<String, Value> =
        extra.iter().map(|(k, v)| (k.clone(), json!(v))).collect();
    if !run_id.is_empty() {
        metadata.insert(RUN_KEY.into(), json!(run_id));
    }
    if !branch.is_empty() {
        metadata.insert(BRANCH_KEY.into(), json!(branch));
    }
    metadata.insert(CREATED_BY_KEY.into(), json!(key));
    metadata
}

/// Longest activity timeout a sandbox may be given: 30 days.
const MAX_TIMEOUT_SEC: u64 = 30 * 86_400;
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

    /// A lifecycle action. The platform answers with the sandbox; an answer without its
    /// attribution or metadata may be partial (the SDKs merge it into what they hold), so the
    /// sandbox is then read again rather than recorded without its end user or run.
    async fn lifecycle(
        &self,
        sandbox_id: &str,
        idempotency_key: &str,
        action: &'static str,
        body: Value,
    ) -> Result<SandboxReply, ServiceError> {
        resource("sandbox_id", sandbox_id)?;
        required("idempotency_key", idempotency_key)?;
        let answer = self
            .client
            .lifecycle(sandbox_id, action, body, idempotency_key)
            .await
            .map_err(platform_error)?;
        let whole = answer
            .get("id")
            .and_then(crate::miosa::decode::string_or_number)
            .is_some()
            && answer.get("metadata").is_some_and(Value::is_object)
            && answer.get("external_user_id").is_some();
        let got = match whole {
            true => answer,
            false => self
                .client
                .get_sandbox(sandbox_id)
                .await
                .map_err(platform_error)?,
        };
        let sandbox = convert::sandbox(&got);
        self.remember(&sandbox, idempotency_key).await?;
        Ok(SandboxReply {
            sandbox: Some(sandbox),
        })
    }

    pub async fn pause(&self, req: SandboxRef) -> Result<SandboxReply, ServiceError> {
        self.lifecycle(&req.sandbox_id, &req.idempotency_key, "pause", json!({}))
            .await
    }

    /// Resumes, then (in the background, so the reply does not wait for the sandbox to be
    /// command-ready) relaunches the processes started with `restart_on_resume` that are gone:
    /// MIOSA keeps no processes across a pause or stop.
    pub async fn resume(&self, req: SandboxRef) -> Result<SandboxReply, ServiceError> {
        let reply = self
            .lifecycle(&req.sandbox_id, &req.idempotency_key, "resume", json!({}))
            .await?;
        if self
            .record(&req.sandbox_id)
            .await?
            .is_some_and(|r| !r.restart.is_empty())
        {
            let first = self
                .relaunching
                .lock()
                .map(|mut set| set.insert(req.sandbox_id.clone()))
                .unwrap_or(false);
            if first {
                let mut background = Executor::new(self.client.background(), self.nats.clone());
                background.relaunching = self.relaunching.clone();
                tokio::spawn(async move {
                    if let Err(e) = background
                        .relaunch(&req.sandbox_id, &req.idempotency_key)
                        .await
                    {
                        tracing::warn!(sandbox_id = %req.sandbox_id, error = %e,
                            "relaunching after a resume");
                    }
                    if let Ok(mut set) = background.relaunching.lock() {
                        set.remove(&req.sandbox_id);
                    }
                });
            }
        }
        Ok(reply)
    }

    /// `POST /stop`: the disk is kept, processes are not.
    pub async fn stop(&self, req: SandboxRef) -> Result<SandboxReply, ServiceError> {
        self.lifecycle(&req.sandbox_id, &req.idempotency_key, "stop", json!({}))
            .await
    }

    /// `POST /extend`: `{timeout_sec}`, or `{}` to restart the deadline with the current timeout.
    pub async fn extend(&self, req: ExtendSandboxRequest) -> Result<SandboxReply, ServiceError> {
        let body = match req.timeout_sec {
            Some(t) if t == 0 || t > MAX_TIMEOUT_SEC => {
                return Err(ServiceError::invalid_input(format!(
                    "timeout_sec: 1 to {}",
                    MAX_TIMEOUT_SEC
                )));
            }
            Some(t) => json!({ "timeout_sec": t }),
            None => json!({}),
        };
        self.lifecycle(&req.sandbox_id, &req.idempotency_key, "extend", body)
            .await
    }

    /// Starts again each recorded restartable process whose name the platform no longer lists
    /// as running, once the sandbox is command-ready. The start's key derives from the
    /// resume's, so a retried resume starts each at most once. A process that cannot be started
    /// is logged and left for the next resume: the resume itself happened.
    async fn relaunch(&self, sandbox_id: &str, key: &str) -> Result<(), ServiceError> {
        let Some(record) = self.record(sandbox_id).await? else {
            return Ok(());
        };
        if record.restart.is_empty() {
            return Ok(());
        }
        let ready = self
            .readiness(ReadinessRequest {
                sandbox_id: sandbox_id.to_string(),
                wait_ms: 30_000,
            })
            .await?;
        if !ready.ready {
            tracing::warn!(
                sandbox_id,
                "not command-ready after a resume: nothing relaunched"
            );
            return Ok(());
        }
        let listed = self
            .platform_get(
                "process.list",
                format!("/sandboxes/{sandbox_id}/processes"),
                vec![],
            )
            .await?;
        let running: Vec<String> = super::items(&listed, &["processes"])
            .iter()
            .map(convert::process)
            .filter(|p| p.state == i32::from(slipway_proto::v1::ProcessState::Running))
            .map(|p| p.name)
            .collect();
        for spec in record.restart.iter().filter(|s| !running.contains(&s.name)) {
            let key = format!("{key}:relaunch:{}", spec.name);
            let body =
                super::workspace::process_body(&spec.command, &spec.cwd, &spec.env, &spec.name);
            let started = self
                .client
                .request(
                    "process.start",
                    Method::POST,
                    format!("/sandboxes/{sandbox_id}/processes"),
                    vec![],
                    Some(body),
                    Some(&key),
                )
                .await;
            match started {
                Ok(answer) => {
                    tracing::info!(sandbox_id, process = %spec.name, "relaunched after a resume");
                    // A later stop names the new process.
                    let id = convert::process(&answer).id;
                    self.modify_record(sandbox_id, |record| {
                        for s in record.restart.iter_mut().filter(|s| s.name == spec.name) {
                            s.process_id = id.clone();
                        }
                    })
                    .await?;
                }
                Err(e) => tracing::warn!(
                    sandbox_id, process = %spec.name, error = %e,
                    "could not relaunch after a resume"
                ),
            }
        }
        Ok(())
    }

    /// Polls the platform's `GET /readiness` until the sandbox is command-ready or `wait_ms`
    /// passes (`ready: true`, `status: "ready"`, or every component ready, as the SDKs read it).
    pub async fn readiness(&self, req: ReadinessRequest) -> Result<ReadinessReply, ServiceError> {
        resource("sandbox_id", &req.sandbox_id)?;
        let deadline = tokio::time::Instant::now()
            + std::time::Duration::from_millis(req.wait_ms.min(300_000));
        loop {
            let got = self
                .platform_get(
                    "sandbox.readiness",
                    format!("/sandboxes/{}/readiness", req.sandbox_id),
                    vec![],
                )
                .await?;
            let ready = convert::is_ready(&got);
            if ready || tokio::time::Instant::now() >= deadline {
                // MIOSA's readiness answer may not carry the state: read the sandbox for it.
                let stated = convert::sandbox(&got).state;
                let state = match stated != i32::from(SandboxState::Unspecified) {
                    true => stated,
                    false => {
                        let sandbox = self
                            .client
                            .get_sandbox(&req.sandbox_id)
                            .await
                            .map_err(platform_error)?;
                        convert::sandbox(&sandbox).state
                    }
                };
                return Ok(ReadinessReply {
                    ready,
                    state,
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

    /// An independent sandbox from the live one or a snapshot, recorded like a create. The body
    /// is what the Python SDK sends (`snapshot_id`, `name`, `metadata`, `external_user_id`);
    /// the run, branch and creating key go in `metadata`, where MIOSA keeps caller data. A
    /// platform that takes only the public body (`timeout_sec`, `template_id`, `snapshot_id`)
    /// answers without them: the fork is then recorded and counted first, and they are written
    /// with `PATCH`. A retry with the same key gets the same fork and checks it again.
    pub async fn fork(&self, req: ForkSandboxRequest) -> Result<SandboxReply, ServiceError> {
        resource("sandbox_id", &req.sandbox_id)?;
        required("idempotency_key", &req.idempotency_key)?;
        if !req.snapshot_id.is_empty() {
            resource("snapshot_id", &req.snapshot_id)?;
        }
        let attribution = req.attribution.clone().unwrap_or_default();
        if !attribution.project_id.is_empty() || !attribution.workspace_id.is_empty() {
            self.check_parent_attribution(&req.sandbox_id, &attribution)
                .await?;
        }
        let metadata = slipway_metadata(
            &req.run_id,
            &req.branch,
            &req.metadata,
            &req.idempotency_key,
        );
        let mut body = json!({ "metadata": metadata });
        if !req.snapshot_id.is_empty() {
            body["snapshot_id"] = json!(req.snapshot_id);
        }
        if !req.name.is_empty() {
            body["name"] = json!(req.name);
        }
        if !attribution.user_id.is_empty() {
            body["external_user_id"] = json!(attribution.user_id);
        }
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
        let mut sandbox = convert::sandbox(&forked);
        if sandbox.id.is_empty() {
            return Err(ServiceError::unavailable(
                "the platform's fork answer has no sandbox id",
            ));
        }
        let kept = forked.get("metadata");
        let named =
            req.name.is_empty() || forked.get("name").and_then(Value::as_str) == Some(&req.name);
        let tagged = metadata
            .iter()
            .all(|(k, v)| kept.and_then(|m| m.get(k)) == Some(v));
        if !(named && tagged) {
            // Recorded first, so a crash before the PATCH leaves a sandbox the registry knows.
            sandbox.run_id = req.run_id.clone();
            sandbox.branch = req.branch.clone();
            self.remember(&sandbox, &req.idempotency_key).await?;
            self.count_created(&sandbox).await?;
            let patched = self
                .tag(
                    &sandbox.id,
                    kept,
                    &metadata,
                    &req.name,
                    &req.idempotency_key,
                    "sandbox.fork",
                )
                .await?;
            sandbox = convert::sandbox(&patched);
        }
        self.remember(&sandbox, &req.idempotency_key).await?;
        self.count_created(&sandbox).await?;
        Ok(SandboxReply {
            sandbox: Some(sandbox),
        })
    }

    /// A fork keeps its parent's project and workspace (MIOSA's fork has no field for them):
    /// asking for others is refused.
    async fn check_parent_attribution(
        &self,
        parent_id: &str,
        asked: &slipway_proto::v1::Attribution,
    ) -> Result<(), ServiceError> {
        let parent = match self.record(parent_id).await?.and_then(|r| r.sandbox) {
            Some(s) => s,
            None => convert::sandbox(
                &self
                    .client
                    .get_sandbox(parent_id)
                    .await
                    .map_err(platform_error)?,
            ),
        };
        let has = parent.attribution.unwrap_or_default();
        for (field, asked, has) in [
            ("project_id", &asked.project_id, &has.project_id),
            ("workspace_id", &asked.workspace_id, &has.workspace_id),
        ] {
            if !asked.is_empty() && asked != has {
                return Err(ServiceError::invalid_input(format!(
                    "attribution.{field}: a fork keeps its parent's ({has:?}), not {asked:?}; \
                     MIOSA's fork takes no other"
                )));
            }
        }
        Ok(())
    }

    /// Writes Slipway's metadata (and a name) onto a sandbox the platform made for us without
    /// them, merged into the metadata it has (MIOSA may replace rather than merge); returns the
    /// sandbox as the platform answers.
    pub(crate) async fn tag(
        &self,
        sandbox_id: &str,
        existing: Option<&Value>,
        ours: &serde_json::Map<String, Value>,
        name: &str,
        key: &str,
        op: &str,
    ) -> Result<Value, ServiceError> {
        // Merged into what the sandbox has (read when the answer did not say): a platform that
        // replaces metadata on PATCH keeps the rest.
        let mut metadata = match existing.and_then(Value::as_object) {
            Some(m) => m.clone(),
            None => self
                .client
                .get_sandbox(sandbox_id)
                .await
                .map_err(platform_error)?
                .get("metadata")
                .and_then(Value::as_object)
                .cloned()
                .unwrap_or_default(),
        };
        metadata.extend(ours.clone());
        let mut patch = json!({ "metadata": metadata });
        if !name.is_empty() {
            patch["name"] = json!(name);
        }
        self.client
            .update_sandbox(sandbox_id, patch, &format!("{key}:{op}.tag"))
            .await
            .map_err(platform_error)
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
            let mut s = convert::sandbox(v);
            if s.run_id.is_empty() && !s.id.is_empty() {
                // Made for a run but not tagged yet (a tag PATCH that failed): the registry
                // knows its run.
                if let Some(run) = self
                    .record(&s.id)
                    .await?
                    .and_then(|r| r.sandbox)
                    .map(|r| r.run_id)
                {
                    s.run_id = run;
                }
            }
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
