//! The health server: `/livez` (the process answers), `/readyz` (it should get work: its
//! endpoints and workers are registered, NATS is connected, its topology verified, its
//! background loops healthy, and it is not shutting down) and `/metrics`. Readiness is a latch
//! at start: 503 until the service has registered everything it serves, as linkerd's is.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

#[derive(Clone, Debug, Default)]
pub struct Health {
    inner: Arc<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    checks: Mutex<BTreeMap<String, Result<(), String>>>,
    registered: AtomicBool,
    shutting_down: AtomicBool,
    nats: Mutex<Option<async_nats::Client>>,
    metrics: Arc<Metrics>,
}

impl Health {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self {
            inner: Arc::new(Inner {
                metrics,
                ..Default::default()
            }),
        }
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.inner.metrics
    }

    /// Sets a named readiness check; any failing check makes `/readyz` answer 503.
    pub fn set_check(&self, name: &str, result: Result<(), String>) {
        self.inner
            .checks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_string(), result);
    }

    /// A background loop's state as a readiness check, logged only when it changes (a missing
    /// bucket is said once, not at every tick).
    pub fn report(&self, name: &str, result: Result<(), String>) {
        let mut checks = self.inner.checks.lock().unwrap_or_else(|p| p.into_inner());
        let before = checks.get(name).cloned();
        match (&before, &result) {
            (Some(Err(old)), Err(new)) if old == new => {}
            (_, Err(new)) => tracing::warn!(check = name, problem = %new, "not ready"),
            (Some(Err(_)), Ok(())) => tracing::info!(check = name, "recovered"),
            _ => {}
        }
        checks.insert(name.to_string(), result);
    }

    /// The service has registered its endpoints and workers: the start-up latch opens.
    pub fn mark_registered(&self) {
        self.inner.registered.store(true, Ordering::SeqCst);
    }

    /// Readiness also requires this client to be connected.
    pub fn watch_nats(&self, client: async_nats::Client) {
        *self.inner.nats.lock().unwrap_or_else(|p| p.into_inner()) = Some(client);
    }

    pub fn set_shutting_down(&self) {
        self.inner.shutting_down.store(true, Ordering::SeqCst);
    }

    /// Whether the service is ready, and the failing checks by name.
    pub fn readiness(&self) -> (bool, BTreeMap<String, String>) {
        let mut failing: BTreeMap<String, String> = self
            .inner
            .checks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter_map(|(k, v)| v.as_ref().err().map(|e| (k.clone(), e.clone())))
            .collect();
        if let Some(client) = &*self.inner.nats.lock().unwrap_or_else(|p| p.into_inner()) {
            let state = client.connection_state();
            if state != async_nats::connection::State::Connected {
                failing.insert("nats".into(), format!("connection is {state}"));
            }
        }
        if !self.inner.registered.load(Ordering::SeqCst) {
            failing.insert(
                "registered".into(),
                "starting: endpoints and workers not registered yet".into(),
            );
        }
        if self.inner.shutting_down.load(Ordering::SeqCst) {
            failing.insert("shutdown".into(), "shutting down".into());
        }
        (failing.is_empty(), failing)
    }
}

/// Serves the health endpoints on `listen` until `stop` is cancelled; returns the bound address.
pub async fn serve(
    listen: SocketAddr,
    health: Health,
    stop: CancellationToken,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    let app = Router::new()
        .route("/livez", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(health);
    let task = tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "health server failed");
        }
    });
    Ok((addr, task))
}

async fn readyz(State(health): State<Health>) -> Response {
    let (ready, failing) = health.readiness();
    let body = serde_json::json!({ "ready": ready, "failing": failing });
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(body)).into_response()
}

async fn metrics(State(health): State<Health>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        health.metrics().render(),
    )
        .into_response()
}
