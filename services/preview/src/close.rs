//! Closing: a run's previews deleted at the platform, its links revoked, its relays stopped,
//! and the run marked closed so nothing new opens for it (`close`); and what a preview leaves on
//! a sandbox it no longer points at.

use slipway_common::ServiceError;
use slipway_common::records::RecordError;
use slipway_proto::v1::*;

use crate::ids::{check_run, pv_key, run_key};
use crate::service::{Preview, executor, is_not_found, store, upstream};

impl Preview {
    /// Deletes a preview at the platform and marks it closed; `true` when this call closed it.
    pub(crate) async fn close_preview(&self, record: &PreviewRecord) -> Result<bool, ServiceError> {
        self.delete_platform_preview(record).await?;
        let changed = self
            .previews
            .modify(&pv_key(&record.preview_id), |r| {
                if r.state == PreviewState::Closed as i32 {
                    return false;
                }
                r.state = PreviewState::Closed.into();
                true
            })
            .await
            .map_err(store)?;
        Ok(changed.is_some_and(|_| record.state != PreviewState::Closed as i32))
    }

    /// What a preview left on a sandbox it no longer points at: its platform preview and the
    /// sandbox's relay.
    pub(crate) async fn retire(&self, old: &PreviewRecord) -> Result<(), ServiceError> {
        self.delete_platform_preview(old).await?;
        self.stop_relay(&old.sandbox_id, &old.run_id).await
    }

    pub(crate) async fn stop_relay(
        &self,
        sandbox_id: &str,
        run_id: &str,
    ) -> Result<(), ServiceError> {
        let stopped: Result<RelayReply, _> = self
            .rpc
            .call(
                &executor("relay.stop"),
                &RelayRequest {
                    sandbox_id: sandbox_id.to_string(),
                    run_id: run_id.to_string(),
                },
            )
            .await;
        match stopped {
            Ok(_) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            Err(e) => Err(upstream(e)),
        }
    }

    /// Deletes the record's platform preview. One recorded but never confirmed is looked up by
    /// its key first (the platform may have made it before a crash).
    async fn delete_platform_preview(&self, record: &PreviewRecord) -> Result<(), ServiceError> {
        let mut platform_id = record.platform_preview_id.clone();
        if platform_id.is_empty() {
            let made: Result<PreviewReply, _> = self
                .rpc
                .call(
                    &executor("preview.create"),
                    &CreatePreviewRequest {
                        sandbox_id: record.sandbox_id.clone(),
                        port: record.port,
                        idempotency_key: format!(
                            "preview:{}:{}",
                            record.preview_id, record.sandbox_id
                        ),
                    },
                )
                .await;
            match made {
                Ok(r) => platform_id = r.preview.map(|p| p.id).unwrap_or_default(),
                // The sandbox is gone, and its previews with it.
                Err(e)
                    if is_not_found(&e)
                        || e.service_error()
                            .is_some_and(|s| s.code == ErrorCode::Conflict) => {}
                Err(e) => return Err(upstream(e)),
            }
        }
        if !platform_id.is_empty() {
            let done: Result<DeletePreviewReply, _> = self
                .rpc
                .call(
                    &executor("preview.delete"),
                    &DeletePreviewRequest {
                        sandbox_id: record.sandbox_id.clone(),
                        preview_id: platform_id,
                    },
                )
                .await;
            match done {
                Ok(_) => {}
                Err(e) if is_not_found(&e) => {}
                Err(e) => return Err(upstream(e)),
            }
        }
        Ok(())
    }

    /// `close`: every preview of the run deleted, every link revoked, every relay stopped;
    /// nothing new opens for the run. A second close finds nothing left to do.
    pub async fn close(
        &self,
        req: ClosePreviewsRequest,
    ) -> Result<ClosePreviewsReply, ServiceError> {
        check_run(&req.run_id)?;
        let key = run_key(&req.run_id)?;
        let closed_index = RunPreviewsRecord {
            run_id: req.run_id.clone(),
            closed: true,
            ..Default::default()
        };
        let index = match self.runs.create(&key, &closed_index).await {
            Ok(_) => closed_index,
            Err(RecordError::Exists { .. }) => self
                .runs
                .modify(&key, |r| {
                    let was = r.closed;
                    r.closed = true;
                    !was
                })
                .await
                .map_err(store)?
                .unwrap_or(closed_index),
            Err(e) => return Err(store(e)),
        };
        let mut reply = ClosePreviewsReply::default();
        let mut sandboxes = std::collections::BTreeSet::new();
        for id in &index.preview_ids {
            let Some((record, _)) = self.previews.get(&pv_key(id)).await.map_err(store)? else {
                continue;
            };
            sandboxes.insert(record.sandbox_id.clone());
            if record.state != PreviewState::Closed as i32 && self.close_preview(&record).await? {
                reply.previews_closed += 1;
            }
        }
        for id in &index.share_ids {
            match self.revoke_link(&req.run_id, id).await {
                Ok((_, true)) => reply.shares_revoked += 1,
                Ok((_, false)) => {}
                // Indexed, then a crash before its record: nothing was handed out.
                Err(e) if e.code == ErrorCode::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        for sandbox in sandboxes {
            self.stop_relay(&sandbox, &req.run_id).await?;
        }
        Ok(reply)
    }
}
