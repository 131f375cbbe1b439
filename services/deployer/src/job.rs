//! Running one deploy job. Each step is written to the job's record (revision-checked) before
//! the next is taken, and every effect outside it is idempotent by an id derived from the job:
//! the platform's deploy is keyed by the job, events and usage carry ids of the job or version,
//! the source's destruction is keyed by the job. A redelivery, or a crash and restart at any
//! point, resumes from the record: one version, one `deployed`, one count.

use std::time::{Duration, Instant};

use slipway_common::records::RecordError;
use slipway_common::run_events::Step;
use slipway_common::service::now;
use slipway_common::worker::{Delivery, HandlerError};
use slipway_common::{ServiceError, failpoint};
use slipway_proto::meters;
use slipway_proto::v1::run_event::Payload;
use slipway_proto::v1::*;

use crate::service::{Deployer, executor, name_key, rpc_error, store};
use crate::verify::Verdict;

/// How many lines of the build log a failure carries.
const LOG_TAIL_LINES: usize = 40;

fn retry(e: impl std::fmt::Display) -> HandlerError {
    HandlerError::retry(Duration::from_secs(2), e.to_string())
}

impl Deployer {
    /// The worker's handler for one job. On the job's last delivery a failure to go on is the
    /// job's failure (published), never a silent dead letter.
    pub async fn run(&self, job: DeployJob, delivery: Delivery) -> Result<(), HandlerError> {
        match self.run_once(&job, &delivery).await {
            Err(HandlerError::Retry { reason, .. }) if delivery.last_attempt => {
                self.give_up(&job.job_id, ErrorCode::Unavailable, &reason)
                    .await
            }
            other => other,
        }
    }

    async fn run_once(&self, job: &DeployJob, delivery: &Delivery) -> Result<(), HandlerError> {
        let key = format!("job.{}", job.job_id);
        let Some((mut record, mut revision)) = self.jobs.get(&key).await.map_err(retry)? else {
            return Err(HandlerError::permanent(
                "unknown_job",
                format!(
                    "job `{}` has no record (enqueued without `deploy`)",
                    job.job_id
                ),
            ));
        };
        let req = record.request.clone().unwrap_or_default();
        let run = req.run_id.clone();
        let who = req.attribution.clone();
        let finished = [
            DeployJobState::Succeeded as i32,
            DeployJobState::Failed as i32,
        ];
        if !finished.contains(&record.state) {
            if record.state != DeployJobState::Running as i32 {
                record.state = DeployJobState::Running.into();
                revision = self.save(&key, &mut record, revision).await?;
            }
            self.event(
                &run,
                &Step::once(&job.job_id),
                &who,
                Payload::DeployStarted(DeployStarted {
                    job_id: job.job_id.clone(),
                    deployment_name: req.name.clone(),
                }),
            )
            .await?;
            match self
                .build(&job.job_id, &mut record, &mut revision, &key, delivery)
                .await
            {
                Ok(()) => {}
                Err(JobError::Failed {
                    code,
                    message,
                    log_tail,
                }) => {
                    self.restore_serving(&record).await;
                    record.state = DeployJobState::Failed.into();
                    record.error = message;
                    record.error_code = code.into();
                    record.log_tail = log_tail;
                    record.finished_at = Some(now());
                    revision = self.save(&key, &mut record, revision).await?;
                    failpoint::hit("deployer.job.after_failed_record");
                }
                Err(JobError::Retry(e)) => return Err(e),
            }
        }
        if record.state == DeployJobState::Failed as i32 {
            // Announced once, also when a crash came between the record and the event.
            if !record.announced {
                self.event(
                    &run,
                    &Step::once(&job.job_id),
                    &who,
                    Payload::DeployFailed(DeployFailed {
                        job_id: job.job_id.clone(),
                        code: record.error_code,
                        message: record.error.clone(),
                        log_tail: record.log_tail.clone(),
                    }),
                )
                .await?;
                record.announced = true;
                self.save(&key, &mut record, revision).await?;
                self.metrics.finished("failed");
            }
            return Ok(());
        }
        if !record.announced {
            self.count(&record).await?;
            self.event(
                &run,
                &Step::once(&job.job_id),
                &who,
                Payload::Deployed(Deployed {
                    job_id: job.job_id.clone(),
                    deployment_id: record.deployment_id.clone(),
                    version: record.version,
                    url: record.url.clone(),
                    digest: record.digest.clone(),
                    // Asked for, and done right after this event (retried until it is).
                    source_destroyed: req.destroy_source,
                }),
            )
            .await?;
            failpoint::hit("deployer.job.after_event");
            record.announced = true;
            revision = self.save(&key, &mut record, revision).await?;
            self.metrics.finished("deployed");
        }
        if req.destroy_source && !record.source_destroyed {
            self.progress(&run, &job.job_id, &who, "destroying_source")
                .await?;
            let _: SandboxReply = self
                .rpc
                .call(
                    &executor("sandbox.destroy"),
                    &SandboxRef {
                        sandbox_id: req.sandbox_id.clone(),
                        idempotency_key: format!("{}:destroy", job.job_id),
                    },
                )
                .await
                .map_err(|e| retry(rpc_error(e)))?;
            record.source_destroyed = true;
            self.save(&key, &mut record, revision).await?;
        }
        Ok(())
    }

