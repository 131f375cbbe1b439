//! The HTTP API: MIOSA's routes under `/api/v1`, bearer-key authentication, MIOSA-style errors.

mod deployments;
mod error;
pub mod extract;
mod previews;
mod sandboxes;
mod snapshots;
mod usage;

use std::sync::Arc;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post};

pub use error::ApiError;

use crate::deployments::Deployments;
use crate::edge::Links;
use crate::grants::Grants;
use crate::host::Host;
use crate::{KeyPolicy, exec, files, templates};

/// Largest request body: a write-many of a whole small app.
pub const MAX_BODY: usize = 64 * 1024 * 1024;

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    pub host: Arc<Host>,
    keys: Arc<KeyPolicy>,
    pub grants: Arc<Grants>,
    pub edge: Arc<Links>,
    pub deployments: Arc<Deployments>,
    /// Host names the API answers to besides IP literals and `localhost`.
    names: Arc<Vec<String>>,
}

impl AppState {
    pub fn new(
        host: Arc<Host>,
        keys: KeyPolicy,
        grants: Arc<Grants>,
        edge: Arc<Links>,
        deployments: Arc<Deployments>,
        names: Vec<String>,
    ) -> Self {
        Self {
            host,
            keys: Arc::new(keys),
            grants,
            edge,
            deployments,
            names: Arc::new(names),
        }
    }

    /// Whether a request's `Host` is one the API answers to: an IP address, `localhost`, or a
    /// configured name (`--api-hostname`). A page in a browser that rebinds its own DNS name
    /// to this machine still sends its own name, and is refused, as Docker and Jupyter do.
    fn accepts_host(&self, host: &str) -> bool {
        let is_port = |p: &str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit());
        if let Some(rest) = host.strip_prefix('[') {
            // `[v6]` or `[v6]:port`.
            return rest.split_once(']').is_some_and(|(addr, after)| {
                addr.parse::<std::net::Ipv6Addr>().is_ok()
                    && (after.is_empty() || after.strip_prefix(':').is_some_and(is_port))
            });
        }
        let name = match host.rsplit_once(':') {
            Some((n, port)) if is_port(port) => n,
            _ => host,
        };
        name.parse::<std::net::Ipv4Addr>().is_ok()
            || name.eq_ignore_ascii_case("localhost")
            || self.names.iter().any(|n| n.eq_ignore_ascii_case(name))
    }
}

