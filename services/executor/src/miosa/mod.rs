//! A typed client for MIOSA's REST API (and sandboxd, which speaks it): one shared reqwest client
//! with rustls, `Authorization: Bearer` from configuration (never logged), an `Idempotency-Key`
//! on every mutation derived from the caller's key, retries on 429, 5xx, connection errors and
//! timeouts (three, exponential backoff with full jitter, `Retry-After` honoured), per-operation
//! timeouts, lenient decoding, and the SDKs' route choices (canonical `/fs/*` with the legacy
//! `/files/*` fallback on 404, as the SDKs fall back).

pub mod decode;
pub mod error;
pub mod limit;
pub mod metrics;
pub mod sse;

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use rand::Rng;
use reqwest::Method;
use serde_json::{Value, json};
use slipway_common::config::Secret;

pub use error::MiosaError;
pub use limit::{Priority, RateLimiter};

#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// `https://api.miosa.ai/api/v1` or a sandboxd's `http://127.0.0.1:7070/api/v1`.
    pub base_url: String,
    pub api_key: Secret,
    /// Timeout of one attempt of an ordinary call.
    pub timeout: Duration,
    /// Timeout of one attempt of a command run to completion (exec) or a build.
    pub long_timeout: Duration,
    /// Retries after the first attempt.
    pub max_retries: u32,
    /// The first backoff; each retry doubles it (full jitter), at most 30 s.
    pub backoff: Duration,
    /// The key's requests per minute, and how many may go at once.
    pub rate_limit_rpm: u32,
    pub rate_limit_burst: u32,
    /// How edge URLs (previews, shares, deployments) are reached: `edge.resolve`.
    pub edge: Option<slipway_common::config::EdgeSettings>,
}

impl ClientConfig {
    pub fn new(base_url: impl Into<String>, api_key: Secret) -> Self {
        Self {
            base_url: base_url.into(),
            api_key,
            timeout: Duration::from_secs(60),
            long_timeout: Duration::from_secs(600),
            max_retries: 3,
            backoff: Duration::from_millis(500),
            rate_limit_rpm: 600,
            rate_limit_burst: 100,
            edge: None,
        }
    }
}

/// One client per process: reuse it (HTTP/2 and keep-alive pools, as MIOSA asks).
#[derive(Clone)]
pub struct MiosaClient {
    http: reqwest::Client,
    config: ClientConfig,
    /// Shared by every clone: the limit is per key.
    limiter: Arc<RateLimiter>,
    priority: Priority,
    metrics: Option<metrics::PlatformMetrics>,
}

impl std::fmt::Debug for MiosaClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MiosaClient")
            .field("base_url", &self.config.base_url)
            .finish_non_exhaustive()
    }
}

/// A successful answer.
struct Answer {
    body: bytes::Bytes,
    content_type: Option<String>,
}

/// One request: what to send and how long an attempt may take.
struct Call<'a> {
    op: &'a str,
    method: Method,
    path: String,
    query: Vec<(&'a str, String)>,
    body: Option<Value>,
    idempotency_key: Option<String>,
    timeout: Duration,
    /// Another base URL than the configured one (MIOSA's `sandboxes.` host).
    base: Option<String>,
}

impl MiosaClient {
    pub fn new(config: ClientConfig) -> Result<Self, MiosaError> {
        let builder = match &config.edge {
            Some(edge) => slipway_common::http::client_builder(edge),
            None => {
                slipway_common::tls::install_default_provider();
                reqwest::Client::builder()
            }
        };
        let http = builder
            .user_agent(concat!("slipway-executor/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| MiosaError::Unreachable {
                url: config.base_url.clone(),
                message: e.to_string(),
            })?;
        let limiter = Arc::new(RateLimiter::new(
            config.rate_limit_rpm,
            config.rate_limit_burst,
        ));
        Ok(Self {
            http,
            config,
            limiter,
            priority: Priority::Interactive,
            metrics: None,
        })
    }

