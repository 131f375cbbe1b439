//! The sandbox registry: every sandbox in memory and on disk under `<data-dir>/sandboxes/<id>`,
//! idempotent creation, and the lifecycle (pause, resume, stop, extend, destroy).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use rand::Rng;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::api::ApiError;
use crate::clock::now_ms;
use crate::isolation::cgroup::{Cgroups, Limits};
use crate::isolation::net::Net;
use crate::jail::{Confinement, Jail};
use crate::model::{Sandbox, State};
use crate::processes::Processes;
use crate::watch::Hub;
use crate::{store, templates};

/// How long an `Idempotency-Key` is remembered.
pub const IDEMPOTENCY_TTL_MS: i64 = 24 * 3600 * 1000;

pub struct Host {
    data_dir: PathBuf,
    sandboxes: RwLock<HashMap<String, Arc<Entry>>>,
    /// Serialises creation, so a key or a name is checked and taken in one step.
    create_lock: tokio::sync::Mutex<()>,
    pub iso: Isolation,
    pub storage: crate::storage::Storage,
    pub events: crate::events::EventLog,
    pub quotas: crate::quotas::Quotas,
    pub prices: crate::rollup::Prices,
}

/// How sandboxes are confined on this host.
pub struct Isolation {
    pub jail: Jail,
    pub cgroups: Option<Cgroups>,
    pub net: Option<Net>,
    /// Most processes (and threads) in one sandbox.
    pub pids: u64,
    /// Host-wide caps on what a size gives (`--memory-limit-mb`, `--disk-limit-mb`).
    pub memory_cap_mb: Option<u64>,
    pub disk_cap_mb: Option<u64>,
    /// The most CPUs' worth of time one sandbox may take: the host's CPUs less those kept
    /// for sandboxd and the other sandboxes (`--reserved-cpus`), so no sandbox, a fork bomb
    /// included, can take every CPU.
    pub max_cpus: u64,
}

impl Isolation {
    /// What a sandbox of `size` is given on this host.
    pub fn resources(&self, size: crate::model::Size) -> crate::model::Resources {
        crate::model::Resources::of(size, self.memory_cap_mb, self.disk_cap_mb)
    }

    /// The cgroup limits of a sandbox.
    pub fn limits(&self, r: &crate::model::Resources) -> Limits {
        Limits {
            memory_bytes: r.memory_mb.saturating_mul(1024 * 1024),
            pids: self.pids,
            cpus: u32::try_from(r.cpu_count.min(self.max_cpus)).unwrap_or(u32::MAX),
        }
    }
}

/// A process to start again when its sandbox resumes after a sandboxd restart.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RestartSpec {
    pub command: String,
    pub cwd: String,
    pub env: BTreeMap<String, String>,
    pub name: Option<String>,
}

/// One sandbox and what lives with it.
pub struct Entry {
    pub id: String,
    /// Its records: `meta.json`, process logs, restart specs.
    pub dir: PathBuf,
    /// Its files (`workspace/`, `journal/`), where the storage backend keeps them.
    pub files: PathBuf,
    /// Held while the files change as a whole (a write batch) or are captured (a snapshot).
    pub files_lock: tokio::sync::Mutex<()>,
    pub record: Mutex<Sandbox>,
    pub processes: Processes,
    pub watch: Hub,
    pub exec_count: AtomicU64,
    /// Cumulative usage (see `usage`).
    pub usage: Mutex<crate::usage::Counters>,
    /// Unix ms of the last call that counts as activity (idle timeouts).
    pub last_activity_ms: AtomicI64,
    /// Set when sandboxd restarted under it: flagged processes are relaunched on resume.
    pub relaunch_pending: AtomicBool,
    /// Held (shared) by deploy builds; destroy takes it alone, so it waits for them.
    pub builds: Arc<tokio::sync::RwLock<()>>,
}

impl Entry {
    /// The host directory mounted at `/workspace`.
    pub fn workspace(&self) -> PathBuf {
        self.files.join("workspace")
    }

