//! The file API, on both route families the SDKs use: the canonical `/fs/*` routes and the legacy
//! `/files/*` routes they fall back to on 404, each with its own body rules (`/fs/write` takes
//! `content` verbatim and decodes `content_base64`; legacy `/files` decodes `content` as base64).

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;

use axum::Json;
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use futures::Stream;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::api::extract::JsonBody;
use crate::api::{ApiError, AppState};
use crate::host::Entry;
use crate::journal::{self, Item};
use crate::paths::{self, PathError, Resolved};
use crate::rooted::{self, ReadError, Root};
use std::os::fd::OwnedFd;

/// Largest single file accepted (MIOSA's `FILE_TOO_LARGE` limit).
pub const MAX_FILE_BYTES: usize = 10 * 1024 * 1024;
/// Most files in one write-many.
pub const MAX_BATCH_FILES: usize = 10_000;

fn path_error(e: PathError) -> ApiError {
    match e {
        PathError::TooLong(_) => ApiError::invalid("name_too_long", e.to_string()),
        PathError::Nul | PathError::Loop(_) => {
            ApiError::new(StatusCode::BAD_REQUEST, "invalid_path", e.to_string())
        }
        _ => ApiError::new(StatusCode::FORBIDDEN, "FORBIDDEN_PATH", e.to_string()),
    }
}

fn resolve(entry: &Entry, path: &str) -> Result<Resolved, ApiError> {
    paths::resolve(&entry.workspace(), path).map_err(path_error)
}

fn io_error(path: &str, e: std::io::Error) -> ApiError {
    match e.kind() {
        std::io::ErrorKind::NotFound => {
            ApiError::not_found("file_not_found", format!("`{path}` does not exist"))
        }
        std::io::ErrorKind::IsADirectory => {
            ApiError::invalid("is_a_directory", format!("`{path}` is a directory"))
        }
        std::io::ErrorKind::NotADirectory => ApiError::invalid(
            "not_a_directory",
            format!("a parent of `{path}` is not a directory"),
        ),
        std::io::ErrorKind::AlreadyExists => ApiError::new(
            StatusCode::CONFLICT,
            "already_exists",
            format!("`{path}` exists and is not a directory"),
        ),
        std::io::ErrorKind::InvalidFilename => {
            ApiError::invalid("name_too_long", format!("`{path}`: a name is too long"))
        }
        _ => ApiError::internal(format!("`{path}`: {e}")),
    }
}

/// Which body rule a route follows.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Rules {
    /// `/fs/*`: `content` verbatim, `content_base64` decoded.
    Canonical,
    /// `/files/*`: `content` is base64 unless `encoding` says otherwise.
    Legacy,
}

#[derive(Deserialize)]
pub struct FileBody {
    path: String,
    content: Option<String>,
    content_base64: Option<String>,
    encoding: Option<String>,
    mode: Option<u32>,
}

impl FileBody {
    fn bytes(&self, rules: Rules) -> Result<Vec<u8>, String> {
        if let Some(b64) = &self.content_base64 {
            return B64
                .decode(b64.trim())
                .map_err(|e| format!("content_base64 is not base64: {e}"));
        }
        let content = self.content.as_deref().unwrap_or("");
        let base64 = match self.encoding.as_deref() {
            Some("base64") => true,
            Some("utf8" | "utf-8" | "text") => false,
            Some(other) => return Err(format!("unknown encoding `{other}`")),
            None => rules == Rules::Legacy,
        };
        if base64 {
            B64.decode(content.trim())
                .map_err(|e| format!("content is not base64: {e}"))
        } else {
            Ok(content.as_bytes().to_vec())
        }
    }
}

/// Why one file of a write was refused.
enum Refusal {
    Path(PathError),
    TooLarge,
    Invalid(String),
}

