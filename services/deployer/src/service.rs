//! The deployer's operations: `deploy` (record the job, enqueue it, answer its id), the queries
//! `deployments.list` and `deployment.get`, and `rollback` / `promote`.

use std::time::Duration;

use async_nats::jetstream::kv;
use slipway_common::records::{RecordError, Records};
use slipway_common::run_events::{RunEventPublisher, Step};
use slipway_common::service::{now, required};
use slipway_common::usage::UsagePublisher;
use slipway_common::{App, RpcClient, Service, ServiceError, subjects};
use slipway_proto::v1::run_event::Payload;
use slipway_proto::v1::*;

use crate::verify::Verifier;

/// What every operation and job shares.
pub struct Deployer {
    pub(crate) rpc: RpcClient,
    pub(crate) jetstream: async_nats::jetstream::Context,
    pub(crate) jobs: Records<DeployJobRecord>,
    pub(crate) deployments: Records<DeploymentRecord>,
    pub(crate) names: Records<DeploymentNameRecord>,
    pub(crate) events: RunEventPublisher,
    pub(crate) usage: UsagePublisher,
    pub(crate) verifier: Verifier,
    pub(crate) job_timeout: Duration,
    pub(crate) verify_timeout: Duration,
    pub(crate) metrics: crate::metrics::DeployMetrics,
}

pub(crate) fn executor(op: &str) -> String {
    Service::Executor.op(op)
}

/// A store error as the service's error (the bucket is unavailable).
pub(crate) fn store(e: RecordError) -> ServiceError {
    ServiceError::unavailable(format!("deployment records: {e}"))
}

/// The job of an end user's idempotency key: the same key is the same job, however much later.
pub fn job_id(user_id: &str, key: &str) -> String {
    format!("dj_{:016x}", fnv(&format!("{user_id}\n{key}")))
}

/// FNV-1a: a stable hash of a key (the standard library's is not stable across builds).
pub(crate) fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// A deployment name: 1 to 63 of `[a-z0-9-]`, starting with a letter or digit (it becomes a
/// host name).
fn check_name(name: &str) -> Result<(), ServiceError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-');
    if ok {
        Ok(())
    } else {
        Err(ServiceError::invalid_input(
            "name: 1 to 63 of a-z, 0-9 and `-`, not starting with `-`",
        ))
    }
}

pub(crate) fn name_key(user_id: &str, name: &str) -> Result<String, ServiceError> {
    let user = subjects::user_token(user_id)
        .map_err(|e| ServiceError::invalid_input(format!("attribution.user_id: {e}")))?;
    Ok(format!("name.{user}.{name}"))
}

/// `dep.<deployment id>`, the id encoded: ids come from the platform and may hold `:` (readable
/// ones stay as they are, so keys written before the encoding are unchanged).
pub(crate) fn dep_key(deployment_id: &str) -> Result<String, ServiceError> {
    let id = slipway_common::keys::encode_key(deployment_id)
        .map_err(|e| ServiceError::invalid_input(format!("deployment_id: {e}")))?;
    Ok(format!("dep.{id}"))
}

impl Deployer {
    pub fn new(app: &App, store: kv::Store) -> anyhow::Result<Self> {
        let s = &app.settings;
        Ok(Self {
            rpc: app.rpc.clone(),
            jetstream: app.jetstream.clone(),
            jobs: Records::new(store.clone()),
            deployments: Records::new(store.clone()),
            names: Records::new(store),
            events: RunEventPublisher::new(app.jetstream.clone(), Service::Deployer),
            usage: UsagePublisher::new(app.jetstream.clone(), Service::Deployer),
            verifier: Verifier::new(&s.edge)?,
            job_timeout: Duration::from_millis(s.deployer.job_timeout_ms),
            verify_timeout: Duration::from_millis(s.deployer.verify_timeout_ms),
            metrics: crate::metrics::DeployMetrics::register(app.health.metrics()),
        })
    }