    pub fn snapshot(&self) -> Sandbox {
        self.record
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn persist(&self, record: &Sandbox) -> Result<(), ApiError> {
        store::write_json(&self.dir.join("meta.json"), record)
            .map_err(|e| ApiError::internal(format!("saving sandbox {}: {e}", self.id)))
    }

    /// Applies `change` to the record and saves it.
    pub fn update(&self, change: impl FnOnce(&mut Sandbox)) -> Result<Sandbox, ApiError> {
        let mut record = self.record.lock().unwrap_or_else(|p| p.into_inner());
        let mut next = record.clone();
        change(&mut next);
        next.updated_at_ms = now_ms();
        self.persist(&next)?;
        *record = next.clone();
        Ok(next)
    }

    /// The sandbox's network namespace index, without copying the record.
    pub fn net_index(&self) -> Option<u32> {
        self.record
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .net_index
    }

    pub fn state(&self) -> State {
        self.record.lock().unwrap_or_else(|p| p.into_inner()).state
    }

    pub fn touch(&self) {
        self.last_activity_ms.store(now_ms(), Ordering::Relaxed);
    }

    fn restart_file(&self) -> PathBuf {
        self.dir.join("restart.json")
    }

    pub fn restart_specs(&self) -> Vec<RestartSpec> {
        store::read_json(&self.restart_file())
            .ok()
            .flatten()
            .unwrap_or_default()
    }

    /// Remembers a process to relaunch after a sandboxd restart.
    pub fn remember(&self, spec: RestartSpec) -> Result<(), ApiError> {
        let mut specs = self.restart_specs();
        specs.push(spec);
        store::write_json(&self.restart_file(), &specs)
            .map_err(|e| ApiError::internal(e.to_string()))
    }
}

/// The body of `POST /sandboxes`, with the aliases the SDKs send.
#[derive(Debug, Default, Clone, Deserialize, Serialize)]
pub struct CreateRequest {
    pub template_id: Option<String>,
    pub image: Option<String>,
    pub template: Option<String>,
    pub name: Option<String>,
    pub slug: Option<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub metadata: serde_json::Map<String, serde_json::Value>,
    #[serde(default)]
    pub tags: Vec<String>,
    pub external_user_id: Option<String>,
    pub external_project_id: Option<String>,
    pub external_workspace_id: Option<String>,
    pub workspace_id: Option<String>,
    pub project_id: Option<String>,
    pub timeout_sec: Option<u64>,
    pub idle_timeout_sec: Option<u64>,
    pub persistent: Option<bool>,
    pub always_on: Option<bool>,
    pub size: Option<String>,
    /// MIOSA's network policy switch; outbound access is on by default where the host has it.
    pub allow_internet_access: Option<bool>,
}

#[derive(Debug, Serialize, Deserialize)]
struct IdempotencyRecord {
    body_sha256: String,
    sandbox_id: String,
    created_at_ms: i64,
}

/// Where a new sandbox's files come from.
pub(crate) enum FilesSource {
    Empty,
    /// A snapshot's directory.
    Snapshot(PathBuf),
    /// A live sandbox, captured at one point in time.
    Live(Arc<Entry>),
}

/// Filters of `GET /sandboxes`; every one that is set must match.
#[derive(Debug, Default, Deserialize)]
pub struct ListFilter {
    pub state: Option<String>,
    pub external_user_id: Option<String>,
    pub external_project_id: Option<String>,
    pub external_workspace_id: Option<String>,
    pub name: Option<String>,
    pub tags: Option<String>,
}

const MAX_NAME: usize = 128;
const MAX_ENV: usize = 256;

impl Host {
    /// Loads every sandbox under `data_dir`, rolling interrupted file batches forward or back.
    /// With `for_purge`, nothing is brought back (no namespaces or cgroups re-created, no
    /// records changed): the host is opened only to find what to remove.
    pub fn open(
        data_dir: &Path,
        iso: Isolation,
        storage: crate::storage::Storage,
        prices: crate::rollup::Prices,
        for_purge: bool,
    ) -> anyhow::Result<Arc<Host>> {
        let sandboxes_dir = data_dir.join("sandboxes");
        std::fs::create_dir_all(&sandboxes_dir)?;
        std::fs::create_dir_all(data_dir.join("idempotency"))?;
        let mut sandboxes = HashMap::new();
        for entry in std::fs::read_dir(&sandboxes_dir)? {
            let dir = entry?.path();
            let Some(mut record) = store::read_json::<Sandbox>(&dir.join("meta.json"))? else {
                // Created but never recorded (a crash mid-create): nothing refers to it.
                std::fs::remove_dir_all(&dir)?;
                continue;
            };
            if !for_purge && record.state != State::Destroyed {
                let files = storage.sandbox_dir(&record.id);
                // A file batch cut short by a crash is completed or undone before anything
                // reads the workspace.
                crate::journal::recover(&files, iso.jail.owner())?;
                // Limits and ownership as this sandboxd applies them (a record from an older
                // one gets them now).
                storage.prepare(&files, iso.jail.owner(), disk_bytes(&record))?;
            }
            let restarted = !for_purge && matches!(record.state, State::Running | State::Paused);
            if restarted && record.state == State::Running {
                // Its processes died with the previous sandboxd: it comes back paused, and
                // resuming it relaunches the processes started with the restart flag.
                record.state = State::Paused;
                store::write_json(&dir.join("meta.json"), &record)?;
            }
            let files = storage.sandbox_dir(&record.id);
            let entry = Arc::new(Entry::new(record.id.clone(), dir, files, record));
            let counters = Host::load_usage(&entry);
            entry
                .exec_count
                .store(counters.exec_count, Ordering::Relaxed);
            *entry.usage.lock().unwrap_or_else(|p| p.into_inner()) = counters;
            if restarted {
                entry.relaunch_pending.store(true, Ordering::SeqCst);
                if let (Some(net), Some(index)) = (&iso.net, entry.snapshot().net_index)
                    && !net.owns(index)
                {
                    // Its namespace was lost (a reboot, another sandboxd): a fresh one, same policy.
                    let fresh = net.allocate()?;
                    let mut r = entry.record.lock().unwrap_or_else(|p| p.into_inner());
                    r.net_index = Some(fresh);
                    store::write_json(&entry.dir.join("meta.json"), &*r)?;
                }
                let record = entry.snapshot();
                confine(&iso, &record, false)
                    .map_err(|e| anyhow::anyhow!("sandbox {}: {}", record.id, e.message))?;
            }
            sandboxes.insert(entry.id.clone(), entry);
        }
        let host = Arc::new(Host {
            data_dir: data_dir.to_path_buf(),
            sandboxes: RwLock::new(sandboxes),
            create_lock: tokio::sync::Mutex::new(()),
            iso,
            storage,
            events: crate::events::EventLog::open(data_dir)?,
            quotas: crate::quotas::Quotas::open(data_dir)?,
            prices,
        });
        host.prune_idempotency();
        Ok(host)
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    pub fn get(&self, id: &str) -> Result<Arc<Entry>, ApiError> {
        self.sandboxes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()
            .ok_or_else(|| {
                ApiError::not_found("sandbox_not_found", format!("sandbox `{id}` not found"))
            })
    }

    /// A sandbox that is not destroyed; a paused one is resumed first (any call counts as
    /// activity).
    pub fn live(&self, id: &str) -> Result<Arc<Entry>, ApiError> {
        let entry = self.get(id)?;
        match entry.state() {
            State::Destroyed => Err(ApiError::new(
                axum::http::StatusCode::GONE,
                "sandbox_destroyed",
                format!("sandbox `{id}` was destroyed"),
            )),
            State::Paused => {
                self.resume(&entry)?;
                entry.touch();
                Ok(entry)
            }
            State::Running | State::Stopped => {
                entry.touch();
                Ok(entry)
            }
        }
    }

    pub fn by_name(&self, name: &str) -> Result<Arc<Entry>, ApiError> {
        self.sandboxes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .find(|e| {
                let r = e.record.lock().unwrap_or_else(|p| p.into_inner());
                r.state != State::Destroyed && r.name.as_deref() == Some(name)
            })
            .cloned()
            .ok_or_else(|| {
                ApiError::not_found("sandbox_not_found", format!("no sandbox named `{name}`"))
            })
    }

    pub fn list(&self, filter: &ListFilter) -> Result<Vec<Sandbox>, ApiError> {
        let state = match filter.state.as_deref().filter(|s| !s.is_empty()) {
            Some(s) => Some(State::parse(s).ok_or_else(|| {
                ApiError::invalid("invalid_state", format!("unknown state `{s}`"))
            })?),
            None => None,
        };
        let tags: Vec<&str> = filter
            .tags
            .as_deref()
            .map(|t| t.split(',').filter(|t| !t.is_empty()).collect())
            .unwrap_or_default();
        let eq = |want: &Option<String>, have: &Option<String>| {
            want.as_ref().is_none_or(|w| have.as_ref() == Some(w))
        };
        let mut out: Vec<Sandbox> = self
            .sandboxes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .map(|e| e.snapshot())
            .filter(|s| match state {
                Some(st) => s.state == st,
                None => s.state != State::Destroyed,
            })
            // Deployment runtimes are sandboxd's own, not the tenant's sandboxes.
            .filter(|s| !s.is_runtime())
            .filter(|s| eq(&filter.external_user_id, &s.external_user_id))
            .filter(|s| eq(&filter.external_project_id, &s.external_project_id))
            .filter(|s| eq(&filter.external_workspace_id, &s.external_workspace_id))
            .filter(|s| eq(&filter.name, &s.name))
            .filter(|s| tags.iter().all(|t| s.tags.iter().any(|have| have == t)))
            .collect();
        out.sort_by(|a, b| a.created_at_ms.cmp(&b.created_at_ms).then(a.id.cmp(&b.id)));
        Ok(out)
    }

    /// Creates a sandbox; with an `Idempotency-Key` seen in the last 24 h, returns that
    /// sandbox instead (and refuses the key with a different body).
    pub async fn create(
        &self,
        req: CreateRequest,
        idempotency_key: Option<&str>,
    ) -> Result<Sandbox, ApiError> {
        self.create_from(req, idempotency_key, FilesSource::Empty)
            .await
    }

    /// Creates a sandbox whose files come from `source`.
    pub(crate) async fn create_from(
        &self,
        req: CreateRequest,
        idempotency_key: Option<&str>,
        source: FilesSource,
    ) -> Result<Sandbox, ApiError> {
        let template_id = req
            .template_id
            .clone()
            .or(req.image.clone())
            .or(req.template.clone())
            .unwrap_or_else(|| templates::DEFAULT_TEMPLATE.to_string());
        if templates::find(&template_id).is_none() {
            return Err(ApiError::invalid(
                "template_not_found",
                format!("unknown template `{template_id}` (GET /sandbox-templates lists them)"),
            ));
        }
        let name = req
            .name
            .clone()
            .or(req.slug.clone())
            .filter(|n| !n.is_empty());
        if let Some(n) = &name
            && (n.len() > MAX_NAME || n.chars().any(|c| c.is_control() || c == '/'))
        {
            return Err(ApiError::invalid(
                "invalid_name",
                "a name is 1 to 128 characters, no `/`",
            ));
        }
        check_timeouts(&[
            ("timeout_sec", req.timeout_sec),
            ("idle_timeout_sec", req.idle_timeout_sec),
        ])?;
        if req.env.len() > MAX_ENV || req.env.keys().any(|k| !valid_env_key(k)) {
            return Err(ApiError::invalid(
                "invalid_env",
                "env keys are [A-Za-z_][A-Za-z0-9_]*",
            ));
        }
        if req.env.values().any(|v| v.contains('\0')) {
            return Err(ApiError::invalid(
                "invalid_env",
                "an env value cannot hold a NUL byte",
            ));
        }
        let size_name = req.size.as_deref().unwrap_or(crate::model::DEFAULT_SIZE);
        let Some(size) = crate::model::size(size_name) else {
            return Err(ApiError::invalid(
                "invalid_size",
                format!("unknown size `{size_name}` (xs, small, medium, large, xl)"),
            ));
        };

        let _guard = self.create_lock.lock().await;
        let body_sha256 = hex(&Sha256::digest(
            serde_json::to_vec(&req).unwrap_or_default(),
        ));
        let idem_path = idempotency_key.map(|k| {
            self.data_dir
                .join("idempotency")
                .join(format!("{}.json", hex(&Sha256::digest(k.as_bytes()))))
        });
        let mut id = None;
        if let Some(path) = &idem_path {
            let seen = store::read_json::<IdempotencyRecord>(path)
                .map_err(|e| ApiError::internal(e.to_string()))?;
            if let Some(seen) = seen.filter(|s| now_ms() - s.created_at_ms < IDEMPOTENCY_TTL_MS) {
                if seen.body_sha256 != body_sha256 {
                    return Err(ApiError::new(
                        axum::http::StatusCode::CONFLICT,
                        "idempotency_key_reused",
                        "this Idempotency-Key was used with a different request body",
                    ));
                }
                if let Ok(entry) = self.get(&seen.sandbox_id) {
                    return Ok(entry.snapshot());
                }
                // Recorded, then a crash before the sandbox existed: create it under that id.
                id = Some(seen.sandbox_id);
            }
        }
        if let Some(n) = &name
            && self.by_name(n).is_ok()
        {
            return Err(ApiError::new(
                axum::http::StatusCode::CONFLICT,
                "name_taken",
                format!("a sandbox named `{n}` exists"),
            ));
        }
        if !req.metadata.contains_key(crate::deployments::RUNTIME_KEY) {
            self.check_quota(
                req.external_user_id.as_deref(),
                crate::quotas::Action::Create,
            )?;
        }
        let id = id.unwrap_or_else(new_id);
        let outbound = req.allow_internet_access.unwrap_or(true);
        let taken = self.take_net_index(outbound)?;
        let net_index = taken.map(|(i, _)| i);
        let net_ready = taken.is_some_and(|(_, ready)| ready);
        if let Some(path) = &idem_path {
            store::write_json(
                path,
                &IdempotencyRecord {
                    body_sha256,
                    sandbox_id: id.clone(),
                    created_at_ms: now_ms(),
                },
            )
            .map_err(|e| ApiError::internal(e.to_string()))?;
        }
        let now = now_ms();
        let record = Sandbox {
            id: id.clone(),
            name,
            template_id,
            state: State::Running,
            env: req.env,
            metadata: req.metadata,
            tags: req.tags,
            external_user_id: req.external_user_id,
            external_project_id: req.external_project_id,
            external_workspace_id: req.external_workspace_id,
            workspace_id: req.workspace_id,
            project_id: req.project_id,
            timeout_sec: req.timeout_sec,
            idle_timeout_sec: req.idle_timeout_sec,
            persistent: req.persistent.unwrap_or(false),
            always_on: req.always_on.unwrap_or(false),
            created_at_ms: now,
            updated_at_ms: now,
            destroyed_at_ms: None,
            timeout_base_ms: now,
            net_index,
            outbound,
            resources: self.iso.resources(size),
        };
        confine(&self.iso, &record, net_ready)?;
        let dir = self.data_dir.join("sandboxes").join(&id);
        let files = self.storage.sandbox_dir(&id);
        match source {
            FilesSource::Empty => self.storage.create(&files),
            FilesSource::Snapshot(src) => {
                let (storage, dst) = (self.storage.clone(), files.clone());
                tokio::task::spawn_blocking(move || storage.snapshot(&src, &dst, true))
                    .await
                    .map_err(|e| ApiError::internal(e.to_string()))?
            }
            FilesSource::Live(parent) => {
                self.capture(&parent, files.clone(), true).await?;
                Ok(())
            }
        }
        .and_then(|()| self.prepare_files(&files, &record))
        .map_err(|e| ApiError::internal(format!("creating the workspace: {e}")))?;
        let entry = Arc::new(Entry::new(id.clone(), dir, files, record.clone()));
        entry.touch();
        entry.persist(&record)?;
        self.sandboxes
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.clone(), entry);
        let mut data = serde_json::Map::new();
        data.insert("image".into(), record.template_id.clone().into());
        if let Some(u) = &record.external_user_id {
            data.insert("external_user_id".into(), u.clone().into());
        }
        self.events.emit("sandbox.created", &id, data);
        let mut ready = serde_json::Map::new();
        ready.insert("status".into(), "ready".into());
        self.events.emit("sandbox.ready", &id, ready);
        Ok(record)
    }

