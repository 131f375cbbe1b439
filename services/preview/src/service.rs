//! The preview service's state and its preview operations `open` and `token` (closing is in
//! `close`, share links in `shares`, tickets in `tickets`). Every record is written before the platform call it
//! stands for, and every platform call carries a key derived from the record, so a crash at any
//! point is resumed by the caller's retry without a second preview or link.

use std::sync::{Arc, OnceLock};

use async_nats::jetstream;
use slipway_common::config::PreviewSettings;
use slipway_common::records::{RecordError, Records};
use slipway_common::run_events::{RunEventPublisher, Step};
use slipway_common::service::now;
use slipway_common::topology::buckets;
use slipway_common::{App, RpcClient, Service, ServiceError};
use slipway_proto::v1::run_event::Payload;
use slipway_proto::v1::*;

use crate::ids::{branch_or_main, check_minted, check_run, digest, preview_id, pv_key, run_key};
use crate::index::Index;
use crate::metrics::PreviewMetrics;

/// What every operation, loop and HTTP handler shares.
pub struct Preview {
    pub(crate) rpc: RpcClient,
    pub(crate) jetstream: jetstream::Context,
    pub(crate) previews: Records<PreviewRecord>,
    pub(crate) runs: Records<RunPreviewsRecord>,
    pub(crate) shares: Records<ShareRecord>,
    pub(crate) tickets: Records<TicketRecord>,
    pub(crate) events: RunEventPublisher,
    pub(crate) settings: PreviewSettings,
    pub(crate) metrics: PreviewMetrics,
    pub(crate) index: Arc<Index>,
    /// Where browsers reach the browser API (`http://<bound address>`), once it listens.
    pub(crate) browser_base: OnceLock<String>,
}

/// A store error as the service's error (the bucket is unavailable).
pub(crate) fn store(e: RecordError) -> ServiceError {
    ServiceError::unavailable(format!("preview records: {e}"))
}

pub(crate) fn executor(op: &str) -> String {
    Service::Executor.op(op)
}

/// An error the executor answered, as this service's (the executor already names the field).
pub(crate) fn upstream(e: slipway_common::RpcError) -> ServiceError {
    match e.service_error() {
        Some(s) => s.clone(),
        None => ServiceError::unavailable(format!("the executor: {e}")),
    }
}

pub(crate) fn is_not_found(e: &slipway_common::RpcError) -> bool {
    e.service_error()
        .is_some_and(|s| s.code == ErrorCode::NotFound)
}

impl Preview {
    pub async fn new(
        app: &App,
        index: Arc<Index>,
        metrics: PreviewMetrics,
    ) -> anyhow::Result<Self> {
        let previews = app.bucket(buckets::PREVIEWS).await?;
        let shares = app.bucket(buckets::SHARES).await?;
        let tickets = app.bucket(buckets::TICKETS).await?;
        Ok(Self {
            rpc: app.rpc.clone(),
            jetstream: app.jetstream.clone(),
            previews: Records::new(previews.clone()),
            runs: Records::new(previews),
            shares: Records::new(shares),
            tickets: Records::new(tickets),
            events: RunEventPublisher::new(app.jetstream.clone(), Service::Preview),
            settings: app.settings.preview.clone(),
            metrics,
            index,
            browser_base: OnceLock::new(),
        })
    }

