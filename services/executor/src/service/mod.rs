//! The NATS service `slipway.executor.v1.<op>`: each operation checks its request, calls the
//! platform through the MIOSA client, keeps the sandbox registry (KV) in step, and replies with
//! the contract's message or a typed error that keeps MIOSA's meaning. Here: the shared parts
//! and sandbox create/get/list/destroy, files.write_many and exec; the rest by topic below.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use slipway_common::ServiceError;
use slipway_common::records::Records;
use slipway_common::service::ServiceHost;
use slipway_common::topology::buckets;
use slipway_proto::v1::{
    CreateSandboxRequest, ExecReply, ExecRequest, GetSandboxRequest, ListSandboxesReply,
    ListSandboxesRequest, SandboxRecord, SandboxRef, SandboxReply, WriteFilesReply,
    WriteFilesRequest,
};

use crate::convert::{self, BRANCH_KEY, CREATED_BY_KEY, RUN_KEY};
use crate::miosa::{MiosaClient, MiosaError};

mod deploy;
mod sandboxes;
mod sharing;
mod snapshots;
mod usage;
mod workspace;

/// What every handler shares.
pub struct Executor {
    pub client: MiosaClient,
    pub nats: async_nats::Client,
    pub jetstream: async_nats::jetstream::Context,
    /// Deployment id -> URL (immutable once the deployment exists).
    deployment_urls: std::sync::Mutex<std::collections::HashMap<String, String>>,
    /// Usage events, to `slipway.usage.executor.<meter>.<user>`.
    pub usage: slipway_common::usage::UsagePublisher,
    /// Sandboxes whose processes are being relaunched after a resume (one relaunch at a time
    /// per sandbox in this process).
    relaunching: std::sync::Arc<std::sync::Mutex<std::collections::HashSet<String>>>,
    /// Template id -> preview port (a template's port does not change).
    preview_ports: std::sync::Mutex<std::collections::HashMap<String, u32>>,
}

pub(crate) fn platform_error(e: MiosaError) -> ServiceError {
    let mut err = ServiceError::new(e.code(), e.to_string());
    if let MiosaError::Api {
        code,
        retry_after,
        request_id,
        ..
    } = &e
    {
        err = err.with_detail("platform_code", code.clone());
        if let Some(id) = request_id {
            err = err.with_detail("platform_request_id", id.clone());
        }
        if let Some(after) = retry_after {
            err = err.with_retry_after(*after);
        }
    }
    err
}

/// The list in a platform answer: a bare array, or under one of `keys` (`data` is unwrapped
/// already when it is the whole envelope).
fn items(got: &Value, keys: &[&str]) -> Vec<Value> {
    got.as_array()
        .cloned()
        .or_else(|| {
            keys.iter()
                .find_map(|k| got.get(*k).and_then(Value::as_array).cloned())
        })
        .unwrap_or_default()
}

use slipway_common::service::{now, required};

/// The id of a platform resource, which goes into a URL path: refused unless it can name
/// nothing but itself there (no `/`, `..`, `?`, `#` or `%`).
fn resource(field: &'static str, value: &str) -> Result<(), ServiceError> {
    slipway_proto::validate::check_resource_id(field, value).map_err(ServiceError::from)
}

impl Executor {
    pub fn new(client: MiosaClient, nats: async_nats::Client) -> Self {
        let jetstream = async_nats::jetstream::new(nats.clone());
        Self {
            client,
            usage: slipway_common::usage::UsagePublisher::new(
                jetstream.clone(),
                slipway_common::Service::Executor,
            ),
            jetstream,
            nats,
            deployment_urls: Default::default(),
            preview_ports: Default::default(),
            relaunching: Default::default(),
        }
    }

