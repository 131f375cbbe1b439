//! Wire conformance: the executor speaks MIOSA as MIOSA's official Python SDK does. One flow of
//! operations goes through the executor over NATS, and the same flow through the SDK
//! (`tests/conformance/wire_flow.py`), each through its own recording proxy in front of one real
//! sandboxd. Per route: method and path, query names, body field names and shapes, and the
//! `Idempotency-Key` header are compared; every difference must be a named exception below,
//! with its reason, and every exception must still be needed.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::Response;
use serde_json::Value;
use slipway_common::RpcClient;
use slipway_proto::v1::*;
use slipway_test_support::{NatsServer, Sandboxd, workspace_bin};

use crate::harness::op;

/// What reached the platform: one request as the proxy saw it, in the step (operation) it
/// belongs to.
#[derive(Clone, Debug)]
struct Seen {
    step: String,
    method: String,
    path: String,
    query: BTreeMap<String, String>,
    key: bool,
    body: Option<Value>,
}

#[derive(Clone)]
struct Proxy {
    upstream: String,
    seen: Arc<Mutex<Vec<Seen>>>,
    /// The step the next requests belong to: each side sends `GET /__step/<op>` before an
    /// operation (the proxy keeps it, never forwards it).
    step: Arc<Mutex<String>>,
    http: reqwest::Client,
}

/// Steps named `legacy.*` run with the proxy answering 404 on every `/fs/*` route, as a MIOSA
/// without them would, so both sides' fallbacks are compared too.
const LEGACY: &str = "legacy.";

impl Proxy {
    async fn start(upstream: &str) -> (String, Arc<Mutex<Vec<Seen>>>) {
        let proxy = Proxy {
            upstream: upstream.trim_end_matches("/api/v1").to_string(),
            seen: Arc::default(),
            step: Arc::default(),
            http: slipway_test_support::http(),
        };
        let seen = proxy.seen.clone();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = axum::Router::new().fallback(forward).with_state(proxy);
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (format!("http://{addr}/api/v1"), seen)
    }
}

/// Records the request, then forwards it and streams the answer back (event streams too).
async fn forward(State(p): State<Proxy>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let path = parts.uri.path().trim_start_matches("/api/v1").to_string();
    if let Some(step) = path.strip_prefix("/__step/") {
        *p.step.lock().unwrap() = step.to_string();
        return Response::new(Body::empty());
    }
    let body = axum::body::to_bytes(body, 64 << 20).await.unwrap();
    let query = parts
        .uri
        .query()
        .map(|q| {
            q.split('&')
                .filter(|kv| !kv.is_empty())
                .map(|kv| {
                    let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                    (k.to_string(), v.to_string())
                })
                .collect()
        })
        .unwrap_or_default();
    let step = p.step.lock().unwrap().clone();
    p.seen.lock().unwrap().push(Seen {
        step: step.clone(),
        method: parts.method.to_string(),
        path: path.clone(),
        query,
        key: parts.headers.contains_key("idempotency-key"),
        body: (!body.is_empty()).then(|| serde_json::from_slice(&body).unwrap_or(Value::Null)),
    });
    if step.starts_with(LEGACY) && path.contains("/fs/") {
        let mut resp = Response::new(Body::from(
            r#"{"error":{"code":"not_found","message":"no such route"}}"#,
        ));
        *resp.status_mut() = axum::http::StatusCode::NOT_FOUND;
        resp.headers_mut()
            .insert("content-type", "application/json".parse().unwrap());
        return resp;
    }
    let url = format!("{}{}", p.upstream, parts.uri);
    let mut out = p.http.request(parts.method.clone(), url).body(body);
    for (name, value) in &parts.headers {
        if name != "host" && name != "content-length" {
            out = out.header(name, value);
        }
    }
    let answer = out.send().await.unwrap();
    let mut resp = Response::builder().status(answer.status().as_u16());
    for (name, value) in answer.headers() {
        if name != "content-length" && name != "transfer-encoding" {
            resp = resp.header(name, value);
        }
    }
    resp.body(Body::from_stream(answer.bytes_stream())).unwrap()
}

/// Words after which a path segment is an id (or, after `files`, a file path).
const COLLECTIONS: [&str; 10] = [
    "by-name",
    "sandboxes",
    "snapshots",
    "restore",
    "processes",
    "previews",
    "shares",
    "deployments",
    "versions",
    "external",
];
/// Named routes under `/files` (anything else there is the download catch-all).
const FILE_ROUTES: [&str; 6] = ["write-many", "stat", "mkdir", "tree", "watch", "batch"];

/// The file path of a legacy download route, as sent (its encoding is compared).
fn file_tail(s: &Seen) -> Option<String> {
    let (_, tail) = s.path.split_once("/files/")?;
    (!FILE_ROUTES.contains(&tail)).then(|| tail.to_string())
}

