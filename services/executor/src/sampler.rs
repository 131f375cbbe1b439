//! Usage from the platform's cumulative counters (`sandbox_vcpu_ms`, `active_cpu_ms`,
//! `memory_mib_ms`, `disk_gib_ms`, `exec_count`), billed as the growth since the last billed
//! value; and the one delta meter the executor publishes itself, `sandboxes_created`.
//!
//! For each sandbox and meter a watermark in the `meter` bucket says up to which counter value
//! events are published. Billing an interval is three steps, each safe to cut short:
//! 1. the interval (`<sandbox>:<meter>:<from>-<to>`) is written to the watermark as pending;
//! 2. its event is published (JetStream, `Nats-Msg-Id` = the event id);
//! 3. the watermark moves to `to` and the pending interval is cleared.
//!
//! A restart finds a pending interval and publishes it again under the same id (billing dedupes
//! on it), before reading anything new; so the published deltas of a sandbox sum to its counter,
//! exactly. A destroyed sandbox's final counters are billed, then its watermarks are closed.
//! One sampler runs at a time across replicas: it holds the lease `executor.usage_sampler`
//! (`slipway_common::lease`, in `slipway_leases`), since no stream delivers its work.

use std::sync::Arc;
use std::time::Duration;

use slipway_common::Shutdown;
use slipway_common::failpoint;
use slipway_common::lease::{Held, LeaseError, Leases};
use slipway_common::records::{RecordError, Records};
use slipway_common::service::now;
use slipway_common::topology::buckets;
use slipway_proto::meters;
use slipway_proto::v1::{MeterInterval, MeterWatermark, SandboxRecord, SandboxState};

use crate::convert;
use crate::service::Executor;

/// The cumulative meters, with where each comes from in the platform's counters.
type Reading = fn(&slipway_proto::v1::SandboxCounters) -> u64;

const METERS: [(&str, Reading); 5] = [
    (meters::SANDBOX_VCPU_MS, |c| c.vcpu_ms),
    (meters::ACTIVE_CPU_MS, |c| c.active_cpu_ms),
    (meters::MEMORY_MIB_MS, |c| c.memory_mib_ms),
    (meters::DISK_GIB_MS, |c| c.disk_gib_ms),
    (meters::EXEC_COUNT, |c| c.exec_count),
];

/// The sampler's lease. (Before `slipway_common::lease`, a JSON lease under `executor.sampler`:
/// a new name, so such a leftover is never misread.)
pub const LEASE: &str = "executor.usage_sampler";

#[derive(Debug, thiserror::Error)]
pub enum SampleError {
    #[error("KV: {0}")]
    Store(String),
    #[error("publishing a usage event: {0}")]
    Publish(String),
    #[error("the platform: {0}")]
    Platform(String),
}

impl From<RecordError> for SampleError {
    fn from(e: RecordError) -> Self {
        SampleError::Store(e.to_string())
    }
}

impl From<LeaseError> for SampleError {
    fn from(e: LeaseError) -> Self {
        SampleError::Store(e.to_string())
    }
}

pub struct Sampler {
    executor: Arc<Executor>,
    holder: String,
}

