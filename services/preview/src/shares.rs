//! Share links: one platform capability per link (a sandbox share), so revoking one leaves the
//! others working. Their expiry is announced by the sweeper (`sweeper`).

use slipway_common::records::RecordError;
use slipway_common::run_events::Step;
use slipway_common::service::{now, required};
use slipway_proto::v1::run_event::Payload;
use slipway_proto::v1::*;

use crate::ids::{branch_or_main, check_minted, check_run, pv_key, run_key, sh_key, share_id};
use crate::service::{Preview, executor, is_not_found, store, upstream};

pub(crate) fn millis(t: Option<pbjson_types::Timestamp>) -> i64 {
    t.map_or(0, |t| t.seconds * 1000 + i64::from(t.nanos / 1_000_000))
}

pub(crate) fn now_ms() -> i64 {
    millis(Some(now()))
}

/// The link as callers see it, with `expired` as of now.
fn link(record: &ShareRecord) -> ShareLink {
    let mut share = record.share.clone().unwrap_or_default();
    share.expired = !share.revoked && millis(share.expires_at) <= now_ms();
    share
}

fn no_share(run_id: &str, share_id: &str) -> slipway_common::ServiceError {
    slipway_common::ServiceError::not_found(format!(
        "share_id: run `{run_id}` has no share link `{share_id}`"
    ))
    .with_detail("field", "share_id")
}

impl Preview {
    /// `share.create`: a public read-only link to the branch's app that expires (TTL capped by
    /// `preview.max_share_ttl_sec`); the same key answers the same link.
    pub async fn share_create(
        &self,
        req: CreateShareLinkRequest,
    ) -> Result<ShareLinkReply, slipway_common::ServiceError> {
        use slipway_common::ServiceError;
        check_run(&req.run_id)?;
        let branch = branch_or_main(&req.branch)?;
        required("idempotency_key", &req.idempotency_key)?;
        let max = self.settings.max_share_ttl_sec;
        let ttl = match req.ttl_sec {
            0 => self.settings.share_ttl_sec,
            t if t > max => {
                return Err(ServiceError::invalid_input(format!(
                    "ttl_sec: at most {max} seconds (`preview.max_share_ttl_sec`)"
                ))
                .with_detail("field", "ttl_sec"));
            }
            t => t,
        };
        let id = share_id(&req.run_id, &req.idempotency_key);
        let key = sh_key(&id);
        let record = match self.shares.get(&key).await.map_err(store)? {
            Some((r, _)) => {
                let same = r.share.as_ref().is_some_and(|s| s.branch == branch) && r.ttl_sec == ttl;
                if !same {
                    return Err(ServiceError::invalid_input(
                        "idempotency_key: already used for another share link of this run",
                    )
                    .with_detail("field", "idempotency_key"));
                }
                r
            }
            None => {
                let preview = self.open_preview_of(&req.run_id, &branch).await?;
                self.register(&req.run_id, None, Some(&id)).await?;
                let mut expires_at = now();
                expires_at.seconds += ttl as i64;
                let record = ShareRecord {
                    share: Some(ShareLink {
                        share_id: id.clone(),
                        run_id: req.run_id.clone(),
                        branch: branch.clone(),
                        url: String::new(),
                        created_at: Some(now()),
                        expires_at: Some(expires_at),
                        revoked: false,
                        expired: false,
                    }),
                    sandbox_id: preview.sandbox_id,
                    platform_share_id: String::new(),
                    idempotency_key: req.idempotency_key.clone(),
                    attribution: preview.attribution,
                    ttl_sec: ttl,
                    announced: false,
                    expiry_announced: false,
                };
                match self.shares.create(&key, &record).await {
                    Ok(_) => record,
                    Err(RecordError::Exists { .. }) => self
                        .shares
                        .get(&key)
                        .await
                        .map_err(store)?
                        .map(|(r, _)| r)
                        .ok_or_else(|| ServiceError::unavailable("the share record vanished"))?,
                    Err(e) => return Err(store(e)),
                }
            }
        };
        let mut record = record;
        if record.platform_share_id.is_empty() && !record.share.as_ref().is_some_and(|s| s.revoked)
        {
            record = self.make_platform_share(&key, record).await?;
        }
        if !record.announced && !record.share.as_ref().is_some_and(|s| s.revoked) {
            let share = link(&record);
            self.publish(
                &record,
                Step::once(&format!("share.{id}")),
                Payload::ShareCreated(ShareCreated {
                    share_id: id.clone(),
                    url: share.url.clone(),
                    expires_at: share.expires_at,
                }),
            )
            .await?;
            record = self
                .shares
                .modify(&key, |r| {
                    let was = r.announced;
                    r.announced = true;
                    !was
                })
                .await
                .map_err(store)?
                .unwrap_or(record);
        }
        Ok(ShareLinkReply {
            share: Some(link(&record)),
        })
    }

