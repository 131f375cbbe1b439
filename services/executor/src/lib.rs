//! slipway-executor: the only door to the sandbox platform (MIOSA REST API or sandboxd).
//!
//! Today this is the service shell every Slipway service shares: it connects to NATS as its own
//! user, verifies the streams and buckets it depends on (`/readyz` fails on drift), registers
//! `slipway-executor` with the NATS service API (`$SRV.PING`, `INFO`, `STATS`) and shuts down
//! gracefully. Its operations (`slipway.executor.v1.<op>`) are added by the issues that build them.
#![forbid(unsafe_code)]

pub mod miosa;

use slipway_common::App;

/// Registers the service on NATS and runs it until shutdown.
pub async fn serve(app: App) -> anyhow::Result<()> {
    let _host = app
        .service_host(
            "Slipway executor: the only door to the sandbox platform (MIOSA REST API or sandboxd)",
        )
        .await?;
    tracing::info!(health = %app.health_addr, "slipway-executor running");
    app.run().await
}