pub fn router(state: AppState) -> Router {
    let sandbox = Router::new()
        .route(
            "/",
            get(sandboxes::get)
                .patch(sandboxes::update)
                .delete(sandboxes::destroy),
        )
        .route("/pause", post(sandboxes::pause))
        .route("/resume", post(sandboxes::resume))
        .route("/stop", post(sandboxes::stop))
        .route("/extend", post(sandboxes::extend))
        .route("/readiness", get(sandboxes::readiness))
        .route("/resources", get(exec::resources))
        .route("/usage", get(exec::usage))
        .route("/snapshots", post(snapshots::create).get(snapshots::list))
        .route("/snapshots/{sid}", axum::routing::delete(snapshots::delete))
        .route("/snapshot", post(snapshots::create_legacy))
        .route("/restore/{sid}", post(snapshots::restore))
        .route("/fork", post(snapshots::fork))
        .route("/ports/{port}/probe", get(exec::probe_port))
        .route("/preview-token", post(previews::preview_token))
        .route("/deploy", post(deployments::deploy))
        .route(
            "/previews",
            post(previews::create_preview).get(previews::list_previews),
        )
        .route(
            "/previews/{pid}",
            get(previews::get_preview).delete(previews::delete_preview),
        )
        .route(
            "/previews/{pid}/share",
            post(previews::share_preview).delete(previews::revoke_preview_shares),
        )
        .route(
            "/shares",
            post(previews::create_share).get(previews::list_shares),
        )
        .route(
            "/shares/{share_id}",
            axum::routing::delete(previews::revoke_share),
        )
        .route("/readiness/stream", get(sandboxes::readiness_stream))
        // Canonical file routes.
        .route("/fs/write", post(files::fs_write))
        .route("/fs/write-many", post(files::fs_write_many))
        .route("/fs/download", get(files::fs_download))
        .route("/fs/stat", post(files::stat))
        .route("/fs/mkdir", post(files::mkdir))
        .route("/fs", axum::routing::delete(files::delete_query))
        // Legacy file routes; the named ones are matched before the catch-all download.
        .route(
            "/files",
            post(files::legacy_write)
                .get(files::list)
                .delete(files::delete_body),
        )
        .route("/files/write-many", post(files::legacy_write_many))
        .route("/files/stat", post(files::stat).get(files::stat_get))
        .route("/files/mkdir", post(files::mkdir))
        .route("/files/tree", get(files::tree))
        .route("/files/watch", get(files::watch))
        .route("/files/{*path}", get(files::legacy_download))
        .route("/exec", post(exec::exec))
        .route("/exec/stream", post(exec::exec_stream))
        .route(
            "/processes",
            post(exec::start_process).get(exec::list_processes),
        )
        .route(
            "/processes/{pid}",
            get(exec::get_process).delete(exec::stop_process),
        )
        .route("/processes/{pid}/logs", get(exec::process_logs))
        .route("/processes/{pid}/stream", get(exec::process_stream));
    let api = Router::new()
        .route("/sandboxes", post(sandboxes::create).get(sandboxes::list))
        .route("/sandboxes/by-name/{name}", get(sandboxes::by_name))
        .nest("/sandboxes/{id}", sandbox)
        .route("/events/stream", get(sandboxes::tenant_events))
        .route("/deployments", get(deployments::list))
        .route(
            "/deployments/{id}",
            get(deployments::get).delete(deployments::delete),
        )
        .route("/deployments/{id}/versions", get(deployments::versions))
        .route(
            "/deployments/{id}/versions/{vid}",
            get(deployments::version),
        )
        .route(
            "/deployments/{id}/versions/{vid}/logs",
            get(deployments::version_logs),
        )
        .route(
            "/deployments/{id}/versions/{vid}/promote",
            post(deployments::promote_version),
        )
        .route("/deployments/{id}/rollback", post(deployments::rollback))
        .route("/deployments/{id}/promote", post(deployments::promote))
        .route("/usage", get(usage::rollup))
        .route("/usage/summary", get(usage::summary))
        .route(
            "/quotas/external/{user}",
            get(usage::get_quota)
                .put(usage::put_quota)
                .delete(usage::delete_quota),
        )
        .route("/sandbox-templates", get(templates::list))
        .route("/sandbox-templates/{id}", get(templates::get))
        .fallback(|| async { ApiError::not_found("route_not_found", "no such route") })
        .layer(middleware::from_fn_with_state(state.clone(), authenticate))
        .layer(DefaultBodyLimit::max(MAX_BODY));
    Router::new()
        .nest("/api/v1", api)
        .route("/livez", get(|| async { "ok\n" }))
        .with_state(state)
}

async fn authenticate(
    axum::extract::State(state): axum::extract::State<AppState>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let hosts = request.headers().get_all(axum::http::header::HOST);
    let mut seen = 0;
    for host in hosts.iter() {
        seen += 1;
        let ok = host.to_str().is_ok_and(|h| state.accepts_host(h));
        if !ok || seen > 1 {
            return Err(ApiError::new(
                axum::http::StatusCode::FORBIDDEN,
                "forbidden_host",
                "this API answers to IP addresses, `localhost` and its configured host names \
                 (--api-hostname) only, with one Host header",
            ));
        }
    }
    let key = request
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match key {
        Some(k) if state.keys.accepts(k) => Ok(next.run(request).await),
        Some(_) => Err(ApiError::unauthorized("invalid API key")),
        None => Err(ApiError::unauthorized(
            "missing `Authorization: Bearer msk_...`",
        )),
    }
}
