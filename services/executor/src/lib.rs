//! slipway-executor: the only door to the sandbox platform (MIOSA REST API or sandboxd).
//!
//! It serves `slipway.executor.v1.<op>` over NATS through its typed MIOSA client, keeps a sandbox
//! registry in KV, and turns the platform's cumulative usage counters into usage events.
#![forbid(unsafe_code)]

pub mod convert;
pub mod miosa;
pub mod relay;
pub mod sampler;
pub mod service;

use std::sync::Arc;

use slipway_common::App;

/// Registers the service on NATS and runs it until shutdown.
pub async fn serve(app: App) -> anyhow::Result<()> {
    let platform = &app.settings.platform;
    let key = platform.api_key.clone().ok_or_else(|| {
        anyhow::anyhow!("platform.api_key_file (or MIOSA_API_KEY) is required: the executor calls the sandbox platform")
    })?;
    let mut config = miosa::ClientConfig::new(platform.base_url.clone(), key);
    config.rate_limit_rpm = platform.rate_limit_rpm;
    config.rate_limit_burst = (platform.rate_limit_rpm / 6).max(1);
    config.edge = Some(app.settings.edge.clone());
    let client = miosa::MiosaClient::new(config)?.with_metrics(
        miosa::metrics::PlatformMetrics::register(app.health.metrics()),
    );
    let executor = Arc::new(service::Executor::new(client, app.nats.clone()));
    let host = app
        .service_host(
            "Slipway executor: the only door to the sandbox platform (MIOSA REST API or sandboxd)",
        )
        .await?;
    service::register(&host, executor.clone()).await?;
    let relays = relay::Relays::new(executor.clone());
    for (op, start) in [("relay.start", true), ("relay.stop", false)] {
        let r = relays.clone();
        host.endpoint(op, move |req, _| {
            let r = r.clone();
            async move {
                if start {
                    r.start(req).await
                } else {
                    r.stop(req).await
                }
            }
        })
        .await?;
    }
    {
        let (r, shutdown, health) = (relays.clone(), app.shutdown.clone(), app.health.clone());
        app.shutdown
            .tracker()
            .spawn(async move { r.supervise(shutdown, health).await });
    }
    let every = std::time::Duration::from_millis(platform.usage_sample_ms);
    let sampler = sampler::Sampler::new(executor);
    let (shutdown, health) = (app.shutdown.clone(), app.health.clone());
    app.shutdown
        .tracker()
        .spawn(async move { sampler.run(every, shutdown, health).await });
    tracing::info!(health = %app.health_addr, "slipway-executor running");
    app.run().await
}