    /// The job's last delivery could not go on: it fails, with its reason, so the run hears.
    async fn give_up(
        &self,
        job_id: &str,
        code: ErrorCode,
        reason: &str,
    ) -> Result<(), HandlerError> {
        let key = format!("job.{job_id}");
        let Some((mut record, revision)) = self.jobs.get(&key).await.map_err(retry)? else {
            return Ok(());
        };
        if record.state == DeployJobState::Succeeded as i32 {
            // Succeeded but not all said or done: the dead letter keeps it for a replay.
            return Err(HandlerError::permanent("unfinished", reason.to_string()));
        }
        if record.state != DeployJobState::Failed as i32 {
            self.restore_serving(&record).await;
            record.state = DeployJobState::Failed.into();
            record.error = format!("gave up after every delivery: {reason}");
            record.error_code = code.into();
            record.finished_at = Some(now());
        }
        let req = record.request.clone().unwrap_or_default();
        let revision = self.save(&key, &mut record, revision).await?;
        self.event(
            &req.run_id,
            &Step::once(job_id),
            &req.attribution,
            Payload::DeployFailed(DeployFailed {
                job_id: job_id.to_string(),
                code: record.error_code,
                message: record.error.clone(),
                log_tail: record.log_tail.clone(),
            }),
        )
        .await?;
        record.announced = true;
        self.save(&key, &mut record, revision).await?;
        self.metrics.finished("failed");
        Ok(())
    }

    /// After a failure past the platform's deploy (the platform may already serve the new,
    /// unverified version), points the deployment back at the version it served before.
    async fn restore_serving(&self, record: &DeployJobRecord) {
        if record.deployment_id.is_empty() || record.version_id.is_empty() {
            return;
        }
        let Ok(dep_key) = crate::service::dep_key(&record.deployment_id) else {
            return;
        };
        let previous = match self.deployments.get(&dep_key).await {
            Ok(Some((dep, _))) => dep
                .versions
                .iter()
                .find(|v| v.number == dep.serving && v.version_id != record.version_id)
                .map(|v| v.version_id.clone()),
            _ => None,
        };
        let Some(previous) = previous else { return };
        let restored: Result<DeploymentReply, _> = self
            .rpc
            .call(
                &executor("deployment.rollback"),
                &SetVersionRequest {
                    deployment_id: record.deployment_id.clone(),
                    version_id: previous,
                    idempotency_key: format!("{}:restore", record.job_id),
                },
            )
            .await;
        if let Err(e) = restored {
            tracing::warn!(job = %record.job_id, error = %e, "could not restore the version served before");
        }
    }