    /// Adds an id to the run's index (`close` finds everything there); refused once the run is
    /// closed.
    pub(crate) async fn register(
        &self,
        run_id: &str,
        preview: Option<&str>,
        share: Option<&str>,
    ) -> Result<(), ServiceError> {
        let key = run_key(run_id)?;
        let fresh = RunPreviewsRecord {
            run_id: run_id.to_string(),
            preview_ids: preview.map(str::to_string).into_iter().collect(),
            share_ids: share.map(str::to_string).into_iter().collect(),
            closed: false,
        };
        match self.runs.create(&key, &fresh).await {
            Ok(_) => return Ok(()),
            Err(RecordError::Exists { .. }) => {}
            Err(e) => return Err(store(e)),
        }
        let index = self
            .runs
            .modify(&key, |r| {
                if r.closed {
                    return false;
                }
                let mut changed = false;
                if let Some(p) = preview
                    && !r.preview_ids.iter().any(|x| x == p)
                {
                    r.preview_ids.push(p.to_string());
                    changed = true;
                }
                if let Some(s) = share
                    && !r.share_ids.iter().any(|x| x == s)
                {
                    r.share_ids.push(s.to_string());
                    changed = true;
                }
                changed
            })
            .await
            .map_err(store)?;
        // Nothing is added to a closed run (the change above wrote nothing then).
        if index.is_some_and(|r| r.closed) {
            return Err(closed(run_id));
        }
        Ok(())
    }

    pub(crate) async fn run_closed(&self, run_id: &str) -> Result<bool, ServiceError> {
        Ok(self
            .runs
            .get(&run_key(run_id)?)
            .await
            .map_err(store)?
            .is_some_and(|(r, _)| r.closed))
    }

    /// `open`: the preview of (run, branch, port) on `sandbox_id`, made once, with a fresh token.
    pub async fn open(&self, req: OpenPreviewRequest) -> Result<OpenPreviewReply, ServiceError> {
        check_run(&req.run_id)?;
        let branch = branch_or_main(&req.branch)?;
        if req.port == 0 || req.port > 65_535 {
            return Err(
                ServiceError::invalid_input("port: 1 to 65535").with_detail("field", "port")
            );
        }
        slipway_proto::validate::check_resource_id("sandbox_id", &req.sandbox_id)
            .map_err(ServiceError::from)?;
        let id = preview_id(&req.run_id, &branch, req.port);
        let key = pv_key(&id);
        let found = self.previews.get(&key).await.map_err(store)?;
        let mut record = match found {
            Some((r, _)) if r.state == PreviewState::Closed as i32 => {
                return Err(closed(&req.run_id));
            }
            Some((r, _)) if r.sandbox_id == req.sandbox_id => r,
            other => {
                // New, or the branch moved to another sandbox (a restore): check the sandbox is
                // the run's branch before anything points at it.
                let attribution = self
                    .check_sandbox(&req.sandbox_id, &req.run_id, &branch)
                    .await?;
                self.register(&req.run_id, Some(&id), None).await?;
                let record = PreviewRecord {
                    preview_id: id.clone(),
                    run_id: req.run_id.clone(),
                    branch: branch.clone(),
                    port: req.port,
                    sandbox_id: req.sandbox_id.clone(),
                    attribution,
                    state: PreviewState::Opening.into(),
                    ..Default::default()
                };
                match other {
                    None => match self.previews.create(&key, &record).await {
                        Ok(_) => record,
                        Err(RecordError::Exists { .. }) => self.current(&key).await?,
                        Err(e) => return Err(store(e)),
                    },
                    Some((old, _)) => {
                        // The old sandbox's preview and relay go first: nothing else would
                        // find them once the record points elsewhere.
                        self.retire(&old).await?;
                        let target = record.clone();
                        self.previews
                            .modify(&key, |r| {
                                if r.sandbox_id == target.sandbox_id {
                                    return false;
                                }
                                *r = target.clone();
                                true
                            })
                            .await
                            .map_err(store)?
                            .ok_or_else(|| {
                                ServiceError::unavailable("the preview record vanished")
                            })?
                    }
                }
            }
        };
        if record.platform_preview_id.is_empty() {
            record = self.make_platform_preview(&key, record).await?;
        }
        if record.state != PreviewState::Open as i32 {
            return Err(closed(&req.run_id));
        }
        let _: RelayReply = self
            .rpc
            .call(
                &executor("relay.start"),
                &RelayRequest {
                    sandbox_id: record.sandbox_id.clone(),
                    run_id: record.run_id.clone(),
                },
            )
            .await
            .map_err(upstream)?;
        // `close` may have run since the record was read: it stopped the relays it knew of,
        // so this one must not outlive it.
        let now_closed = self.run_closed(&record.run_id).await?
            || self.current(&key).await?.state == PreviewState::Closed as i32;
        if now_closed {
            self.stop_relay(&record.sandbox_id, &record.run_id).await?;
            return Err(closed(&req.run_id));
        }
        let token = self.mint_token(&record).await?;
        if !record.announced {
            self.announce(&key, &record, &token).await?;
        }
        Ok(OpenPreviewReply {
            preview_id: id,
            url: token.url,
            token_expires_at: token.expires_at,
        })
    }

