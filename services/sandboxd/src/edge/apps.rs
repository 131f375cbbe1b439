//! Deployments on the edge: `<slug>.apps.<domain>` serves the files of the version the
//! deployment points at, straight from the artifact store (the sandbox may be long gone).

use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::{EdgeState, page};
use crate::deployments::{Deployment, Version, VersionState};

pub async fn serve(s: &EdgeState, slug: &str, req: Request) -> Response {
    let deployments = &s.deployments;
    let Some(d) = deployments.by_slug(slug) else {
        return page::error(
            StatusCode::NOT_FOUND,
            "No such deployment",
            "Nothing is deployed at this address.",
        );
    };
    let Some((version, manifest)) = deployments.serving(&d) else {
        let building = deployments
            .versions(&d.id)
            .iter()
            .any(|v| v.state == VersionState::Building);
        let mut resp = page::error(
            StatusCode::SERVICE_UNAVAILABLE,
            if building { "Building" } else { "Not deployed" },
            if building {
                "The first version is being built. This page retries by itself."
            } else {
                "No version of this deployment built successfully."
            },
        );
        if building {
            resp.headers_mut()
                .insert(header::REFRESH, HeaderValue::from_static("2"));
        }
        return resp;
    };
    if version.runtime.is_some() {
        return serve_dynamic(s, &d, &version, req).await;
    }
    if !matches!(*req.method(), Method::GET | Method::HEAD) {
        return page::error(
            StatusCode::METHOD_NOT_ALLOWED,
            "Static site",
            "A static deployment answers GET and HEAD only.",
        );
    }
    let path = percent_decode(req.uri().path().trim_start_matches('/'));
    let wanted = if path.is_empty() {
        manifest.entrypoint.clone()
    } else if path.ends_with('/') {
        format!("{path}index.html")
    } else {
        path.clone()
    };
    let last = wanted.rsplit('/').next().unwrap_or_default();
    let file = manifest
        .find(&wanted)
        .or_else(|| manifest.find(&format!("{wanted}/index.html")))
        // Client-side routes (no extension) get the entrypoint, as single-page apps expect.
        .or_else(|| {
            (!last.contains('.'))
                .then(|| manifest.find(&manifest.entrypoint))
                .flatten()
        });
    let Some(file) = file else {
        return page::error(
            StatusCode::NOT_FOUND,
            "Not found",
            &format!("This deployment has no `/{path}`."),
        );
    };
    let etag = format!("\"{}\"", file.sha256);
    let digest = version.artifact_sha256.clone().unwrap_or_default();
    let mut headers = vec![
        (header::ETAG, etag.clone()),
        (header::CACHE_CONTROL, "no-cache".to_string()),
        (header::CONTENT_TYPE, content_type(&file.path).to_string()),
        (
            header::HeaderName::from_static("x-slipway-version"),
            version.id.clone(),
        ),
        (
            header::HeaderName::from_static("x-slipway-artifact"),
            digest,
        ),
    ];
    let matches_etag = req
        .headers()
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag));
    if matches_etag {
        headers.retain(|(h, _)| h != header::CONTENT_TYPE);
        return response(StatusCode::NOT_MODIFIED, headers, Body::empty());
    }
    let body = if req.method() == Method::HEAD {
        Body::empty()
    } else {
        match tokio::fs::read(deployments.artifacts.blob(&file.sha256)).await {
            Ok(bytes) => Body::from(bytes),
            Err(e) => {
                return page::error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "Artifact unreadable",
                    &e.to_string(),
                );
            }
        }
    };
    headers.push((header::CONTENT_LENGTH, file.size.to_string()));
    response(StatusCode::OK, headers, body)
}

/// A dynamic version: its runtime sandbox (made on first use) answers.
async fn serve_dynamic(s: &EdgeState, d: &Deployment, v: &Version, req: Request) -> Response {
    let port = v.runtime.as_ref().map_or(0, |r| r.port);
    match s.host.runtime_for(&s.deployments, d, v).await {
        Ok(entry) => {
            let mut resp = s.pool.forward(entry.net_index(), port, req, false).await;
            if let Ok(id) = HeaderValue::from_str(&v.id) {
                resp.headers_mut().insert("x-slipway-version", id);
            }
            resp
        }
        Err(e) => page::error(e.status, "The app could not start", &e.message),
    }
}

fn response(
    status: StatusCode,
    headers: Vec<(header::HeaderName, String)>,
    body: Body,
) -> Response {
    let mut resp = (status, body).into_response();
    for (name, value) in headers {
        if let Ok(v) = HeaderValue::from_str(&value) {
            resp.headers_mut().insert(name, v);
        }
    }
    resp
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%'
            && let (Some(h), Some(l)) = (
                bytes.get(i + 1).and_then(|b| hex(*b)),
                bytes.get(i + 2).and_then(|b| hex(*b)),
            )
        {
            out.push((h * 16 + l) as u8);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn content_type(path: &str) -> &'static str {
    let ext = path.rsplit_once('.').map(|(_, e)| e.to_ascii_lowercase());
    match ext.as_deref() {
        Some("html" | "htm") => "text/html; charset=utf-8",
        Some("css") => "text/css; charset=utf-8",
        Some("js" | "mjs") => "text/javascript; charset=utf-8",
        Some("json" | "map") => "application/json",
        Some("svg") => "image/svg+xml",
        Some("png") => "image/png",
        Some("jpg" | "jpeg") => "image/jpeg",
        Some("gif") => "image/gif",
        Some("webp") => "image/webp",
        Some("ico") => "image/x-icon",
        Some("woff2") => "font/woff2",
        Some("woff") => "font/woff",
        Some("txt") => "text/plain; charset=utf-8",
        Some("wasm") => "application/wasm",
        Some("xml") => "application/xml",
        _ => "application/octet-stream",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_decode_and_types() {
        assert_eq!(percent_decode("a%20b/%E2%9C%93"), "a b/\u{2713}");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(content_type("x/app.JS"), "text/javascript; charset=utf-8");
        assert_eq!(content_type("README"), "application/octet-stream");
    }
}
