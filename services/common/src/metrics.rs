//! Prometheus metrics shared by the kit: requests by operation and outcome, and their latency;
//! consumer workers' messages by outcome, handler latency and pending counts. Services register
//! their own metrics in the same registry.

use std::sync::Mutex;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

type Labels = Vec<(String, String)>;

/// Consumer counters by stream, consumer and outcome, resolved once: counting a message then
/// allocates nothing (a worker counts every message it holds and settles).
type ConsumerCounters = std::collections::HashMap<
    String,
    std::collections::HashMap<String, std::collections::HashMap<String, Counter>>,
>;

pub struct Metrics {
    registry: Mutex<Registry>,
    requests: Family<Labels, Counter>,
    latency: Family<Labels, Histogram>,
    consumer_messages: Family<Labels, Counter>,
    handler_latency: Family<Labels, Histogram>,
    consumer_pending: Family<Labels, Gauge>,
    partitions_pinned: Family<Labels, Gauge>,
    consumer_counters: Mutex<ConsumerCounters>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("slipway");
        let requests = Family::<Labels, Counter>::default();
        let latency = Family::<Labels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.0005, 2.0, 16))
        });
        registry.register(
            "requests",
            "Service requests handled, by operation and outcome",
            requests.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Time to handle a service request, by operation",
            latency.clone(),
        );
        let consumer_messages = Family::<Labels, Counter>::default();
        let handler_latency = Family::<Labels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.0005, 2.0, 20))
        });
        let consumer_pending = Family::<Labels, Gauge>::default();
        registry.register(
            "consumer_messages",
            "Messages of a durable consumer by outcome: delivered, redelivered, acked, nakked, dead_lettered, fenced",
            consumer_messages.clone(),
        );
        registry.register(
            "consumer_handler_duration_seconds",
            "Time a consumer's handler took, per message or batch",
            handler_latency.clone(),
        );
        registry.register(
            "consumer_pending",
            "Messages not yet delivered to a durable consumer, from its info",
            consumer_pending.clone(),
        );
        let partitions_pinned = Family::<Labels, Gauge>::default();
        registry.register(
            "partitions_pinned",
            "Partitions of a stream this replica is pinned to, by stream and owner",
            partitions_pinned.clone(),
        );
        Self {
            registry: Mutex::new(registry),
            requests,
            latency,
            consumer_messages,
            handler_latency,
            consumer_pending,
            partitions_pinned,
            consumer_counters: Mutex::new(ConsumerCounters::new()),
        }
    }

    fn consumer_labels(stream: &str, consumer: &str) -> Labels {
        vec![
            ("stream".to_string(), stream.to_string()),
            ("consumer".to_string(), consumer.to_string()),
        ]
    }

    /// Counts one message of a consumer by `outcome`.
    pub fn count_consumer(&self, stream: &str, consumer: &str, outcome: &str) {
        self.count_consumer_n(stream, consumer, outcome, 1);
    }

    /// Counts `n` messages of a consumer by `outcome`.
    pub fn count_consumer_n(&self, stream: &str, consumer: &str, outcome: &str, n: u64) {
        let mut counters = self
            .consumer_counters
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let found = counters
            .get(stream)
            .and_then(|c| c.get(consumer))
            .and_then(|o| o.get(outcome));
        if let Some(counter) = found {
            counter.inc_by(n);
            return;
        }
        let mut labels = Self::consumer_labels(stream, consumer);
        labels.push(("outcome".to_string(), outcome.to_string()));
        let counter = self.consumer_messages.get_or_create(&labels).clone();
        counter.inc_by(n);
        counters
            .entry(stream.to_string())
            .or_default()
            .entry(consumer.to_string())
            .or_default()
            .insert(outcome.to_string(), counter);
    }

    pub fn observe_handler(&self, stream: &str, consumer: &str, seconds: f64) {
        self.handler_latency
            .get_or_create(&Self::consumer_labels(stream, consumer))
            .observe(seconds);
    }

    pub fn set_pending(&self, stream: &str, consumer: &str, pending: i64) {
        self.consumer_pending
            .get_or_create(&Self::consumer_labels(stream, consumer))
            .set(pending);
    }

    pub fn set_pinned(&self, stream: &str, owner: &str, pinned: i64) {
        self.partitions_pinned
            .get_or_create(&vec![
                ("stream".to_string(), stream.to_string()),
                ("owner".to_string(), owner.to_string()),
            ])
            .set(pinned);
    }

    /// Records one handled request. `outcome` is `ok` or an error code name.
    pub fn observe_request(&self, service: &str, op: &str, outcome: &str, seconds: f64) {
        let base = vec![
            ("service".to_string(), service.to_string()),
            ("op".to_string(), op.to_string()),
        ];
        let mut with_outcome = base.clone();
        with_outcome.push(("outcome".to_string(), outcome.to_string()));
        self.requests.get_or_create(&with_outcome).inc();
        self.latency.get_or_create(&base).observe(seconds);
    }

    /// Registers a service's own metric.
    pub fn register(
        &self,
        name: &str,
        help: &str,
        metric: impl prometheus_client::registry::Metric,
    ) {
        self.registry
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .register(name, help, metric);
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let registry = self.registry.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = encode(&mut out, &registry) {
            out = format!("# encoding failed: {e}\n");
        }
        out
    }
}
