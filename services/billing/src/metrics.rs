//! Billing's metrics: events folded, refused by reason, duplicates dropped, redeliveries,
//! checkpoint latency, fence conflicts and second writers on `BILLED` (the lag per partition is
//! the kit's `slipway_consumer_pending` of each `billing-<p>-of-<P>`).

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use slipway_common::metrics::Metrics;

type Labels = Vec<(String, String)>;

#[derive(Clone)]
pub struct BillingMetrics {
    folded: Counter,
    rejected: Family<Labels, Counter>,
    duplicates: Counter,
    redeliveries: Counter,
    checkpoint: Histogram,
    fence_conflicts: Counter,
    second_writers: Counter,
}

impl BillingMetrics {
    pub fn register(metrics: &Metrics) -> Self {
        let m = Self {
            folded: Counter::default(),
            rejected: Family::default(),
            duplicates: Counter::default(),
            redeliveries: Counter::default(),
            checkpoint: Histogram::new(exponential_buckets(0.001, 2.0, 14)),
            fence_conflicts: Counter::default(),
            second_writers: Counter::default(),
        };
        metrics.register(
            "billing_folded",
            "Usage events folded (accepted once)",
            m.folded.clone(),
        );
        metrics.register(
            "billing_rejected",
            "Usage events refused, by reason",
            m.rejected.clone(),
        );
        metrics.register(
            "billing_duplicates",
            "Usage events dropped as duplicates of an earlier (source, id)",
            m.duplicates.clone(),
        );
        metrics.register(
            "billing_redeliveries",
            "Usage events delivered more than once",
            m.redeliveries.clone(),
        );
        metrics.register(
            "billing_checkpoint_seconds",
            "Time to fold one batch, checkpoint to published",
            m.checkpoint.clone(),
        );
        metrics.register(
            "billing_fence_conflicts",
            "Checkpoint writes refused because another holder wrote first",
            m.fence_conflicts.clone(),
        );
        metrics.register(
            "billing_second_writers",
            "BILLED publishes refused because another writer moved a user's subject",
            m.second_writers.clone(),
        );
        m
    }

    pub fn folded(&self, n: u64) {
        self.folded.inc_by(n);
    }
    pub fn rejected(&self, code: &str) {
        self.rejected
            .get_or_create(&vec![("reason".to_string(), code.to_string())])
            .inc();
    }
    pub fn duplicates(&self, n: u64) {
        self.duplicates.inc_by(n);
    }
    pub fn redelivered(&self) {
        self.redeliveries.inc();
    }
    pub fn checkpoint_latency(&self, seconds: f64) {
        self.checkpoint.observe(seconds);
    }
    pub fn fence_conflict(&self) {
        self.fence_conflicts.inc();
    }
    pub fn second_writer(&self) {
        self.second_writers.inc();
    }
}
