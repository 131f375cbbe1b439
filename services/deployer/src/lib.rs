//! slipway-deployer: turns a branch of a run into an immutable production deployment.
//!
//! `deploy` records a job (its id derived from the caller's key) and puts it on `DEPLOY_JOBS`;
//! the kit's worker runs it: the executor's `deploy`, the version followed until ready, its URL
//! verified to serve that version, then `deployed` (or `deploy_failed`) on the run's events,
//! usage (`deploys`, `build_ms`) and, when asked, the source sandbox destroyed. Every step is
//! recorded in `slipway_deployments` before the next, and every effect is keyed by the job or
//! its version, so a crash anywhere resumes without a second version, event or count. `rollback` and `promote` re-point a deployment.
#![forbid(unsafe_code)]

pub mod job;
pub mod metrics;
pub mod service;
pub mod verify;

use std::sync::Arc;

use slipway_common::App;
use slipway_common::topology::buckets;
use slipway_common::worker::WorkerSpec;

/// Registers the service on NATS and runs it until shutdown.
pub async fn serve(app: App) -> anyhow::Result<()> {
    let store = app.bucket(buckets::DEPLOYMENTS).await?;
    let deployer = Arc::new(service::Deployer::new(&app, store)?);
    let host = app
        .service_host("Slipway deployer: immutable production deployments, versions, rollback")
        .await?;
    slipway_common::endpoints!(host, deployer, {
        "deploy" => deploy,
        "deployments.list" => list,
        "deployment.get" => get,
        "rollback" => rollback,
        "promote" => promote,
        "deployment.delete" => take_down,
    });
    let consumer = app
        .topology
        .consumers
        .iter()
        .find(|c| c.durable == "deployer")
        .cloned()
        .ok_or_else(|| anyhow::anyhow!("the topology has no `deployer` consumer"))?;
    let jobs = deployer.clone();
    app.worker(
        WorkerSpec::for_consumer(&consumer).max_in_flight(4),
        move |job, delivery| {
            let jobs = jobs.clone();
            async move { jobs.run(job, delivery).await }
        },
    )
    .await?;
    tracing::info!(health = %app.health_addr, "slipway-deployer running");
    app.run().await
}