/// The sandbox's workspace, open: one per request, whatever number of files it names.
fn open_root(entry: &Entry) -> Result<Root, ApiError> {
    Root::open(&entry.workspace())
        .map_err(|e| ApiError::internal(format!("opening the workspace: {e}")))
}

/// Checks one file of a write and turns it into a batch item.
fn item(entry: &Entry, root: &Root, body: &FileBody, rules: Rules) -> Result<Item, Refusal> {
    let resolved = paths::resolve(&entry.workspace(), &body.path).map_err(Refusal::Path)?;
    if resolved.parts.is_empty() {
        return Err(Refusal::Invalid("cannot write /workspace itself".into()));
    }
    // Looked at through the sandbox's own root, like everything else (no host path is
    // stat'ed on the sandbox's word).
    if root.stat(&resolved.parts, true).is_ok_and(|m| m.is_dir()) {
        return Err(Refusal::Invalid(format!("`{}` is a directory", body.path)));
    }
    // A parent that exists as anything but a directory would fail the batch after its commit.
    for n in 1..resolved.parts.len() {
        if root
            .stat(&resolved.parts[..n], false)
            .is_ok_and(|m| !m.is_dir())
        {
            return Err(Refusal::Invalid(format!(
                "a parent of `{}` is not a directory",
                body.path
            )));
        }
    }
    let content = body.bytes(rules).map_err(Refusal::Invalid)?;
    if content.len() > MAX_FILE_BYTES {
        return Err(Refusal::TooLarge);
    }
    if body.mode.is_some_and(|m| m > 0o7777) {
        return Err(Refusal::Invalid(
            "mode must be permission bits (at most 0o7777)".into(),
        ));
    }
    Ok(Item {
        parts: resolved.parts,
        content,
        mode: body.mode,
    })
}

async fn write_items(
    state: &AppState,
    entry: Arc<Entry>,
    items: Vec<Item>,
) -> Result<Vec<String>, ApiError> {
    let written: Vec<String> = items
        .iter()
        .map(|i| paths::sandbox_path(&i.parts))
        .collect();
    let _files = entry.files_lock.lock().await;
    let dir = entry.files.clone();
    let workspace = entry.workspace();
    let owner = state.host.iso.jail.owner();
    let (host, limit_mb) = (state.host.clone(), entry.snapshot().resources.disk_size_mb);
    let incoming = items.iter().map(|i| i.content.len() as u64).sum();
    tokio::task::spawn_blocking(move || {
        // What the batch replaces is freed by it: counted off, so rewriting a file in a full
        // workspace still fits.
        let replaced = || {
            Root::open(&workspace).map_or(0, |root| {
                items
                    .iter()
                    .filter_map(|i| root.stat(&i.parts, false).ok())
                    .filter(|m| m.is_file())
                    .map(|m| m.len())
                    .sum()
            })
        };
        host.storage
            .room(&dir, limit_mb, incoming, replaced)
            .map_err(|full| disk_full(&full.to_string()))?;
        journal::write_batch(&dir, &workspace, &items, owner).map_err(|e| {
            if is_disk_full(&e) {
                disk_full(&format!("the sandbox's disk ({limit_mb} MB) is full"))
            } else {
                ApiError::internal(format!("writing files: {e}"))
            }
        })
    })
    .await
    .map_err(|e| ApiError::internal(e.to_string()))??;
    Ok(written)
}

/// A write refused for want of room (the sandbox's disk size, or the host's disk): nothing of
/// it was written.
fn disk_full(why: &str) -> ApiError {
    ApiError::new(
        StatusCode::INSUFFICIENT_STORAGE,
        "disk_full",
        format!("{why}; nothing was written"),
    )
}

fn is_disk_full(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::QuotaExceeded | std::io::ErrorKind::StorageFull
    )
}