    /// Checks the request, records the job (once per key), puts it on the queue, and answers its
    /// id. A job recorded but not yet started is enqueued again (the first enqueue may have been
    /// lost to a crash); one started or finished is not.
    pub async fn deploy(
        &self,
        req: EnqueueDeployRequest,
    ) -> Result<EnqueueDeployReply, ServiceError> {
        required("run_id", &req.run_id)?;
        required("idempotency_key", &req.idempotency_key)?;
        slipway_proto::validate::check_resource_id("sandbox_id", &req.sandbox_id)
            .map_err(ServiceError::from)?;
        check_name(&req.name)?;
        let user = req
            .attribution
            .as_ref()
            .map(|a| a.user_id.as_str())
            .unwrap_or("");
        required("attribution.user_id", user)?;
        if req.output_path.trim().is_empty() {
            return Err(ServiceError::invalid_input(
                "output_path: the directory to publish (for example /workspace/dist)",
            ));
        }
        if req.run_command.is_empty() != (req.port == 0) {
            return Err(ServiceError::invalid_input(
                "run_command and port: both or neither (a dynamic deployment needs both)",
            ));
        }
        if req.port > 65_535 {
            return Err(ServiceError::invalid_input("port: 1 to 65535"));
        }
        if !req.snapshot_id.is_empty() {
            slipway_proto::validate::check_resource_id("snapshot_id", &req.snapshot_id)
                .map_err(ServiceError::from)?;
        }
        // The sandbox must exist: no job for a sandbox that is not there.
        let found: Result<SandboxReply, _> = self
            .rpc
            .call(
                &executor("sandbox.get"),
                &GetSandboxRequest {
                    sandbox_id: req.sandbox_id.clone(),
                    name: String::new(),
                },
            )
            .await;
        if let Err(e) = found {
            return Err(match e.service_error() {
                Some(s) if s.code == ErrorCode::NotFound => {
                    ServiceError::not_found(format!("sandbox_id: no sandbox `{}`", req.sandbox_id))
                }
                Some(s) => s.clone(),
                None => ServiceError::unavailable(format!("the executor: {e}")),
            });
        }
        let job_id = job_id(user, &req.idempotency_key);
        let key = format!("job.{job_id}");
        let record = DeployJobRecord {
            job_id: job_id.clone(),
            request: Some(req.clone()),
            state: DeployJobState::Queued.into(),
            enqueued_at: Some(now()),
            ..Default::default()
        };
        let queued = match self.jobs.create(&key, &record).await {
            Ok(_) => true,
            Err(RecordError::Exists { .. }) => {
                let (existing, _) = self.jobs.get(&key).await.map_err(store)?.ok_or_else(|| {
                    ServiceError::unavailable("the job record vanished while read")
                })?;
                if existing.request.as_ref() != Some(&req) {
                    return Err(ServiceError::invalid_input(
                        "idempotency_key: already used for another deploy request",
                    ));
                }
                // Not started, or started and not heard of for long (its holder died with every
                // delivery spent): enqueued again.
                let stale = existing.state == DeployJobState::Running as i32
                    && existing.updated_at.is_some_and(|t| {
                        now().seconds - t.seconds > (2 * self.job_timeout.as_secs()) as i64
                    });
                existing.state == DeployJobState::Queued as i32 || stale
            }
            Err(e) => return Err(store(e)),
        };
        slipway_common::failpoint::hit("deployer.enqueue.after_record");
        if queued {
            self.enqueue(&job_id, req).await?;
        }
        slipway_common::failpoint::hit("deployer.enqueue.after_publish");
        Ok(EnqueueDeployReply { job_id })
    }

    async fn enqueue(&self, job_id: &str, req: EnqueueDeployRequest) -> Result<(), ServiceError> {
        let job = DeployJob {
            job_id: job_id.to_string(),
            request: Some(req),
            enqueued_at: Some(now()),
            traceparent: String::new(),
        };
        slipway_common::run_events::publish_once(
            &self.jetstream,
            subjects::DEPLOY_JOBS.to_string(),
            &job,
            job_id,
        )
        .await
        .map_err(|e| ServiceError::unavailable(format!("enqueueing: {e}")))?;
        Ok(())
    }

    async fn record_of(&self, deployment_id: &str) -> Result<DeploymentRecord, ServiceError> {
        slipway_proto::validate::check_resource_id("deployment_id", deployment_id)
            .map_err(ServiceError::from)?;
        self.deployments
            .get(&dep_key(deployment_id)?)
            .await
            .map_err(store)?
            .map(|(r, _)| r)
            .ok_or_else(|| {
                ServiceError::not_found(format!("deployment_id: no deployment `{deployment_id}`"))
            })
    }