    pub fn pause(&self, entry: &Entry) -> Result<Sandbox, ApiError> {
        match entry.state() {
            State::Running => {
                self.freeze(entry, true)?;
                let record = entry.update(|r| r.state = State::Paused)?;
                self.events
                    .emit("sandbox.paused", &entry.id, serde_json::Map::new());
                Ok(record)
            }
            State::Paused => Ok(entry.snapshot()),
            s => Err(conflict(&entry.id, s, "pause")),
        }
    }

    pub fn resume(&self, entry: &Entry) -> Result<Sandbox, ApiError> {
        match entry.state() {
            State::Paused | State::Stopped => {
                let user = entry.snapshot().external_user_id;
                self.check_quota(user.as_deref(), crate::quotas::Action::Resume)?;
                self.freeze(entry, false)?;
                let record = entry.update(|r| {
                    r.state = State::Running;
                    r.timeout_base_ms = now_ms();
                })?;
                entry.touch();
                self.events
                    .emit("sandbox.resumed", &entry.id, serde_json::Map::new());
                if entry.relaunch_pending.swap(false, Ordering::SeqCst) {
                    for spec in entry.restart_specs() {
                        self.launch(entry, spec.command, spec.cwd, spec.env, spec.name, false)?;
                    }
                }
                Ok(record)
            }
            State::Running => Ok(entry.snapshot()),
            s => Err(conflict(&entry.id, s, "resume")),
        }
    }

