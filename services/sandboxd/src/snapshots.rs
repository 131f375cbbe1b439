//! Snapshots of a sandbox's files (checkpoints), restore, and fork into an independent sandbox,
//! from the live sandbox or from a snapshot. A snapshot is a consistent point in time while the
//! sandbox's processes keep running: a btrfs snapshot is atomic, and the copy backend freezes the
//! sandbox for the length of the copy. Snapshots expire by `expiration_seconds` and by the
//! sandbox's `keep_last_snapshots`; `keep: true` pins one.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::api::ApiError;
use crate::clock::now_ms;
use crate::host::{CreateRequest, Entry, FilesSource, Host};
use crate::model::{Sandbox, State};
use crate::store;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Snapshot {
    pub id: String,
    pub sandbox_id: String,
    pub comment: Option<String>,
    pub created_at_ms: i64,
    pub size_bytes: u64,
    pub expires_at_ms: Option<i64>,
    pub keep: bool,
}

impl Snapshot {
    pub fn view(&self) -> serde_json::Value {
        let ts = crate::clock::rfc3339;
        serde_json::json!({
            "id": self.id,
            "snapshot_id": self.id,
            "sandbox_id": self.sandbox_id,
            "status": "ready",
            "comment": self.comment,
            "keep": self.keep,
            "size_bytes": self.size_bytes,
            "created_at": ts(self.created_at_ms),
            "updated_at": ts(self.created_at_ms),
            "expires_at": self.expires_at_ms.map(ts),
            "retention_seconds": self.expires_at_ms.map(|e| (e - self.created_at_ms) / 1000),
        })
    }
}

/// The body of `POST /sandboxes/{id}/snapshots`.
#[derive(Debug, Default, Deserialize)]
pub struct SnapshotRequest {
    pub comment: Option<String>,
    pub keep: Option<bool>,
    pub expiration_seconds: Option<u64>,
    pub retention_seconds: Option<u64>,
    pub expiration_days: Option<u64>,
}

/// The body of `POST /sandboxes/{id}/fork`: what is not given is the parent's.
#[derive(Debug, Default, Deserialize, Serialize)]
pub struct ForkRequest {
    pub snapshot_id: Option<String>,
    pub name: Option<String>,
    pub external_user_id: Option<String>,
    pub external_project_id: Option<String>,
    pub external_workspace_id: Option<String>,
    pub metadata: Option<serde_json::Map<String, serde_json::Value>>,
    pub timeout_sec: Option<u64>,
    pub idle_timeout_sec: Option<u64>,
    pub template_id: Option<String>,
    pub env: Option<std::collections::BTreeMap<String, String>>,
    pub allow_internet_access: Option<bool>,
}

fn new_snapshot_id() -> String {
    format!("snap_{}", &crate::host::new_id()[4..])
}

impl Host {
    fn snapshot_file(&self, id: &str) -> std::path::PathBuf {
        self.data_dir().join("snapshots").join(format!("{id}.json"))
    }

    pub fn snapshot(&self, id: &str) -> Result<Snapshot, ApiError> {
        let valid =
            id.starts_with("snap_") && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        let found = if valid {
            store::read_json::<Snapshot>(&self.snapshot_file(id))
                .map_err(|e| ApiError::internal(e.to_string()))?
        } else {
            None
        };
        found.ok_or_else(|| {
            ApiError::not_found("snapshot_not_found", format!("snapshot `{id}` not found"))
        })
    }

    pub fn snapshots_of(&self, sandbox_id: &str) -> Vec<Snapshot> {
        let Ok(dir) = std::fs::read_dir(self.data_dir().join("snapshots")) else {
            return Vec::new();
        };
        let mut out: Vec<Snapshot> = dir
            .flatten()
            .filter_map(|e| store::read_json::<Snapshot>(&e.path()).ok().flatten())
            .filter(|s| s.sandbox_id == sandbox_id)
            .collect();
        out.sort_by(|a, b| a.created_at_ms.cmp(&b.created_at_ms).then(a.id.cmp(&b.id)));
        out
    }

