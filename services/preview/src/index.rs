//! What this replica knows of the buckets without asking them: the open previews of each
//! sandbox (a file change finds its run here) and the links still to expire (the sweeper's
//! work). Kept by watching both buckets from their last values on, so every replica converges
//! on the same view; the records stay the source of truth for every write.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use async_nats::jetstream::kv;
use futures::StreamExt;
use slipway_common::Shutdown;
use slipway_common::health::Health;
use slipway_common::records::decode;
use slipway_proto::v1::{PreviewRecord, PreviewState, ShareRecord};

use crate::metrics::PreviewMetrics;

#[derive(Default)]
struct State {
    /// Open (or opening) previews, by preview id.
    previews: HashMap<String, PreviewRecord>,
    /// Links neither revoked nor announced as expired: share id -> expiry (ms).
    live_shares: HashMap<String, i64>,
}

pub struct Index {
    state: Mutex<State>,
    metrics: PreviewMetrics,
}

impl Index {
    pub fn new(metrics: PreviewMetrics) -> Self {
        Self {
            state: Mutex::new(State::default()),
            metrics,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The open previews of a sandbox.
    pub fn previews_of(&self, sandbox_id: &str) -> Vec<PreviewRecord> {
        self.lock()
            .previews
            .values()
            .filter(|p| p.sandbox_id == sandbox_id && p.state == PreviewState::Open as i32)
            .cloned()
            .collect()
    }

    /// Links past their expiry whose `share_expired` is not out yet.
    pub fn due_shares(&self, now_ms: i64) -> Vec<String> {
        let mut due: Vec<(i64, String)> = self
            .lock()
            .live_shares
            .iter()
            .filter(|(_, e)| **e <= now_ms)
            .map(|(id, e)| (*e, id.clone()))
            .collect();
        due.sort();
        due.into_iter().map(|(_, id)| id).collect()
    }

    fn apply_preview(&self, key: &str, entry: &kv::Entry) {
        let Some(id) = key.strip_prefix("pv.") else {
            return;
        };
        let record = (entry.operation == kv::Operation::Put)
            .then(|| decode::<PreviewRecord>(key, &entry.value).ok())
            .flatten()
            .filter(|r| r.state != PreviewState::Closed as i32);
        let mut s = self.lock();
        match record {
            Some(r) => s.previews.insert(id.to_string(), r),
            None => s.previews.remove(id),
        };
        let open = s
            .previews
            .values()
            .filter(|p| p.state == PreviewState::Open as i32)
            .count();
        self.metrics.set_open_previews(open as i64);
    }

    fn apply_share(&self, key: &str, entry: &kv::Entry) {
        let Some(id) = key.strip_prefix("sh.") else {
            return;
        };
        let expiry = (entry.operation == kv::Operation::Put)
            .then(|| decode::<ShareRecord>(key, &entry.value).ok())
            .flatten()
            .filter(|r| !r.expiry_announced && !r.share.as_ref().is_some_and(|s| s.revoked))
            .and_then(|r| r.share.and_then(|s| s.expires_at))
            .map(|t| t.seconds * 1000 + i64::from(t.nanos / 1_000_000));
        let mut s = self.lock();
        match expiry {
            Some(e) => s.live_shares.insert(id.to_string(), e),
            None => s.live_shares.remove(id),
        };
        let now = crate::shares::now_ms();
        let live = s.live_shares.values().filter(|e| **e > now).count();
        self.metrics.set_live_shares(live as i64);
    }
}

/// Follows one bucket into the index until shutdown, starting again after a lost watch.
pub async fn follow(
    index: std::sync::Arc<Index>,
    store: kv::Store,
    shares: bool,
    shutdown: Shutdown,
    health: Health,
) {
    let check = if shares {
        "index_shares"
    } else {
        "index_previews"
    };
    while !shutdown.is_triggered() {
        let watch = store.watch_with_history(">").await;
        let mut watch = match watch {
            Ok(w) => {
                health.report(check, Ok(()));
                w
            }
            Err(e) => {
                health.report(check, Err(format!("watching {}: {e}", store.name)));
                tokio::select! {
                    _ = shutdown.triggered() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                }
            }
        };
        loop {
            let next = tokio::select! {
                _ = shutdown.triggered() => return,
                next = watch.next() => next,
            };
            match next {
                Some(Ok(entry)) => {
                    if shares {
                        index.apply_share(&entry.key, &entry);
                    } else {
                        index.apply_preview(&entry.key, &entry);
                    }
                }
                Some(Err(e)) => {
                    health.report(check, Err(format!("watching {}: {e}", store.name)));
                    break;
                }
                None => break,
            }
        }
    }
}