    /// Keeps the files, ends the processes.
    pub async fn stop(&self, entry: &Entry) -> Result<Sandbox, ApiError> {
        match entry.state() {
            State::Running | State::Paused => {
                self.end_processes(entry).await;
                let record = entry.update(|r| r.state = State::Stopped)?;
                self.events
                    .emit("sandbox.stopped", &entry.id, serde_json::Map::new());
                Ok(record)
            }
            State::Stopped => Ok(entry.snapshot()),
            s => Err(conflict(&entry.id, s, "stop")),
        }
    }

    pub fn extend(&self, entry: &Entry, timeout_sec: Option<u64>) -> Result<Sandbox, ApiError> {
        check_timeouts(&[("timeout_sec", timeout_sec)])?;
        entry.update(|r| {
            if let Some(t) = timeout_sec {
                r.timeout_sec = Some(t);
            }
            r.timeout_base_ms = now_ms();
        })
    }

    /// Ends the processes and removes the files; the record stays, destroyed.
    pub async fn destroy(&self, entry: &Entry) -> Result<Sandbox, ApiError> {
        if entry.state() == State::Destroyed {
            return Ok(entry.snapshot());
        }
        // A deploy build in progress finishes first (its version would fail otherwise).
        let _no_builds = entry.builds.write().await;
        if entry.state() == State::Destroyed {
            return Ok(entry.snapshot());
        }
        self.end_processes(entry).await;
        // The last interval of usage is read before the sandbox's resources go.
        self.sample_usage(entry);
        let record = entry.update(|r| {
            r.state = State::Destroyed;
            r.destroyed_at_ms = Some(now_ms());
            r.env.clear();
        })?;
        entry.watch.close();
        if let Some(cg) = &self.iso.cgroups {
            cg.remove(&entry.id)
                .map_err(|e| ApiError::internal(format!("removing cgroups: {e}")))?;
        }
        if let Some(index) = record.net_index {
            self.iso
                .net
                .as_ref()
                .map(|n| n.remove(index))
                .transpose()
                .map(|_| ())
                .map_err(|e| ApiError::internal(format!("removing the network: {e}")))?;
        }
        let _ = std::fs::remove_file(entry.restart_file());
        self.storage
            .delete(&entry.files)
            .map_err(|e| ApiError::internal(format!("removing the files: {e}")))?;
        self.events
            .emit("sandbox.destroyed", &entry.id, serde_json::Map::new());
        let processes = entry.dir.join("processes");
        if processes.exists() {
            std::fs::remove_dir_all(&processes)
                .map_err(|e| ApiError::internal(format!("removing process logs: {e}")))?;
        }
        Ok(record)
    }

