//! Inside a sandbox: reading, listing and deleting files, and background processes.

use reqwest::Method;
use serde_json::{Value, json};
use slipway_common::ServiceError;
use slipway_proto::v1::{
    DeleteFileReply, DeleteFileRequest, FileEntry, FileKind, FileTreeNode, FileTreeReply,
    FileTreeRequest, ListFilesReply, ListFilesRequest, ListProcessesReply, ListProcessesRequest,
    ProcessLogsReply, ProcessLogsRequest, ProcessRef, ProcessReply, ReadFileReply, ReadFileRequest,
    RestartSpec, StartProcessRequest,
};

use super::{Executor, platform_error, required, resource};
use crate::convert;

/// Deepest tree MIOSA documents.
const MAX_TREE_DEPTH: u32 = 10;

/// Largest file `files.read` returns over NATS (the default max payload is 1 MiB; leave room).
const MAX_READ: usize = 900 * 1024;

/// A path in the sandbox. `.` and `..` segments are refused: on a route that carries the path
/// in the URL (the legacy download), the URL parser would resolve them against the route and
/// reach another sandbox's files under the one shared API key.
fn path_of(path: &str) -> Result<String, ServiceError> {
    if path.is_empty() || path.contains('\0') {
        return Err(ServiceError::invalid_input(
            "path: is required, without NUL",
        ));
    }
    if path.split('/').any(|s| s == "." || s == "..") {
        return Err(ServiceError::invalid_input(
            "path: `.` and `..` segments are not allowed; give the path from /workspace or as relative without them",
        ));
    }
    if path.len() > MAX_PATH_BYTES {
        return Err(ServiceError::invalid_input(format!(
            "path: longer than {MAX_PATH_BYTES} bytes"
        )));
    }
    Ok(path.to_string())
}

/// Longest path the executor passes on (Linux's PATH_MAX).
const MAX_PATH_BYTES: usize = 4096;

/// At most this many processes per sandbox are kept to relaunch on resume.
const MAX_RESTART_SPECS: usize = 16;
/// Largest restart spec (command, cwd and environment), in bytes.
const MAX_RESTART_SPEC_BYTES: usize = 16 * 1024;

/// The body of `POST /processes` as the SDKs send it: `command`, `env`, `name`, and `cwd`
/// (which the Elixir SDK and Python's background `commands.run` send).
pub(crate) fn process_body(
    command: &str,
    cwd: &str,
    env: &std::collections::HashMap<String, String>,
    name: &str,
) -> Value {
    let mut body = json!({ "command": command });
    if !env.is_empty() {
        body["env"] = json!(env);
    }
    if !name.is_empty() {
        body["name"] = json!(name);
    }
    if !cwd.is_empty() {
        body["cwd"] = json!(cwd);
    }
    body
}

/// A stable process name from the start's key (FNV-1a), so a retried start names the same
/// process.
fn generated_name(key: &str) -> String {
    let hash = key.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    format!("slipway-{hash:016x}")
}

/// The platform's key for a stop: the caller's (tied to this sandbox and pid, so a key reused
/// for another process is not a replay), or one of its own for this call (pids repeat, so a
/// fixed key per pid would turn a later stop into a replay of an old one).
fn stop_key(caller: &str, sandbox: &str, pid: &str) -> String {
    if caller.is_empty() {
        let n: u128 = rand::random();
        format!("stop-{n:032x}")
    } else {
        format!("{caller}:{sandbox}:{pid}")
    }
}

/// Lines of a process log to ask for: MIOSA's SDKs send 200 and treat 0 or less as 200.
fn tail(asked: u32) -> u32 {
    if asked == 0 { 200 } else { asked }
}

fn entry(v: &Value) -> FileEntry {
    let kind = match v.get("type").and_then(Value::as_str) {
        Some("dir" | "directory") => FileKind::Dir,
        Some("symlink" | "link") => FileKind::Symlink,
        Some(_) => FileKind::File,
        None if v.get("is_dir").and_then(Value::as_bool) == Some(true) => FileKind::Dir,
        None => FileKind::File,
    };
    FileEntry {
        path: v
            .get("path")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string(),
        kind: kind.into(),
        size: v.get("size").and_then(Value::as_u64).unwrap_or(0),
        modified_at: convert::timestamp(v.get("modified_at")),
    }
}

/// A tree node and its children (`children` or `entries`).
fn tree_node(v: &Value) -> FileTreeNode {
    let children = v
        .get("children")
        .or(v.get("entries"))
        .and_then(Value::as_array)
        .map(|c| c.iter().map(tree_node).collect())
        .unwrap_or_default();
    FileTreeNode {
        entry: Some(entry(v)),
        children,
    }
}

