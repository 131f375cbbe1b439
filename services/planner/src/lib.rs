//! slipway-planner: runs: prompts to plans to patches, the run state machine.
//!
//! Today this is the service shell every Slipway service shares: it connects to NATS as its own
//! user, verifies the streams and buckets it depends on (`/readyz` fails on drift), registers
//! `slipway-planner` with the NATS service API (`$SRV.PING`, `INFO`, `STATS`) and shuts down
//! gracefully. Its operations (`slipway.planner.v1.<op>`) are added by the issues that build them.
#![forbid(unsafe_code)]

use slipway_common::App;

/// Registers the service on NATS and runs it until shutdown.
pub async fn serve(app: App) -> anyhow::Result<()> {
    let _host = app
        .service_host("Slipway planner: runs: prompts to plans to patches, the run state machine")
        .await?;
    tracing::info!(health = %app.health_addr, "slipway-planner running");
    app.run().await
}