    /// A read at the platform (no body, no idempotency key), errors mapped.
    async fn platform_get(
        &self,
        op: &'static str,
        path: String,
        query: Vec<(&'static str, String)>,
    ) -> Result<Value, ServiceError> {
        self.client
            .request(op, reqwest::Method::GET, path, query, None, None)
            .await
            .map_err(platform_error)
    }

    async fn registry(&self) -> Result<Records<SandboxRecord>, ServiceError> {
        let store = self
            .jetstream
            .get_key_value(buckets::SANDBOXES)
            .await
            .map_err(|e| ServiceError::unavailable(format!("sandbox registry: {e}")))?;
        Ok(Records::new(store))
    }

    /// A sandbox's key in the registry: its id, encoded (ids may hold `:`; readable ones stay as
    /// they are, so the keys written before the encoding are unchanged).
    pub(crate) fn registry_key(sandbox_id: &str) -> Result<String, ServiceError> {
        slipway_common::keys::encode_key(sandbox_id)
            .map_err(|e| ServiceError::invalid_input(format!("sandbox_id: {e}")))
    }

    /// Records (or refreshes) a sandbox in the registry; what the record holds besides the
    /// sandbox (who created it, processes to relaunch) is kept.
    pub(crate) async fn remember(
        &self,
        sandbox: &slipway_proto::v1::Sandbox,
        created_by: &str,
    ) -> Result<(), ServiceError> {
        self.modify_record(&sandbox.id, |record| {
            record.sandbox = Some(sandbox.clone());
            if record.created_by.is_empty() {
                record.created_by = created_by.to_string();
            }
        })
        .await
        .map(|_| ())
    }

    /// Applies `change` to a sandbox's record (a new one if there is none) with a
    /// revision-checked write, read again and retried when another writer got there first.
    pub(crate) async fn modify_record(
        &self,
        sandbox_id: &str,
        mut change: impl FnMut(&mut SandboxRecord),
    ) -> Result<SandboxRecord, ServiceError> {
        use slipway_common::records::RecordError;
        let key = Self::registry_key(sandbox_id)?;
        let records = self.registry().await?;
        let store_err =
            |e: RecordError| ServiceError::unavailable(format!("sandbox registry: {e}"));
        for _ in 0..8 {
            let current = records.get(&key).await.map_err(store_err)?;
            let (mut record, revision) = match current {
                Some((record, revision)) => (record, Some(revision)),
                None => (SandboxRecord::default(), None),
            };
            change(&mut record);
            record.updated_at = Some(now());
            let written = match revision {
                None => records.create(&key, &record).await,
                Some(revision) => records.update(&key, &record, revision).await,
            };
            match written {
                Ok(_) => return Ok(record),
                Err(RecordError::Exists { .. } | RecordError::Conflict { .. }) => continue,
                Err(e) => return Err(store_err(e)),
            }
        }
        Err(ServiceError::unavailable(format!(
            "sandbox registry: record `{sandbox_id}` kept changing under this write"
        )))
    }

    /// Makes sure the sandbox is one Slipway made (it carries Slipway's metadata) and that the
    /// registry holds it, reading it from the platform when the registry does not: a record
    /// never stands in for an unknown sandbox, nor for one that is not ours.
    pub(crate) async fn ensure_ours(&self, sandbox_id: &str) -> Result<(), ServiceError> {
        if self
            .record(sandbox_id)
            .await?
            .is_some_and(|r| r.sandbox.is_some())
        {
            return Ok(());
        }
        let got = self
            .client
            .get_sandbox(sandbox_id)
            .await
            .map_err(platform_error)?;
        let created_by = got
            .get("metadata")
            .and_then(|m| m.get(CREATED_BY_KEY))
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        if created_by.is_empty() {
            return Err(ServiceError::invalid_input(format!(
                "sandbox `{sandbox_id}` was not made through Slipway; it keeps no processes to \
                 relaunch"
            )));
        }
        self.remember(&convert::sandbox(&got), &created_by).await
    }

    fn known_port(&self, template_id: &str) -> Option<u32> {
        self.preview_ports
            .lock()
            .ok()
            .and_then(|m| m.get(template_id).copied())
    }

    fn remember_port(&self, template_id: &str, port: u32) {
        if let Ok(mut m) = self.preview_ports.lock() {
            m.insert(template_id.to_string(), port);
        }
    }

    /// A sandbox's record, if the registry has one.
    pub(crate) async fn record(
        &self,
        sandbox_id: &str,
    ) -> Result<Option<SandboxRecord>, ServiceError> {
        let key = Self::registry_key(sandbox_id)?;
        self.registry()
            .await?
            .get(&key)
            .await
            .map(|r| r.map(|(record, _)| record))
            .map_err(|e| ServiceError::unavailable(format!("sandbox registry: {e}")))
    }

    /// One `sandboxes_created` event per sandbox, its id `<sandbox_id>:sandboxes_created`: a
    /// retried request gets the same sandbox and so publishes the same id, which billing counts
    /// once (a request key would collide between two users who chose the same one).
    pub(crate) async fn count_created(
        &self,
        sandbox: &slipway_proto::v1::Sandbox,
    ) -> Result<(), ServiceError> {
        let meter = slipway_proto::meters::SANDBOXES_CREATED;
        let mut event = convert::usage_event(sandbox, meter, 1);
        event.id = format!("{}:{meter}", sandbox.id);
        // The sandbox's creation time, the platform's: a retried request republishes the same
        // event, in the same hour.
        event.time = sandbox.created_at.or_else(|| Some(now()));
        self.usage
            .publish(&event)
            .await
            .map(|_| ())
            .map_err(|e| ServiceError::unavailable(e.to_string()))
    }

    pub async fn create(&self, req: CreateSandboxRequest) -> Result<SandboxReply, ServiceError> {
        required("idempotency_key", &req.idempotency_key)?;
        let attribution = req.attribution.clone().unwrap_or_default();
        required("attribution.user_id", &attribution.user_id)?;
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
        // So a sandbox created just before a crash can be found and adopted.
        metadata.insert(CREATED_BY_KEY.into(), json!(req.idempotency_key));
        let mut body = json!({
            "external_user_id": attribution.user_id,
            "env": req.env,
            "metadata": metadata,
            "persistent": req.persistent,
            "always_on": req.always_on,
        });
        for (key, value) in [
            ("template_id", req.template_id.as_str()),
            ("name", req.name.as_str()),
            ("external_project_id", attribution.project_id.as_str()),
            ("external_workspace_id", attribution.workspace_id.as_str()),
        ] {
            if !value.is_empty() {
                body[key] = json!(value);
            }
        }
        if req.timeout_sec > 0 {
            body["timeout_sec"] = json!(req.timeout_sec);
        }
        if req.idle_timeout_sec > 0 {
            body["idle_timeout_sec"] = json!(req.idle_timeout_sec);
        }
        let created = self
            .client
            .create_sandbox(body, &req.idempotency_key)
            .await
            .map_err(platform_error)?;
        let sandbox = convert::sandbox(&created);
        slipway_common::failpoint::hit("executor.create.after_platform");
        self.remember(&sandbox, &req.idempotency_key).await?;
        self.count_created(&sandbox).await?;
        Ok(SandboxReply {
            sandbox: Some(sandbox),
        })
    }

    pub async fn get(&self, req: GetSandboxRequest) -> Result<SandboxReply, ServiceError> {
        resource("sandbox_id", &req.sandbox_id)?;
        let got = self
            .client
            .get_sandbox(&req.sandbox_id)
            .await
            .map_err(platform_error)?;
        Ok(SandboxReply {
            sandbox: Some(convert::sandbox(&got)),
        })
    }

    pub async fn list(
        &self,
        req: ListSandboxesRequest,
    ) -> Result<ListSandboxesReply, ServiceError> {
        let mut filters = Vec::new();
        for (key, value) in [
            ("external_user_id", &req.user_id),
            ("external_project_id", &req.project_id),
            ("external_workspace_id", &req.workspace_id),
        ] {
            if !value.is_empty() {
                filters.push((key, value.clone()));
            }
        }
        let all = self
            .client
            .list_sandboxes(&filters)
            .await
            .map_err(platform_error)?;
        let sandboxes = all
            .iter()
            .map(convert::sandbox)
            .filter(|s| req.run_id.is_empty() || s.run_id == req.run_id)
            .filter(|s| req.state == 0 || s.state == req.state)
            .collect();
        Ok(ListSandboxesReply { sandboxes })
    }

    pub async fn destroy(&self, req: SandboxRef) -> Result<SandboxReply, ServiceError> {
        resource("sandbox_id", &req.sandbox_id)?;
        required("idempotency_key", &req.idempotency_key)?;
        self.client
            .destroy_sandbox(&req.sandbox_id, &req.idempotency_key)
            .await
            .map_err(platform_error)?;
        let sandbox = match self.client.get_sandbox(&req.sandbox_id).await {
            Ok(v) => convert::sandbox(&v),
            Err(e) if matches!(e.status(), Some(404 | 410)) => slipway_proto::v1::Sandbox {
                id: req.sandbox_id.clone(),
                state: slipway_proto::v1::SandboxState::Destroyed.into(),
                ..Default::default()
            },
            Err(e) => return Err(platform_error(e)),
        };
        self.remember(&sandbox, &req.idempotency_key).await?;
        Ok(SandboxReply {
            sandbox: Some(sandbox),
        })
    }

    pub async fn write_files(
        &self,
        req: WriteFilesRequest,
    ) -> Result<WriteFilesReply, ServiceError> {
        resource("sandbox_id", &req.sandbox_id)?;
        required("idempotency_key", &req.idempotency_key)?;
        if req.files.is_empty() {
            return Err(ServiceError::invalid_input("files: at least one file"));
        }
        let bytes = req.files.iter().map(|f| f.content.len() as u64).sum();
        let files: Vec<(String, Vec<u8>)> =
            req.files.into_iter().map(|f| (f.path, f.content)).collect();
        let count = u32::try_from(files.len()).unwrap_or(u32::MAX);
        self.client
            .write_many(&req.sandbox_id, &files, &req.idempotency_key)
            .await
            .map_err(platform_error)?;
        Ok(WriteFilesReply {
            files: count,
            bytes,
        })
    }

    pub async fn exec(&self, req: ExecRequest) -> Result<ExecReply, ServiceError> {
        resource("sandbox_id", &req.sandbox_id)?;
        if req.command.trim().is_empty() {
            return Err(ServiceError::invalid_input("command: is required"));
        }
        if req.timeout_ms > MAX_EXEC_TIMEOUT_MS {
            return Err(ServiceError::invalid_input(format!(
                "timeout_ms: at most {MAX_EXEC_TIMEOUT_MS} (an hour); run longer work as a process"
            )));
        }
        let timeout = (req.timeout_ms > 0).then(|| Duration::from_millis(req.timeout_ms));
        let cwd = Some(req.cwd.as_str()).filter(|c| !c.is_empty());
        let ran = self
            .client
            .exec(&req.sandbox_id, &req.command, cwd, &req.env, timeout)
            .await
            .map_err(platform_error)?;
        let text = |k: &str| {
            ran.get(k)
                .and_then(Value::as_str)
                .unwrap_or("")
                .as_bytes()
                .to_vec()
        };
        Ok(ExecReply {
            exit_code: ran
                .get("exit_code")
                .and_then(Value::as_i64)
                .and_then(|c| i32::try_from(c).ok())
                .unwrap_or(-1),
            stdout: text("stdout"),
            stderr: text("stderr"),
            duration_ms: ran.get("duration_ms").and_then(Value::as_u64).unwrap_or(0),
            timed_out: ran
                .get("timed_out")
                .and_then(Value::as_bool)
                .unwrap_or(false),
        })
    }
}

/// Longest command `exec` waits for: an hour (sandboxd's bound; longer work is a process).
const MAX_EXEC_TIMEOUT_MS: u64 = 3_600_000;

/// Adds every operation to the service host (`slipway.executor.v1.<op>`).
pub async fn register(
    host: &ServiceHost,
    executor: Arc<Executor>,
) -> Result<(), slipway_common::service::HostError> {
    slipway_common::endpoints!(host, executor, {
        "sandbox.create" => create,
        "sandbox.get" => get,
        "sandbox.list" => list,
        "sandbox.update" => update,
        "sandbox.pause" => pause,
        "sandbox.resume" => resume,
        "sandbox.stop" => stop,
        "sandbox.extend" => extend,
        "sandbox.readiness" => readiness,
        "sandbox.destroy" => destroy,
        "sandbox.fork" => fork,
        "templates.list" => templates,
        "files.write_many" => write_files,
        "files.read" => read_file,
        "files.list" => list_files,
        "files.tree" => tree,
        "files.delete" => delete_file,
        "exec" => exec,
        "process.start" => start_process,
        "process.list" => list_processes,
        "process.get" => get_process,
        "process.stop" => stop_process,
        "process.logs" => process_logs,
        "snapshot.create" => create_snapshot,
        "snapshot.list" => list_snapshots,
        "snapshot.restore" => restore_snapshot,
        "preview.create" => create_preview,
        "preview.token" => preview_token,
        "preview.share" => share_preview,
        "preview.revoke" => revoke_preview_shares,
        "preview.delete" => delete_preview,
        "share.create" => create_share,
        "share.list" => list_shares,
        "share.revoke" => revoke_share,
        "deploy" => deploy,
        "deployment.get" => get_deployment,
        "deployment.rollback" => rollback,
        "deployment.promote" => promote,
        "deployment.delete" => delete_deployment,
        "version.get" => get_version,
        "version.list" => list_versions,
        "version.logs" => version_logs,
        "usage.sandbox" => sandbox_usage,
        "usage.rollup" => usage_rollup,
        "quota.get" => get_quota,
        "quota.set" => set_quota,
        "reap" => reap,
    });
    Ok(())
}
