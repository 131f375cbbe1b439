//! File-watch relays: on `relay.start`, a replica follows a sandbox's watch stream and republishes
//! each change as a `FileChange` on `slipway.sandboxes.<sandbox>.files` (core NATS). Each relay is
//! a record in `slipway_relays` (what to relay) and a lease `relay.<sandbox>` in `slipway_leases`
//! (who relays it: `slipway_common::lease`, since no stream delivers this work), which its replica
//! renews; when a replica dies, another finds the lease expired, takes the relay over and
//! publishes a `resync` change first (changes may have been missed in between). A relay ends
//! with `relay.stop` or when its sandbox is destroyed.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::kv;
use futures::StreamExt;
use serde_json::Value;
use slipway_common::lease::{Held, LeaseError, Leases};
use slipway_common::records::{RecordError, Records};
use slipway_common::topology::buckets;
use slipway_common::{ServiceError, Shutdown};
use slipway_proto::codec::ContentType;
use slipway_proto::v1::{FileChange, FileChangeKind, RelayRecord, RelayReply, RelayRequest};
use tokio_util::sync::CancellationToken;

use crate::service::Executor;

/// How long a lease holds without renewal, and how often leases are renewed and expired ones
/// looked for.
pub const LEASE: Duration = Duration::from_secs(3);
const TICK: Duration = Duration::from_millis(1000);

/// A relay this replica runs: its follower and the lease it holds for it.
struct Running {
    cancel: CancellationToken,
    held: Held,
}

pub struct Relays {
    executor: Arc<Executor>,
    holder: String,
    running: Mutex<HashMap<String, Running>>,
}

/// The name of a relay's lease in `slipway_leases` (encoded into its key by the lease helper).
pub fn lease_name(sandbox_id: &str) -> String {
    format!("relay.{sandbox_id}")
}

/// A relay's key in `slipway_relays`: the sandbox id, encoded (ids may hold `:`; readable ones
/// stay as they are, so keys written before the encoding are unchanged).
fn record_key(sandbox_id: &str) -> Result<String, ServiceError> {
    slipway_common::keys::encode_key(sandbox_id)
        .map_err(|e| ServiceError::invalid_input(format!("sandbox_id: {e}")))
}

fn store_error(e: impl std::fmt::Display) -> ServiceError {
    ServiceError::unavailable(format!("relay records: {e}"))
}

impl Relays {
    pub fn new(executor: Arc<Executor>) -> Arc<Self> {
        Arc::new(Self {
            executor,
            holder: format!(
                "executor-{}-{:08x}",
                std::process::id(),
                rand::random::<u32>()
            ),
            running: Mutex::default(),
        })
    }

    /// This replica's name in relay leases (it carries the process id).
    pub fn holder(&self) -> &str {
        &self.holder
    }

    async fn store(&self) -> Result<kv::Store, ServiceError> {
        self.executor
            .jetstream
            .get_key_value(buckets::RELAYS)
            .await
            .map_err(store_error)
    }