/// `POST /sandboxes/{}/restore/{}`: the route with its ids taken out.
fn route(s: &Seen) -> String {
    let mut out = Vec::new();
    let mut previous = "";
    for segment in s.path.trim_start_matches('/').split('/') {
        if previous == "files" && !FILE_ROUTES.contains(&segment) {
            out.push("{path}");
            break;
        }
        if COLLECTIONS.contains(&previous) && segment != "by-name" {
            out.push("{}");
        } else {
            out.push(segment);
        }
        previous = segment;
    }
    format!("{} /{}", s.method, out.join("/"))
}

/// Fields whose keys are the caller's data (metadata, environment variables), not field names.
const MAPS: [&str; 2] = ["metadata", "env"];

/// A JSON value's shape: objects keep their keys (a caller's map is just `map`), arrays the
/// union of their items' shapes, scalars become their type.
fn shape(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .map(|(k, v)| {
                    let s = if MAPS.contains(&k.as_str()) && v.is_object() {
                        "map".into()
                    } else {
                        shape(v)
                    };
                    (k.clone(), s)
                })
                .collect(),
        ),
        Value::Array(items) => Value::Array(vec![items.iter().map(shape).fold(Value::Null, merge)]),
        Value::String(_) => "string".into(),
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer".into(),
        Value::Number(_) => "number".into(),
        Value::Bool(_) => "bool".into(),
        // An explicit null is a value the other side may not accept.
        Value::Null => "null".into(),
    }
}

fn merge(a: Value, b: Value) -> Value {
    match (a, b) {
        (Value::Null, b) => b,
        (a, Value::Null) => a,
        (Value::Object(mut a), Value::Object(b)) => {
            for (k, v) in b {
                let old = a.remove(&k).unwrap_or(Value::Null);
                a.insert(k, merge(old, v));
            }
            Value::Object(a)
        }
        (Value::Array(a), Value::Array(b)) => Value::Array(vec![merge(
            a.into_iter().next().unwrap_or(Value::Null),
            b.into_iter().next().unwrap_or(Value::Null),
        )]),
        (a, _) => a,
    }
}

/// Query parameters whose values are the caller's data (ids, paths, times), not the protocol.
const CALLER_QUERY: [&str; 6] = [
    "path",
    "start",
    "end",
    "external_user_id",
    "external_project_id",
    "external_workspace_id",
];

/// What each side sent on one route within one step, all its requests taken together.
#[derive(Default, Debug)]
struct Sent {
    /// Query names, with the value where it is protocol (`tail`, `depth`, `period`...).
    query: BTreeSet<String>,
    body: Value,
    keyed: bool,
    unkeyed: bool,
    /// File paths on the legacy download route, as encoded.
    tails: BTreeSet<String>,
    /// Requests on the route in the step.
    count: usize,
}

/// Steps that poll until something is so: their call counts are the platform's timing.
const POLLING: [&str; 2] = ["sandbox.readiness", "version.list"];

/// Per step, per route, what was sent. Requests before the first step (the executor's
/// start-up work) are not part of the flow.
fn by_step(seen: &[Seen]) -> BTreeMap<String, BTreeMap<String, Sent>> {
    let mut out: BTreeMap<String, BTreeMap<String, Sent>> = BTreeMap::new();
    for s in seen.iter().filter(|s| !s.step.is_empty()) {
        let sent = out
            .entry(s.step.clone())
            .or_default()
            .entry(route(s))
            .or_default();
        for (k, v) in &s.query {
            sent.query.insert(if CALLER_QUERY.contains(&k.as_str()) {
                k.clone()
            } else {
                format!("{k}={v}")
            });
        }
        // No body and `{}` say the same: nothing.
        let body = s.body.as_ref().map(shape).unwrap_or(Value::Null);
        sent.body = merge(std::mem::take(&mut sent.body), body);
        if s.key {
            sent.keyed = true;
        } else {
            sent.unkeyed = true;
        }
        sent.tails.extend(file_tail(s));
        sent.count += 1;
    }
    out
}

const NOT_SENT: &str = "the SDK does not send";

/// Fields (as `a.b[].c`) the executor sends that the SDK does not, or with another type.
fn body_differences(path: &str, ours: &Value, theirs: &Value, out: &mut Vec<String>) {
    match (ours, theirs) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in a {
                let at = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                match b.get(k) {
                    None => out.push(format!("field `{at}` {NOT_SENT}")),
                    Some(t) => body_differences(&at, v, t, out),
                }
            }
        }
        (Value::Object(a), Value::Null) => {
            for k in a.keys() {
                let at = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                out.push(format!("field `{at}` {NOT_SENT}"));
            }
        }
        (Value::Array(a), Value::Array(b)) => body_differences(
            &format!("{path}[]"),
            a.first().unwrap_or(&Value::Null),
            b.first().unwrap_or(&Value::Null),
            out,
        ),
        (Value::Null, _) | (_, Value::Null) => {}
        (a, b) if a == b => {}
        // Whole numbers where the SDK's field takes any number.
        (a, b) if a == "integer" && b == "number" => {}
        (a, b) => out.push(format!("field `{path}` is {a} where the SDK sends {b}")),
    }
}