    /// The open preview of the run's branch: the sandbox a link points at.
    async fn open_preview_of(
        &self,
        run_id: &str,
        branch: &str,
    ) -> Result<PreviewRecord, slipway_common::ServiceError> {
        use slipway_common::ServiceError;
        let index = self
            .runs
            .get(&run_key(run_id)?)
            .await
            .map_err(store)?
            .map(|(r, _)| r);
        let Some(index) = index else {
            return Err(
                ServiceError::not_found(format!("run_id: no previews of run `{run_id}`"))
                    .with_detail("field", "run_id"),
            );
        };
        if index.closed {
            return Err(crate::service::closed(run_id));
        }
        for id in &index.preview_ids {
            if let Some((p, _)) = self.previews.get(&pv_key(id)).await.map_err(store)?
                && p.branch == branch
                && p.state == PreviewState::Open as i32
            {
                return Ok(p);
            }
        }
        Err(ServiceError::new(
            ErrorCode::FailedPrecondition,
            format!("branch `{branch}` of run `{run_id}` has no open preview: open one first"),
        )
        .with_detail("field", "branch"))
    }

    async fn make_platform_share(
        &self,
        key: &str,
        record: ShareRecord,
    ) -> Result<ShareRecord, slipway_common::ServiceError> {
        let id = record
            .share
            .as_ref()
            .map(|s| s.share_id.clone())
            .unwrap_or_default();
        let made: ShareReply = self
            .rpc
            .call(
                &executor("share.create"),
                &CreateShareRequest {
                    sandbox_id: record.sandbox_id.clone(),
                    expires_in_sec: record.ttl_sec,
                    idempotency_key: format!("share:{id}"),
                },
            )
            .await
            .map_err(upstream)?;
        slipway_common::failpoint::hit("preview.share.after_platform");
        let made = made.share.unwrap_or_default();
        let updated = self
            .shares
            .modify(key, |r| {
                if !r.platform_share_id.is_empty() {
                    return false;
                }
                r.platform_share_id = made.id.clone();
                if let Some(s) = r.share.as_mut() {
                    s.url = made.url.clone();
                    if made.expires_at.is_some() {
                        s.expires_at = made.expires_at;
                    }
                }
                true
            })
            .await
            .map_err(store)?
            .ok_or_else(|| {
                slipway_common::ServiceError::unavailable("the share record vanished")
            })?;
        // Revoked (or its run closed) while the platform made it: it must not stay open.
        if updated.share.as_ref().is_some_and(|s| s.revoked) {
            self.revoke_at_platform(&updated).await?;
        }
        Ok(updated)
    }

    async fn revoke_at_platform(
        &self,
        record: &ShareRecord,
    ) -> Result<(), slipway_common::ServiceError> {
        if record.platform_share_id.is_empty() {
            return Ok(());
        }
        let done: Result<RevokeReply, _> = self
            .rpc
            .call(
                &executor("share.revoke"),
                &RevokeShareRequest {
                    sandbox_id: record.sandbox_id.clone(),
                    share_id: record.platform_share_id.clone(),
                },
            )
            .await;
        match done {
            Ok(_) => Ok(()),
            // Its sandbox is gone: so is the link.
            Err(e) if is_not_found(&e) => Ok(()),
            Err(e) => Err(upstream(e)),
        }
    }