fn refuse_item(index: usize, path: &str, refusal: Refusal) -> ApiError {
    let (base, reason) = match refusal {
        Refusal::Path(e) => (path_error(e.clone()), e.to_string()),
        Refusal::TooLarge => (
            ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "FILE_TOO_LARGE", ""),
            format!("larger than {MAX_FILE_BYTES} bytes"),
        ),
        Refusal::Invalid(r) => (ApiError::invalid("invalid_file", ""), r),
    };
    ApiError::new(
        base.status,
        base.code,
        format!("file {index} (`{path}`): {reason}; nothing was written"),
    )
}

async fn write_one(
    state: &AppState,
    id: &str,
    body: FileBody,
    rules: Rules,
) -> Result<Json<Value>, ApiError> {
    let entry = state.host.live(id)?;
    let root = open_root(&entry)?;
    let it = item(&entry, &root, &body, rules).map_err(|r| refuse_item(0, &body.path, r))?;
    let size = it.content.len();
    let written = write_items(state, entry, vec![it]).await?;
    Ok(Json(
        json!({ "data": { "path": written[0], "size": size, "written": true } }),
    ))
}

pub async fn fs_write(
    State(s): State<AppState>,
    UrlPath(id): UrlPath<String>,
    JsonBody(body): JsonBody<FileBody>,
) -> Result<Json<Value>, ApiError> {
    write_one(&s, &id, body, Rules::Canonical).await
}

pub async fn legacy_write(
    State(s): State<AppState>,
    UrlPath(id): UrlPath<String>,
    JsonBody(body): JsonBody<FileBody>,
) -> Result<Json<Value>, ApiError> {
    write_one(&s, &id, body, Rules::Legacy).await
}

#[derive(Deserialize)]
pub struct ManyBody {
    files: Vec<FileBody>,
}

async fn write_many(
    state: &AppState,
    id: &str,
    body: ManyBody,
    rules: Rules,
) -> Result<Json<Value>, ApiError> {
    let entry = state.host.live(id)?;
    if body.files.is_empty() {
        return Err(ApiError::invalid("invalid_files", "`files` is empty"));
    }
    if body.files.len() > MAX_BATCH_FILES {
        return Err(ApiError::invalid(
            "invalid_files",
            format!("at most {MAX_BATCH_FILES} files per batch"),
        ));
    }
    let root = open_root(&entry)?;
    let mut items = Vec::with_capacity(body.files.len());
    let mut seen = std::collections::HashSet::new();
    for (i, f) in body.files.iter().enumerate() {
        let it = item(&entry, &root, f, rules).map_err(|r| refuse_item(i, &f.path, r))?;
        if !seen.insert(it.parts.clone()) {
            return Err(refuse_item(
                i,
                &f.path,
                Refusal::Invalid("appears twice in the batch".into()),
            ));
        }
        items.push(it);
    }
    let sizes: Vec<usize> = items.iter().map(|i| i.content.len()).collect();
    let written = write_items(state, entry, items).await?;
    // MIOSA's documented shape: `written: [{path, size_bytes}]` (Go's SDK decodes it typed).
    let written: Vec<Value> = written
        .into_iter()
        .zip(sizes)
        .map(|(path, size)| json!({ "path": path, "size_bytes": size }))
        .collect();
    Ok(Json(
        json!({ "data": { "written": written, "failed": [] } }),
    ))
}

pub async fn fs_write_many(
    State(s): State<AppState>,
    UrlPath(id): UrlPath<String>,
    JsonBody(body): JsonBody<ManyBody>,
) -> Result<Json<Value>, ApiError> {
    write_many(&s, &id, body, Rules::Canonical).await
}

pub async fn legacy_write_many(
    State(s): State<AppState>,
    UrlPath(id): UrlPath<String>,
    JsonBody(body): JsonBody<ManyBody>,
) -> Result<Json<Value>, ApiError> {
    write_many(&s, &id, body, Rules::Legacy).await
}

#[derive(Deserialize)]
pub struct PathQuery {
    path: Option<String>,
    depth: Option<usize>,
    recursive: Option<bool>,
}