/// Every way the executor's traffic departs from the SDK's, as `<step> <route>: <what>`.
fn differences(
    ours: &BTreeMap<String, BTreeMap<String, Sent>>,
    theirs: &BTreeMap<String, BTreeMap<String, Sent>>,
) -> Vec<String> {
    let mut out = Vec::new();
    let none = BTreeMap::new();
    let steps: BTreeSet<&String> = ours.keys().chain(theirs.keys()).collect();
    for step in steps {
        let (o_routes, t_routes) = (
            ours.get(step).unwrap_or(&none),
            theirs.get(step).unwrap_or(&none),
        );
        for (route, o) in o_routes {
            let at = format!("{step} {route}");
            let Some(t) = t_routes.get(route) else {
                out.push(format!("{at}: a call the SDK does not make in this step"));
                continue;
            };
            for q in o.query.difference(&t.query) {
                out.push(format!("{at}: query `{q}` the SDK does not send"));
            }
            for q in t.query.difference(&o.query) {
                out.push(format!("{at}: no query `{q}` where the SDK sends it"));
            }
            let mut fields = Vec::new();
            body_differences("", &o.body, &t.body, &mut fields);
            out.extend(fields.into_iter().map(|f| format!("{at}: {f}")));
            let mut missing = Vec::new();
            body_differences("", &t.body, &o.body, &mut missing);
            out.extend(
                missing
                    .into_iter()
                    .filter(|m| m.contains(NOT_SENT))
                    .map(|m| {
                        format!(
                            "{at}: {}",
                            m.replace(NOT_SENT, "the executor does not send")
                        )
                    }),
            );
            if o.count != t.count && !POLLING.contains(&step.as_str()) {
                out.push(format!(
                    "{at}: {} calls where the SDK makes {}",
                    o.count, t.count
                ));
            }
            if o.tails != t.tails {
                out.push(format!(
                    "{at}: file path sent as {:?}, the SDK as {:?}",
                    o.tails, t.tails
                ));
            }
            if o.keyed && !t.keyed {
                out.push(format!("{at}: Idempotency-Key where the SDK sends none"));
            }
            if o.unkeyed && t.keyed && !t.unkeyed {
                out.push(format!(
                    "{at}: no Idempotency-Key where the SDK always sends one"
                ));
            }
        }
        for route in t_routes.keys().filter(|r| !o_routes.contains_key(*r)) {
            out.push(format!(
                "{step} {route}: the SDK's call, which the executor does not make"
            ));
        }
    }
    out
}

