//! Commands in a sandbox: one-shot exec (stdout, stderr, exit code, duration, timeout, cwd, env),
//! its SSE stream, and the background process API.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use futures::Stream;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::io::AsyncReadExt;

use crate::api::extract::JsonBody;
use crate::api::{ApiError, AppState};
use crate::files::async_stream;
use crate::host::Entry;
use crate::paths;

/// Output kept per stream of a one-shot exec.
pub const MAX_OUTPUT: usize = 4 * 1024 * 1024;
const MAX_COMMAND: usize = 64 * 1024;
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);
const MAX_TIMEOUT: Duration = Duration::from_secs(3600);

#[derive(Deserialize, Default)]
pub struct ExecBody {
    command: Option<String>,
    cmd: Option<String>,
    cwd: Option<String>,
    working_dir: Option<String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    /// Whole seconds (MIOSA's `timeout`; a fraction is refused as MIOSA's integer field would);
    /// `timeout_ms` is also accepted (the devices route's name).
    timeout: Option<f64>,
    timeout_sec: Option<f64>,
    timeout_ms: Option<u64>,
    name: Option<String>,
    #[serde(default)]
    restart: bool,
}

struct Prepared {
    entry: Arc<Entry>,
    command: String,
    cwd: String,
    env: BTreeMap<String, String>,
    timeout: Duration,
}

impl Prepared {
    /// Starts the command in its sandbox, counted as one exec.
    fn spawn(&self, host: &crate::host::Host) -> Result<tokio::process::Child, ApiError> {
        self.entry.exec_count.fetch_add(1, Ordering::Relaxed);
        host.iso
            .jail
            .command(
                &self.entry.workspace(),
                &host.confinement(&self.entry),
                &self.cwd,
                &self.env,
                &self.command,
            )
            .spawn()
            .map_err(|e| ApiError::internal(format!("starting the command: {e}")))
    }
}

fn prepare(s: &AppState, id: &str, b: ExecBody) -> Result<Prepared, ApiError> {
    let entry = s.host.live(id)?;
    if entry.state() != crate::model::State::Running {
        s.host.resume(&entry)?;
    }
    let command = b.command.or(b.cmd).unwrap_or_default();
    if command.trim().is_empty() {
        return Err(ApiError::invalid(
            "invalid_command",
            "`command` is required",
        ));
    }
    if command.len() > MAX_COMMAND || command.contains('\0') {
        return Err(ApiError::invalid(
            "invalid_command",
            format!("a command is at most {MAX_COMMAND} bytes, without NUL"),
        ));
    }
    let cwd = b
        .cwd
        .or(b.working_dir)
        .unwrap_or_else(|| paths::WORKSPACE.into());
    let resolved = paths::resolve(&entry.workspace(), &cwd)
        .map_err(|e| ApiError::new(StatusCode::FORBIDDEN, "FORBIDDEN_PATH", e.to_string()))?;
    let is_dir = crate::rooted::Root::open(&entry.workspace())
        .and_then(|r| r.stat(&resolved.parts, true))
        .is_ok_and(|m| m.is_dir());
    if !is_dir {
        return Err(ApiError::invalid(
            "invalid_cwd",
            format!("`{cwd}` is not a directory"),
        ));
    }
    for (k, v) in &b.env {
        if !crate::host::valid_env_key(k) || v.contains('\0') {
            return Err(ApiError::invalid(
                "invalid_env",
                format!("bad environment variable `{k}`"),
            ));
        }
    }
    let timeout = match (b.timeout_ms, b.timeout.or(b.timeout_sec)) {
        (Some(ms), _) => Duration::from_millis(ms),
        (None, Some(s)) if s.is_finite() && s > 0.0 && s.fract() == 0.0 => {
            Duration::from_secs_f64(s.min(MAX_TIMEOUT.as_secs_f64()))
        }
        (None, Some(_)) => {
            return Err(ApiError::invalid(
                "invalid_timeout",
                "timeout must be a positive whole number of seconds",
            ));
        }
        (None, None) => DEFAULT_TIMEOUT,
    }
    .min(MAX_TIMEOUT);
    let mut env = entry.snapshot().env;
    env.extend(b.env);
    Ok(Prepared {
        entry,
        command,
        cwd: resolved.sandbox_path(),
        env,
        timeout,
    })
}

