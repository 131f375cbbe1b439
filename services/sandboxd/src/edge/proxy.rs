//! Forwarding to a port on a sandbox's own loopback: one HTTP/1 connection per request in
//! flight, kept alive and reused (opening one means entering the sandbox's network namespace),
//! WebSocket upgrades spliced through, the edge's credentials and hop-by-hop headers dropped.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::Mutex;

use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;

use super::{TOKEN_HEADER, live, page};

/// Idle connections kept per sandbox port.
const MAX_IDLE: usize = 32;
/// Largest HTML page the live-refresh script is added to.
const MAX_INJECT: usize = 32 * 1024 * 1024;

type Key = (Option<u32>, u16);

#[derive(Default)]
pub struct Pool {
    idle: Mutex<HashMap<Key, Vec<SendRequest<Body>>>>,
}

/// Headers that describe one hop, not the message (RFC 9110 §7.6.1).
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

impl Pool {
    fn take(&self, key: Key) -> Option<SendRequest<Body>> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let list = idle.get_mut(&key)?;
        let mut i = list.len();
        while i > 0 {
            i -= 1;
            if list[i].is_closed() {
                list.swap_remove(i);
            } else if list[i].is_ready() {
                return Some(list.swap_remove(i));
            }
        }
        None
    }

    fn put(&self, key: Key, sender: SendRequest<Body>) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let list = idle.entry(key).or_default();
        list.retain(|s| !s.is_closed());
        if list.len() < MAX_IDLE {
            list.push(sender);
        }
    }

    /// Drops the idle connections to a sandbox (it was destroyed).
    pub fn forget(&self, net: Option<u32>) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        idle.retain(|(n, _), _| *n != net);
    }

    async fn open(key: Key) -> std::io::Result<SendRequest<Body>> {
        let (net, port) = key;
        let stream = match net {
            Some(index) => crate::isolation::net::Net::connect(index, port).await?,
            None => tokio::net::TcpStream::connect((Ipv4Addr::LOCALHOST, port)).await?,
        };
        stream.set_nodelay(true)?;
        let (sender, conn) = http1::handshake(TokioIo::new(stream))
            .await
            .map_err(std::io::Error::other)?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(error = %e, "edge upstream connection ended");
            }
        });
        Ok(sender)
    }

    /// Sends `req` to `port` in the sandbox whose network namespace is `net` (None: the host's
    /// loopback, when sandboxd runs without isolation). With `live`, HTML pages get the
    /// live-refresh script (previews; not deployments).
    pub async fn forward(
        &self,
        net: Option<u32>,
        port: u16,
        mut req: Request,
        live: bool,
    ) -> Response {
        let key = (net, port);
        let upgrade = is_upgrade(req.headers());
        let client_side = upgrade.then(|| hyper::upgrade::on(&mut req));
        let method = req.method().clone();
        let navigating = live
            && method == Method::GET
            && req
                .headers()
                .get(header::ACCEPT)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|a| a.contains("text/html"));
        let (parts, body) = req.into_parts();
        let build = |body: Body| upstream_request(&parts, body, port, upgrade, navigating);
        let retryable = matches!(method, Method::GET | Method::HEAD) && !upgrade;

        let pooled = if upgrade { None } else { self.take(key) };
        let reused = pooled.is_some();
        let mut sender = match pooled {
            Some(s) => s,
            None => match Self::open(key).await {
                Ok(s) => s,
                Err(e) => return not_listening(port, &e),
            },
        };
        let mut result = match build(body) {
            Ok(r) => sender.send_request(r).await,
            Err(resp) => return *resp,
        };
        // A kept-alive connection the app closed meanwhile: once more on a new one.
        if result.is_err() && reused && retryable {
            sender = match Self::open(key).await {
                Ok(s) => s,
                Err(e) => return not_listening(port, &e),
            };
            result = match build(Body::empty()) {
                Ok(r) => sender.send_request(r).await,
                Err(resp) => return *resp,
            };
        }
        let mut resp = match result {
            Ok(r) => r,
            Err(e) => {
                return page::error(
                    StatusCode::BAD_GATEWAY,
                    "The app did not answer",
                    &format!("Port {port} in the sandbox closed the connection ({e})."),
                );
            }
        };
        if !upgrade {
            self.put(key, sender);
        }

        if let Some(client_side) = client_side
            && resp.status() == StatusCode::SWITCHING_PROTOCOLS
        {
            let app_side = hyper::upgrade::on(&mut resp);
            tokio::spawn(async move {
                let (Ok(client), Ok(app)) = tokio::join!(client_side, app_side) else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(
                    &mut TokioIo::new(client),
                    &mut TokioIo::new(app),
                )
                .await;
            });
            let (parts, _) = resp.into_parts();
            return Response::from_parts(parts, Body::empty());
        }

        let (mut parts, incoming) = resp.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        // Previews are made to be framed by the platform's UI.
        parts.headers.remove(header::X_FRAME_OPTIONS);
        let html = parts
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|t| t.starts_with("text/html"));
        let encoded = parts.headers.contains_key(header::CONTENT_ENCODING);
        if live && method == Method::GET && parts.status == StatusCode::OK && html && !encoded {
            let bytes = match axum::body::to_bytes(Body::new(incoming), MAX_INJECT).await {
                Ok(b) => b,
                Err(e) => {
                    return page::error(
                        StatusCode::BAD_GATEWAY,
                        "The page could not be read",
                        &e.to_string(),
                    );
                }
            };
            let page = live::inject(&bytes);
            parts.headers.remove(header::CONTENT_LENGTH);
            return (parts, Body::from(page)).into_response();
        }
        Response::from_parts(parts, Body::new(incoming))
    }
}