    /// Counts calls, retries and 429s in the process's metrics.
    pub fn with_metrics(mut self, metrics: metrics::PlatformMetrics) -> Self {
        self.metrics = Some(metrics);
        self
    }

    pub fn metrics(&self) -> Option<&metrics::PlatformMetrics> {
        self.metrics.as_ref()
    }

    /// The same client for background work, which yields to interactive calls under the
    /// rate limit.
    pub fn background(&self) -> Self {
        Self {
            priority: Priority::Background,
            ..self.clone()
        }
    }

    pub fn config(&self) -> &ClientConfig {
        &self.config
    }

    /// MIOSA cloud serves the file watch (and tree) only on its `sandboxes.` host, as the SDKs
    /// know: an `api.` base URL becomes `sandboxes.` for those routes; any other base URL (a
    /// sandboxd) is used as it is.
    pub fn sandboxes_host_base(&self) -> String {
        let base = self.config.base_url.trim_end_matches('/');
        if base.contains("//api.") {
            base.replacen("//api.", "//sandboxes.", 1)
        } else {
            base.to_string()
        }
    }

    /// The platform's `Idempotency-Key` for a caller's key and an operation. A header value
    /// holds visible ASCII only, so other bytes (and `%`) are percent-encoded: any caller key
    /// works, and the same key always gives the same header.
    fn key(caller: &str, op: &str) -> String {
        format!("{caller}:{op}")
            .bytes()
            .map(|b| match b {
                b'!'..=b'~' if b != b'%' => (b as char).to_string(),
                _ => format!("%{b:02X}"),
            })
            .collect()
    }

    /// Sends a call, retrying what may succeed when repeated; returns the successful body.
    async fn send(&self, call: &Call<'_>) -> Result<bytes::Bytes, MiosaError> {
        self.send_typed(call).await.map(|a| a.body)
    }

    /// As `send`, with the answer's content type.
    async fn send_typed(&self, call: &Call<'_>) -> Result<Answer, MiosaError> {
        let base = call
            .base
            .as_deref()
            .unwrap_or(&self.config.base_url)
            .trim_end_matches('/');
        let url = format!("{base}{}", call.path);
        let mut attempt = 0;
        loop {
            let started = std::time::Instant::now();
            let result = self.attempt(&url, call).await;
            if let Some(m) = &self.metrics {
                let outcome = match &result {
                    Ok(_) => "ok".to_string(),
                    Err(e) => e
                        .status()
                        .map(|s| s.to_string())
                        .unwrap_or_else(|| e.kind().to_string()),
                };
                m.attempt(call.op, &outcome, started.elapsed().as_secs_f64());
            }
            match result {
                Err(e) if e.is_retryable() && attempt < self.config.max_retries => {
                    attempt += 1;
                    if let Some(m) = &self.metrics {
                        m.retry(call.op);
                    }
                    let wait = match &e {
                        MiosaError::Api {
                            retry_after: Some(after),
                            ..
                        } => *after,
                        _ => self.backoff(attempt),
                    };
                    tracing::debug!(op = call.op, attempt, ?wait, error = %e, "retrying a MIOSA call");
                    tokio::time::sleep(wait).await;
                }
                other => return other,
            }
        }
    }

    fn backoff(&self, attempt: u32) -> Duration {
        let cap = self
            .config
            .backoff
            .saturating_mul(1 << attempt.min(16))
            .min(Duration::from_secs(30));
        Duration::from_secs_f64(rand::rng().random_range(0.0..=cap.as_secs_f64()))
    }