/// What a command run to completion left.
pub struct Captured {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub exit_code: i32,
    pub timed_out: bool,
    pub duration: Duration,
}

/// Runs `command` in the sandbox to completion (or `timeout`: killed, exit code 124), counted as
/// one exec; output capped at `MAX_OUTPUT` per stream.
pub async fn run_captured(
    host: &crate::host::Host,
    entry: &Arc<Entry>,
    command: &str,
    cwd: &str,
    env: &BTreeMap<String, String>,
    timeout: Duration,
) -> Result<Captured, ApiError> {
    let p = Prepared {
        entry: entry.clone(),
        command: command.to_string(),
        cwd: cwd.to_string(),
        env: env.clone(),
        timeout,
    };
    let started = Instant::now();
    let mut child = p.spawn(host)?;
    let os_pid = child.id();
    let (mut out, mut err) = (child.stdout.take(), child.stderr.take());
    let read_out = tokio::spawn(async move { read_capped(out.as_mut()).await });
    let read_err = tokio::spawn(async move { read_capped(err.as_mut()).await });
    let (exit_code, timed_out) = match tokio::time::timeout(p.timeout, child.wait()).await {
        Ok(status) => (status.ok().and_then(|s| s.code()).unwrap_or(-1), false),
        Err(_) => {
            if let Some(pid) = os_pid {
                crate::processes::signal_group(pid, crate::processes::Signal::Kill);
            }
            let _ = child.wait().await;
            (124, true)
        }
    };
    Ok(Captured {
        stdout: read_out.await.unwrap_or_default(),
        stderr: read_err.await.unwrap_or_default(),
        exit_code,
        timed_out,
        duration: started.elapsed(),
    })
}

pub async fn exec(
    State(s): State<AppState>,
    UrlPath(id): UrlPath<String>,
    JsonBody(b): JsonBody<ExecBody>,
) -> Result<Json<Value>, ApiError> {
    let p = prepare(&s, &id, b)?;
    let c = run_captured(&s.host, &p.entry, &p.command, &p.cwd, &p.env, p.timeout).await?;
    Ok(Json(json!({ "data": {
        "stdout": String::from_utf8_lossy(&c.stdout),
        "stderr": String::from_utf8_lossy(&c.stderr),
        "exit_code": c.exit_code,
        "duration_ms": u64::try_from(c.duration.as_millis()).unwrap_or(u64::MAX),
        "timed_out": c.timed_out,
    }})))
}

async fn read_capped<R: tokio::io::AsyncRead + Unpin>(r: Option<&mut R>) -> Vec<u8> {
    let mut out = Vec::new();
    let Some(r) = r else { return out };
    let mut buf = [0u8; 16 * 1024];
    while let Ok(n) = r.read(&mut buf).await {
        if n == 0 {
            break;
        }
        // Keep reading past the cap, so the process is never blocked on a full pipe.
        let room = MAX_OUTPUT.saturating_sub(out.len());
        out.extend_from_slice(&buf[..n.min(room)]);
    }
    out
}

