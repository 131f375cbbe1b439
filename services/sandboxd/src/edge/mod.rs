//! The edge: the listener browsers reach previews and shares through. It routes by host name
//! (`<port>-<sandbox>-<secret>.preview.<domain>`), so apps that use absolute paths work, checks
//! the grant behind the name on every request, and forwards to the port on the sandbox's own
//! loopback, WebSockets included. HTML pages get a small live-refresh script.

mod apps;
mod live;
mod page;
mod proxy;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{Method, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::grants::{Grant, Grants, Refusal, Scope};
use crate::host::Host;

pub use proxy::Pool;

/// The path the live-refresh script listens on; never forwarded to the app.
pub const LIVE_PATH: &str = "/__slipway/live";

/// How the edge's URLs look from the outside.
#[derive(Clone, Debug)]
pub struct Links {
    scheme: String,
    /// The base domain: preview hosts are `<label>.preview.<domain>`.
    domain: String,
    /// `:<port>` when the public URL names one.
    port: String,
}

impl Links {
    /// From `--edge-public-url` (scheme, host, port of the base domain, as an Ingress serves it)
    /// or else `http://<domain>:<the bound port>`.
    pub fn new(public_url: Option<&str>, domain: &str, bound: SocketAddr) -> anyhow::Result<Self> {
        let Some(url) = public_url else {
            return Ok(Self {
                scheme: "http".into(),
                domain: domain.trim_end_matches('.').to_ascii_lowercase(),
                port: format!(":{}", bound.port()),
            });
        };
        let uri: axum::http::Uri = url
            .parse()
            .map_err(|e| anyhow::anyhow!("--edge-public-url {url}: {e}"))?;
        let scheme = uri.scheme_str().unwrap_or_default();
        if !matches!(scheme, "http" | "https") || uri.host().is_none() {
            anyhow::bail!("--edge-public-url {url}: expected http(s)://<domain>[:port]");
        }
        if uri.path() != "/" && !uri.path().is_empty() {
            anyhow::bail!("--edge-public-url {url}: previews live at the root of their host");
        }
        Ok(Self {
            scheme: scheme.into(),
            domain: uri.host().unwrap_or_default().to_ascii_lowercase(),
            port: uri.port_u16().map(|p| format!(":{p}")).unwrap_or_default(),
        })
    }

    /// The URL for a grant's host label; `key=token` is added when a key is given.
    pub fn url(&self, label: &str, key: &str, token: &str) -> String {
        let base = format!(
            "{}://{label}.preview.{}{}/",
            self.scheme, self.domain, self.port
        );
        if key.is_empty() {
            base
        } else {
            format!("{base}?{key}={token}")
        }
    }

    /// A deployment's URL: `<slug>.apps.<domain>`.
    pub fn app_url(&self, slug: &str) -> String {
        format!(
            "{}://{slug}.apps.{}{}/",
            self.scheme, self.domain, self.port
        )
    }