/// Largest file a download returns (a whole request body's worth).
pub const MAX_DOWNLOAD_BYTES: u64 = crate::api::MAX_BODY as u64;

async fn read(state: &AppState, id: &str, path: &str) -> Result<Response, ApiError> {
    let entry = state.host.live(id)?;
    let r = resolve(&entry, path)?;
    let workspace = entry.workspace();
    let opened = tokio::task::spawn_blocking(move || {
        Root::open(&workspace)
            .map_err(ReadError::Io)
            .and_then(|root| root.open_regular(&r.parts, MAX_DOWNLOAD_BYTES))
    })
    .await
    .map_err(|e| ApiError::internal(e.to_string()))?;
    let (file, len) = opened.map_err(|e| match e {
        ReadError::Io(e) => io_error(path, e),
        ReadError::Directory => {
            ApiError::invalid("is_a_directory", format!("`{path}` is a directory"))
        }
        ReadError::NotRegular(k) => ApiError::invalid(
            "not_a_regular_file",
            format!("`{path}` is a {k}, not a regular file"),
        ),
        ReadError::TooLarge(max) => ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "FILE_TOO_LARGE",
            format!("`{path}` is larger than {max} bytes"),
        ),
    })?;
    // Streamed from the open file, never more than its size when opened: a file that grows
    // meanwhile cannot make the answer larger.
    use tokio::io::AsyncReadExt;
    let stream = tokio_util::io::ReaderStream::new(tokio::fs::File::from_std(file).take(len));
    let bytes = axum::body::Body::from_stream(stream);
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], bytes).into_response())
}

pub async fn fs_download(
    State(s): State<AppState>,
    UrlPath(id): UrlPath<String>,
    Query(q): Query<PathQuery>,
) -> Result<Response, ApiError> {
    let path = q
        .path
        .ok_or_else(|| ApiError::invalid("invalid_path", "`path` is required"))?;
    read(&s, &id, &path).await
}

pub async fn legacy_download(
    State(s): State<AppState>,
    UrlPath((id, path)): UrlPath<(String, String)>,
) -> Result<Response, ApiError> {
    // `/files/app.txt` is `/workspace/app.txt`; `/files/workspace/app.txt` names it too.
    let path = if path == "workspace" || path.starts_with("workspace/") {
        format!("/{path}")
    } else {
        path
    };
    read(&s, &id, &path).await
}

fn describe(r_path: &str, meta: &std::fs::Metadata) -> Value {
    let kind = rooted::kind(meta);
    let name = Path::new(r_path)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "workspace".into());
    json!({
        "name": name,
        "path": r_path,
        "type": kind,
        "is_dir": kind == "dir",
        "size": meta.len(),
        "mode": format!("{:o}", meta.permissions().mode() & 0o7777),
        "modified_at": crate::clock::rfc3339(meta.mtime() * 1000 + meta.mtime_nsec() / 1_000_000),
    })
}

fn listing(base: &str, dir: &OwnedFd, depth: usize, out: &mut Vec<Value>) -> std::io::Result<()> {
    for (name, meta) in rooted::entries(dir)? {
        let path = format!("{}/{name}", base.trim_end_matches('/'));
        out.push(describe(&path, &meta));
        if meta.is_dir() && depth > 1 {
            // A directory swapped for something else meanwhile is listed but not entered.
            if let Ok(sub) = rooted::subdir(dir, &name) {
                listing(&path, &sub, depth - 1, out)?;
            }
        }
    }
    Ok(())
}