/// The differences that remain, each with why it is right. The test fails on a difference not
/// listed here, and on a line here that no longer matches a difference.
const EXCEPTIONS: &[(&str, &str)] = &[
    (
        "files.write_many POST /sandboxes/{}/fs/write-many: Idempotency-Key where the SDK sends none",
        "write-many is all or nothing, so a keyed replay is safe; A key on every retried mutation, as MIOSA's API reference asks (POST, PUT, PATCH and DELETE); the executor retries where the SDK's caller may not.",
    ),
    (
        "legacy.files.write_many POST /sandboxes/{}/fs/write-many: Idempotency-Key where the SDK sends none",
        "A key on every retried mutation, as MIOSA's API reference asks (POST, PUT, PATCH and DELETE); the executor retries where the SDK's caller may not.",
    ),
    (
        "legacy.files.write_many POST /sandboxes/{}/files/write-many: Idempotency-Key where the SDK sends none",
        "The fallback is another request, so it has its own key (the platform may keep the 404 under the first); A key on every retried mutation, as MIOSA's API reference asks (POST, PUT, PATCH and DELETE); the executor retries where the SDK's caller may not.",
    ),
    (
        "preview.create POST /sandboxes/{}/previews: Idempotency-Key where the SDK sends none",
        "A key on every retried mutation, as MIOSA's API reference asks (POST, PUT, PATCH and DELETE); the executor retries where the SDK's caller may not.",
    ),
    (
        "preview.share POST /sandboxes/{}/previews/{}/share: field `expires_in_sec` the SDK does not send",
        "The SDKs disagree on the TTL's name: Python and TypeScript send `ttl_seconds`, Go and Elixir `expires_in_sec`; both go, so either reading gets the TTL.",
    ),
    (
        "preview.share POST /sandboxes/{}/previews/{}/share: Idempotency-Key where the SDK sends none",
        "A key on every retried mutation, as MIOSA's API reference asks (POST, PUT, PATCH and DELETE); the executor retries where the SDK's caller may not.",
    ),
    (
        "process.start POST /sandboxes/{}/processes: field `cwd` the SDK does not send",
        "Elixir's SDK sends `cwd` on process start, and Python's own background `commands.run` sends the exec payload with `cwd`; Python's `processes.start` just has no parameter for it.",
    ),
    (
        "process.start POST /sandboxes/{}/processes: Idempotency-Key where the SDK sends none",
        "A retried start must not start a second dev server; A key on every retried mutation, as MIOSA's API reference asks (POST, PUT, PATCH and DELETE); the executor retries where the SDK's caller may not.",
    ),
    (
        "process.stop DELETE /sandboxes/{}/processes/{}: Idempotency-Key where the SDK sends none",
        "The caller's key tied to this sandbox and pid, or a fresh one per call (pids repeat); A key on every retried mutation, as MIOSA's API reference asks (POST, PUT, PATCH and DELETE); the executor retries where the SDK's caller may not.",
    ),
    (
        "snapshot.create POST /sandboxes/{}/snapshots: Idempotency-Key where the SDK sends none",
        "A retried checkpoint must not make two snapshots; A key on every retried mutation, as MIOSA's API reference asks (POST, PUT, PATCH and DELETE); the executor retries where the SDK's caller may not.",
    ),
    (
        "snapshot.restore POST /sandboxes/{}/restore/{}: Idempotency-Key where the SDK sends none",
        "A restore may create a sandbox, and a retry must not create two; A key on every retried mutation, as MIOSA's API reference asks (POST, PUT, PATCH and DELETE); the executor retries where the SDK's caller may not.",
    ),
    (
        "share.create POST /sandboxes/{}/shares: Idempotency-Key where the SDK sends none",
        "A key on every retried mutation, as MIOSA's API reference asks (POST, PUT, PATCH and DELETE); the executor retries where the SDK's caller may not.",
    ),
    (
        "sandbox.update PATCH /sandboxes/{}: Idempotency-Key where the SDK sends none",
        "A key on every retried mutation, as MIOSA's API reference asks (POST, PUT, PATCH and DELETE); the executor retries where the SDK's caller may not.",
    ),
    (
        "sandbox.pause POST /sandboxes/{}/pause: Idempotency-Key where the SDK sends none",
        "A key on every retried mutation, as MIOSA's API reference asks (POST, PUT, PATCH and DELETE); the executor retries where the SDK's caller may not.",
    ),
    (
        "sandbox.extend POST /sandboxes/{}/extend: Idempotency-Key where the SDK sends none",
        "A key on every retried mutation, as MIOSA's API reference asks (POST, PUT, PATCH and DELETE); the executor retries where the SDK's caller may not.",
    ),
    (
        "sandbox.stop POST /sandboxes/{}/stop: Idempotency-Key where the SDK sends none",
        "A key on every retried mutation, as MIOSA's API reference asks (POST, PUT, PATCH and DELETE); the executor retries where the SDK's caller may not.",
    ),
    (
        "sandbox.destroy DELETE /sandboxes/{}: Idempotency-Key where the SDK sends none",
        "A key on every retried mutation, as MIOSA's API reference asks (POST, PUT, PATCH and DELETE); the executor retries where the SDK's caller may not.",
    ),
    (
        "sandbox.destroy GET /sandboxes/{}: a call the SDK does not make in this step",
        "DELETE answers 204 without a body; the executor reads the sandbox back to record its final state in the registry (a 404 or 410 counts as destroyed).",
    ),
    (
        "version.list GET /deployments/{}: a call the SDK does not make in this step",
        "Versions carry their deployment's URL, which the version answers lack; the deployment is read once and its URL cached (it never changes).",
    ),
];

/// Every route the executor's flow takes, the legacy file routes of its fallbacks included.
/// `files.delete` is not here: the Python SDK has no file delete to compare it with (its routes
/// are tested in `faults.rs` and against sandboxd).
const FLOW_ROUTES: [&str; 46] = [
    "DELETE /sandboxes/{}",
    "DELETE /sandboxes/{}/previews/{}",
    "DELETE /sandboxes/{}/previews/{}/share",
    "DELETE /sandboxes/{}/processes/{}",
    "DELETE /sandboxes/{}/shares/{}",
    "GET /deployments/{}",
    "GET /deployments/{}/versions",
    "GET /deployments/{}/versions/{}",
    "GET /deployments/{}/versions/{}/logs",
    "GET /quotas/external/{}",
    "GET /sandbox-templates",
    "GET /sandboxes",
    "GET /sandboxes/{}",
    "GET /sandboxes/{}/files",
    "GET /sandboxes/{}/files/tree",
    "GET /sandboxes/{}/files/{path}",
    "GET /sandboxes/{}/fs/download",
    "GET /sandboxes/{}/processes",
    "GET /sandboxes/{}/processes/{}",
    "GET /sandboxes/{}/processes/{}/logs",
    "GET /sandboxes/{}/readiness",
    "GET /sandboxes/{}/shares",
    "GET /sandboxes/{}/snapshots",
    "GET /sandboxes/{}/usage",
    "GET /usage",
    "PATCH /sandboxes/{}",
    "POST /deployments/{}/rollback",
    "POST /deployments/{}/versions/{}/promote",
    "POST /sandboxes",
    "POST /sandboxes/{}/deploy",
    "POST /sandboxes/{}/exec",
    "POST /sandboxes/{}/extend",
    "POST /sandboxes/{}/files/write-many",
    "POST /sandboxes/{}/fork",
    "POST /sandboxes/{}/fs/write-many",
    "POST /sandboxes/{}/pause",
    "POST /sandboxes/{}/preview-token",
    "POST /sandboxes/{}/previews",
    "POST /sandboxes/{}/previews/{}/share",
    "POST /sandboxes/{}/processes",
    "POST /sandboxes/{}/restore/{}",
    "POST /sandboxes/{}/resume",
    "POST /sandboxes/{}/shares",
    "POST /sandboxes/{}/snapshots",
    "POST /sandboxes/{}/stop",
    "PUT /quotas/external/{}",
];