    pub(crate) async fn publish(
        &self,
        record: &ShareRecord,
        step: Step,
        payload: Payload,
    ) -> Result<(), slipway_common::ServiceError> {
        let share = record.share.as_ref().cloned().unwrap_or_default();
        self.events
            .publish(
                &share.run_id,
                &step,
                &share.branch,
                record.attribution.clone(),
                payload,
            )
            .await
            .map(|_| ())
            .map_err(|e| slipway_common::ServiceError::unavailable(format!("publishing: {e}")))
    }

    /// Revokes one link (platform first, then the record, then `share_revoked`). Answers the
    /// link and whether this call revoked it.
    pub(crate) async fn revoke_link(
        &self,
        run_id: &str,
        share_id: &str,
    ) -> Result<(ShareRecord, bool), slipway_common::ServiceError> {
        let key = sh_key(share_id);
        let Some((record, _)) = self.shares.get(&key).await.map_err(store)? else {
            return Err(no_share(run_id, share_id));
        };
        if record.share.as_ref().is_none_or(|s| s.run_id != run_id) {
            return Err(no_share(run_id, share_id));
        }
        // Revoked already, or expired (the platform refuses it already): nothing to do.
        if record
            .share
            .as_ref()
            .is_some_and(|s| s.revoked || millis(s.expires_at) <= now_ms())
        {
            return Ok((record, false));
        }
        let mut record = record;
        if record.platform_share_id.is_empty() {
            // Recorded, then perhaps made at the platform before a crash: the same key finds
            // it, so it can be revoked rather than left open.
            let made: Result<ShareReply, _> = self
                .rpc
                .call(
                    &executor("share.create"),
                    &CreateShareRequest {
                        sandbox_id: record.sandbox_id.clone(),
                        expires_in_sec: record.ttl_sec,
                        idempotency_key: format!("share:{share_id}"),
                    },
                )
                .await;
            match made {
                Ok(r) => record.platform_share_id = r.share.map(|s| s.id).unwrap_or_default(),
                // The sandbox is gone, and its links with it.
                Err(e) if is_not_found(&e) => {}
                Err(e) => return Err(upstream(e)),
            }
        }
        self.revoke_at_platform(&record).await?;
        let mut revoked_now = false;
        let record = self
            .shares
            .modify(&key, |r| {
                let Some(s) = r.share.as_mut() else {
                    return false;
                };
                revoked_now = !s.revoked;
                s.revoked = true;
                revoked_now
            })
            .await
            .map_err(store)?
            .unwrap_or(record);
        if revoked_now {
            self.publish(
                &record,
                Step::once(&format!("share.{share_id}.revoked")),
                Payload::ShareRevoked(ShareRevoked {
                    share_id: share_id.to_string(),
                }),
            )
            .await?;
        }
        Ok((record, revoked_now))
    }

    /// `share.revoke`: that link answers 403 from now on; the others keep working.
    pub async fn share_revoke(
        &self,
        req: RevokeShareLinkRequest,
    ) -> Result<RevokeShareLinkReply, slipway_common::ServiceError> {
        check_run(&req.run_id)?;
        check_minted("share_id", "sh_", &req.share_id)?;
        let (record, _) = self.revoke_link(&req.run_id, &req.share_id).await?;
        Ok(RevokeShareLinkReply {
            share: Some(link(&record)),
        })
    }

    /// `share.list`: every link of the run, revoked and expired ones included, oldest first.
    pub async fn share_list(
        &self,
        req: ListShareLinksRequest,
    ) -> Result<ListShareLinksReply, slipway_common::ServiceError> {
        check_run(&req.run_id)?;
        let index = self
            .runs
            .get(&run_key(&req.run_id)?)
            .await
            .map_err(store)?
            .map(|(r, _)| r)
            .unwrap_or_default();
        let mut shares = Vec::new();
        for id in &index.share_ids {
            if let Some((r, _)) = self.shares.get(&sh_key(id)).await.map_err(store)? {
                shares.push(link(&r));
            }
        }
        shares.sort_by_key(|s| (millis(s.created_at), s.share_id.clone()));
        Ok(ListShareLinksReply { shares })
    }
}