pub async fn list(
    State(s): State<AppState>,
    UrlPath(id): UrlPath<String>,
    Query(q): Query<PathQuery>,
) -> Result<Json<Value>, ApiError> {
    let entry = s.host.live(&id)?;
    let path = q.path.unwrap_or_else(|| paths::WORKSPACE.into());
    let r = resolve(&entry, &path)?;
    let depth = if q.recursive == Some(true) {
        64
    } else {
        q.depth.unwrap_or(1).clamp(1, 64)
    };
    let base = r.sandbox_path();
    let mut entries = Vec::new();
    Root::open(&entry.workspace())
        .and_then(|root| root.dir(&r.parts))
        .and_then(|dir| listing(&base, &dir, depth, &mut entries))
        .map_err(|e| io_error(&path, e))?;
    Ok(Json(
        json!({ "data": { "path": base, "entries": entries } }),
    ))
}

fn tree_node(
    path: &str,
    meta: &std::fs::Metadata,
    dir: Option<OwnedFd>,
    depth: usize,
) -> std::io::Result<Value> {
    let mut node = describe(path, meta);
    if let Some(dir) = dir.filter(|_| meta.is_dir()) {
        let mut children = Vec::new();
        if depth > 0 {
            for (name, m) in rooted::entries(&dir)? {
                let child = format!("{}/{name}", path.trim_end_matches('/'));
                let sub = if m.is_dir() {
                    rooted::subdir(&dir, &name).ok()
                } else {
                    None
                };
                children.push(tree_node(&child, &m, sub, depth - 1)?);
            }
        }
        node["children"] = Value::Array(children);
    }
    Ok(node)
}

pub async fn tree(
    State(s): State<AppState>,
    UrlPath(id): UrlPath<String>,
    Query(q): Query<PathQuery>,
) -> Result<Json<Value>, ApiError> {
    let entry = s.host.live(&id)?;
    let path = q.path.unwrap_or_else(|| paths::WORKSPACE.into());
    let r = resolve(&entry, &path)?;
    let depth = q.depth.unwrap_or(3).min(64);
    let node = Root::open(&entry.workspace())
        .and_then(|root| {
            let meta = root.stat(&r.parts, true)?;
            let dir = if meta.is_dir() {
                Some(root.dir(&r.parts)?)
            } else {
                None
            };
            tree_node(&r.sandbox_path(), &meta, dir, depth)
        })
        .map_err(|e| io_error(&path, e))?;
    Ok(Json(json!({ "data": node })))
}

#[derive(Deserialize)]
pub struct PathBody {
    path: String,
}

async fn stat_path(s: &AppState, id: &str, path: &str) -> Result<Json<Value>, ApiError> {
    let entry = s.host.live(id)?;
    let r = paths::resolve_nofollow(&entry.workspace(), path).map_err(path_error)?;
    let meta = Root::open(&entry.workspace())
        .and_then(|root| root.stat(&r.parts, false))
        .map_err(|e| io_error(path, e))?;
    Ok(Json(json!({ "data": describe(&r.sandbox_path(), &meta) })))
}

pub async fn stat(
    State(s): State<AppState>,
    UrlPath(id): UrlPath<String>,
    JsonBody(b): JsonBody<PathBody>,
) -> Result<Json<Value>, ApiError> {
    stat_path(&s, &id, &b.path).await
}

pub async fn stat_get(
    State(s): State<AppState>,
    UrlPath(id): UrlPath<String>,
    Query(q): Query<PathQuery>,
) -> Result<Json<Value>, ApiError> {
    let path = q
        .path
        .ok_or_else(|| ApiError::invalid("invalid_path", "`path` is required"))?;
    stat_path(&s, &id, &path).await
}

pub async fn mkdir(
    State(s): State<AppState>,
    UrlPath(id): UrlPath<String>,
    JsonBody(b): JsonBody<PathBody>,
) -> Result<Json<Value>, ApiError> {
    let entry = s.host.live(&id)?;
    let r = resolve(&entry, &b.path)?;
    Root::open(&entry.workspace())
        .and_then(|root| root.make_dirs(&r.parts, s.host.iso.jail.owner()))
        .map_err(|e| io_error(&b.path, e))?;
    Ok(Json(
        json!({ "data": { "path": r.sandbox_path(), "created": true } }),
    ))
}