impl Sampler {
    pub fn new(executor: Arc<Executor>) -> Self {
        let holder = format!(
            "executor-{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        );
        Self { executor, holder }
    }

    /// Samples every `every` until shutdown, while holding the sampler lease. The lease's state
    /// (a missing bucket, say) is a readiness check, said once when it changes.
    pub async fn run(
        self,
        every: Duration,
        shutdown: Shutdown,
        health: slipway_common::health::Health,
    ) {
        let mut held = None;
        loop {
            // A pass stops where it is on shutdown: the sampler is built to survive being cut
            // off at any point (as by a crash), and waiting on NATS or the platform would hold
            // the exit up.
            let leased = tokio::select! {
                () = shutdown.triggered() => return,
                leased = self.lease(&mut held, every * 3) => leased,
            };
            match leased {
                Ok(true) => {
                    health.report("usage_sampler", Ok(()));
                    let sampled = tokio::select! {
                        () = shutdown.triggered() => return,
                        sampled = self.sample_once() => sampled,
                    };
                    if let Err(e) = sampled {
                        tracing::warn!(error = %e, "usage sampling");
                    }
                }
                Ok(false) => {
                    health.report("usage_sampler", Ok(()));
                    tracing::debug!("another replica samples usage");
                }
                Err(e) => health.report("usage_sampler", Err(format!("the sampler lease: {e}"))),
            }
            tokio::select! {
                () = tokio::time::sleep(every) => {}
                () = shutdown.triggered() => return,
            }
        }
    }

    /// Renews the lease this sampler holds, or takes it when it is free or expired; false when
    /// another live replica holds it.
    async fn lease(&self, held: &mut Option<Held>, ttl: Duration) -> Result<bool, SampleError> {
        let store = self
            .executor
            .jetstream
            .get_key_value(buckets::LEASES)
            .await
            .map_err(|e| SampleError::Store(e.to_string()))?;
        let leases = Leases::new(store, self.holder.clone()).map_err(SampleError::from)?;
        if let Some(current) = held.as_ref() {
            match leases.renew(current, ttl).await {
                Ok(renewed) => {
                    *held = Some(renewed);
                    return Ok(true);
                }
                Err(LeaseError::Lost { .. }) => {
                    tracing::info!("the usage sampler's lease went to another replica");
                    *held = None;
                }
                // Kept: the next tick renews at the same revision, or finds the lease lost.
                Err(e) => return Err(e.into()),
            }
        }
        *held = leases.try_acquire(LEASE, ttl).await?;
        Ok(held.is_some())
    }

    async fn watermarks(&self) -> Result<Records<MeterWatermark>, SampleError> {
        let store = self
            .executor
            .jetstream
            .get_key_value(buckets::METER)
            .await
            .map_err(|e| SampleError::Store(e.to_string()))?;
        Ok(Records::new(store))
    }

    /// Records sandboxes the platform has for Slipway (they carry its metadata) but the
    /// registry does not: created just before a crash, before their record was written. So no
    /// sandbox goes unbilled or unreaped.
    async fn adopt_orphans(&self, records: &Records<SandboxRecord>) -> Result<(), SampleError> {
        let all = self
            .executor
            .client
            .background()
            .list_sandboxes(&[])
            .await
            .map_err(|e| SampleError::Platform(e.to_string()))?;
        for v in &all {
            let sandbox = convert::sandbox(v);
            let created_by = sandbox
                .metadata
                .get(convert::CREATED_BY_KEY)
                .cloned()
                .unwrap_or_default();
            let ours = !created_by.is_empty() || !sandbox.run_id.is_empty();
            if !ours
                || sandbox.id.is_empty()
                || sandbox.state == SandboxState::Destroyed as i32
                || records
                    .get(
                        &Executor::registry_key(&sandbox.id)
                            .map_err(|e| SampleError::Store(e.message))?,
                    )
                    .await?
                    .is_some()
            {
                continue;
            }
            tracing::warn!(sandbox = %sandbox.id, %created_by, "adopting a sandbox with no record");
            // Counted before it is recorded: the record is what stops the next pass from adopting
            // it again, so a pass cut off between the two (shutdown, a crash) counts it then, and
            // the count's id makes a repeat a no-op.
            if !created_by.is_empty() {
                self.executor
                    .count_created(&sandbox)
                    .await
                    .map_err(|e| SampleError::Publish(e.message))?;
            }
            self.executor
                .remember(&sandbox, &created_by)
                .await
                .map_err(|e| SampleError::Store(e.message))?;
        }
        Ok(())
    }

    /// One pass over every sandbox in the registry (after adopting any the registry lacks).
    pub async fn sample_once(&self) -> Result<(), SampleError> {
        let registry = self
            .executor
            .jetstream
            .get_key_value(buckets::SANDBOXES)
            .await
            .map_err(|e| SampleError::Store(e.to_string()))?;
        let mut keys = registry
            .keys()
            .await
            .map_err(|e| SampleError::Store(e.to_string()))?;
        let records = Records::<SandboxRecord>::new(registry.clone());
        if let Err(e) = self.adopt_orphans(&records).await {
            tracing::warn!(error = %e, "looking for sandboxes without a record");
        }
        let marks = self.watermarks().await?;
        let mut live: std::collections::BTreeMap<String, i64> = Default::default();
        use futures::StreamExt;
        while let Some(key) = keys.next().await {
            let Ok(key) = key else { continue };
            let Some((record, _)) = records.get(&key).await? else {
                continue;
            };
            let Some(sandbox) = record.sandbox else {
                continue;
            };
            if sandbox.state != SandboxState::Destroyed as i32 {
                let user = sandbox.attribution.clone().unwrap_or_default().user_id;
                *live.entry(user).or_default() += 1;
            }
            if let Err(e) = self.sample_sandbox(&marks, &sandbox).await {
                tracing::warn!(sandbox = %sandbox.id, error = %e, "sampling a sandbox");
            }
        }
        if let Some(m) = self.executor.client.metrics() {
            m.set_live(&live);
        }
        Ok(())
    }

    async fn sample_sandbox(
        &self,
        marks: &Records<MeterWatermark>,
        sandbox: &slipway_proto::v1::Sandbox,
    ) -> Result<(), SampleError> {
        // Each watermark is read once per pass and carried through its updates.
        let mut current = Vec::with_capacity(METERS.len());
        for (meter, _) in METERS {
            current.push(marks.get(&mark_key(&sandbox.id, meter)?).await?);
        }
        // Closed on every meter: this sandbox is done.
        if current
            .iter()
            .all(|m| m.as_ref().is_some_and(|(m, _)| m.closed))
        {
            return Ok(());
        }
        // Pending intervals first: they were decided before anything new is read.
        for ((meter, _), mark) in METERS.iter().zip(current.iter_mut()) {
            if let Some((m, revision)) = mark.take() {
                *mark = Some(
                    self.settle_pending(marks, sandbox, meter, m, revision)
                        .await?,
                );
            }
        }
        // Background work: it yields to calls people wait for under the rate limit.
        let client = self.executor.client.background();
        let counters = client
            .sandbox_usage(&sandbox.id)
            .await
            .map_err(|e| SampleError::Platform(e.to_string()))?;
        let state = client
            .get_sandbox(&sandbox.id)
            .await
            .map(|v| convert::sandbox(&v).state)
            .unwrap_or(SandboxState::Unspecified as i32);
        let gone = state == SandboxState::Destroyed as i32;
        let counters = convert::counters(&counters);
        failpoint::hit("executor.usage.after_read");
        for ((meter, read), mark) in METERS.into_iter().zip(current) {
            self.bill(marks, sandbox, meter, mark, read(&counters), gone)
                .await?;
        }
        Ok(())
    }

    /// Publishes a pending interval again (same id) and moves the watermark past it; returns the
    /// watermark as it now stands.
    async fn settle_pending(
        &self,
        marks: &Records<MeterWatermark>,
        sandbox: &slipway_proto::v1::Sandbox,
        meter: &str,
        mark: MeterWatermark,
        revision: u64,
    ) -> Result<(MeterWatermark, u64), SampleError> {
        let Some(pending) = mark.pending.clone() else {
            return Ok((mark, revision));
        };
        self.publish(sandbox, meter, &pending).await?;
        failpoint::hit("executor.usage.after_publish");
        let moved = MeterWatermark {
            billed: pending.to,
            pending: None,
            ..mark
        };
        let revision = marks
            .update(&mark_key(&sandbox.id, meter)?, &moved, revision)
            .await?;
        Ok((moved, revision))
    }

    /// Bills the growth of one counter: pending interval, event, watermark.
    async fn bill(
        &self,
        marks: &Records<MeterWatermark>,
        sandbox: &slipway_proto::v1::Sandbox,
        meter: &str,
        current: Option<(MeterWatermark, u64)>,
        value: u64,
        gone: bool,
    ) -> Result<(), SampleError> {
        let key = mark_key(&sandbox.id, meter)?;
        let (mark, revision) = match current {
            Some(found) => found,
            None => {
                let fresh = MeterWatermark {
                    sandbox_id: sandbox.id.clone(),
                    meter: meter.to_string(),
                    ..Default::default()
                };
                let revision = match marks.create(&key, &fresh).await {
                    Ok(r) => r,
                    Err(RecordError::Exists { .. }) => return Ok(()),
                    Err(e) => return Err(e.into()),
                };
                (fresh, revision)
            }
        };
        if mark.closed || mark.pending.is_some() {
            return Ok(());
        }
        if value <= mark.billed {
            if gone {
                let closed = MeterWatermark {
                    closed: true,
                    ..mark
                };
                marks.update(&key, &closed, revision).await?;
            }
            return Ok(());
        }
        let interval = MeterInterval {
            id: format!("{}:{meter}:{}-{value}", sandbox.id, mark.billed),
            from: mark.billed,
            to: value,
            read_at: Some(now()),
        };
        let pending = MeterWatermark {
            pending: Some(interval.clone()),
            ..mark.clone()
        };
        let revision = marks.update(&key, &pending, revision).await?;
        failpoint::hit("executor.usage.after_pending");
        self.publish(sandbox, meter, &interval).await?;
        failpoint::hit("executor.usage.after_publish");
        let moved = MeterWatermark {
            billed: interval.to,
            pending: None,
            closed: false,
            ..mark
        };
        marks.update(&key, &moved, revision).await?;
        Ok(())
    }

    async fn publish(
        &self,
        sandbox: &slipway_proto::v1::Sandbox,
        meter: &str,
        interval: &MeterInterval,
    ) -> Result<(), SampleError> {
        let mut event = convert::usage_event(sandbox, meter, interval.to - interval.from);
        event.id = interval.id.clone();
        // The time the interval was read, kept with it: a republish lands in the same hour.
        event.time = interval.read_at;
        event.counter_from = interval.from;
        event.counter_to = interval.to;
        self.executor
            .usage
            .publish(&event)
            .await
            .map(|_| ())
            .map_err(|e| SampleError::Publish(e.to_string()))
    }
}

/// `<sandbox>.<meter>`, with the sandbox id encoded (ids may hold `:`; readable ones stay as
/// they are). One encoded id before a meter name, which has no `.`: no two pairs share a key.
fn mark_key(sandbox: &str, meter: &str) -> Result<String, SampleError> {
    let sandbox = slipway_common::keys::encode_key(sandbox)
        .map_err(|e| SampleError::Store(format!("sandbox `{sandbox}`: {e}")))?;
    Ok(format!("{sandbox}.{meter}"))
}
