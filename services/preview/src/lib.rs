//! slipway-preview: previews, preview tokens, share links and the browser API of runs.
//!
//! The executor stays the only door to the platform: this service records previews
//! (`slipway_previews`) and links (`slipway_shares`) and asks the executor for the platform's
//! previews, tokens and shares. `open` is idempotent per (run, branch, port); each share link
//! is its own capability, so one can be revoked alone; an expiry sweeper (one replica, by lease)
//! announces `share_expired` once; the executor's relayed file changes become one
//! `files_changed` per burst (the sandbox's lease holder debounces); and a browser API serves a
//! run's events and previews to a page holding a single-use ticket.
#![forbid(unsafe_code)]

pub mod browser;
pub mod changes;
pub mod close;
pub mod ids;
pub mod index;
pub mod metrics;
pub mod service;
pub mod shares;
pub mod sweeper;
pub mod tickets;

use std::sync::Arc;

use slipway_common::App;
use slipway_common::lease::Leases;
use slipway_common::topology::buckets;

/// Registers the service on NATS and runs it until shutdown.
pub async fn serve(app: App) -> anyhow::Result<()> {
    let metrics = metrics::PreviewMetrics::register(app.health.metrics());
    let index = Arc::new(index::Index::new(metrics.clone()));
    let preview = Arc::new(service::Preview::new(&app, index.clone(), metrics).await?);
    let leases_store = app.bucket(buckets::LEASES).await?;
    let holder = format!(
        "preview-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    );
    let leases = Leases::new(leases_store, holder)?;

    let tracker = app.shutdown.tracker();
    for (store, shares) in [
        (preview.previews.store().clone(), false),
        (preview.shares.store().clone(), true),
    ] {
        tracker.spawn(index::follow(
            index.clone(),
            store,
            shares,
            app.shutdown.clone(),
            app.health.clone(),
        ));
    }
    tracker.spawn(sweeper::sweep(
        preview.clone(),
        leases.clone(),
        app.shutdown.clone(),
        app.health.clone(),
    ));
    tracker.spawn(changes::run(
        changes::Debouncer::new(preview.clone(), leases),
        app.nats.clone(),
        app.shutdown.clone(),
        app.health.clone(),
    ));

    let addr = browser::start(preview.clone(), app.shutdown.clone()).await?;
    let base = if preview.settings.public_url.is_empty() {
        if !addr.ip().is_loopback() {
            tracing::warn!(
                %addr,
                "preview.public_url is empty: ticket URLs name the listen address, which \
                 browsers outside this host may not reach"
            );
        }
        format!("http://{addr}")
    } else {
        preview.settings.public_url.clone()
    };
    let _ = preview.browser_base.set(base);

    let host = app
        .service_host("Slipway preview: previews, preview tokens, share links, browser API")
        .await?;
    slipway_common::endpoints!(host, preview, {
        "open" => open,
        "token" => token,
        "share.create" => share_create,
        "share.revoke" => share_revoke,
        "share.list" => share_list,
        "ticket" => ticket,
        "close" => close,
    });
    tracing::info!(health = %app.health_addr, browser = %addr, "slipway-preview running");
    app.run().await
}
