//! slipway-billing: usage folded exactly once per end-user and priced onto `BILLED`.
//!
//! One folder per pinned partition of `USAGE` (the kit's partitioned worker: one replica holds a
//! partition at a time, so one end-user's usage is folded in one place). Each batch is checked
//! against the meter catalogue (the invalid go to `slipway.rejected.usage.<service>` with the
//! reason), deduplicated by (`source`, `id`) whatever its time or `Nats-Msg-Id`, and committed
//! through a per-partition checkpoint written before its effects (`fold`), so a crash at any
//! step is completed by the partition's next holder. See `docs/billing.md`.
#![forbid(unsafe_code)]

pub mod aggregates;
pub mod billed;
pub mod decimal;
pub mod dedupe;
pub mod fold;
pub mod metrics;
pub mod prices;
pub mod validate;

use std::sync::Arc;
use std::time::Duration;

use slipway_common::partition::{self, PartitionSpec};
use slipway_common::records::Records;
use slipway_common::subjects::streams;
use slipway_common::topology::buckets;
use slipway_common::worker::BatchSpec;
use slipway_common::{App, Service};

/// Registers the service on NATS and runs its folders until shutdown.
pub async fn serve(app: App) -> anyhow::Result<()> {
    let s = &app.settings.billing;
    let store = app.bucket(buckets::BILLING).await?;
    let dedupe = app.bucket(buckets::BILLING_DEDUPE).await?;
    let prices = prices::Prices::new(&s.currency, &s.prices).map_err(|e| anyhow::anyhow!(e))?;
    let folder = Arc::new(fold::Folder {
        checkpoints: Records::new(store.clone()),
        completions: Records::new(store.clone()),
        aggregates: Records::new(store),
        dedupe: Records::new(dedupe.clone()),
        chunks: Records::new(dedupe),
        billed: billed::BilledPublisher::new(app.jetstream.clone()).await?,
        prices,
        skew_ms: (s.clock_skew_sec * 1000) as i64,
        lateness_ms: i64::from(s.lateness_days) * 86_400_000,
        // One KV value, with room for the record's envelope.
        max_checkpoint_bytes: app.settings.setup.max_message_bytes as usize * 9 / 10,
        metrics: metrics::BillingMetrics::register(app.health.metrics()),
        written: aggregates::Written::default(),
        indexes: dedupe::Indexes::default(),
        completed: Default::default(),
    });
    // The service is registered first: live replicas are counted through it, and partitions
    // are balanced over them.
    let _host = app
        .service_host("Slipway billing: usage folded exactly once per end-user, priced")
        .await?;
    let spec = PartitionSpec {
        batch: BatchSpec {
            max_messages: s.batch_max_events,
            max_bytes: s.batch_max_bytes,
            max_wait: Duration::from_millis(50),
        },
        ..PartitionSpec::new(streams::USAGE, Service::Billing)
    };
    partition::start_partitioned(app.worker_context(), spec, move |part, items| {
        let folder = folder.clone();
        async move { folder.fold(part, items).await }
    })
    .await?;
    tracing::info!(health = %app.health_addr, "slipway-billing running");
    app.run().await
}