    /// Copies `entry`'s files at one point in time to `dst`, the sandbox's processes running on.
    pub(crate) async fn capture(
        &self,
        entry: &Entry,
        dst: std::path::PathBuf,
        writable: bool,
    ) -> Result<(), ApiError> {
        let _files = entry.files_lock.lock().await;
        // A copy walks the tree by path: nothing inside may move while it does, so the copy
        // waits until every process is frozen, and is refused if they cannot be.
        let freeze = matches!(self.storage, crate::storage::Storage::Copy { .. })
            && entry.state() == State::Running;
        if freeze && let Some(cg) = &self.iso.cgroups {
            let (cg, id) = (cg.clone(), entry.id.clone());
            let frozen = tokio::task::spawn_blocking(move || {
                cg.freeze_and_wait(&id, std::time::Duration::from_secs(10))
            })
            .await
            .map_err(|e| ApiError::internal(e.to_string()))?;
            if let Err(e) = frozen {
                if let Some(cg) = &self.iso.cgroups {
                    let _ = cg.freeze(&entry.id, false);
                }
                return Err(ApiError::internal(format!("freezing for the copy: {e}")));
            }
        }
        let (storage, src) = (self.storage.clone(), entry.files.clone());
        let copied =
            tokio::task::spawn_blocking(move || storage.snapshot(&src, &dst, writable)).await;
        if freeze && let Some(cg) = &self.iso.cgroups {
            let _ = cg.freeze(&entry.id, false);
        }
        copied
            .map_err(|e| ApiError::internal(e.to_string()))?
            .map_err(|e| ApiError::internal(format!("snapshot: {e}")))
    }

    pub async fn create_snapshot(
        &self,
        entry: &Arc<Entry>,
        req: SnapshotRequest,
    ) -> Result<Snapshot, ApiError> {
        if req.comment.as_ref().is_some_and(|c| c.len() > 1024) {
            return Err(ApiError::invalid(
                "invalid_comment",
                "a comment is at most 1024 bytes",
            ));
        }
        let id = new_snapshot_id();
        let dir = self.storage.snapshot_dir(&id);
        self.capture(entry, dir.clone(), false).await?;
        let created = now_ms();
        let ttl = req
            .expiration_seconds
            .or(req.retention_seconds)
            .or(req.expiration_days.map(|d| d.saturating_mul(86_400)))
            .or_else(|| {
                entry
                    .snapshot()
                    .metadata
                    .get("snapshot_expiration_sec")
                    .and_then(|v| v.as_u64())
            });
        let snap = Snapshot {
            id: id.clone(),
            sandbox_id: entry.id.clone(),
            comment: req.comment,
            created_at_ms: created,
            size_bytes: crate::storage::Storage::size(&dir.join("workspace")),
            expires_at_ms: ttl.map(|t| created.saturating_add(crate::model::secs_to_ms(t))),
            keep: req.keep.unwrap_or(false),
        };
        store::write_json(&self.snapshot_file(&id), &snap)
            .map_err(|e| ApiError::internal(e.to_string()))?;
        self.enforce_retention(&entry.id);
        Ok(snap)
    }

    pub fn delete_snapshot(&self, snap: &Snapshot) -> Result<(), ApiError> {
        self.storage
            .delete(&self.storage.snapshot_dir(&snap.id))
            .map_err(|e| ApiError::internal(format!("removing snapshot: {e}")))?;
        let _ = std::fs::remove_file(self.snapshot_file(&snap.id));
        Ok(())
    }

    /// Expired snapshots go, and beyond the sandbox's `keep_last_snapshots` the oldest unpinned.
    pub fn enforce_retention(&self, sandbox_id: &str) {
        let now = now_ms();
        let mut snaps = self.snapshots_of(sandbox_id);
        let keep_last = self.get(sandbox_id).ok().and_then(|e| {
            e.snapshot()
                .metadata
                .get("keep_last_snapshots")
                .and_then(|v| v.as_u64())
        });
        snaps.retain(|s| {
            if s.expires_at_ms.is_some_and(|e| e <= now) && !s.keep {
                let _ = self.delete_snapshot(s);
                false
            } else {
                true
            }
        });
        if let Some(n) = keep_last.and_then(|n| usize::try_from(n).ok()) {
            let unpinned: Vec<&Snapshot> = snaps.iter().filter(|s| !s.keep).collect();
            for s in unpinned.iter().take(unpinned.len().saturating_sub(n)) {
                let _ = self.delete_snapshot(s);
            }
        }
    }