    pub async fn list(
        &self,
        req: ListDeploymentsRequest,
    ) -> Result<ListDeploymentsReply, ServiceError> {
        use futures::StreamExt;
        let mut keys = self
            .deployments
            .store()
            .keys()
            .await
            .map_err(|e| ServiceError::unavailable(format!("deployment records: {e}")))?;
        let mut deployments = Vec::new();
        while let Some(key) = keys.next().await {
            let Ok(key) = key else { continue };
            if !key.starts_with("dep.") {
                continue;
            }
            let Some((r, _)) = self.deployments.get(&key).await.map_err(store)? else {
                continue;
            };
            if r.deleted_at.is_some() {
                continue;
            }
            let a = r.attribution.clone().unwrap_or_default();
            let matches = (req.user_id.is_empty() || a.user_id == req.user_id)
                && (req.project_id.is_empty() || a.project_id == req.project_id)
                && (req.run_id.is_empty() || r.run_id == req.run_id);
            if matches {
                deployments.push(deployment_of(&r));
            }
        }
        deployments.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(ListDeploymentsReply { deployments })
    }

    pub async fn get(
        &self,
        req: GetDeploymentDetailRequest,
    ) -> Result<DeploymentDetail, ServiceError> {
        let r = self.record_of(&req.deployment_id).await?;
        let versions = r
            .versions
            .iter()
            .map(|v| DeploymentVersion {
                id: v.version_id.clone(),
                deployment_id: r.deployment_id.clone(),
                number: v.number,
                state: v.state,
                digest: v.digest.clone(),
                url: v.url.clone(),
                source_sandbox_id: v.source_sandbox_id.clone(),
                snapshot_id: v.snapshot_id.clone(),
                created_at: v.created_at,
                error: String::new(),
            })
            .collect();
        Ok(DeploymentDetail {
            deployment: Some(deployment_of(&r)),
            versions,
            run_id: r.run_id,
        })
    }

    /// Takes a deployment down (admin): the platform stops serving it at once, the record says
    /// when, and the name is freed, so deploying it again makes a new deployment.
    pub async fn take_down(&self, req: TakeDownRequest) -> Result<TakeDownReply, ServiceError> {
        required("idempotency_key", &req.idempotency_key)?;
        let r = self.record_of(&req.deployment_id).await?;
        let _: DeleteDeploymentReply = self
            .rpc
            .call(
                &executor("deployment.delete"),
                &DeleteDeploymentRequest {
                    deployment_id: r.deployment_id.clone(),
                    idempotency_key: req.idempotency_key.clone(),
                },
            )
            .await
            .map_err(rpc_error)?;
        let key = dep_key(&r.deployment_id)?;
        for _ in 0..8 {
            let Some((mut dep, rev)) = self.deployments.get(&key).await.map_err(store)? else {
                break;
            };
            if dep.deleted_at.is_some() {
                break;
            }
            dep.deleted_at = Some(now());
            match self.deployments.update(&key, &dep, rev).await {
                Ok(_) => break,
                Err(RecordError::Conflict { .. }) => continue,
                Err(e) => return Err(store(e)),
            }
        }
        let user = r
            .attribution
            .as_ref()
            .map(|a| a.user_id.as_str())
            .unwrap_or("");
        if let Ok(names_key) = name_key(user, &r.name) {
            let still_this = self
                .names
                .get(&names_key)
                .await
                .map_err(store)?
                .is_some_and(|(n, _)| n.deployment_id == r.deployment_id);
            if still_this {
                self.names
                    .store()
                    .delete(&names_key)
                    .await
                    .map_err(|e| ServiceError::unavailable(format!("deployment records: {e}")))?;
            }
        }
        let step = Step::once(&format!("down-{:016x}", fnv(&req.idempotency_key)));
        self.events
            .publish(
                &r.run_id,
                &step,
                "",
                r.attribution.clone(),
                Payload::TakenDown(TakenDown {
                    deployment_id: r.deployment_id.clone(),
                    reason: req.reason.clone(),
                }),
            )
            .await
            .map_err(|e| ServiceError::unavailable(e.to_string()))?;
        Ok(TakeDownReply {
            deployment: Some(deployment_of(&r)),
        })
    }

    pub async fn rollback(
        &self,
        req: ServeVersionRequest,
    ) -> Result<ServeVersionReply, ServiceError> {
        self.serve_version(req, true).await
    }

    pub async fn promote(
        &self,
        req: ServeVersionRequest,
    ) -> Result<ServeVersionReply, ServiceError> {
        self.serve_version(req, false).await
    }

