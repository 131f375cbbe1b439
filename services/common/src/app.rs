//! The service kit: what every Slipway service does around its own work. Connect to NATS as its
//! own user, serve health, verify the topology it depends on, host its NATS service, and on
//! shutdown: not ready, stop intake, finish in-flight work under the grace period, drain NATS.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream;
use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::health::{self, Health};
use crate::metrics::Metrics;
use crate::rpc::RpcClient;
use crate::service::{HostError, ServiceHost};
use crate::shutdown::Shutdown;
use crate::subjects::Service;
use crate::topology::Topology;

pub struct App {
    pub service: Service,
    pub settings: Arc<Settings>,
    pub nats: async_nats::Client,
    pub jetstream: jetstream::Context,
    pub rpc: RpcClient,
    pub health: Health,
    pub health_addr: SocketAddr,
    pub shutdown: Shutdown,
    /// The part of the topology this service depends on.
    pub topology: Topology,
    hosts: Mutex<Vec<Arc<ServiceHost>>>,
    health_stop: CancellationToken,
    health_task: tokio::task::JoinHandle<()>,
}

impl App {
    /// Connects, serves health, and starts verifying the topology. Returns once the health
    /// server listens; NATS may still be connecting (readiness says so).
    pub async fn start(
        service: Service,
        settings: Settings,
        shutdown: Shutdown,
    ) -> anyhow::Result<App> {
        let settings = Arc::new(settings);
        let metrics = Arc::new(Metrics::new());
        let health = Health::new(metrics);
        let health_stop = CancellationToken::new();
        let (health_addr, health_task) =
            health::serve(settings.health.listen, health.clone(), health_stop.clone()).await?;
        tracing::info!(%health_addr, "health endpoints up");

        let nats = crate::nats::connect(
            &settings.nats_as(crate::auth::Principal::Service(service)),
            &format!("slipway-{service}"),
        )
        .await?;
        health.watch_nats(nats.clone());
        let jetstream = jetstream::new(nats.clone());
        let rpc = RpcClient::new(
            nats.clone(),
            Duration::from_millis(settings.nats.request_timeout_ms),
        );
        let topology = Topology::new(&settings.setup).for_service(service);
        health.set_check("topology", Err("not verified yet".into()));
        spawn_verifier(
            jetstream.clone(),
            topology.clone(),
            health.clone(),
            Duration::from_millis(settings.setup.verify_interval_ms),
            shutdown.clone(),
        );
        Ok(App {
            service,
            settings,
            nats,
            jetstream,
            rpc,
            health,
            health_addr,
            shutdown,
            topology,
            hosts: Mutex::new(Vec::new()),
            health_stop,
            health_task,
        })
    }

    /// Registers this service with the NATS service API; add operations on the returned host.
    pub async fn service_host(&self, description: &str) -> Result<Arc<ServiceHost>, HostError> {
        let host = ServiceHost::start(
            self.nats.clone(),
            self.service,
            description,
            self.shutdown.clone(),
            self.settings.service.max_in_flight,
            self.health.metrics().clone(),
        )
        .await?;
        self.hosts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(host.clone());
        Ok(host)
    }

    /// A KV bucket of the topology (setup made it; readiness verifies it), named in the error
    /// when it cannot be opened.
    pub async fn bucket(&self, name: &str) -> anyhow::Result<async_nats::jetstream::kv::Store> {
        self.jetstream
            .get_key_value(name)
            .await
            .map_err(|e| anyhow::anyhow!("the `{name}` bucket: {e}"))
    }

    /// What a durable-consumer worker of this service shares: its JetStream, shutdown and
    /// metrics.
    pub fn worker_context(&self) -> crate::worker::WorkerContext {
        crate::worker::WorkerContext {
            jetstream: self.jetstream.clone(),
            shutdown: self.shutdown.clone(),
            metrics: self.health.metrics().clone(),
        }
    }

    /// Hands the messages of the durable consumer `spec` to `handler`, one at a time each, at
    /// most `spec.max_in_flight` at once (see `worker`).
    pub async fn worker<M, F, Fut>(
        &self,
        spec: crate::worker::WorkerSpec,
        handler: F,
    ) -> Result<(), crate::worker::WorkerError>
    where
        M: slipway_proto::WireMessage + 'static,
        F: Fn(M, crate::worker::Delivery) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = Result<(), crate::worker::HandlerError>> + Send + 'static,
    {
        crate::worker::start(self.worker_context(), spec, handler).await
    }

    /// As `worker`, with a handler for batches.
    pub async fn batch_worker<M, F, Fut>(
        &self,
        spec: crate::worker::WorkerSpec,
        batch: crate::worker::BatchSpec,
        handler: F,
    ) -> Result<(), crate::worker::WorkerError>
    where
        M: slipway_proto::WireMessage + 'static,
        F: Fn(Vec<crate::worker::Item<M>>) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = Vec<Result<(), crate::worker::HandlerError>>>
            + Send
            + 'static,
    {
        crate::worker::start_batches(self.worker_context(), spec, batch, handler).await
    }

    /// Runs until shutdown is triggered, then shuts down gracefully. Call it once everything
    /// the service serves is registered: readiness opens here.
    pub async fn run(self) -> anyhow::Result<()> {
        self.health.mark_registered();
        self.shutdown.triggered().await;
        self.finish().await
    }

    /// One grace period for all of it: the work in flight, then draining NATS with what is
    /// left; with NATS gone there is nothing to drain, so nothing is waited for.
    async fn finish(self) -> anyhow::Result<()> {
        let grace = Duration::from_millis(self.settings.service.grace_period_ms);
        let deadline = tokio::time::Instant::now() + grace;
        tracing::info!(?grace, "shutting down: not ready, no new work");
        self.health.set_shutting_down();
        for host in self.hosts.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            host.stop();
        }
        if !self.shutdown.wait_in_flight(grace).await {
            tracing::warn!("grace period over with work still in flight");
        }
        let connected = self.nats.connection_state() == async_nats::connection::State::Connected;
        if connected {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if tokio::time::timeout(left, self.nats.drain()).await.is_err() {
                tracing::warn!("draining NATS did not finish within the grace period");
            }
        } else {
            tracing::info!("NATS is not connected: nothing to drain");
        }
        self.health_stop.cancel();
        // The health server only answers probes; its end is not worth failing shutdown over.
        let _ = self.health_task.await;
        tracing::info!("shutdown complete");
        Ok(())
    }
}

fn spawn_verifier(
    js: jetstream::Context,
    topology: Topology,
    health: Health,
    every: Duration,
    shutdown: Shutdown,
) {
    // Not tracked: verification is not in-flight work and stops at once on shutdown.
    tokio::spawn(async move {
        loop {
            let result = match crate::setup::verify(&js, &topology).await {
                Ok(drifts) if drifts.is_empty() => Ok(()),
                Ok(drifts) => Err(drifts
                    .iter()
                    .map(|d| d.to_string())
                    .collect::<Vec<_>>()
                    .join("; ")),
                Err(e) => Err(format!("cannot verify: {e}")),
            };
            health.report("topology", result);
            tokio::select! {
                _ = shutdown.triggered() => return,
                _ = tokio::time::sleep(every) => {}
            }
        }
    });
}