async fn delete_path(
    s: &AppState,
    id: &str,
    path: &str,
    recursive: bool,
) -> Result<Json<Value>, ApiError> {
    let entry = s.host.live(id)?;
    let r = paths::resolve_nofollow(&entry.workspace(), path).map_err(path_error)?;
    if r.parts.is_empty() {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "FORBIDDEN_PATH",
            "cannot delete /workspace itself",
        ));
    }
    let result = Root::open(&entry.workspace()).and_then(|root| root.remove(&r.parts, recursive));
    result.map_err(|e| match e.kind() {
        std::io::ErrorKind::DirectoryNotEmpty => ApiError::new(
            StatusCode::CONFLICT,
            "directory_not_empty",
            format!("`{path}` is not empty (pass recursive)"),
        ),
        _ => io_error(path, e),
    })?;
    Ok(Json(
        json!({ "data": { "path": r.sandbox_path(), "deleted": true } }),
    ))
}

/// `DELETE /fs?path=&recursive=`: the canonical delete.
pub async fn delete_query(
    State(s): State<AppState>,
    UrlPath(id): UrlPath<String>,
    Query(q): Query<PathQuery>,
) -> Result<Json<Value>, ApiError> {
    let path = q
        .path
        .ok_or_else(|| ApiError::invalid("invalid_path", "`path` is required"))?;
    delete_path(&s, &id, &path, q.recursive.unwrap_or(false)).await
}

/// `DELETE /files` with `{path}` (the Go CLI's delete).
pub async fn delete_body(
    State(s): State<AppState>,
    UrlPath(id): UrlPath<String>,
    Query(q): Query<PathQuery>,
    JsonBody(b): JsonBody<Value>,
) -> Result<Json<Value>, ApiError> {
    let path = b
        .get("path")
        .and_then(Value::as_str)
        .map(str::to_string)
        .or(q.path)
        .ok_or_else(|| ApiError::invalid("invalid_path", "`path` is required"))?;
    let recursive = b
        .get("recursive")
        .and_then(Value::as_bool)
        .or(q.recursive)
        .unwrap_or(false);
    delete_path(&s, &id, &path, recursive).await
}

pub async fn watch(
    State(s): State<AppState>,
    UrlPath(id): UrlPath<String>,
    Query(q): Query<PathQuery>,
) -> Result<Sse<impl Stream<Item = Result<Event, std::convert::Infallible>>>, ApiError> {
    let entry = s.host.live(&id)?;
    let path = q.path.unwrap_or_else(|| paths::WORKSPACE.into());
    let prefix = resolve(&entry, &path)?.sandbox_path();
    let mut rx = entry
        .watch
        .subscribe()
        .map_err(|e| ApiError::internal(format!("watching: {e}")))?;
    let stream = async_stream(move |tx| async move {
        let mut n: u64 = 0;
        loop {
            let ev = match rx.recv().await {
                Ok(ev) => ev,
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                    crate::watch::FileEvent::resync(&prefix)
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
            };
            let inside = ev.event == "resync"
                || ev.path == prefix
                || ev
                    .path
                    .starts_with(&format!("{}/", prefix.trim_end_matches('/')));
            if !inside {
                continue;
            }
            n += 1;
            let data = serde_json::to_string(&ev).unwrap_or_default();
            if tx
                .send(
                    Event::default()
                        .id(n.to_string())
                        .event(ev.event)
                        .data(data),
                )
                .await
                .is_err()
            {
                break;
            }
        }
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

/// A stream fed by a task, ended when the task ends or the client goes away.
pub fn async_stream<F, Fut>(f: F) -> impl Stream<Item = Result<Event, std::convert::Infallible>>
where
    F: FnOnce(tokio::sync::mpsc::Sender<Event>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(256);
    tokio::spawn(f(tx));
    futures::StreamExt::map(tokio_stream::wrappers::ReceiverStream::new(rx), Ok)
}