    async fn attempt(&self, url: &str, call: &Call<'_>) -> Result<Answer, MiosaError> {
        self.limiter.acquire(self.priority).await;
        let mut req = self
            .http
            .request(call.method.clone(), url)
            .bearer_auth(self.config.api_key.expose())
            .header("Accept", "application/json")
            .timeout(call.timeout);
        if !call.query.is_empty() {
            req = req.query(&call.query);
        }
        if let Some(body) = &call.body {
            req = req.json(body);
        }
        if let Some(key) = &call.idempotency_key {
            req = req.header("Idempotency-Key", key);
        }
        let resp = req
            .send()
            .await
            .map_err(|e| self.transport_error(call, url, e))?;
        let status = resp.status().as_u16();
        let header = |name: &str| {
            resp.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let (retry_after, request_id) = (header("retry-after"), header("x-request-id"));
        let content_type = header("content-type");
        let body = resp
            .bytes()
            .await
            .map_err(|e| self.transport_error(call, url, e))?;
        if status >= 400 {
            return Err(decode::error_from(
                status,
                retry_after.as_deref(),
                request_id.as_deref(),
                &body,
            ));
        }
        Ok(Answer { body, content_type })
    }

    fn transport_error(&self, call: &Call<'_>, url: &str, e: reqwest::Error) -> MiosaError {
        if e.is_timeout() {
            MiosaError::Timeout {
                operation: call.op.to_string(),
                timeout: call.timeout,
            }
        } else {
            // reqwest's error text names the URL, never the headers: the key cannot leak here.
            MiosaError::Unreachable {
                url: url.to_string(),
                message: e.to_string(),
            }
        }
    }

    /// Sends, retries, and decodes the JSON answer (without its `data` envelope).
    async fn json(&self, call: Call<'_>) -> Result<Value, MiosaError> {
        let body = self.send(&call).await?;
        if body.iter().all(u8::is_ascii_whitespace) {
            return Ok(Value::Null);
        }
        let value: Value = serde_json::from_slice(&body).map_err(|e| MiosaError::Malformed {
            operation: call.op.to_string(),
            message: e.to_string(),
        })?;
        Ok(decode::unwrap_envelope(value))
    }

    fn call<'a>(&self, op: &'a str, method: Method, path: String) -> Call<'a> {
        Call {
            op,
            method,
            path,
            query: Vec::new(),
            body: None,
            idempotency_key: None,
            timeout: self.config.timeout,
            base: None,
        }
    }

    /// The sandbox object of an answer, checked to have an id.
    fn sandbox(op: &str, v: Value) -> Result<Value, MiosaError> {
        match v.get("id").and_then(decode::string_or_number) {
            Some(_) => Ok(v),
            None => Err(MiosaError::Malformed {
                operation: op.to_string(),
                message: "no sandbox id in the answer".into(),
            }),
        }
    }

    /// Any JSON operation of the contract: `op` names it in errors, logs and metrics, and a
    /// mutation's `idempotency_key` becomes the platform's `Idempotency-Key` (`<key>:<op>`).
    pub async fn request(
        &self,
        op: &'static str,
        method: Method,
        path: String,
        query: Vec<(&'static str, String)>,
        body: Option<Value>,
        idempotency_key: Option<&str>,
    ) -> Result<Value, MiosaError> {
        let mut c = self.call(op, method, path);
        c.query = query;
        c.body = body;
        c.idempotency_key = idempotency_key.map(|k| Self::key(k, op));
        self.json(c).await
    }

    /// `GET /sandboxes/{id}/usage`: cumulative counters, also after destroy.
    pub async fn sandbox_usage(&self, id: &str) -> Result<Value, MiosaError> {
        self.json(self.call(
            "usage.sandbox",
            Method::GET,
            format!("/sandboxes/{id}/usage"),
        ))
        .await
    }

    /// Fetches an edge URL (a preview, share or deployment) the way a browser would: no API key
    /// (it must never reach an app), host names resolved as `edge.resolve` says. Returns the
    /// status and body.
    pub async fn fetch_edge(&self, url: &str) -> Result<(u16, bytes::Bytes), MiosaError> {
        let resp = self
            .http
            .get(url)
            .timeout(self.config.timeout)
            .send()
            .await
            .map_err(|e| MiosaError::Unreachable {
                url: url.to_string(),
                message: e.to_string(),
            })?;
        let status = resp.status().as_u16();
        let body = resp.bytes().await.map_err(|e| MiosaError::Unreachable {
            url: url.to_string(),
            message: e.to_string(),
        })?;
        Ok((status, body))
    }

    /// `GET /sandboxes/{id}/files/tree` (on MIOSA's `sandboxes.` host): a directory tree.
    pub async fn tree(&self, id: &str, path: &str, depth: u32) -> Result<Value, MiosaError> {
        let mut c = self.call(
            "files.tree",
            Method::GET,
            format!("/sandboxes/{id}/files/tree"),
        );
        c.query = vec![("path", path.to_string()), ("depth", depth.to_string())];
        c.base = Some(self.sandboxes_host_base());
        self.json(c).await
    }

    /// A raw answer (file downloads).
    pub async fn bytes(
        &self,
        op: &'static str,
        path: String,
        query: Vec<(&'static str, String)>,
    ) -> Result<bytes::Bytes, MiosaError> {
        let mut c = self.call(op, Method::GET, path);
        c.query = query;
        self.send(&c).await
    }

    /// A plain-text answer (build logs), or the JSON string / `lines` it may come wrapped in.
    pub async fn text(&self, op: &'static str, path: String) -> Result<String, MiosaError> {
        let body = self.send(&self.call(op, Method::GET, path)).await?;
        match serde_json::from_slice::<Value>(&body).map(decode::unwrap_envelope) {
            Ok(Value::String(s)) => Ok(s),
            Ok(Value::Object(m)) => Ok(m
                .get("logs")
                .or(m.get("log"))
                .or(m.get("lines"))
                .map(|v| match v {
                    Value::String(s) => s.clone(),
                    Value::Array(lines) => lines
                        .iter()
                        .filter_map(Value::as_str)
                        .collect::<Vec<_>>()
                        .join("\n"),
                    other => other.to_string(),
                })
                .unwrap_or_default()),
            _ => Ok(String::from_utf8_lossy(&body).into_owned()),
        }
    }

    /// `POST /sandboxes`, with the caller's idempotency key.
    pub async fn create_sandbox(
        &self,
        body: Value,
        idempotency_key: &str,
    ) -> Result<Value, MiosaError> {
        let mut c = self.call("sandbox.create", Method::POST, "/sandboxes".into());
        c.body = Some(body);
        c.idempotency_key = Some(Self::key(idempotency_key, "sandbox.create"));
        Self::sandbox("sandbox.create", self.json(c).await?)
    }

    pub async fn get_sandbox(&self, id: &str) -> Result<Value, MiosaError> {
        Self::sandbox(
            "sandbox.get",
            self.json(self.call("sandbox.get", Method::GET, format!("/sandboxes/{id}")))
                .await?,
        )
    }

    /// `GET /sandboxes` with filters; accepts a bare list or `data`/`sandboxes`/`items`.
    pub async fn list_sandboxes(
        &self,
        filters: &[(&'static str, String)],
    ) -> Result<Vec<Value>, MiosaError> {
        let mut c = self.call("sandbox.list", Method::GET, "/sandboxes".into());
        c.query = filters.to_vec();
        match self.json(c).await? {
            Value::Array(items) => Ok(items),
            Value::Object(map) => ["sandboxes", "items", "data"]
                .iter()
                .find_map(|k| map.get(*k).and_then(Value::as_array).cloned())
                .ok_or_else(|| MiosaError::Malformed {
                    operation: "sandbox.list".into(),
                    message: "no list in the answer".into(),
                }),
            _ => Err(MiosaError::Malformed {
                operation: "sandbox.list".into(),
                message: "not a list".into(),
            }),
        }
    }

    pub async fn update_sandbox(
        &self,
        id: &str,
        patch: Value,
        idempotency_key: &str,
    ) -> Result<Value, MiosaError> {
        let mut c = self.call("sandbox.update", Method::PATCH, format!("/sandboxes/{id}"));
        c.body = Some(patch);
        c.idempotency_key = Some(Self::key(idempotency_key, "sandbox.update"));
        Self::sandbox("sandbox.update", self.json(c).await?)
    }

    /// `pause`, `resume`, `stop` or `extend` (`body` is `{}` but for extend's `timeout_sec`).
    pub async fn lifecycle(
        &self,
        id: &str,
        action: &'static str,
        body: Value,
        idempotency_key: &str,
    ) -> Result<Value, MiosaError> {
        let mut c = self.call(action, Method::POST, format!("/sandboxes/{id}/{action}"));
        c.body = Some(body);
        c.idempotency_key = Some(Self::key(idempotency_key, action));
        self.json(c).await
    }

    /// `DELETE /sandboxes/{id}`; a sandbox already gone counts as destroyed.
    pub async fn destroy_sandbox(&self, id: &str, idempotency_key: &str) -> Result<(), MiosaError> {
        let mut c = self.call(
            "sandbox.destroy",
            Method::DELETE,
            format!("/sandboxes/{id}"),
        );
        c.idempotency_key = Some(Self::key(idempotency_key, "sandbox.destroy"));
        match self.json(c).await {
            Ok(_) => Ok(()),
            Err(e) if matches!(e.status(), Some(404 | 410)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// A canonical `/fs/*` call, and on a 404 that is not about the sandbox the legacy
    /// `/files/*` one, as the SDKs fall back. The legacy call gets its own idempotency key: a key
    /// names one request, and the platform may have stored the 404 under the first.
    async fn fs_or_legacy(
        &self,
        canonical: Call<'_>,
        legacy: Call<'_>,
    ) -> Result<Value, MiosaError> {
        match self.json(canonical).await {
            Err(e) if e.status() == Some(404) && !is_sandbox_missing(&e) => self.json(legacy).await,
            other => other,
        }
    }

    /// Writes every file in one call: `/fs/write-many`, and on 404 the legacy
    /// `/files/write-many`; both with `content_base64`, as all four SDKs send it.
    pub async fn write_many(
        &self,
        id: &str,
        files: &[(String, Vec<u8>)],
        idempotency_key: &str,
    ) -> Result<Value, MiosaError> {
        let items: Vec<Value> = files
            .iter()
            .map(|(p, c)| json!({ "path": p, "content_base64": B64.encode(c) }))
            .collect();
        let body = json!({ "files": items });
        let op = "files.write_many";
        let mut canonical = self.call(op, Method::POST, format!("/sandboxes/{id}/fs/write-many"));
        canonical.body = Some(body.clone());
        canonical.idempotency_key = Some(Self::key(idempotency_key, op));
        let mut legacy = self.call(
            op,
            Method::POST,
            format!("/sandboxes/{id}/files/write-many"),
        );
        legacy.body = Some(body);
        legacy.idempotency_key = Some(Self::key(idempotency_key, "files.write_many.legacy"));
        self.fs_or_legacy(canonical, legacy).await
    }

    /// Reads a file: `GET /fs/download?path=`, and on 404 the legacy `GET /files/{path}`. A JSON
    /// answer that is the SDKs' envelope (`{data:{content}}`, and on the legacy route also a bare
    /// `{content}`) carries the file base64-encoded (or as text), as the Python SDK decodes it
    /// from either route; any other answer is the file's bytes as they came (the SDK would turn
    /// a JSON file into nothing).
    pub async fn read_file(&self, id: &str, path: &str) -> Result<bytes::Bytes, MiosaError> {
        let op = "files.read";
        let mut canonical = self.call(op, Method::GET, format!("/sandboxes/{id}/fs/download"));
        canonical.query = vec![("path", path.to_string())];
        let (answer, legacy) = match self.send_typed(&canonical).await {
            Err(e) if e.status() == Some(404) && !is_sandbox_missing(&e) => {
                let legacy = self.call(
                    op,
                    Method::GET,
                    format!("/sandboxes/{id}/files/{}", encode_file_path(path)),
                );
                (self.send_typed(&legacy).await?, true)
            }
            other => (other?, false),
        };
        let is_json = answer
            .content_type
            .as_deref()
            .is_some_and(|t| t.starts_with("application/json"));
        if !is_json {
            return Ok(answer.body);
        }
        let Ok(value) = serde_json::from_slice::<Value>(&answer.body) else {
            return Ok(answer.body);
        };
        let content = value
            .get("data")
            .and_then(|d| d.get("content"))
            .or(legacy.then(|| value.get("content")).flatten())
            .and_then(Value::as_str);
        Ok(match content {
            Some(c) => B64
                .decode(c.as_bytes())
                .map(bytes::Bytes::from)
                .unwrap_or_else(|_| bytes::Bytes::from(c.as_bytes().to_vec())),
            None => answer.body,
        })
    }

    /// Deletes a file or directory: `DELETE /files` with `{path}` (the Go CLI's route, the only
    /// one a MIOSA client documents; `recursive` only when asked for), and on a 404 or 405 the
    /// `/fs` family's `DELETE /fs?path=&recursive=`.
    pub async fn delete_file(
        &self,
        id: &str,
        path: &str,
        recursive: bool,
        idempotency_key: &str,
    ) -> Result<Value, MiosaError> {
        let op = "files.delete";
        let mut body = json!({ "path": path });
        if recursive {
            body["recursive"] = json!(true);
        }
        let mut documented = self.call(op, Method::DELETE, format!("/sandboxes/{id}/files"));
        documented.body = Some(body);
        documented.idempotency_key = Some(Self::key(idempotency_key, op));
        match self.json(documented).await {
            Err(e) if matches!(e.status(), Some(404 | 405)) && !is_sandbox_missing(&e) => {
                let mut other = self.call(op, Method::DELETE, format!("/sandboxes/{id}/fs"));
                other.query = vec![
                    ("path", path.to_string()),
                    ("recursive", recursive.to_string()),
                ];
                other.idempotency_key = Some(Self::key(idempotency_key, "files.delete.fs"));
                self.json(other).await
            }
            other => other,
        }
    }

    /// Runs a command to completion (`POST /exec`), with the long timeout. MIOSA's `timeout` is
    /// whole seconds: a partial second rounds up.
    pub async fn exec(
        &self,
        id: &str,
        command: &str,
        cwd: Option<&str>,
        env: &std::collections::HashMap<String, String>,
        timeout: Option<Duration>,
    ) -> Result<Value, MiosaError> {
        let mut body = json!({ "command": command });
        if let Some(cwd) = cwd {
            body["cwd"] = json!(cwd);
        }
        if !env.is_empty() {
            body["env"] = json!(env);
        }
        if let Some(t) = timeout {
            body["timeout"] = json!(whole_seconds(t));
        }
        let mut c = self.call("exec", Method::POST, format!("/sandboxes/{id}/exec"));
        c.body = Some(body);
        c.timeout = timeout
            .map(|t| t + Duration::from_secs(10))
            .unwrap_or(self.config.long_timeout);
        self.json(c).await
    }
}

/// Seconds, a partial one rounded up, at least 1.
pub fn whole_seconds(t: Duration) -> u64 {
    let secs = t.as_secs() + u64::from(t.subsec_nanos() > 0);
    secs.max(1)
}

/// A file path as the legacy download route's segments, each percent-encoded (so `#`, `?`, `%`
/// and spaces in names reach the file they name), as the SDKs encode it.
pub fn encode_file_path(path: &str) -> String {
    path.trim_start_matches('/')
        .split('/')
        .map(|segment| {
            segment
                .bytes()
                .map(|b| match b {
                    b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                        (b as char).to_string()
                    }
                    _ => format!("%{b:02X}"),
                })
                .collect::<String>()
        })
        .collect::<Vec<_>>()
        .join("/")
}

/// A 404 about the sandbox itself (no fallback can help) rather than about the route; codes
/// come in either case (`SANDBOX_NOT_FOUND` from some servers).
fn is_sandbox_missing(e: &MiosaError) -> bool {
    matches!(e, MiosaError::Api { code, .. } if code.eq_ignore_ascii_case("sandbox_not_found"))
}