    /// Which of our sites a host name is, if any.
    fn site<'a>(&self, host: &'a str) -> Option<Site<'a>> {
        let name = host.rsplit_once(':').map_or(host, |(n, p)| {
            if p.chars().all(|c| c.is_ascii_digit()) {
                n
            } else {
                host
            }
        });
        let rest = name.strip_suffix(self.domain.as_str())?;
        let (label, site) = if let Some(l) = rest.strip_suffix(".preview.") {
            (l, Site::Preview as fn(&'a str) -> Site<'a>)
        } else {
            (
                rest.strip_suffix(".apps.")?,
                Site::App as fn(&'a str) -> Site<'a>,
            )
        };
        (!label.is_empty() && !label.contains('.')).then(|| site(label))
    }
}

/// A host name the edge serves.
#[derive(Debug, PartialEq, Eq)]
enum Site<'a> {
    /// A preview or share: the grant's host label.
    Preview(&'a str),
    /// A deployment: its slug.
    App(&'a str),
}

#[derive(Clone)]
pub struct EdgeState {
    pub host: Arc<Host>,
    pub grants: Arc<Grants>,
    pub links: Arc<Links>,
    pub deployments: Arc<crate::deployments::Deployments>,
    pub pool: Arc<Pool>,
}

pub fn router(state: EdgeState) -> Router {
    Router::new().fallback(handle).with_state(state)
}

/// Query parameters and the header MIOSA clients carry tokens in; checked, then never forwarded.
const TOKEN_PARAMS: [&str; 3] = ["mt", "ms", "preview_token"];
const TOKEN_HEADER: &str = "x-miosa-preview-token";

/// A query component as servers read it: `%XX` escapes and `+` decoded (a malformed escape is
/// kept as it is). Token parameters are recognised by their decoded name, so `%6Dt=` is `mt=`.
pub(crate) fn decode_component(s: &str) -> String {
    let b = s.as_bytes();
    let hex = |c: u8| char::from(c).to_digit(16);
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => match (hex(b[i + 1]), hex(b[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push(u8::try_from(h * 16 + l).unwrap_or(b'%'));
                    i += 3;
                }
                _ => {
                    out.push(b'%');
                    i += 1;
                }
            },
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Whether a `key=value` query pair carries a token (by its decoded name).
pub(crate) fn is_token_param(kv: &str) -> bool {
    let k = kv.split_once('=').map_or(kv, |(k, _)| k);
    TOKEN_PARAMS.contains(&decode_component(k).as_str())
}

async fn handle(State(s): State<EdgeState>, req: Request) -> Response {
    if req.headers().get_all(header::HOST).iter().count() > 1 {
        return page::error(
            StatusCode::BAD_REQUEST,
            "Bad request",
            "A request names one host.",
        );
    }
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri().host())
        .unwrap_or_default()
        .to_ascii_lowercase();
    let label = match s.links.site(&host) {
        Some(Site::Preview(label)) => label,
        Some(Site::App(slug)) => return apps::serve(&s, slug, req).await,
        None => {
            return page::error(
                StatusCode::NOT_FOUND,
                "No such preview",
                "This address is not a Slipway preview or deployment.",
            );
        }
    };
    let grant = match s.grants.check_host_label(label) {
        Ok(g) => g,
        Err(r) => return page::refusal(&r),
    };
    if let Err(r) = presented_tokens_match(&s.grants, &req, &grant) {
        return page::refusal(&r);
    }
    let safe = matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS);
    if grant.scope == Scope::Read && !safe {
        return page::error(
            StatusCode::FORBIDDEN,
            "Read-only link",
            "This link lets you look at the app, not change it.",
        );
    }
    // Preview traffic is activity: it resumes a paused sandbox and resets its idle clock.
    let entry = match s.host.live(&grant.sandbox_id) {
        Ok(e) => e,
        Err(e) if e.status == StatusCode::GONE => {
            return page::error(
                StatusCode::GONE,
                "Sandbox gone",
                "The sandbox behind this preview was destroyed.",
            );
        }
        Err(e) => {
            return page::error(e.status, "Sandbox unavailable", &e.message);
        }
    };
    if req.uri().path() == LIVE_PATH {
        return live::events(&entry).into_response();
    }
    let net = entry.net_index();
    s.pool.forward(net, grant.port, req, true).await
}

/// Any token the request carries must stand for the same grant as its host name: a changed,
/// foreign or stale token is refused rather than ignored.
fn presented_tokens_match(grants: &Grants, req: &Request, grant: &Grant) -> Result<(), Refusal> {
    let from_query = req
        .uri()
        .query()
        .into_iter()
        .flat_map(|q| q.split('&'))
        .filter(|kv| is_token_param(kv))
        .map(|kv| decode_component(kv.split_once('=').map_or("", |(_, v)| v)));
    let from_header = req
        .headers()
        .get_all(TOKEN_HEADER)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .map(str::to_string);
    for token in from_query.chain(from_header) {
        let presented = grants.check_token(&token)?;
        if presented.id != grant.id {
            return Err(Refusal::Mismatch);
        }
    }
    Ok(())
}

/// Serves the edge until `stop`, on a thread of its own with a single-threaded runtime: a
/// proxied request is a chain of small socket reads and writes, and keeping the whole chain on one
/// thread avoids waking another for each step (measured in `benches/edge.rs`).
pub fn spawn(
    listener: std::net::TcpListener,
    state: EdgeState,
    header_timeout: std::time::Duration,
    stop: tokio_util::sync::CancellationToken,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    listener.set_nonblocking(true)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name("edge".into())
        .spawn(move || {
            runtime.block_on(async move {
                if let Err(e) = serve(listener, state, header_timeout, stop).await {
                    tracing::error!(error = %e, "the edge stopped");
                }
            });
        })
}

async fn serve(
    listener: std::net::TcpListener,
    state: EdgeState,
    header_timeout: std::time::Duration,
    stop: tokio_util::sync::CancellationToken,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::from_std(listener)?;
    crate::serve::http1(listener, router(state), header_timeout, stop).await
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn links_and_labels() {
        let bound: SocketAddr = "127.0.0.1:7071".parse().unwrap();
        let l = Links::new(None, "localhost", bound).unwrap();
        assert_eq!(
            l.url("3000-a-b", "mt", "mp_x"),
            "http://3000-a-b.preview.localhost:7071/?mt=mp_x"
        );
        assert_eq!(
            l.site("3000-a-b.preview.localhost:7071"),
            Some(Site::Preview("3000-a-b"))
        );
        assert_eq!(
            l.site("3000-a-b.preview.localhost"),
            Some(Site::Preview("3000-a-b"))
        );
        assert_eq!(
            l.site("shop-1f2e3d.apps.localhost:7071"),
            Some(Site::App("shop-1f2e3d"))
        );
        assert_eq!(l.app_url("shop"), "http://shop.apps.localhost:7071/");
        assert_eq!(l.site("x.3000-a-b.preview.localhost"), None);
        assert_eq!(l.site("3000-a-b.preview.localhost.evil.com"), None);
        assert_eq!(l.site("preview.localhost"), None);
        assert_eq!(l.site("apps.localhost"), None);
        let l = Links::new(Some("https://sandboxes.example.com"), "ignored", bound).unwrap();
        assert_eq!(
            l.url("3000-a-b", "", ""),
            "https://3000-a-b.preview.sandboxes.example.com/"
        );
        assert!(Links::new(Some("ftp://x"), "", bound).is_err());
        assert!(Links::new(Some("https://x.com/path"), "", bound).is_err());
    }
}