    /// Every sandbox's retention, live or destroyed (from the reaper).
    pub fn enforce_all_retention(&self) {
        for e in self.all() {
            self.enforce_retention(&e.id);
        }
    }

    /// Replaces the sandbox's files with the snapshot's; its processes end, and those started
    /// with the restart flag start again on the restored files.
    pub async fn restore(&self, entry: &Arc<Entry>, snap: &Snapshot) -> Result<Sandbox, ApiError> {
        if snap.sandbox_id != entry.id {
            return Err(ApiError::invalid(
                "snapshot_mismatch",
                format!("snapshot `{}` is not of sandbox `{}`", snap.id, entry.id),
            ));
        }
        self.end_processes(entry).await;
        {
            let _files = entry.files_lock.lock().await;
            let (storage, files, src) = (
                self.storage.clone(),
                entry.files.clone(),
                self.storage.snapshot_dir(&snap.id),
            );
            tokio::task::spawn_blocking(move || {
                storage.delete(&files)?;
                storage.snapshot(&src, &files, true)
            })
            .await
            .map_err(|e| ApiError::internal(e.to_string()))?
            .and_then(|()| self.prepare_files(&entry.files, &entry.snapshot()))
            .map_err(|e| ApiError::internal(format!("restore: {e}")))?;
        }
        entry.watch.rewatch();
        let record = entry.update(|r| {
            r.state = State::Running;
            r.timeout_base_ms = now_ms();
        })?;
        for spec in entry.restart_specs() {
            self.launch(entry, spec.command, spec.cwd, spec.env, spec.name, false)?;
        }
        Ok(record)
    }

    /// A new, independent sandbox with the parent's files (live, or from `snapshot_id`) and the
    /// parent's attribution unless the request overrides it.
    pub async fn fork(
        &self,
        parent: &Arc<Entry>,
        req: ForkRequest,
        key: Option<&str>,
    ) -> Result<Sandbox, ApiError> {
        let source = match &req.snapshot_id {
            Some(sid) => {
                let snap = self.snapshot(sid)?;
                if snap.sandbox_id != parent.id {
                    return Err(ApiError::invalid(
                        "snapshot_mismatch",
                        format!("snapshot `{sid}` is not of sandbox `{}`", parent.id),
                    ));
                }
                Some(self.storage.snapshot_dir(sid))
            }
            None => None,
        };
        let p = parent.snapshot();
        let mut metadata = p.metadata.clone();
        metadata.extend(req.metadata.clone().unwrap_or_default());
        metadata.insert(
            "forked_from".into(),
            serde_json::Value::String(p.id.clone()),
        );
        let create = CreateRequest {
            template_id: req.template_id.clone().or(Some(p.template_id.clone())),
            name: req.name.clone(),
            env: req.env.clone().unwrap_or(p.env.clone()),
            metadata,
            tags: p.tags.clone(),
            external_user_id: req.external_user_id.clone().or(p.external_user_id.clone()),
            external_project_id: req
                .external_project_id
                .clone()
                .or(p.external_project_id.clone()),
            external_workspace_id: req
                .external_workspace_id
                .clone()
                .or(p.external_workspace_id.clone()),
            workspace_id: p.workspace_id.clone(),
            project_id: p.project_id.clone(),
            timeout_sec: req.timeout_sec.or(p.timeout_sec),
            idle_timeout_sec: req.idle_timeout_sec.or(p.idle_timeout_sec),
            persistent: Some(p.persistent),
            always_on: Some(false),
            allow_internet_access: req.allow_internet_access.or(Some(p.outbound)),
            // A fork is the size of its parent (and holds as many bytes).
            size: Some(p.resources.size.clone()),
            ..Default::default()
        };
        let scoped = key.map(|k| format!("fork:{}:{k}", parent.id));
        let source = match source {
            Some(dir) => FilesSource::Snapshot(dir),
            None => FilesSource::Live(parent.clone()),
        };
        self.create_from(create, scoped.as_deref(), source).await
    }
}
