//! Prometheus metrics shared by the kit: requests by operation and outcome, and their latency.
//! Services register their own metrics in the same registry.

use std::sync::Mutex;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

type Labels = Vec<(String, String)>;

pub struct Metrics {
    registry: Mutex<Registry>,
    requests: Family<Labels, Counter>,
    latency: Family<Labels, Histogram>,
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
        Self {
            registry: Mutex::new(registry),
            requests,
            latency,
        }
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