pub async fn exec_stream(
    State(s): State<AppState>,
    UrlPath(id): UrlPath<String>,
    JsonBody(b): JsonBody<ExecBody>,
) -> Result<Sse<impl Stream<Item = Result<Event, std::convert::Infallible>>>, ApiError> {
    let p = prepare(&s, &id, b)?;
    let mut child = p.spawn(&s.host)?;
    let timeout = p.timeout;
    let stream = async_stream(move |tx| async move {
        use tokio::io::AsyncBufReadExt;
        let started = Instant::now();
        let os_pid = child.id();
        let (lines_tx, mut lines_rx) = tokio::sync::mpsc::channel::<(&'static str, String)>(256);
        if let Some(out) = child.stdout.take() {
            let t = lines_tx.clone();
            tokio::spawn(async move {
                let mut l = tokio::io::BufReader::new(out).lines();
                while let Ok(Some(line)) = l.next_line().await {
                    if t.send(("stdout", line)).await.is_err() {
                        break;
                    }
                }
            });
        }
        if let Some(err) = child.stderr.take() {
            let t = lines_tx.clone();
            tokio::spawn(async move {
                let mut l = tokio::io::BufReader::new(err).lines();
                while let Ok(Some(line)) = l.next_line().await {
                    if t.send(("stderr", line)).await.is_err() {
                        break;
                    }
                }
            });
        }
        drop(lines_tx);
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        let mut timed_out = false;
        loop {
            tokio::select! {
                line = lines_rx.recv() => match line {
                    Some((stream, line)) => {
                        let ev = Event::default().event(stream).data(json!({ "line": line, "stream": stream }).to_string());
                        if tx.send(ev).await.is_err() {
                            if let Some(pid) = os_pid { crate::processes::signal_group(pid, crate::processes::Signal::Kill); }
                            return;
                        }
                    }
                    None => break,
                },
                _ = &mut deadline => {
                    timed_out = true;
                    if let Some(pid) = os_pid { crate::processes::signal_group(pid, crate::processes::Signal::Kill); }
                    break;
                }
            }
        }
        let code = child
            .wait()
            .await
            .ok()
            .and_then(|s| s.code())
            .unwrap_or(if timed_out { 124 } else { -1 });
        let exit = json!({ "exit_code": if timed_out { 124 } else { code }, "duration_ms": started.elapsed().as_millis() as u64, "timed_out": timed_out });
        let _ = tx
            .send(Event::default().event("exit").data(exit.to_string()))
            .await;
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

pub async fn start_process(
    State(s): State<AppState>,
    UrlPath(id): UrlPath<String>,
    JsonBody(b): JsonBody<ExecBody>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let name = b.name.clone();
    let restart = b.restart;
    let p = prepare(&s, &id, b)?;
    let proc = s
        .host
        .launch(&p.entry, p.command, p.cwd, p.env, name, restart)?;
    Ok((StatusCode::CREATED, Json(json!({ "data": proc.view() }))))
}

pub async fn list_processes(
    State(s): State<AppState>,
    UrlPath(id): UrlPath<String>,
) -> Result<Json<Value>, ApiError> {
    let entry = s.host.get(&id)?;
    let procs: Vec<Value> = entry.processes.list().iter().map(|p| p.view()).collect();
    Ok(Json(json!({ "data": procs })))
}

fn find(entry: &Entry, pid: &str) -> Result<Arc<crate::processes::Proc>, ApiError> {
    pid.parse::<u64>()
        .ok()
        .and_then(|n| entry.processes.get(n))
        .ok_or_else(|| {
            ApiError::not_found(
                "process_not_found",
                format!("no process `{pid}` in sandbox `{}`", entry.id),
            )
        })
}

pub async fn get_process(
    State(s): State<AppState>,
    UrlPath((id, pid)): UrlPath<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    let entry = s.host.get(&id)?;
    Ok(Json(json!({ "data": find(&entry, &pid)?.view() })))
}

pub async fn stop_process(
    State(s): State<AppState>,
    UrlPath((id, pid)): UrlPath<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    let entry = s.host.get(&id)?;
    let proc = find(&entry, &pid)?;
    proc.stop().await;
    Ok(Json(json!({ "data": proc.view() })))
}

#[derive(Deserialize)]
pub struct TailQuery {
    tail: Option<usize>,
}

pub async fn process_logs(
    State(s): State<AppState>,
    UrlPath((id, pid)): UrlPath<(String, String)>,
    Query(q): Query<TailQuery>,
) -> Result<Json<Value>, ApiError> {
    let entry = s.host.get(&id)?;
    let logs = find(&entry, &pid)?.logs(q.tail.unwrap_or(200));
    Ok(Json(json!({ "data": logs, "logs": logs })))
}

pub async fn process_stream(
    State(s): State<AppState>,
    UrlPath((id, pid)): UrlPath<(String, String)>,
) -> Result<Sse<impl Stream<Item = Result<Event, std::convert::Infallible>>>, ApiError> {
    let entry = s.host.get(&id)?;
    let proc = find(&entry, &pid)?;
    let (mut lines, mut done) = proc.subscribe();
    let backlog = proc.logs(0);
    let stream = async_stream(move |tx| async move {
        for line in backlog.lines() {
            if tx
                .send(
                    Event::default()
                        .event("output")
                        .data(json!({ "line": line }).to_string()),
                )
                .await
                .is_err()
            {
                return;
            }
        }
        loop {
            tokio::select! {
                l = lines.recv() => match l {
                    Ok(l) => {
                        let ev = Event::default().event(l.stream).data(json!({ "line": l.line, "stream": l.stream }).to_string());
                        if tx.send(ev).await.is_err() { return; }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(_) => break,
                },
                _ = crate::processes::finished(&mut done) => break,
            }
        }
        let _ = tx
            .send(Event::default().event("exit").data(proc.view().to_string()))
            .await;
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

/// `GET /sandboxes/{id}/resources`: limits, what the kernel counted, and containment events.
pub async fn resources(
    State(s): State<AppState>,
    UrlPath(id): UrlPath<String>,
) -> Result<Json<Value>, ApiError> {
    let entry = s.host.get(&id)?;
    let stats = match &s.host.iso.cgroups {
        Some(cg) if entry.state() != crate::model::State::Destroyed => cg.stats(&entry.id).ok(),
        _ => None,
    }
    .unwrap_or_default();
    let resources = entry.snapshot().resources;
    Ok(Json(json!({ "data": {
        "size": resources.size,
        "cpu_count": resources.cpu_count,
        "memory_mb": resources.memory_mb,
        "disk_size_mb": resources.disk_size_mb,
        "pids_max": s.host.iso.pids,
        "usage": {
            "active_cpu_ms": stats.cpu_usage_ns / 1_000_000,
            "memory_bytes": stats.memory_bytes,
            "pids": stats.pids,
        },
        "events": {
            "oom_kills": stats.oom_kills,
            "pids_limit_hits": stats.pids_limit_hits,
        },
        "exec_count": entry.exec_count.load(Ordering::Relaxed),
    }})))
}

/// `GET /sandboxes/{id}/ports/{port}/probe`: whether something answers HTTP on the sandbox's own
/// `localhost:<port>`, asked from inside its network namespace (how readiness probes and the
/// edge reach sandbox ports: sandboxes are unreachable from the host's network).
pub async fn probe_port(
    State(s): State<AppState>,
    UrlPath((id, port)): UrlPath<(String, u16)>,
) -> Result<Json<Value>, ApiError> {
    use tokio::io::AsyncWriteExt;
    let entry = s.host.live(&id)?;
    let Some(index) = entry.snapshot().net_index else {
        return Err(ApiError::invalid(
            "no_network",
            "this sandbox has no network namespace (sandboxd runs without isolation)",
        ));
    };
    let answer = async {
        let mut stream = crate::isolation::net::Net::connect(index, port).await?;
        stream
            .write_all(
                format!("GET / HTTP/1.1\r\nHost: localhost:{port}\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            )
            .await?;
        let mut head = [0u8; 64];
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut head))
            .await
            .map_err(|_| std::io::Error::other("no answer"))??;
        Ok::<_, std::io::Error>(String::from_utf8_lossy(&head[..n]).into_owned())
    }
    .await;
    Ok(Json(match answer {
        Ok(head) => {
            let status = head
                .split_whitespace()
                .nth(1)
                .and_then(|s| s.parse::<u16>().ok());
            json!({ "data": { "port": port, "open": true, "http_status": status } })
        }
        Err(e) => json!({ "data": { "port": port, "open": false, "error": e.to_string() } }),
    }))
}

/// `GET /sandboxes/{id}/usage`: cumulative counters, also after the sandbox is destroyed.
pub async fn usage(
    State(s): State<AppState>,
    UrlPath(id): UrlPath<String>,
) -> Result<Json<Value>, ApiError> {
    let entry = s.host.get(&id)?;
    let host = s.host.clone();
    let e = entry.clone();
    let counters = tokio::task::spawn_blocking(move || {
        if e.state() == crate::model::State::Destroyed {
            e.usage.lock().unwrap_or_else(|p| p.into_inner()).clone()
        } else {
            host.sample_usage(&e)
        }
    })
    .await
    .map_err(|e| ApiError::internal(e.to_string()))?;
    Ok(Json(json!({ "data": counters.view(&entry) })))
}