    fn prune_idempotency(&self) {
        let dir = self.data_dir.join("idempotency");
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return;
        };
        for e in entries.flatten() {
            if let Ok(Some(r)) = store::read_json::<IdempotencyRecord>(&e.path())
                && now_ms() - r.created_at_ms >= IDEMPOTENCY_TTL_MS
            {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }

    /// Completes a sandbox's files (new, forked, restored or reloaded): ownership and disk limit.
    pub(crate) fn prepare_files(&self, files: &Path, record: &Sandbox) -> std::io::Result<()> {
        self.storage
            .prepare(files, self.iso.jail.owner(), disk_bytes(record))
    }

    /// What confines `entry`'s processes.
    pub fn confinement(&self, entry: &Entry) -> Confinement {
        let record = entry.snapshot();
        Confinement {
            cgroup_procs: self
                .iso
                .cgroups
                .as_ref()
                .map(|c| c.procs_files(&entry.id))
                .unwrap_or_default(),
            netns: record
                .net_index
                .filter(|_| self.iso.net.is_some())
                .map(Net::ns_path),
        }
    }

    /// Starts a background process in `entry` (and remembers it when `remember` and flagged).
    pub fn launch(
        &self,
        entry: &Entry,
        command: String,
        cwd: String,
        env: BTreeMap<String, String>,
        name: Option<String>,
        restart: bool,
    ) -> Result<Arc<crate::processes::Proc>, ApiError> {
        let cmd = self.iso.jail.command(
            &entry.workspace(),
            &self.confinement(entry),
            &cwd,
            &env,
            &command,
        );
        let proc = entry
            .processes
            .start(cmd, command.clone(), cwd.clone(), name.clone(), restart)
            .map_err(|e| ApiError::internal(format!("starting the process: {e}")))?;
        if restart {
            entry.remember(RestartSpec {
                command,
                cwd,
                env,
                name,
            })?;
        }
        Ok(proc)
    }

    fn freeze(&self, entry: &Entry, frozen: bool) -> Result<(), ApiError> {
        match &self.iso.cgroups {
            Some(cg) => cg
                .freeze(&entry.id, frozen)
                .map_err(|e| ApiError::internal(format!("freezer: {e}"))),
            None => {
                let signal = if frozen {
                    crate::processes::Signal::Stop
                } else {
                    crate::processes::Signal::Continue
                };
                entry.processes.signal_all(signal);
                Ok(())
            }
        }
    }

    /// Ends every process of the sandbox, those that left their process group included.
    pub(crate) async fn end_processes(&self, entry: &Entry) {
        if let Some(cg) = &self.iso.cgroups {
            let (cg, id) = (cg.clone(), entry.id.clone());
            let _ = tokio::task::spawn_blocking(move || kill_cgroup(&cg, &id)).await;
        }
        entry.processes.kill_all().await;
    }

    /// Ends every sandbox's processes (sandboxd is stopping; the sandboxes stay).
    pub async fn shutdown(&self) {
        for entry in self.all() {
            self.end_processes(&entry).await;
        }
    }

    fn take_net_index(&self, outbound: bool) -> Result<Option<(u32, bool)>, ApiError> {
        self.iso
            .net
            .as_ref()
            .map(|n| n.take(outbound))
            .transpose()
            .map_err(|e| {
                ApiError::new(
                    axum::http::StatusCode::SERVICE_UNAVAILABLE,
                    "capacity_exhausted",
                    e.to_string(),
                )
            })
    }

    /// Pauses (persistent) or destroys sandboxes idle past `idle_timeout_sec`, or past
    /// `timeout_sec` since their last extend; `always_on` sandboxes are left alone.
    pub async fn reap_idle(&self) {
        let now = now_ms();
        for entry in self.all() {
            let r = entry.snapshot();
            if r.state != State::Running || r.always_on {
                continue;
            }
            let idle_ms = now - entry.last_activity_ms.load(Ordering::Relaxed);
            let idle = r
                .idle_timeout_sec
                .is_some_and(|t| idle_ms >= crate::model::secs_to_ms(t));
            let expired = r
                .timeout_sec
                .is_some_and(|t| now - r.timeout_base_ms >= crate::model::secs_to_ms(t));
            if !(idle || expired) {
                continue;
            }
            let outcome = if r.persistent {
                self.pause(&entry).map(|_| "paused")
            } else {
                self.destroy(&entry).await.map(|_| "destroyed")
            };
            match outcome {
                Ok(what) => {
                    tracing::info!(sandbox = %r.id, idle, expired, "{what} after its timeout")
                }
                Err(e) => {
                    tracing::warn!(sandbox = %r.id, error = %e.message, "timeout handling failed")
                }
            }
        }
    }

    /// Removes every host resource of every sandbox (cgroups, network namespaces), leaving the
    /// records: `slipway-sandboxd --purge`, for uninstalling or after tests.
    pub async fn purge(&self) {
        if let Some(net) = &self.iso.net {
            net.drain_pool();
        }
        for entry in self.all() {
            self.end_processes(&entry).await;
            if let Some(cg) = &self.iso.cgroups {
                let _ = cg.remove(&entry.id);
            }
            if let (Some(index), Some(net)) = (entry.snapshot().net_index, &self.iso.net) {
                let _ = net.remove(index);
            }
        }
        if let Some(net) = &self.iso.net {
            net.remove_all_owned();
        }
        crate::isolation::view::unmount(&self.data_dir);
        self.storage.release();
    }

    /// Every sandbox, for shutdown.
    pub fn all(&self) -> Vec<Arc<Entry>> {
        self.sandboxes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }
}

impl Entry {
    fn new(id: String, dir: PathBuf, files: PathBuf, record: Sandbox) -> Self {
        Entry {
            processes: Processes::new(dir.join("processes")),
            watch: Hub::new(files.join("workspace")),
            id,
            dir,
            files,
            files_lock: tokio::sync::Mutex::new(()),
            record: Mutex::new(record),
            exec_count: AtomicU64::new(0),
            usage: Mutex::new(crate::usage::Counters::default()),
            last_activity_ms: AtomicI64::new(now_ms()),
            relaunch_pending: AtomicBool::new(false),
            builds: Arc::default(),
        }
    }
}

/// Kills every process in a sandbox's cgroups. Frozen first, so nothing can fork while it is
/// being killed (a fork bomb included); the SIGKILLs land together when it thaws.
fn kill_cgroup(cg: &Cgroups, id: &str) {
    for _ in 0..100 {
        if cg.pids(id).is_empty() {
            break;
        }
        let _ = cg.freeze(id, true);
        for pid in cg.pids(id) {
            if let Some(p) = rustix::process::Pid::from_raw(pid) {
                let _ = rustix::process::kill_process(p, rustix::process::Signal::KILL);
            }
        }
        let _ = cg.freeze(id, false);
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// A sandbox's disk size in bytes.
fn disk_bytes(record: &Sandbox) -> u64 {
    record.resources.disk_size_mb.saturating_mul(1024 * 1024)
}

/// Creates the sandbox's cgroups and network namespace (both idempotent).
fn confine(iso: &Isolation, record: &Sandbox, net_ready: bool) -> Result<(), ApiError> {
    if let Some(cg) = &iso.cgroups {
        cg.create(&record.id, iso.limits(&record.resources))
            .map_err(|e| ApiError::internal(format!("creating cgroups: {e}")))?;
    }
    if let (Some(net), Some(index), false) = (&iso.net, record.net_index, net_ready) {
        net.setup(index, record.outbound)
            .map_err(|e| ApiError::internal(format!("creating the network: {e}")))?;
    }
    Ok(())
}

fn conflict(id: &str, state: State, op: &str) -> ApiError {
    ApiError::new(
        axum::http::StatusCode::CONFLICT,
        "invalid_state",
        format!("cannot {op} sandbox `{id}` while it is {}", state.as_str()),
    )
}

/// Refuses a timeout past `MAX_TIMEOUT_SEC` (a client's number is never trusted to fit the
/// arithmetic it goes into).
pub(crate) fn check_timeouts(values: &[(&str, Option<u64>)]) -> Result<(), ApiError> {
    for (field, value) in values {
        if let Some(v) = value
            && *v > crate::model::MAX_TIMEOUT_SEC
        {
            return Err(ApiError::invalid(
                "invalid_timeout",
                format!(
                    "`{field}` is {v}: at most {} seconds (30 days)",
                    crate::model::MAX_TIMEOUT_SEC
                ),
            ));
        }
    }
    Ok(())
}

/// The environment variable names sandboxes accept (exec and create use the same rule).
pub(crate) fn valid_env_key(k: &str) -> bool {
    let mut chars = k.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && k.len() <= 128
}

pub(crate) fn new_id() -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    let suffix: String = (0..20)
        .map(|_| char::from(ALPHABET[rng.random_range(0..ALPHABET.len())]))
        .collect();
    format!("sbx_{suffix}")
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
