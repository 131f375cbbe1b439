//! The HTTP API: MIOSA's routes under `/api/v1`, bearer-key authentication, MIOSA-style errors.

mod error;

use std::sync::Arc;

use axum::Router;
use axum::extract::Request;
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::get;

pub use error::ApiError;

use crate::KeyPolicy;

/// What every handler can reach.
#[derive(Clone)]
pub struct State {
    inner: Arc<Inner>,
}

struct Inner {
    keys: KeyPolicy,
}

impl State {
    pub fn new(keys: KeyPolicy) -> Self {
        Self {
            inner: Arc::new(Inner { keys }),
        }
    }
}

pub fn router(state: State) -> Router {
    let api = Router::new()
        .route("/sandbox-templates", get(crate::templates::list))
        .route("/sandbox-templates/{id}", get(crate::templates::get))
        .layer(middleware::from_fn_with_state(state.clone(), authenticate))
        .fallback(|| async { ApiError::not_found("route_not_found", "no such route") });
    Router::new()
        .nest("/api/v1", api)
        .route("/livez", get(|| async { "ok\n" }))
        .with_state(state)
}

async fn authenticate(
    axum::extract::State(state): axum::extract::State<State>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let key = request
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match key {
        Some(k) if state.inner.keys.accepts(k) => Ok(next.run(request).await),
        Some(_) => Err(ApiError::unauthorized("invalid API key")),
        None => Err(ApiError::unauthorized(
            "missing `Authorization: Bearer msk_...`",
        )),
    }
}