    /// Points a deployment at one of its ready versions (`version` 0: the ready one before the
    /// one served now for a rollback, the newest ready one for a promote), then says so.
    async fn serve_version(
        &self,
        req: ServeVersionRequest,
        back: bool,
    ) -> Result<ServeVersionReply, ServiceError> {
        required("idempotency_key", &req.idempotency_key)?;
        let r = self.record_of(&req.deployment_id).await?;
        let current: DeploymentReply = self
            .rpc
            .call(
                &executor("deployment.get"),
                &GetDeploymentRequest {
                    deployment_id: r.deployment_id.clone(),
                },
            )
            .await
            .map_err(rpc_error)?;
        let current_id = current
            .deployment
            .map(|d| d.current_version_id)
            .unwrap_or_default();
        let ready: Vec<&VersionRecord> = r
            .versions
            .iter()
            .filter(|v| v.state == VersionState::Ready as i32)
            .collect();
        // What the platform serves, or, for a version the records do not know (a failed deploy
        // the platform took), what the records say serves.
        let serving = ready
            .iter()
            .find(|v| v.version_id == current_id)
            .map(|v| v.number)
            .unwrap_or(r.serving);
        let target = if req.version != 0 {
            ready.iter().find(|v| v.number == req.version).copied()
        } else if back {
            ready
                .iter()
                .filter(|v| v.number < serving)
                .max_by_key(|v| v.number)
                .copied()
        } else {
            ready
                .iter()
                .filter(|v| v.number > serving)
                .max_by_key(|v| v.number)
                .copied()
        };
        let target = target.ok_or_else(|| {
            ServiceError::invalid_input(format!(
                "version: deployment `{}` has no such ready version (serving {serving})",
                r.deployment_id
            ))
        })?;
        let op = if back {
            "deployment.rollback"
        } else {
            "deployment.promote"
        };
        let _: DeploymentReply = self
            .rpc
            .call(
                &executor(op),
                &SetVersionRequest {
                    deployment_id: r.deployment_id.clone(),
                    version_id: target.version_id.clone(),
                    idempotency_key: req.idempotency_key.clone(),
                },
            )
            .await
            .map_err(rpc_error)?;
        self.set_serving(&r.deployment_id, target.number).await?;
        let run_id = if req.run_id.is_empty() {
            r.run_id.clone()
        } else {
            req.run_id.clone()
        };
        let (deployment_id, version, url) = (r.deployment_id.clone(), target.number, r.url.clone());
        let payload = if back {
            Payload::RolledBack(RolledBack {
                deployment_id,
                version,
                url,
            })
        } else {
            Payload::Promoted(Promoted {
                deployment_id,
                version,
                url,
            })
        };
        // One event per request: its step names the key.
        let step = Step::once(&format!("serve-{:016x}", fnv(&req.idempotency_key)));
        self.events
            .publish(&run_id, &step, "", r.attribution.clone(), payload)
            .await
            .map_err(|e| ServiceError::unavailable(e.to_string()))?;
        Ok(ServeVersionReply {
            deployment: Some(deployment_of(&r)),
            version: Some(DeploymentVersion {
                id: target.version_id.clone(),
                deployment_id: r.deployment_id.clone(),
                number: target.number,
                state: target.state,
                digest: target.digest.clone(),
                url: target.url.clone(),
                ..Default::default()
            }),
        })
    }
}

impl Deployer {
    /// Records which version a deployment serves now.
    async fn set_serving(&self, deployment_id: &str, number: u32) -> Result<(), ServiceError> {
        let key = dep_key(deployment_id)?;
        for _ in 0..8 {
            let Some((mut dep, rev)) = self.deployments.get(&key).await.map_err(store)? else {
                return Ok(());
            };
            dep.serving = number;
            match self.deployments.update(&key, &dep, rev).await {
                Ok(_) => return Ok(()),
                Err(RecordError::Conflict { .. }) => continue,
                Err(e) => return Err(store(e)),
            }
        }
        Err(ServiceError::unavailable(
            "deployment records: kept changing under this write",
        ))
    }
}

pub(crate) fn rpc_error(e: slipway_common::RpcError) -> ServiceError {
    e.service_error()
        .cloned()
        .unwrap_or_else(|| ServiceError::unavailable(format!("the executor: {e}")))
}

fn deployment_of(r: &DeploymentRecord) -> Deployment {
    let current = r.versions.iter().find(|v| v.number == r.serving);
    Deployment {
        id: r.deployment_id.clone(),
        name: r.name.clone(),
        url: r.url.clone(),
        current_version_id: current.map(|v| v.version_id.clone()).unwrap_or_default(),
        attribution: r.attribution.clone(),
        created_at: r.created_at,
    }
}