/// The executor over NATS, marking each operation's step at the proxy first.
struct Flow {
    rpc: RpcClient,
    proxy: String,
}

impl Flow {
    async fn call<Req: slipway_proto::WireMessage, Resp: slipway_proto::WireMessage>(
        &self,
        subject: &str,
        request: &Req,
    ) -> Result<Resp, slipway_common::RpcError> {
        let step = subject.trim_start_matches("slipway.executor.v1.");
        self.call_in(step, subject, request).await
    }

    async fn call_in<Req: slipway_proto::WireMessage, Resp: slipway_proto::WireMessage>(
        &self,
        step: &str,
        subject: &str,
        request: &Req,
    ) -> Result<Resp, slipway_common::RpcError> {
        slipway_test_support::http()
            .get(format!("{}/__step/{step}", self.proxy))
            .send()
            .await
            .unwrap();
        self.rpc.call(subject, request).await
    }
}

/// The executor's half: the flow of `wire_flow.py`, operation for operation, over NATS.
async fn executor_flow(flow: &Flow) {
    let user = Attribution {
        user_id: "wire-user".into(),
        project_id: "wire-project".into(),
        workspace_id: "wire-workspace".into(),
    };
    let _: ListTemplatesReply = flow
        .call(&op("templates.list"), &ListTemplatesRequest {})
        .await
        .unwrap();
    let created: SandboxReply = flow
        .call(
            &op("sandbox.create"),
            &CreateSandboxRequest {
                idempotency_key: "wire:create".into(),
                run_id: "run_wire".into(),
                attribution: Some(user.clone()),
                template_id: "node".into(),
                name: "wire".into(),
                env: [("A".into(), "one".into())].into(),
                timeout_sec: 3600,
                idle_timeout_sec: 600,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let id = created.sandbox.unwrap().id;
    let sandbox = |key: &str| SandboxRef {
        sandbox_id: id.clone(),
        idempotency_key: key.into(),
    };
    let _: SandboxReply = flow
        .call(
            &op("sandbox.get"),
            &GetSandboxRequest {
                sandbox_id: id.clone(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let _: ListSandboxesReply = flow
        .call(
            &op("sandbox.list"),
            &ListSandboxesRequest {
                user_id: "wire-user".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let ready: ReadinessReply = flow
        .call(
            &op("sandbox.readiness"),
            &ReadinessRequest {
                sandbox_id: id.clone(),
                wait_ms: 10_000,
            },
        )
        .await
        .unwrap();
    assert!(ready.ready);
    let _: WriteFilesReply = flow
        .call(
            &op("files.write_many"),
            &WriteFilesRequest {
                sandbox_id: id.clone(),
                idempotency_key: "wire:files:1".into(),
                files: vec![
                    FileContent {
                        path: "/workspace/site/index.html".into(),
                        content: b"<p>one</p>".to_vec(),
                        mode: 0,
                    },
                    FileContent {
                        path: "/workspace/server.js".into(),
                        content: b"require('http')".to_vec(),
                        mode: 0,
                    },
                ],
            },
        )
        .await
        .unwrap();
    let read: ReadFileReply = flow
        .call(
            &op("files.read"),
            &ReadFileRequest {
                sandbox_id: id.clone(),
                path: "/workspace/site/index.html".into(),
            },
        )
        .await
        .unwrap();
    assert_eq!(read.content, b"<p>one</p>");
    let _: ListFilesReply = flow
        .call(
            &op("files.list"),
            &ListFilesRequest {
                sandbox_id: id.clone(),
                path: "/workspace".into(),
                recursive: false,
            },
        )
        .await
        .unwrap();
    let _: FileTreeReply = flow
        .call(
            &op("files.tree"),
            &FileTreeRequest {
                sandbox_id: id.clone(),
                path: "/workspace".into(),
                depth: 3,
            },
        )
        .await
        .unwrap();
    // MIOSA without the `/fs/*` routes: both sides fall back to the legacy ones.
    let odd = "/workspace/a b#c.txt";
    let _: WriteFilesReply = flow
        .call_in(
            "legacy.files.write_many",
            &op("files.write_many"),
            &WriteFilesRequest {
                sandbox_id: id.clone(),
                idempotency_key: "wire:files:legacy".into(),
                files: vec![FileContent {
                    path: odd.into(),
                    content: b"legacy".to_vec(),
                    mode: 0,
                }],
            },
        )
        .await
        .unwrap();
    let read: ReadFileReply = flow
        .call_in(
            "legacy.files.read",
            &op("files.read"),
            &ReadFileRequest {
                sandbox_id: id.clone(),
                path: odd.into(),
            },
        )
        .await
        .unwrap();
    assert_eq!(read.content, b"legacy");
    let ran: ExecReply = flow
        .call(
            &op("exec"),
            &ExecRequest {
                sandbox_id: id.clone(),
                command: "echo $FOO".into(),
                cwd: "/workspace".into(),
                env: [("FOO".into(), "bar".into())].into(),
                timeout_ms: 30_000,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(ran.stdout, b"bar\n");
    let started: ProcessReply = flow
        .call(
            &op("process.start"),
            &StartProcessRequest {
                sandbox_id: id.clone(),
                idempotency_key: "wire:proc".into(),
                command: "echo started; sleep 30".into(),
                cwd: "/workspace".into(),
                env: [("B".into(), "two".into())].into(),
                name: "sleeper".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let pid = started.process.unwrap().id;
    let process = ProcessRef {
        sandbox_id: id.clone(),
        process_id: pid.clone(),
        ..Default::default()
    };
    let _: ListProcessesReply = flow
        .call(
            &op("process.list"),
            &ListProcessesRequest {
                sandbox_id: id.clone(),
            },
        )
        .await
        .unwrap();
    let _: ProcessReply = flow.call(&op("process.get"), &process).await.unwrap();
    let _: ProcessLogsReply = flow
        .call(
            &op("process.logs"),
            &ProcessLogsRequest {
                sandbox_id: id.clone(),
                process_id: pid.clone(),
                tail: 0,
            },
        )
        .await
        .unwrap();
    let _: ProcessReply = flow.call(&op("process.stop"), &process).await.unwrap();
    let snap: SnapshotReply = flow
        .call(
            &op("snapshot.create"),
            &CreateSnapshotRequest {
                sandbox_id: id.clone(),
                idempotency_key: "wire:snap".into(),
                comment: "wire".into(),
            },
        )
        .await
        .unwrap();
    let snap = snap.snapshot.unwrap().id;
    let _: ListSnapshotsReply = flow
        .call(
            &op("snapshot.list"),
            &ListSnapshotsRequest {
                sandbox_id: id.clone(),
            },
        )
        .await
        .unwrap();
    let restored: SandboxReply = flow
        .call(
            &op("snapshot.restore"),
            &RestoreSnapshotRequest {
                sandbox_id: id.clone(),
                snapshot_id: snap.clone(),
                idempotency_key: "wire:restore".into(),
                attribution: Some(user.clone()),
            },
        )
        .await
        .unwrap();
    assert_eq!(
        restored.sandbox.unwrap().id,
        id,
        "sandboxd restores in place"
    );
    let fork: SandboxReply = flow
        .call(
            &op("sandbox.fork"),
            &ForkSandboxRequest {
                sandbox_id: id.clone(),
                snapshot_id: snap,
                idempotency_key: "wire:fork".into(),
                name: "wire-fork".into(),
                run_id: "run_wire".into(),
                branch: "b".into(),
                attribution: Some(Attribution {
                    user_id: "wire-user".into(),
                    ..Default::default()
                }),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let fork = fork.sandbox.unwrap();
    assert_eq!(
        (fork.run_id.as_str(), fork.branch.as_str()),
        ("run_wire", "b")
    );
    let preview: PreviewReply = flow
        .call(
            &op("preview.create"),
            &CreatePreviewRequest {
                sandbox_id: id.clone(),
                port: 3000,
                idempotency_key: "wire:preview".into(),
            },
        )
        .await
        .unwrap();
    let preview = preview.preview.unwrap().id;
    let _: PreviewTokenReply = flow
        .call(
            &op("preview.token"),
            &PreviewTokenRequest {
                sandbox_id: id.clone(),
                expires_in_sec: 600,
                scope: TokenScope::Read.into(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let _: PreviewShareReply = flow
        .call(
            &op("preview.share"),
            &CreatePreviewShareRequest {
                sandbox_id: id.clone(),
                preview_id: preview.clone(),
                ttl_sec: 600,
                idempotency_key: "wire:pshare".into(),
            },
        )
        .await
        .unwrap();
    let _: RevokeReply = flow
        .call(
            &op("preview.revoke"),
            &RevokePreviewSharesRequest {
                sandbox_id: id.clone(),
                preview_id: preview.clone(),
            },
        )
        .await
        .unwrap();
    let _: DeletePreviewReply = flow
        .call(
            &op("preview.delete"),
            &DeletePreviewRequest {
                sandbox_id: id.clone(),
                preview_id: preview,
            },
        )
        .await
        .unwrap();
    let share: ShareReply = flow
        .call(
            &op("share.create"),
            &CreateShareRequest {
                sandbox_id: id.clone(),
                expires_in_sec: 600,
                idempotency_key: "wire:share".into(),
            },
        )
        .await
        .unwrap();
    let _: ListSharesReply = flow
        .call(
            &op("share.list"),
            &ListSharesRequest {
                sandbox_id: id.clone(),
            },
        )
        .await
        .unwrap();
    let _: RevokeReply = flow
        .call(
            &op("share.revoke"),
            &RevokeShareRequest {
                sandbox_id: id.clone(),
                share_id: share.share.unwrap().id,
            },
        )
        .await
        .unwrap();
    let _: SandboxReply = flow
        .call(
            &op("sandbox.update"),
            &UpdateSandboxRequest {
                sandbox_id: id.clone(),
                always_on: Some(true),
                timeout_sec: Some(7200),
                idle_timeout_sec: Some(900),
                name: Some("wire2".into()),
                metadata: [("k".into(), "v".into())].into(),
                idempotency_key: "wire:update".into(),
            },
        )
        .await
        .unwrap();
    let _: SandboxUsageReply = flow
        .call(
            &op("usage.sandbox"),
            &SandboxUsageRequest {
                sandbox_id: id.clone(),
            },
        )
        .await
        .unwrap();
    let day = |d: i64| pbjson_types::Timestamp {
        seconds: 1_767_225_600 + d * 86_400,
        nanos: 0,
    };
    let _: UsageRollupReply = flow
        .call(
            &op("usage.rollup"),
            &UsageRollupRequest {
                group_by: UsageGroupBy::User.into(),
                start: Some(day(0)),
                end: Some(day(1)),
            },
        )
        .await
        .unwrap();
    let _: QuotaReply = flow
        .call(
            &op("quota.set"),
            &SetQuotaRequest {
                user_id: "wire-user".into(),
                limits: Some(QuotaLimits {
                    max_sandboxes: Some(50),
                    max_concurrent: Some(10),
                    ..Default::default()
                }),
            },
        )
        .await
        .unwrap();
    let _: QuotaReply = flow
        .call(
            &op("quota.get"),
            &GetQuotaRequest {
                user_id: "wire-user".into(),
            },
        )
        .await
        .unwrap();
    let first: DeployReply = flow
        .call(
            &op("deploy"),
            &DeployRequest {
                sandbox_id: id.clone(),
                idempotency_key: "wire:deploy:1".into(),
                name: "wire".into(),
                output_path: "/workspace/site".into(),
                attribution: Some(user.clone()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let dep = first.deployment.unwrap().id;
    let _: WriteFilesReply = flow
        .call(
            &op("files.write_many"),
            &WriteFilesRequest {
                sandbox_id: id.clone(),
                idempotency_key: "wire:files:2".into(),
                files: vec![FileContent {
                    path: "/workspace/site/index.html".into(),
                    content: b"<p>two</p>".to_vec(),
                    mode: 0,
                }],
            },
        )
        .await
        .unwrap();
    let _: DeployReply = flow
        .call(
            &op("deploy"),
            &DeployRequest {
                sandbox_id: id.clone(),
                idempotency_key: "wire:deploy:2".into(),
                deployment_id: dep.clone(),
                output_path: "/workspace/site".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let _: DeploymentReply = flow
        .call(
            &op("deployment.get"),
            &GetDeploymentRequest {
                deployment_id: dep.clone(),
            },
        )
        .await
        .unwrap();
    let mut versions = Vec::new();
    for _ in 0..300 {
        let listed: ListVersionsReply = flow
            .call(
                &op("version.list"),
                &ListVersionsRequest {
                    deployment_id: dep.clone(),
                },
            )
            .await
            .unwrap();
        versions = listed.versions;
        let settled = |v: &DeploymentVersion| v.state != VersionState::Building as i32;
        if versions.len() >= 2 && versions.iter().all(settled) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    versions.sort_by_key(|v| v.number);
    let (v1, v2) = (versions[0].id.clone(), versions[1].id.clone());
    let _: VersionReply = flow
        .call(
            &op("version.get"),
            &GetVersionRequest {
                deployment_id: dep.clone(),
                version_id: v1.clone(),
            },
        )
        .await
        .unwrap();
    let _: VersionLogsReply = flow
        .call(
            &op("version.logs"),
            &VersionLogsRequest {
                deployment_id: dep.clone(),
                version_id: v1.clone(),
            },
        )
        .await
        .unwrap();
    let _: DeploymentReply = flow
        .call(
            &op("deployment.rollback"),
            &SetVersionRequest {
                deployment_id: dep.clone(),
                version_id: v1,
                idempotency_key: "wire:rollback".into(),
            },
        )
        .await
        .unwrap();
    let _: DeploymentReply = flow
        .call(
            &op("deployment.promote"),
            &SetVersionRequest {
                deployment_id: dep,
                version_id: v2,
                idempotency_key: "wire:promote".into(),
            },
        )
        .await
        .unwrap();
    let _: SandboxReply = flow
        .call(&op("sandbox.pause"), &sandbox("wire:pause"))
        .await
        .unwrap();
    let _: SandboxReply = flow
        .call(&op("sandbox.resume"), &sandbox("wire:resume"))
        .await
        .unwrap();
    let extended: SandboxReply = flow
        .call(
            &op("sandbox.extend"),
            &ExtendSandboxRequest {
                sandbox_id: id.clone(),
                idempotency_key: "wire:extend".into(),
                timeout_sec: Some(5400),
            },
        )
        .await
        .unwrap();
    assert_eq!(extended.sandbox.unwrap().timeout_sec, 5400);
    let _: SandboxReply = flow
        .call(&op("sandbox.stop"), &sandbox("wire:stop"))
        .await
        .unwrap();
    let _: SandboxReply = flow
        .call(
            &op("sandbox.destroy"),
            &SandboxRef {
                sandbox_id: fork.id,
                idempotency_key: "wire:destroy:fork".into(),
            },
        )
        .await
        .unwrap();
    let _: SandboxReply = flow
        .call(&op("sandbox.destroy"), &sandbox("wire:destroy"))
        .await
        .unwrap();
}

fn python() -> std::path::PathBuf {
    std::env::var_os("SLIPWAY_PYTHON")
        .map(Into::into)
        .unwrap_or_else(|| {
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.tools/venv/bin/python")
        })
}

#[tokio::test]
async fn the_executor_speaks_miosa_as_the_official_python_sdk_does() {
    let nats = NatsServer::start().unwrap();
    let sd = Sandboxd::start(workspace_bin("slipway-sandboxd").unwrap(), &[]).unwrap();
    let (ours_url, ours) = Proxy::start(sd.base_url()).await;
    let (theirs_url, theirs) = Proxy::start(sd.base_url()).await;

    // No usage sampling during the flow: the executor's background work is not part of it.
    let quiet = [("SLIPWAY__PLATFORM__USAGE_SAMPLE_MS", "3600000")];
    let mut ex = crate::service::executor_with(&nats, &ours_url, &quiet).await;
    let flow = Flow {
        rpc: RpcClient::new(
            async_nats::connect(nats.url()).await.unwrap(),
            Duration::from_secs(60),
        ),
        proxy: ours_url.clone(),
    };
    executor_flow(&flow).await;
    ex.stop().await.unwrap();

    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/conformance/wire_flow.py");
    let out = tokio::process::Command::new(python())
        .arg(&script)
        .arg(&theirs_url)
        .output()
        .await
        .expect("the project's Python venv (scripts/tools) runs the SDK flow");
    assert!(
        out.status.success(),
        "the SDK flow failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let ours: Vec<Seen> = ours.lock().unwrap().clone();
    let theirs: Vec<Seen> = theirs.lock().unwrap().clone();
    // The flow covers every route the executor uses (fallbacks included).
    let routes: BTreeSet<String> = ours
        .iter()
        .filter(|s| !s.step.is_empty())
        .map(route)
        .collect();
    assert_eq!(
        routes.iter().map(String::as_str).collect::<Vec<_>>(),
        FLOW_ROUTES,
        "the executor's routes in this flow"
    );
    let (ours, theirs) = (by_step(&ours), by_step(&theirs));
    let found = differences(&ours, &theirs);
    let excused: BTreeSet<&str> = EXCEPTIONS.iter().map(|(d, _)| *d).collect();
    let unexplained: Vec<&String> = found
        .iter()
        .filter(|d| !excused.contains(d.as_str()))
        .collect();
    let stale: Vec<&&str> = excused
        .iter()
        .filter(|e| !found.iter().any(|d| d == **e))
        .collect();
    assert!(
        unexplained.is_empty() && stale.is_empty(),
        "differences without a reason: {unexplained:#?}\nexceptions no longer needed: {stale:#?}"
    );
}

#[test]
fn routes_keep_their_shape_without_their_ids() {
    let seen = |method: &str, path: &str| Seen {
        step: String::new(),
        method: method.into(),
        path: path.into(),
        query: BTreeMap::new(),
        key: false,
        body: None,
    };
    for (method, path, expected) in [
        (
            "POST",
            "/sandboxes/sbx_1/restore/snap_2",
            "POST /sandboxes/{}/restore/{}",
        ),
        (
            "GET",
            "/sandboxes/sbx_1/files/a/b%20c.txt",
            "GET /sandboxes/{}/files/{path}",
        ),
        (
            "GET",
            "/sandboxes/sbx_1/files/tree",
            "GET /sandboxes/{}/files/tree",
        ),
        ("GET", "/sandboxes/by-name/x", "GET /sandboxes/by-name/{}"),
        (
            "POST",
            "/deployments/d/versions/v/promote",
            "POST /deployments/{}/versions/{}/promote",
        ),
        ("PUT", "/quotas/external/u", "PUT /quotas/external/{}"),
    ] {
        assert_eq!(route(&seen(method, path)), expected);
    }
    let mut found = Vec::new();
    body_differences(
        "",
        &shape(&serde_json::json!({"files": [{"path": "a", "content": "x"}], "n": 1})),
        &shape(&serde_json::json!({"files": [{"path": "a", "content_base64": "x"}], "n": 1.5})),
        &mut found,
    );
    assert_eq!(found, vec!["field `files[].content` the SDK does not send"]);
}