    async fn current(&self, key: &str) -> Result<PreviewRecord, ServiceError> {
        self.previews
            .get(key)
            .await
            .map_err(store)?
            .map(|(r, _)| r)
            .ok_or_else(|| ServiceError::unavailable("the preview record vanished while read"))
    }

    /// The sandbox must exist and serve this run's branch: nobody opens a preview of another
    /// tenant's sandbox by naming it. Answers the sandbox's attribution.
    async fn check_sandbox(
        &self,
        sandbox_id: &str,
        run_id: &str,
        branch: &str,
    ) -> Result<Option<Attribution>, ServiceError> {
        let got: Result<SandboxReply, _> = self
            .rpc
            .call(
                &executor("sandbox.get"),
                &GetSandboxRequest {
                    sandbox_id: sandbox_id.to_string(),
                    name: String::new(),
                },
            )
            .await;
        let sandbox = match got {
            Ok(r) => r.sandbox.unwrap_or_default(),
            Err(e) if is_not_found(&e) => {
                return Err(ServiceError::not_found(format!(
                    "sandbox_id: no sandbox `{sandbox_id}`"
                ))
                .with_detail("field", "sandbox_id"));
            }
            Err(e) => return Err(upstream(e)),
        };
        let sandbox_branch = if sandbox.branch.is_empty() {
            "main"
        } else {
            sandbox.branch.as_str()
        };
        if sandbox.run_id != run_id || sandbox_branch != branch {
            return Err(ServiceError::invalid_input(format!(
                "sandbox_id: sandbox `{sandbox_id}` does not serve branch `{branch}` of run `{run_id}`"
            ))
            .with_detail("field", "sandbox_id"));
        }
        Ok(sandbox.attribution)
    }

    /// The platform's preview for the record (keyed by preview and sandbox, so a retry finds
    /// the same one), recorded; deleted again if the run closed meanwhile.
    async fn make_platform_preview(
        &self,
        key: &str,
        record: PreviewRecord,
    ) -> Result<PreviewRecord, ServiceError> {
        let made: PreviewReply = self
            .rpc
            .call(
                &executor("preview.create"),
                &CreatePreviewRequest {
                    sandbox_id: record.sandbox_id.clone(),
                    port: record.port,
                    idempotency_key: format!("preview:{}:{}", record.preview_id, record.sandbox_id),
                },
            )
            .await
            .map_err(upstream)?;
        slipway_common::failpoint::hit("preview.open.after_platform");
        let made = made.preview.unwrap_or_default();
        let platform_id = made.id;
        let platform_url = made.url;
        if platform_id.is_empty() {
            return Err(ServiceError::unavailable(
                "the executor's preview has no id",
            ));
        }
        let sandbox = record.sandbox_id.clone();
        let updated = self
            .previews
            .modify(key, |r| {
                if r.sandbox_id != sandbox || r.state != PreviewState::Opening as i32 {
                    return false;
                }
                r.platform_preview_id = platform_id.clone();
                r.url = platform_url.clone();
                r.state = PreviewState::Open.into();
                r.opened_at = Some(now());
                true
            })
            .await
            .map_err(store)?
            .ok_or_else(|| ServiceError::unavailable("the preview record vanished"))?;
        // `close` may have run between the record and the platform call: it found no platform
        // preview to delete, so this one must not outlive the run.
        if updated.state == PreviewState::Closed as i32 || self.run_closed(&record.run_id).await? {
            self.close_preview(&updated).await?;
            return Err(closed(&record.run_id));
        }
        Ok(updated)
    }

