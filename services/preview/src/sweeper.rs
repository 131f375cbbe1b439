//! The expiry sweeper: the replica holding lease `preview.share-sweeper` (in
//! `slipway_leases`) looks for links past their expiry every `preview.sweep_interval_ms` and
//! publishes `share_expired` once per link, however many replicas run: the lease picks one
//! replica, the event id is a fact of the link (the stream drops a repeat), and the record is
//! marked at its revision afterwards.

use std::sync::Arc;
use std::time::Duration;

use slipway_common::Shutdown;
use slipway_common::health::Health;
use slipway_common::lease::{Held, Leases};
use slipway_common::run_events::Step;
use slipway_proto::v1::run_event::Payload;
use slipway_proto::v1::*;

use crate::ids::sh_key;
use crate::service::{Preview, store};
use crate::shares::{millis, now_ms};

impl Preview {
    /// `share_expired` for one link past its expiry, once: the event id is a fact of the
    /// link (a replay is deduplicated by the stream) and the record is marked at its revision.
    async fn expire(&self, share_id: &str) -> Result<bool, slipway_common::ServiceError> {
        let key = sh_key(share_id);
        let Some((record, _)) = self.shares.get(&key).await.map_err(store)? else {
            return Ok(false);
        };
        let share = record.share.clone().unwrap_or_default();
        if share.revoked || record.expiry_announced || millis(share.expires_at) > now_ms() {
            return Ok(false);
        }
        self.publish(
            &record,
            Step::once(&format!("share.{share_id}.expired")),
            Payload::ShareExpired(ShareExpired {
                share_id: share_id.to_string(),
            }),
        )
        .await?;
        slipway_common::failpoint::hit("preview.sweep.after_publish");
        self.shares
            .modify(&key, |r| {
                let was = r.expiry_announced;
                r.expiry_announced = true;
                !was
            })
            .await
            .map_err(store)?;
        Ok(true)
    }
}

/// The sweeper: the replica holding lease `preview.share-sweeper` announces expired links.
pub async fn sweep(preview: Arc<Preview>, leases: Leases, shutdown: Shutdown, health: Health) {
    const NAME: &str = "preview.share-sweeper";
    let every = Duration::from_millis(preview.settings.sweep_interval_ms);
    let ttl = (every * 3).max(Duration::from_secs(3));
    let mut held: Option<Held> = None;
    loop {
        tokio::select! {
            _ = shutdown.triggered() => break,
            _ = tokio::time::sleep(every) => {}
        }
        held = match held.take() {
            Some(h) => leases.renew(&h, ttl).await.ok(),
            None => leases.try_acquire(NAME, ttl).await.unwrap_or(None),
        };
        if held.is_none() {
            continue;
        }
        let mut result = Ok(());
        for id in preview.index.due_shares(now_ms()) {
            if shutdown.is_triggered() {
                break;
            }
            if let Err(e) = preview.expire(&id).await {
                result = Err(format!("share {id}: {}", e.message));
            }
        }
        health.report("share_sweeper", result);
    }
    if let Some(h) = held {
        let _ = leases.release(h).await;
    }
}