fn not_listening(port: u16, e: &std::io::Error) -> Response {
    let mut resp = page::error(
        StatusCode::BAD_GATEWAY,
        "Nothing is listening yet",
        &format!("The app on port {port} is not answering ({e}). This page retries by itself."),
    );
    resp.headers_mut()
        .insert(header::REFRESH, HeaderValue::from_static("2"));
    resp
}

fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<String> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .filter(|t| !t.is_empty())
        .collect();
    for name in HOP_BY_HOP
        .iter()
        .copied()
        .chain(named.iter().map(String::as_str))
    {
        headers.remove(name);
    }
}

/// The request as the app sees it: its own `Host`, no token, no `Authorization`, no
/// hop-by-hop headers (but the upgrade it asked for), and where it really came from.
fn upstream_request(
    parts: &axum::http::request::Parts,
    body: Body,
    port: u16,
    upgrade: bool,
    navigating: bool,
) -> Result<Request, Box<Response>> {
    let path = parts.uri.path();
    let query: Vec<&str> = parts
        .uri
        .query()
        .into_iter()
        .flat_map(|q| q.split('&'))
        .filter(|kv| !kv.is_empty() && !super::is_token_param(kv))
        .collect();
    let uri = if query.is_empty() {
        path.to_string()
    } else {
        format!("{path}?{}", query.join("&"))
    };
    let mut headers = parts.headers.clone();
    let original_host = headers.remove(header::HOST);
    strip_hop_by_hop(&mut headers);
    headers.remove(header::AUTHORIZATION);
    headers.remove(TOKEN_HEADER);
    if navigating {
        // So the page comes back uncompressed and the live-refresh script can be added.
        headers.remove(header::ACCEPT_ENCODING);
    }
    if upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        if let Some(u) = parts.headers.get(header::UPGRADE) {
            headers.insert(header::UPGRADE, u.clone());
        }
    }
    if let Ok(h) = HeaderValue::from_str(&format!("localhost:{port}")) {
        headers.insert(header::HOST, h);
    }
    if let Some(h) = original_host {
        headers.insert("x-forwarded-host", h);
    }
    headers.insert("x-forwarded-proto", HeaderValue::from_static("http"));
    // Where the request came from is what the edge saw, never what the client claims.
    for claimed in ["x-forwarded-for", "x-real-ip", "forwarded"] {
        headers.remove(claimed);
    }
    if let Some(peer) = parts
        .extensions
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        && let Ok(v) = HeaderValue::from_str(&peer.0.ip().to_string())
    {
        headers.insert("x-forwarded-for", v);
    }
    let mut builder = Request::builder()
        .method(parts.method.clone())
        .uri(uri)
        .version(axum::http::Version::HTTP_11);
    if let Some(h) = builder.headers_mut() {
        *h = headers;
    }
    builder.body(body).map_err(|e| {
        Box::new(page::error(
            StatusCode::BAD_REQUEST,
            "Bad request",
            &e.to_string(),
        ))
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_app_never_sees_the_edges_credentials() {
        let req = Request::builder()
            .uri("/page?a=1&mt=mp_x&ms=ms_y&preview_token=miosa_pv_z&b=2")
            .header(header::HOST, "3000-a-b.preview.localhost:7071")
            .header(header::AUTHORIZATION, "Bearer msk_secret")
            .header(TOKEN_HEADER, "mp_x")
            .header(header::CONNECTION, "keep-alive, x-private")
            .header("x-private", "1")
            .header(header::COOKIE, "app=1")
            .body(Body::empty())
            .unwrap();
        let (parts, body) = req.into_parts();
        let up = upstream_request(&parts, body, 3000, false, false).unwrap();
        assert_eq!(up.uri(), "/page?a=1&b=2");
        let h = up.headers();
        assert_eq!(h[header::HOST], "localhost:3000");
        assert_eq!(h["x-forwarded-host"], "3000-a-b.preview.localhost:7071");
        assert_eq!(h[header::COOKIE], "app=1");
        for gone in ["authorization", TOKEN_HEADER, "connection", "x-private"] {
            assert!(!h.contains_key(gone), "{gone} forwarded");
        }
    }
}
