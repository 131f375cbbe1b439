//! The template catalogue (`GET /sandbox-templates`): each template's workdir, preview port,
//! start command and readiness probe.

use axum::Json;
use axum::extract::Path;
use serde::Serialize;

use crate::api::ApiError;

pub const DEFAULT_TEMPLATE: &str = "miosa-sandbox";

#[derive(Clone, Debug, Serialize)]
pub struct Template {
    pub id: &'static str,
    pub name: &'static str,
    pub category: &'static str,
    pub workdir: &'static str,
    pub preview_port: u16,
    pub install_command: &'static str,
    pub start_command: &'static str,
    pub readiness_probe: Probe,
    pub runtimes: &'static [&'static str],
    pub built_in: bool,
    pub status: &'static str,
}

#[derive(Clone, Debug, Serialize)]
pub struct Probe {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub url: &'static str,
}

/// The built-in templates. `node` needs no npm packages: its dev server is `node server.js`.
pub fn catalogue() -> Vec<Template> {
    let t = |id, name, category, port, install, start, url, runtimes| Template {
        id,
        name,
        category,
        workdir: "/workspace",
        preview_port: port,
        install_command: install,
        start_command: start,
        readiness_probe: Probe { kind: "http", url },
        runtimes,
        built_in: true,
        status: "ready",
    };
    vec![
        t(
            DEFAULT_TEMPLATE,
            "MIOSA sandbox",
            "general",
            3000,
            "",
            "node server.js",
            "http://localhost:3000/",
            &["node", "python"],
        ),
        t(
            "static",
            "Static site",
            "web",
            3000,
            "",
            "python3 -m http.server 3000 --bind 0.0.0.0",
            "http://localhost:3000/",
            &["python"],
        ),
        t(
            "node",
            "Node dev server",
            "web",
            3000,
            "",
            "node server.js",
            "http://localhost:3000/",
            &["node"],
        ),
        t(
            "python",
            "Python",
            "general",
            8000,
            "",
            "python3 -m http.server 8000 --bind 0.0.0.0",
            "http://localhost:8000/",
            &["python"],
        ),
    ]
}

pub fn find(id: &str) -> Option<Template> {
    catalogue().into_iter().find(|t| t.id == id)
}

pub async fn list() -> Json<serde_json::Value> {
    Json(serde_json::json!({
        "default_template_id": DEFAULT_TEMPLATE,
        "data": catalogue(),
    }))
}

pub async fn get(Path(id): Path<String>) -> Result<Json<serde_json::Value>, ApiError> {
    let t = find(&id)
        .ok_or_else(|| ApiError::not_found("template_not_found", format!("no template `{id}`")))?;
    Ok(Json(serde_json::json!({ "data": t })))
}
