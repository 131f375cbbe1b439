//! What the executor's platform calls look like from outside: calls by operation and outcome,
//! their latency, retries, 429s, and live sandboxes per end-user (set by the usage sampler).

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use slipway_common::metrics::Metrics;

type Labels = Vec<(String, String)>;

#[derive(Clone)]
pub struct PlatformMetrics {
    calls: Family<Labels, Counter>,
    latency: Family<Labels, Histogram>,
    retries: Family<Labels, Counter>,
    rate_limited: Family<Labels, Counter>,
    live: Family<Labels, Gauge>,
}

impl std::fmt::Debug for PlatformMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PlatformMetrics")
    }
}

fn op(op: &str) -> Labels {
    vec![("op".to_string(), op.to_string())]
}

impl PlatformMetrics {
    /// Registers the executor's metrics in the process registry.
    pub fn register(metrics: &Metrics) -> Self {
        let m = Self {
            calls: Family::default(),
            latency: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.001, 2.0, 16))
            }),
            retries: Family::default(),
            rate_limited: Family::default(),
            live: Family::default(),
        };
        metrics.register(
            "platform_calls",
            "Sandbox platform calls (attempts), by operation and outcome",
            m.calls.clone(),
        );
        metrics.register(
            "platform_call_duration_seconds",
            "Time of one attempt of a sandbox platform call, by operation",
            m.latency.clone(),
        );
        metrics.register(
            "platform_retries",
            "Sandbox platform calls attempted again, by operation",
            m.retries.clone(),
        );
        metrics.register(
            "platform_rate_limited",
            "429 answers from the sandbox platform, by operation",
            m.rate_limited.clone(),
        );
        metrics.register(
            "live_sandboxes",
            "Sandboxes not destroyed, by end-user (from the registry)",
            m.live.clone(),
        );
        m
    }

    pub fn attempt(&self, operation: &str, outcome: &str, seconds: f64) {
        let mut labels = op(operation);
        labels.push(("outcome".to_string(), outcome.to_string()));
        self.calls.get_or_create(&labels).inc();
        self.latency.get_or_create(&op(operation)).observe(seconds);
        if outcome == "429" {
            self.rate_limited.get_or_create(&op(operation)).inc();
        }
    }

    pub fn retry(&self, operation: &str) {
        self.retries.get_or_create(&op(operation)).inc();
    }

    /// Replaces the per-user gauge with `counts` (users absent from it drop to 0).
    pub fn set_live(&self, counts: &std::collections::BTreeMap<String, i64>) {
        self.live.clear();
        for (user, n) in counts {
            self.live
                .get_or_create(&vec![("user".to_string(), user.clone())])
                .set(*n);
        }
    }
}