    /// The platform's deploy (once: keyed by the job, with a request fixed before the call),
    /// the version followed until it is ready, its URL verified, and the outcome recorded in the
    /// job and the deployment.
    async fn build(
        &self,
        job_id: &str,
        record: &mut DeployJobRecord,
        revision: &mut u64,
        key: &str,
        delivery: &Delivery,
    ) -> Result<(), JobError> {
        let req = record.request.clone().unwrap_or_default();
        let who = req.attribution.clone();
        let user = who.as_ref().map(|a| a.user_id.clone()).unwrap_or_default();
        let names_key = name_key(&user, &req.name).map_err(JobError::failed)?;
        if record.version_id.is_empty() {
            self.progress(&req.run_id, job_id, &who, "building").await?;
            if record.requested_deployment_id.is_empty() {
                // One deployment per end user and name: the first job to reserve the name makes
                // it; others wait for it, then add versions to it.
                if let Some(existing) = self.reserve_name(&names_key, job_id).await? {
                    record.requested_deployment_id = existing;
                }
                *revision = self.save(key, record, *revision).await?;
            }
            let deployed: Result<DeployReply, _> = self
                .rpc
                .call_with_timeout(
                    &executor("deploy"),
                    &DeployRequest {
                        sandbox_id: req.sandbox_id.clone(),
                        idempotency_key: job_id.to_string(),
                        name: req.name.clone(),
                        build_command: req.build_command.clone(),
                        output_path: req.output_path.clone(),
                        entrypoint: req.entrypoint.clone(),
                        deployment_id: record.requested_deployment_id.clone(),
                        run_command: req.run_command.clone(),
                        port: req.port,
                        attribution: who.clone(),
                    },
                    Duration::from_secs(120),
                )
                .await;
            let deployed = match deployed {
                Ok(d) => d,
                Err(e) => {
                    let err = rpc_error(e);
                    // What the platform refuses will not work on another try.
                    return Err(if is_permanent(&err) || delivery.last_attempt {
                        JobError::Failed {
                            code: err.code,
                            message: err.message,
                            log_tail: String::new(),
                        }
                    } else {
                        JobError::Retry(retry(err))
                    });
                }
            };
            failpoint::hit("deployer.job.after_platform_deploy");
            let deployment = deployed.deployment.unwrap_or_default();
            let version = deployed.version.unwrap_or_default();
            record.deployment_id = deployment.id.clone();
            record.version_id = version.id.clone();
            record.url = deployment.url.clone();
            *revision = self.save(key, record, *revision).await?;
            failpoint::hit("deployer.job.after_version_saved");
        }
        // Every delivery: the deployment's and the name's records exist (both idempotent).
        self.remember_deployment(record, &req, &names_key).await?;
        // Followed until ready or failed, within the job's time (from its first delivery).
        let started = Instant::now();
        let version = loop {
            let got: VersionReply = self
                .rpc
                .call(
                    &executor("version.get"),
                    &GetVersionRequest {
                        deployment_id: record.deployment_id.clone(),
                        version_id: record.version_id.clone(),
                    },
                )
                .await
                .map_err(|e| JobError::Retry(retry(rpc_error(e))))?;
            let v = got.version.unwrap_or_default();
            if v.state == VersionState::Ready as i32 || v.state == VersionState::Failed as i32 {
                break v;
            }
            if started.elapsed() > self.job_timeout {
                return Err(JobError::Failed {
                    code: ErrorCode::Timeout,
                    message: format!("the build did not finish within {:?}", self.job_timeout),
                    log_tail: String::new(),
                });
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        if version.state == VersionState::Failed as i32 {
            let logs: Result<VersionLogsReply, _> = self
                .rpc
                .call(
                    &executor("version.logs"),
                    &VersionLogsRequest {
                        deployment_id: record.deployment_id.clone(),
                        version_id: record.version_id.clone(),
                    },
                )
                .await;
            let lines = logs.map(|l| l.lines).unwrap_or_default();
            let tail = lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n");
            return Err(JobError::Failed {
                code: ErrorCode::InvalidInput,
                message: if version.error.is_empty() {
                    "the build failed".into()
                } else {
                    version.error.clone()
                },
                log_tail: tail,
            });
        }
        if record.build_ms == 0 {
            // From the version's creation to the first time it is seen ready, kept: what is
            // billed does not depend on when a redelivery looks.
            let seen = now();
            record.build_ms = version
                .created_at
                .map(|c| {
                    let ms = (seen.seconds - c.seconds) * 1000
                        + i64::from(seen.nanos - c.nanos) / 1_000_000;
                    u64::try_from(ms).unwrap_or(0)
                })
                .unwrap_or(0)
                .max(1);
            record.finished_at = Some(seen);
            *revision = self.save(key, record, *revision).await?;
            self.metrics.built(record.build_ms as f64 / 1000.0);
        }
        failpoint::hit("deployer.job.after_ready");
        self.progress(&req.run_id, job_id, &who, "verifying")
            .await?;
        let verifying = Instant::now();
        let url = if version.url.is_empty() {
            record.url.clone()
        } else {
            version.url.clone()
        };
        if let Verdict::Wrong(why) = self
            .verifier
            .serves(&url, &version.id, &version.digest, self.verify_timeout)
            .await
        {
            return Err(JobError::Failed {
                code: ErrorCode::Unavailable,
                message: format!("the new version is not served: {why}"),
                log_tail: String::new(),
            });
        }
        self.metrics.verified(verifying.elapsed().as_secs_f64());
        record.version = version.number;
        record.url = url.clone();
        record.digest = version.digest.clone();
        record.state = DeployJobState::Succeeded.into();
        self.add_version(record, &req, &version, &url).await?;
        *revision = self.save(key, record, *revision).await?;
        failpoint::hit("deployer.job.after_record");
        Ok(())
    }

    /// Reserves `names_key` for this job, or finds the deployment it names. Returns the existing
    /// deployment's id, or `None` when this job is the one to make it. Another job that holds the
    /// reservation without a deployment yet: try later.
    async fn reserve_name(
        &self,
        names_key: &str,
        job_id: &str,
    ) -> Result<Option<String>, JobError> {
        let mine = DeploymentNameRecord {
            deployment_id: String::new(),
            reserved_by: job_id.to_string(),
        };
        match self.names.create(names_key, &mine).await {
            Ok(_) => return Ok(None),
            Err(RecordError::Exists { .. }) => {}
            Err(e) => return Err(JobError::Retry(retry(e))),
        }
        let (existing, _) = self
            .names
            .get(names_key)
            .await
            .map_err(|e| JobError::Retry(retry(e)))?
            .ok_or_else(|| JobError::Retry(retry("the name's record vanished")))?;
        if !existing.deployment_id.is_empty() {
            Ok(Some(existing.deployment_id))
        } else if existing.reserved_by == job_id {
            Ok(None)
        } else {
            Err(JobError::Retry(HandlerError::retry(
                Duration::from_secs(1),
                "another job is making this deployment",
            )))
        }
    }

    /// The deployment's record (once) and its name's deployment id (once per end user and
    /// name); both idempotent, so every delivery may call them.
    async fn remember_deployment(
        &self,
        job: &DeployJobRecord,
        req: &EnqueueDeployRequest,
        names_key: &str,
    ) -> Result<(), JobError> {
        let dep_key = crate::service::dep_key(&job.deployment_id).map_err(JobError::failed)?;
        let record = DeploymentRecord {
            deployment_id: job.deployment_id.clone(),
            name: req.name.clone(),
            attribution: req.attribution.clone(),
            run_id: req.run_id.clone(),
            url: job.url.clone(),
            versions: Vec::new(),
            created_at: Some(now()),
            deleted_at: None,
            serving: 0,
        };
        match self.deployments.create(&dep_key, &record).await {
            Ok(_) | Err(RecordError::Exists { .. }) => {}
            Err(e) => return Err(JobError::Retry(retry(e))),
        }
        // A deployment taken down meanwhile keeps its name free.
        let taken_down = self
            .deployments
            .get(&dep_key)
            .await
            .map_err(|e| JobError::Retry(retry(e)))?
            .is_some_and(|(d, _)| d.deleted_at.is_some());
        if taken_down {
            return Err(JobError::Failed {
                code: ErrorCode::NotFound,
                message: "the deployment was taken down during the deploy".into(),
                log_tail: String::new(),
            });
        }
        for _ in 0..8 {
            let current = self
                .names
                .get(names_key)
                .await
                .map_err(|e| JobError::Retry(retry(e)))?;
            let named = DeploymentNameRecord {
                deployment_id: job.deployment_id.clone(),
                reserved_by: String::new(),
            };
            let written = match current {
                None => self.names.create(names_key, &named).await.map(|_| ()),
                Some((n, rev)) if n.deployment_id.is_empty() && n.reserved_by == job.job_id => {
                    self.names.update(names_key, &named, rev).await.map(|_| ())
                }
                Some(_) => return Ok(()),
            };
            match written {
                Ok(()) => return Ok(()),
                Err(RecordError::Exists { .. } | RecordError::Conflict { .. }) => continue,
                Err(e) => return Err(JobError::Retry(retry(e))),
            }
        }
        Err(JobError::Retry(retry("the name's record kept changing")))
    }

    /// Adds the version to its deployment's record (once: keyed by its platform id).
    async fn add_version(
        &self,
        record: &DeployJobRecord,
        req: &EnqueueDeployRequest,
        version: &DeploymentVersion,
        url: &str,
    ) -> Result<(), JobError> {
        let dep_key = crate::service::dep_key(&record.deployment_id).map_err(JobError::failed)?;
        for _ in 0..8 {
            let Some((mut dep, rev)) = self
                .deployments
                .get(&dep_key)
                .await
                .map_err(|e| JobError::Retry(retry(e)))?
            else {
                return Err(JobError::Retry(retry("the deployment's record is missing")));
            };
            if dep.versions.iter().any(|v| v.version_id == version.id) {
                return Ok(());
            }
            dep.url = url.to_string();
            // A new ready version serves (the platform points the deployment at it).
            dep.serving = version.number;
            dep.versions.push(VersionRecord {
                number: version.number,
                version_id: version.id.clone(),
                digest: version.digest.clone(),
                source_sandbox_id: req.sandbox_id.clone(),
                snapshot_id: req.snapshot_id.clone(),
                state: VersionState::Ready.into(),
                url: url.to_string(),
                created_at: version.created_at,
                ready_at: record.finished_at,
                build_ms: record.build_ms,
                job_id: record.job_id.clone(),
            });
            match self.deployments.update(&dep_key, &dep, rev).await {
                Ok(_) => return Ok(()),
                Err(RecordError::Conflict { .. }) => continue,
                Err(e) => return Err(JobError::Retry(retry(e))),
            }
        }
        Err(JobError::Retry(retry(
            "the deployment's record kept changing",
        )))
    }

    /// `deploys` and `build_ms` for a version that became ready: ids of the version, time of
    /// its readiness (both from the record), so a republish is the same event.
    async fn count(&self, record: &DeployJobRecord) -> Result<(), HandlerError> {
        let req = record.request.clone().unwrap_or_default();
        let a = req.attribution.clone().unwrap_or_default();
        for (meter, quantity) in [(meters::DEPLOYS, 1), (meters::BUILD_MS, record.build_ms)] {
            let unit = meters::find(meter).map_or("", |m| m.unit);
            let event = UsageEvent {
                id: format!("{}:v{}:{meter}", record.deployment_id, record.version),
                source: "slipway/deployer".into(),
                r#type: meters::USAGE_EVENT_TYPE.into(),
                subject: a.user_id.clone(),
                time: record.finished_at,
                spec_version: meters::CLOUDEVENTS_SPEC_VERSION.into(),
                meter: meter.into(),
                quantity: quantity.to_string(),
                unit: unit.into(),
                run_id: req.run_id.clone(),
                sandbox_id: req.sandbox_id.clone(),
                project_id: a.project_id.clone(),
                workspace_id: a.workspace_id.clone(),
                counter_from: 0,
                counter_to: 0,
            };
            self.usage.publish(&event).await.map_err(retry)?;
        }
        Ok(())
    }

    async fn progress(
        &self,
        run: &str,
        job_id: &str,
        who: &Option<Attribution>,
        phase: &str,
    ) -> Result<(), HandlerError> {
        self.event(
            run,
            &Step::deploy_phase(job_id, phase),
            who,
            Payload::DeployProgress(DeployProgress {
                job_id: job_id.to_string(),
                phase: phase.to_string(),
                message: String::new(),
            }),
        )
        .await
    }

    async fn event(
        &self,
        run: &str,
        step: &Step,
        who: &Option<Attribution>,
        payload: Payload,
    ) -> Result<(), HandlerError> {
        self.events
            .publish(run, step, "", who.clone(), payload)
            .await
            .map(|_| ())
            .map_err(retry)
    }

    async fn save(
        &self,
        key: &str,
        record: &mut DeployJobRecord,
        revision: u64,
    ) -> Result<u64, HandlerError> {
        record.updated_at = Some(now());
        // A conflict: another delivery of this job moved it on; this one stops, the other
        // finishes.
        self.jobs
            .update(key, record, revision)
            .await
            .map_err(|e| retry(store(e)))
    }
}

enum JobError {
    /// Settled: the job failed (published as `deploy_failed`).
    Failed {
        code: ErrorCode,
        message: String,
        log_tail: String,
    },
    /// Try again later.
    Retry(HandlerError),
}

impl JobError {
    fn failed(e: ServiceError) -> Self {
        JobError::Failed {
            code: e.code,
            message: e.message,
            log_tail: String::new(),
        }
    }
}

impl From<HandlerError> for JobError {
    fn from(e: HandlerError) -> Self {
        JobError::Retry(e)
    }
}

fn is_permanent(e: &ServiceError) -> bool {
    matches!(
        e.code,
        ErrorCode::InvalidInput | ErrorCode::NotFound | ErrorCode::Forbidden
    )
}
