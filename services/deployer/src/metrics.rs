//! The deployer's metrics: jobs by outcome, build and verification times (the queue's depth is
//! the kit's `slipway_consumer_pending` for `DEPLOY_JOBS`).

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use slipway_common::metrics::Metrics;

type Labels = Vec<(String, String)>;

#[derive(Clone)]
pub struct DeployMetrics {
    jobs: Family<Labels, Counter>,
    build: Histogram,
    verify: Histogram,
}

impl DeployMetrics {
    pub fn register(metrics: &Metrics) -> Self {
        let m = Self {
            jobs: Family::default(),
            build: Histogram::new(exponential_buckets(0.1, 2.0, 14)),
            verify: Histogram::new(exponential_buckets(0.01, 2.0, 14)),
        };
        metrics.register(
            "deploy_jobs",
            "Deploy jobs finished, by outcome (deployed, failed)",
            m.jobs.clone(),
        );
        metrics.register(
            "deploy_build_seconds",
            "Time from a version's creation to the deployer seeing it ready",
            m.build.clone(),
        );
        metrics.register(
            "deploy_verify_seconds",
            "Time until a ready version's URL served it",
            m.verify.clone(),
        );
        m
    }

    pub fn finished(&self, outcome: &str) {
        self.jobs
            .get_or_create(&vec![("outcome".to_string(), outcome.to_string())])
            .inc();
    }

    pub fn built(&self, seconds: f64) {
        self.build.observe(seconds);
    }

    pub fn verified(&self, seconds: f64) {
        self.verify.observe(seconds);
    }
}