    async fn leases(&self) -> Result<Leases, ServiceError> {
        let store = self
            .executor
            .jetstream
            .get_key_value(buckets::LEASES)
            .await
            .map_err(store_error)?;
        Leases::new(store, self.holder.clone()).map_err(store_error)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Running>> {
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts relaying (idempotent: a relay already running anywhere is left as it is). Answers
    /// once this replica's watch stream is open, so no change after the reply is missed.
    pub async fn start(self: &Arc<Self>, req: RelayRequest) -> Result<RelayReply, ServiceError> {
        slipway_proto::validate::check_resource_id("sandbox_id", &req.sandbox_id)
            .map_err(ServiceError::from)?;
        // The sandbox must exist and be live at the platform.
        let sandbox = self
            .executor
            .client
            .get_sandbox(&req.sandbox_id)
            .await
            .map_err(crate::service::platform_error)?;
        if crate::convert::sandbox(&sandbox).state
            == slipway_proto::v1::SandboxState::Destroyed as i32
        {
            return Err(ServiceError::invalid_input("the sandbox is destroyed"));
        }
        let records = Records::<RelayRecord>::new(self.store().await?);
        let record = RelayRecord {
            sandbox_id: req.sandbox_id.clone(),
            run_id: req.run_id.clone(),
            ..Default::default()
        };
        match records.create(&record_key(&req.sandbox_id)?, &record).await {
            Ok(_) => {}
            Err(RecordError::Exists { .. }) => return Ok(RelayReply { active: true }),
            Err(e) => return Err(store_error(e)),
        }
        // The record first: a replica that dies before its lease is written leaves a relay with
        // no lease, which the others take over.
        let Some(held) = self
            .leases()
            .await?
            .try_acquire(&lease_name(&req.sandbox_id), LEASE)
            .await
            .map_err(store_error)?
        else {
            // A supervising pass took it in between, and runs it.
            return Ok(RelayReply { active: true });
        };
        let (opened, wait) = tokio::sync::oneshot::channel();
        self.spawn_follow(record, held, false, Some(opened));
        match tokio::time::timeout(Duration::from_secs(15), wait).await {
            Ok(Ok(Ok(()))) => Ok(RelayReply { active: true }),
            Ok(Ok(Err(e))) => Err(e),
            _ => Err(ServiceError::unavailable("the watch stream did not open")),
        }
    }

    /// Stops the relay wherever it runs: the record goes, then the lease, so its replica finds
    /// the lease lost (or the record gone) at its next renewal, and a new `relay.start` can take
    /// the lease at once.
    pub async fn stop(&self, req: RelayRequest) -> Result<RelayReply, ServiceError> {
        slipway_proto::validate::check_resource_id("sandbox_id", &req.sandbox_id)
            .map_err(ServiceError::from)?;
        self.store()
            .await?
            .delete(&record_key(&req.sandbox_id)?)
            .await
            .map_err(store_error)?;
        self.leases()
            .await?
            .revoke(&lease_name(&req.sandbox_id))
            .await
            .map_err(store_error)?;
        if let Some(running) = self.lock().remove(&req.sandbox_id) {
            running.cancel.cancel();
        }
        Ok(RelayReply { active: false })
    }

    fn spawn_follow(
        self: &Arc<Self>,
        record: RelayRecord,
        held: Held,
        resync: bool,
        opened: Option<tokio::sync::oneshot::Sender<Result<(), ServiceError>>>,
    ) {
        let cancel = CancellationToken::new();
        let running = Running {
            cancel: cancel.clone(),
            held,
        };
        if let Some(old) = self.lock().insert(record.sandbox_id.clone(), running) {
            old.cancel.cancel();
        }
        let me = self.clone();
        tokio::spawn(async move { me.follow(record, resync, opened, cancel).await });
    }

    async fn publish(&self, change: FileChange) {
        let Ok(subject) = slipway_common::subjects::sandbox_files(&change.sandbox_id) else {
            return;
        };
        let headers = slipway_common::rpc::message_headers::<FileChange>(ContentType::Protobuf);
        let payload = slipway_proto::codec::encode(&change, ContentType::Protobuf);
        if let Err(e) = self
            .executor
            .nats
            .publish_with_headers(subject, headers, payload.into())
            .await
        {
            tracing::warn!(sandbox = %change.sandbox_id, error = %e, "publishing a file change");
        }
    }

    /// Follows the watch until cancelled or the sandbox is gone, reconnecting (with
    /// `Last-Event-ID`, and a resync change since the gap may have lost changes).
    async fn follow(
        self: Arc<Self>,
        record: RelayRecord,
        mut resync: bool,
        mut opened: Option<tokio::sync::oneshot::Sender<Result<(), ServiceError>>>,
        cancel: CancellationToken,
    ) {
        let id = record.sandbox_id.clone();
        let client = self.executor.client.background();
        let mut last_event_id: Option<String> = None;
        let mut backoff = Duration::from_millis(100);
        while !cancel.is_cancelled() {
            match client
                .watch(&id, "/workspace", last_event_id.as_deref())
                .await
            {
                Ok(stream) => {
                    backoff = Duration::from_millis(100);
                    if let Some(tx) = opened.take() {
                        let _ = tx.send(Ok(()));
                    }
                    if resync {
                        self.publish(change(&id, FileChangeKind::Resync, "/workspace", false, ""))
                            .await;
                    }
                    let mut stream = std::pin::pin!(stream);
                    loop {
                        let next = tokio::select! {
                            () = cancel.cancelled() => return,
                            next = stream.next() => next,
                        };
                        let Some(Ok(event)) = next else { break };
                        if event.id.is_some() {
                            last_event_id = event.id.clone();
                        }
                        if let Some(c) = to_change(&id, &event.event, &event.data) {
                            self.publish(c).await;
                        }
                    }
                }
                Err(e) if matches!(e.status(), Some(404 | 410)) => {
                    if let Some(tx) = opened.take() {
                        let _ = tx.send(Err(crate::service::platform_error(e)));
                    }
                    break;
                }
                Err(e) => {
                    tracing::debug!(sandbox = %id, error = %e, "the watch stream");
                    if let Some(tx) = opened.take() {
                        let _ = tx.send(Err(crate::service::platform_error(e)));
                        break;
                    }
                }
            }
            // The stream ended: a destroyed sandbox ends its relay; anything else reconnects.
            let gone = match client.get_sandbox(&id).await {
                Ok(v) => {
                    crate::convert::sandbox(&v).state
                        == slipway_proto::v1::SandboxState::Destroyed as i32
                }
                Err(e) => matches!(e.status(), Some(404 | 410)),
            };
            if gone {
                break;
            }
            resync = true;
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
        if !cancel.is_cancelled() {
            // Finished for good (the sandbox is gone): the record and the lease go too.
            if let (Ok(store), Ok(key)) = (self.store().await, record_key(&id)) {
                let _ = store.delete(&key).await;
            }
            let running = self.lock().remove(&id);
            if let (Some(running), Ok(leases)) = (running, self.leases().await) {
                let _ = leases.release(running.held).await;
            }
        }
    }

    /// Renews this replica's leases and takes over relays whose lease ran out, until shutdown.
    /// Their state (a missing bucket, say) is a readiness check, said once when it changes.
    pub async fn supervise(
        self: Arc<Self>,
        shutdown: Shutdown,
        health: slipway_common::health::Health,
    ) {
        loop {
            // Cut off at shutdown: an unrenewed lease only lets another replica take over.
            let ticked = tokio::select! {
                () = shutdown.triggered() => return,
                ticked = self.tick() => ticked,
            };
            health.report(
                "relay_leases",
                ticked.map_err(|e| format!("relay leases: {}", e.message)),
            );
            tokio::select! {
                () = tokio::time::sleep(TICK) => {}
                () = shutdown.triggered() => return,
            }
        }
    }

    async fn tick(self: &Arc<Self>) -> Result<(), ServiceError> {
        let store = self.store().await?;
        let records = Records::<RelayRecord>::new(store.clone());
        let leases = self.leases().await?;
        let mut keys = store.keys().await.map_err(store_error)?;
        let mut seen = HashSet::new();
        while let Some(key) = keys.next().await {
            let Ok(key) = key else { continue };
            let Some((record, _)) = records.get(&key).await.map_err(store_error)? else {
                continue;
            };
            let id = record.sandbox_id.clone();
            seen.insert(id.clone());
            let held = self.lock().get(&id).map(|r| r.held.clone());
            if let Some(held) = held {
                match leases.renew(&held, LEASE).await {
                    Ok(renewed) => {
                        if let Some(running) = self.lock().get_mut(&id) {
                            running.held = renewed;
                        }
                    }
                    Err(LeaseError::Lost { .. }) => {
                        tracing::info!(sandbox = %id, "a relay's lease was lost; stopping it here");
                        if let Some(running) = self.lock().remove(&id) {
                            running.cancel.cancel();
                        }
                    }
                    Err(e) => return Err(store_error(e)),
                }
                continue;
            }
            // Not running here: taken over when its lease is free or expired.
            let acquired = leases.try_acquire(&lease_name(&id), LEASE).await;
            if let Some(held) = acquired.map_err(store_error)? {
                tracing::info!(sandbox = %id, "taking over a relay");
                self.spawn_follow(record, held, true, None);
            }
        }
        // Relays whose record is gone (stopped elsewhere) stop here too, and give their lease up.
        let gone: Vec<Running> = {
            let mut running = self.lock();
            let ids: Vec<String> = running
                .keys()
                .filter(|k| !seen.contains(*k))
                .cloned()
                .collect();
            ids.iter().filter_map(|k| running.remove(k)).collect()
        };
        for running in gone {
            running.cancel.cancel();
            let _ = leases.release(running.held).await;
        }
        Ok(())
    }
}

fn change(sandbox: &str, kind: FileChangeKind, path: &str, is_dir: bool, old: &str) -> FileChange {
    let t = time::OffsetDateTime::now_utc();
    FileChange {
        sandbox_id: sandbox.to_string(),
        kind: kind.into(),
        path: path.to_string(),
        is_dir,
        old_path: old.to_string(),
        time: Some(pbjson_types::Timestamp {
            seconds: t.unix_timestamp(),
            nanos: i32::try_from(t.nanosecond()).unwrap_or(0),
        }),
    }
}

/// A watch event (`type` or `event` key, as the SDKs read them) as a `FileChange`.
fn to_change(sandbox: &str, sse_event: &str, data: &str) -> Option<FileChange> {
    let v: Value = serde_json::from_str(data).ok()?;
    let kind = v
        .get("type")
        .or(v.get("event"))
        .and_then(Value::as_str)
        .unwrap_or(sse_event);
    let kind = match kind {
        "created" | "create" | "added" => FileChangeKind::Created,
        "modified" | "modify" | "changed" | "renamed" | "moved" => FileChangeKind::Modified,
        "deleted" | "delete" | "removed" => FileChangeKind::Deleted,
        "resync" | "overflow" => FileChangeKind::Resync,
        _ => return None,
    };
    Some(change(
        sandbox,
        kind,
        v.get("path").and_then(Value::as_str).unwrap_or_default(),
        v.get("is_dir").and_then(Value::as_bool).unwrap_or(false),
        v.get("old_path")
            .and_then(Value::as_str)
            .unwrap_or_default(),
    ))
}