    /// A short-lived token URL for the preview's port; for a port the platform mints no tokens
    /// for, the platform preview's own URL (a capability that lasts until `close`).
    pub(crate) async fn mint_token(
        &self,
        record: &PreviewRecord,
    ) -> Result<PreviewTokenReply, ServiceError> {
        let token: Result<PreviewTokenReply, _> = self
            .rpc
            .call(
                &executor("preview.token"),
                &PreviewTokenRequest {
                    sandbox_id: record.sandbox_id.clone(),
                    port: record.port,
                    expires_in_sec: self.settings.token_ttl_sec,
                    scope: TokenScope::Interact.into(),
                },
            )
            .await;
        match token {
            Ok(token) => {
                self.metrics.token_issued();
                Ok(token)
            }
            Err(e)
                if !record.url.is_empty()
                    && e.service_error().is_some_and(|s| {
                        s.code == ErrorCode::InvalidInput
                            && s.details.get("field").is_some_and(|f| f == "port")
                    }) =>
            {
                Ok(PreviewTokenReply {
                    token: String::new(),
                    url: record.url.clone(),
                    expires_at: None,
                })
            }
            Err(e) => Err(upstream(e)),
        }
    }

    /// `preview_ready`, once per preview and sandbox.
    async fn announce(
        &self,
        key: &str,
        record: &PreviewRecord,
        token: &PreviewTokenReply,
    ) -> Result<(), ServiceError> {
        let step = Step::once(&format!(
            "preview.{}.{}",
            record.preview_id,
            digest(&[&record.sandbox_id])
        ));
        self.events
            .publish(
                &record.run_id,
                &step,
                &record.branch,
                record.attribution.clone(),
                Payload::PreviewReady(PreviewReady {
                    preview_id: record.preview_id.clone(),
                    url: token.url.clone(),
                    token_expires_at: token.expires_at,
                    port: record.port,
                }),
            )
            .await
            .map_err(|e| ServiceError::unavailable(format!("publishing preview_ready: {e}")))?;
        let sandbox = record.sandbox_id.clone();
        self.previews
            .modify(key, |r| {
                let stale = r.announced || r.sandbox_id != sandbox;
                r.announced = true;
                !stale
            })
            .await
            .map_err(store)?;
        Ok(())
    }

    /// `token`: a fresh short-lived URL for an open preview (earlier ones stay valid until
    /// their own expiry).
    pub async fn token(
        &self,
        req: PreviewTokenRefreshRequest,
    ) -> Result<PreviewTokenRefreshReply, ServiceError> {
        check_minted("preview_id", "pv_", &req.preview_id)?;
        let Some((record, _)) = self
            .previews
            .get(&pv_key(&req.preview_id))
            .await
            .map_err(store)?
        else {
            return Err(ServiceError::not_found(format!(
                "preview_id: no preview `{}`",
                req.preview_id
            ))
            .with_detail("field", "preview_id"));
        };
        if record.state != PreviewState::Open as i32 {
            return Err(ServiceError::new(
                ErrorCode::FailedPrecondition,
                format!("preview `{}` is not open", req.preview_id),
            ));
        }
        let token = self.mint_token(&record).await?;
        Ok(PreviewTokenRefreshReply {
            url: token.url,
            expires_at: token.expires_at,
        })
    }
}

pub(crate) fn closed(run_id: &str) -> ServiceError {
    ServiceError::new(
        ErrorCode::FailedPrecondition,
        format!("run `{run_id}` is closed: its previews and links are gone"),
    )
}