impl Executor {
    pub async fn read_file(&self, req: ReadFileRequest) -> Result<ReadFileReply, ServiceError> {
        resource("sandbox_id", &req.sandbox_id)?;
        let path = path_of(&req.path)?;
        let content = self
            .client
            .read_file(&req.sandbox_id, &path)
            .await
            .map_err(platform_error)?;
        if content.len() > MAX_READ {
            return Err(ServiceError::invalid_input(format!(
                "the file is {} bytes; files.read returns at most {MAX_READ}",
                content.len()
            )));
        }
        Ok(ReadFileReply {
            content: content.to_vec(),
        })
    }

    pub async fn list_files(&self, req: ListFilesRequest) -> Result<ListFilesReply, ServiceError> {
        resource("sandbox_id", &req.sandbox_id)?;
        let path = if req.path.is_empty() {
            "/workspace".to_string()
        } else {
            path_of(&req.path)?
        };
        let depth = if req.recursive { "20" } else { "1" };
        let got = self
            .platform_get(
                "files.list",
                format!("/sandboxes/{}/files", req.sandbox_id),
                vec![("path", path), ("depth", depth.to_string())],
            )
            .await?;
        let items = super::items(&got, &["entries", "files", "items"]);
        Ok(ListFilesReply {
            entries: items.iter().map(entry).collect(),
        })
    }

    pub async fn tree(&self, req: FileTreeRequest) -> Result<FileTreeReply, ServiceError> {
        resource("sandbox_id", &req.sandbox_id)?;
        let path = if req.path.is_empty() {
            "/workspace".to_string()
        } else {
            path_of(&req.path)?
        };
        let depth = match req.depth {
            0 => 3,
            d @ 1..=MAX_TREE_DEPTH => d,
            d => {
                return Err(ServiceError::invalid_input(format!(
                    "depth: 1 to {MAX_TREE_DEPTH} (got {d})"
                )));
            }
        };
        let got = self
            .client
            .tree(&req.sandbox_id, &path, depth)
            .await
            .map_err(platform_error)?;
        Ok(FileTreeReply {
            root: Some(tree_node(got.get("tree").unwrap_or(&got))),
        })
    }

    pub async fn delete_file(
        &self,
        req: DeleteFileRequest,
    ) -> Result<DeleteFileReply, ServiceError> {
        resource("sandbox_id", &req.sandbox_id)?;
        required("idempotency_key", &req.idempotency_key)?;
        let path = path_of(&req.path)?;
        self.client
            .delete_file(&req.sandbox_id, &path, req.recursive, &req.idempotency_key)
            .await
            .map_err(platform_error)?;
        Ok(DeleteFileReply {})
    }

    /// Starts a background process with the SDKs' body. A process to relaunch on resume is then
    /// recorded in the executor's sandbox record (MIOSA has no field for it), under a name the
    /// resume can look for.
    pub async fn start_process(
        &self,
        req: StartProcessRequest,
    ) -> Result<ProcessReply, ServiceError> {
        resource("sandbox_id", &req.sandbox_id)?;
        required("idempotency_key", &req.idempotency_key)?;
        if req.command.trim().is_empty() {
            return Err(ServiceError::invalid_input("command: is required"));
        }
        slipway_proto::validate::check_id("name", &req.name, false).map_err(ServiceError::from)?;
        let name = if req.name.is_empty() && req.restart_on_resume {
            generated_name(&req.idempotency_key)
        } else {
            req.name.clone()
        };
        let mut spec = RestartSpec {
            name: name.clone(),
            command: req.command.clone(),
            cwd: req.cwd.clone(),
            env: req.env.clone(),
            process_id: String::new(),
        };
        if req.restart_on_resume {
            let size = spec.command.len()
                + spec.cwd.len()
                + spec
                    .env
                    .iter()
                    .map(|(k, v)| k.len() + v.len())
                    .sum::<usize>();
            if size > MAX_RESTART_SPEC_BYTES {
                return Err(ServiceError::invalid_input(format!(
                    "restart_on_resume: command, cwd and env are {size} bytes; a process to \
                     relaunch keeps at most {MAX_RESTART_SPEC_BYTES}"
                )));
            }
            // Only a sandbox Slipway made keeps processes to relaunch (a record of another
            // would have the sampler bill it).
            self.ensure_ours(&req.sandbox_id).await?;
            let kept = self.record(&req.sandbox_id).await?.map(|r| r.restart);
            let known = kept.iter().flatten().any(|s| s.name == name);
            if !known && kept.is_some_and(|k| k.len() >= MAX_RESTART_SPECS) {
                return Err(ServiceError::invalid_input(format!(
                    "restart_on_resume: the sandbox already has {MAX_RESTART_SPECS} processes \
                     to relaunch"
                )));
            }
        }
        let started = self
            .client
            .request(
                "process.start",
                Method::POST,
                format!("/sandboxes/{}/processes", req.sandbox_id),
                vec![],
                Some(process_body(&req.command, &req.cwd, &req.env, &name)),
                Some(&req.idempotency_key),
            )
            .await
            .map_err(platform_error)?;
        let mut process = convert::process(&started);
        if req.restart_on_resume {
            // After the platform accepted it, so a refused start leaves nothing to relaunch.
            spec.process_id = process.id.clone();
            let mut full = false;
            self.modify_record(&req.sandbox_id, |record| {
                record.restart.retain(|s| s.name != spec.name);
                full = record.restart.len() >= MAX_RESTART_SPECS;
                if !full {
                    record.restart.push(spec.clone());
                }
            })
            .await?;
            if full {
                // Another start filled the list meanwhile.
                return Err(ServiceError::invalid_input(format!(
                    "restart_on_resume: process `{}` started, but the sandbox already has \
                     {MAX_RESTART_SPECS} processes to relaunch, so it will not be",
                    process.id
                )));
            }
        }
        process.restart_on_resume = req.restart_on_resume;
        Ok(ProcessReply {
            process: Some(process),
        })
    }

    pub async fn list_processes(
        &self,
        req: ListProcessesRequest,
    ) -> Result<ListProcessesReply, ServiceError> {
        resource("sandbox_id", &req.sandbox_id)?;
        let got = self
            .platform_get(
                "process.list",
                format!("/sandboxes/{}/processes", req.sandbox_id),
                vec![],
            )
            .await?;
        let items = super::items(&got, &["processes"]);
        Ok(ListProcessesReply {
            processes: items.iter().map(convert::process).collect(),
        })
    }

    pub async fn get_process(&self, req: ProcessRef) -> Result<ProcessReply, ServiceError> {
        resource("sandbox_id", &req.sandbox_id)?;
        resource("process_id", &req.process_id)?;
        let got = self
            .platform_get(
                "process.get",
                format!("/sandboxes/{}/processes/{}", req.sandbox_id, req.process_id),
                vec![],
            )
            .await?;
        Ok(ProcessReply {
            process: Some(convert::process(&got)),
        })
    }

    /// Stops a process; one the caller stops is no longer relaunched on resume (also when the
    /// platform no longer knows it).
    pub async fn stop_process(&self, req: ProcessRef) -> Result<ProcessReply, ServiceError> {
        resource("sandbox_id", &req.sandbox_id)?;
        resource("process_id", &req.process_id)?;
        slipway_proto::validate::check_id("idempotency_key", &req.idempotency_key, false)
            .map_err(ServiceError::from)?;
        let stopped = self
            .client
            .request(
                "process.stop",
                Method::DELETE,
                format!("/sandboxes/{}/processes/{}", req.sandbox_id, req.process_id),
                vec![],
                None,
                Some(&stop_key(
                    &req.idempotency_key,
                    &req.sandbox_id,
                    &req.process_id,
                )),
            )
            .await;
        let gone = matches!(&stopped, Err(e) if matches!(e.status(), Some(404 | 410)));
        if stopped.is_ok() || gone {
            self.forget_restart(&req.sandbox_id, &req.process_id).await;
        }
        let got = stopped.map_err(platform_error)?;
        Ok(ProcessReply {
            process: Some(convert::process(&got)),
        })
    }

    /// Drops the restart spec of process `process_id`, if there is one; a failure is logged (the
    /// stop happened).
    async fn forget_restart(&self, sandbox_id: &str, process_id: &str) {
        let kept = match self.record(sandbox_id).await {
            Ok(Some(r)) => r.restart,
            _ => return,
        };
        if !kept.iter().any(|s| s.process_id == process_id) {
            return;
        }
        let forgot = self
            .modify_record(sandbox_id, |record| {
                record.restart.retain(|s| s.process_id != process_id);
            })
            .await;
        if let Err(e) = forgot {
            tracing::warn!(sandbox_id, process_id, error = %e, "could not forget a stopped process");
        }
    }

    pub async fn process_logs(
        &self,
        req: ProcessLogsRequest,
    ) -> Result<ProcessLogsReply, ServiceError> {
        resource("sandbox_id", &req.sandbox_id)?;
        resource("process_id", &req.process_id)?;
        let got = self
            .platform_get(
                "process.logs",
                format!(
                    "/sandboxes/{}/processes/{}/logs",
                    req.sandbox_id, req.process_id
                ),
                vec![("tail", tail(req.tail).to_string())],
            )
            .await?;
        let (stdout, stderr) = match &got {
            Value::String(s) => (s.clone(), String::new()),
            v => (
                v.get("stdout")
                    .or(v.get("logs"))
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string(),
                v.get("stderr")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string(),
            ),
        };
        Ok(ProcessLogsReply { stdout, stderr })
    }
}
