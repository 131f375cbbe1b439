//! Deployments: a sandbox's built output frozen into a content-addressed artifact outside the
//! sandbox, so it outlives it. A deploy answers at once with a version in `building`; the build
//! runs in the sandbox; its output's files are stored by their sha256 and listed in a manifest
//! whose own sha256 is the version's digest. A finished version never changes; the deployment
//! serves one version at a time (the newest ready one, or what rollback or promote points it at).
//!
//! On disk, under the data dir: `deployments/<id>/deployment.json`, `…/versions/<vid>.json` and
//! `.log`; `artifacts/blobs/<sha256>`, `artifacts/manifests/<digest>.json`.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::api::ApiError;
use crate::clock::now_ms;
use crate::host::{Entry, Host, hex};
use crate::store;

/// The longest a build command may run.
pub const BUILD_TIMEOUT: Duration = Duration::from_secs(900);
/// Largest artifact: files and bytes.
const MAX_FILES: usize = 50_000;
const MAX_BYTES: u64 = 2 << 30;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Deployment {
    pub id: String,
    pub name: String,
    pub slug: String,
    pub active_version_id: Option<String>,
    pub source_sandbox_id: Option<String>,
    pub external_user_id: Option<String>,
    pub external_project_id: Option<String>,
    pub external_workspace_id: Option<String>,
    pub versions: u64,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VersionState {
    Building,
    Ready,
    Failed,
}

impl VersionState {
    pub fn as_str(self) -> &'static str {
        match self {
            VersionState::Building => "building",
            VersionState::Ready => "ready",
            VersionState::Failed => "failed",
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Version {
    pub id: String,
    pub deployment_id: String,
    pub version_number: u64,
    pub state: VersionState,
    pub source_sandbox_id: String,
    pub build_command: Option<String>,
    /// In the sandbox, e.g. `/workspace/dist`.
    pub output_path: String,
    pub entrypoint: String,
    pub artifact_sha256: Option<String>,
    pub artifact_files: u64,
    pub artifact_bytes: u64,
    pub error: Option<String>,
    pub created_at_ms: i64,
    pub finished_at_ms: Option<i64>,
}

/// One file of an artifact.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRef {
    /// Relative to the output directory, `/`-separated.
    pub path: String,
    pub size: u64,
    pub sha256: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub entrypoint: String,
    pub files: Vec<FileRef>,
}

impl Manifest {
    /// The artifact's identity: sha256 over the manifest's canonical JSON (files sorted by path).
    pub fn digest(&self) -> String {
        hex(&Sha256::digest(
            serde_json::to_vec(self).unwrap_or_default(),
        ))
    }

    pub fn find(&self, path: &str) -> Option<&FileRef> {
        self.files
            .binary_search_by(|f| f.path.as_str().cmp(path))
            .ok()
            .map(|i| &self.files[i])
    }
}

pub struct Deployments {
    dir: PathBuf,
    blobs: PathBuf,
    manifests: PathBuf,
    state: Mutex<State>,
    /// Manifests read so far (they never change).
    cache: Mutex<HashMap<String, Arc<Manifest>>>,
}

#[derive(Default)]
struct State {
    deployments: BTreeMap<String, Deployment>,
    versions: BTreeMap<String, Version>,
}

fn new_id(prefix: &str) -> String {
    let bytes: [u8; 8] = rand::random();
    format!("{prefix}_{}", hex(&bytes))
}

/// A DNS label from a name: lower-case letters, digits and dashes, plus a short random suffix
/// so names need not be unique.
fn slug_for(name: &str) -> String {
    let mut base: String = name
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    base = base
        .split('-')
        .filter(|p| !p.is_empty())
        .collect::<Vec<_>>()
        .join("-");
    base.truncate(40);
    let base = base.trim_end_matches('-');
    let suffix = hex(&rand::random::<[u8; 3]>());
    if base.is_empty() {
        format!("app-{suffix}")
    } else {
        format!("{base}-{suffix}")
    }
}

impl Deployments {
    /// Loads every deployment; a version still `building` was cut short by a restart and is
    /// marked failed (its sandbox may be gone; deploying again is the way on).
    pub fn open(data_dir: &Path) -> std::io::Result<Self> {
        let dir = data_dir.join("deployments");
        let artifacts = data_dir.join("artifacts");
        let (blobs, manifests) = (artifacts.join("blobs"), artifacts.join("manifests"));
        for d in [&dir, &blobs, &manifests] {
            std::fs::create_dir_all(d)?;
        }
        let mut state = State::default();
        for e in std::fs::read_dir(&dir)? {
            let ddir = e?.path();
            let Some(d) = store::read_json::<Deployment>(&ddir.join("deployment.json"))? else {
                continue;
            };
            let vdir = ddir.join("versions");
            if vdir.is_dir() {
                for v in std::fs::read_dir(&vdir)? {
                    let path = v?.path();
                    if path.extension().is_none_or(|x| x != "json") {
                        continue;
                    }
                    let Some(mut version) = store::read_json::<Version>(&path)? else {
                        continue;
                    };
                    if version.state == VersionState::Building {
                        version.state = VersionState::Failed;
                        version.error = Some("sandboxd restarted during the build".into());
                        version.finished_at_ms = Some(now_ms());
                        store::write_json(&path, &version)?;
                    }
                    state.versions.insert(version.id.clone(), version);
                }
            }
            state.deployments.insert(d.id.clone(), d);
        }
        Ok(Self {
            dir,
            blobs,
            manifests,
            state: Mutex::new(state),
            cache: Mutex::default(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn deployment_dir(&self, id: &str) -> PathBuf {
        self.dir.join(id)
    }

    fn version_path(&self, v: &Version) -> PathBuf {
        self.deployment_dir(&v.deployment_id)
            .join("versions")
            .join(format!("{}.json", v.id))
    }

    pub fn log_path(&self, v: &Version) -> PathBuf {
        self.deployment_dir(&v.deployment_id)
            .join("versions")
            .join(format!("{}.log", v.id))
    }

    fn save_deployment(&self, d: &Deployment) -> Result<(), ApiError> {
        store::write_json(&self.deployment_dir(&d.id).join("deployment.json"), d)
            .map_err(|e| ApiError::internal(format!("saving deployment {}: {e}", d.id)))
    }

    fn save_version(&self, v: &Version) -> Result<(), ApiError> {
        std::fs::create_dir_all(self.deployment_dir(&v.deployment_id).join("versions"))
            .and_then(|()| store::write_json(&self.version_path(v), v))
            .map_err(|e| ApiError::internal(format!("saving version {}: {e}", v.id)))
    }

    pub fn list(&self) -> Vec<Deployment> {
        let mut all: Vec<Deployment> = self.lock().deployments.values().cloned().collect();
        all.sort_by(|a, b| (b.created_at_ms, &b.id).cmp(&(a.created_at_ms, &a.id)));
        all
    }

    pub fn get(&self, id: &str) -> Result<Deployment, ApiError> {
        self.lock().deployments.get(id).cloned().ok_or_else(|| {
            ApiError::not_found(
                "deployment_not_found",
                format!("deployment `{id}` not found"),
            )
        })
    }

    pub fn by_slug(&self, slug: &str) -> Option<Deployment> {
        self.lock()
            .deployments
            .values()
            .find(|d| d.slug == slug)
            .cloned()
    }

    /// The deployment's versions, newest first.
    pub fn versions(&self, id: &str) -> Vec<Version> {
        let mut v: Vec<Version> = self
            .lock()
            .versions
            .values()
            .filter(|v| v.deployment_id == id)
            .cloned()
            .collect();
        v.sort_by_key(|x| std::cmp::Reverse(x.version_number));
        v
    }

    pub fn version(&self, id: &str, vid: &str) -> Result<Version, ApiError> {
        self.lock()
            .versions
            .get(vid)
            .filter(|v| v.deployment_id == id)
            .cloned()
            .ok_or_else(|| {
                ApiError::not_found("version_not_found", format!("version `{vid}` not found"))
            })
    }

    /// Starts a deployment (or a new version of an existing one) in state `building`.
    pub fn begin(
        &self,
        req: &Begin,
        sandbox: &crate::model::Sandbox,
    ) -> Result<(Deployment, Version), ApiError> {
        let now = now_ms();
        let mut st = self.lock();
        let mut d = match &req.deployment_id {
            Some(id) => st.deployments.get(id).cloned().ok_or_else(|| {
                ApiError::not_found(
                    "deployment_not_found",
                    format!("deployment `{id}` not found"),
                )
            })?,
            None => {
                let name = req
                    .name
                    .clone()
                    .or(sandbox.name.clone())
                    .unwrap_or_else(|| "app".into());
                Deployment {
                    id: new_id("dep"),
                    slug: slug_for(&name),
                    name,
                    active_version_id: None,
                    source_sandbox_id: None,
                    external_user_id: sandbox.external_user_id.clone(),
                    external_project_id: sandbox.external_project_id.clone(),
                    external_workspace_id: sandbox.external_workspace_id.clone(),
                    versions: 0,
                    created_at_ms: now,
                    updated_at_ms: now,
                }
            }
        };
        d.versions += 1;
        d.source_sandbox_id = Some(sandbox.id.clone());
        d.updated_at_ms = now;
        let v = Version {
            id: new_id("ver"),
            deployment_id: d.id.clone(),
            version_number: d.versions,
            state: VersionState::Building,
            source_sandbox_id: sandbox.id.clone(),
            build_command: req.build_command.clone(),
            output_path: req.output_path.clone(),
            entrypoint: req.entrypoint.clone(),
            artifact_sha256: None,
            artifact_files: 0,
            artifact_bytes: 0,
            error: None,
            created_at_ms: now,
            finished_at_ms: None,
        };
        self.save_version(&v)?;
        self.save_deployment(&d)?;
        st.deployments.insert(d.id.clone(), d.clone());
        st.versions.insert(v.id.clone(), v.clone());
        Ok((d, v))
    }

    /// Records a version's outcome; a ready version becomes the one served.
    fn finish(&self, mut v: Version, outcome: Result<(Manifest, String), String>) -> Version {
        v.finished_at_ms = Some(now_ms());
        match outcome {
            Ok((m, digest)) => {
                v.state = VersionState::Ready;
                v.artifact_files = m.files.len() as u64;
                v.artifact_bytes = m.files.iter().map(|f| f.size).sum();
                v.artifact_sha256 = Some(digest);
            }
            Err(e) => {
                v.state = VersionState::Failed;
                v.error = Some(e);
            }
        }
        let mut st = self.lock();
        if let Err(e) = self.save_version(&v) {
            tracing::error!(version = %v.id, error = %e.message, "saving a finished version");
        }
        st.versions.insert(v.id.clone(), v.clone());
        let active_number = st
            .deployments
            .get(&v.deployment_id)
            .and_then(|d| d.active_version_id.as_ref())
            .and_then(|a| st.versions.get(a))
            .map(|a| a.version_number);
        // A newer ready version takes over; an older one finishing late does not.
        let takes_over =
            v.state == VersionState::Ready && active_number.is_none_or(|n| v.version_number > n);
        if takes_over && let Some(d) = st.deployments.get_mut(&v.deployment_id) {
            d.active_version_id = Some(v.id.clone());
            d.updated_at_ms = now_ms();
            let d = d.clone();
            if let Err(e) = self.save_deployment(&d) {
                tracing::error!(deployment = %d.id, error = %e.message, "saving a deployment");
            }
        }
        v
    }

    /// Points the deployment at a ready version (rollback and promote; nothing is rebuilt).
    pub fn point(&self, id: &str, vid: &str) -> Result<Deployment, ApiError> {
        let mut st = self.lock();
        let v = st
            .versions
            .get(vid)
            .filter(|v| v.deployment_id == id)
            .cloned()
            .ok_or_else(|| {
                ApiError::not_found("version_not_found", format!("version `{vid}` not found"))
            })?;
        if v.state != VersionState::Ready {
            return Err(ApiError::new(
                axum::http::StatusCode::CONFLICT,
                "version_not_ready",
                format!(
                    "version `{vid}` is {}; only a ready version can be served",
                    v.state.as_str()
                ),
            ));
        }
        let digest = v.artifact_sha256.clone().unwrap_or_default();
        if !self.manifests.join(format!("{digest}.json")).is_file() {
            return Err(ApiError::new(
                axum::http::StatusCode::GONE,
                "artifact_gone",
                format!("the artifact of version `{vid}` is no longer stored"),
            ));
        }
        let d = st.deployments.get_mut(id).ok_or_else(|| {
            ApiError::not_found(
                "deployment_not_found",
                format!("deployment `{id}` not found"),
            )
        })?;
        d.active_version_id = Some(vid.to_string());
        d.updated_at_ms = now_ms();
        let d = d.clone();
        self.save_deployment(&d)?;
        Ok(d)
    }

    /// The version before the one served (for a rollback without a version id).
    pub fn previous_ready(&self, id: &str) -> Result<Version, ApiError> {
        let d = self.get(id)?;
        let versions = self.versions(id);
        let current = d
            .active_version_id
            .as_ref()
            .and_then(|a| versions.iter().find(|v| &v.id == a))
            .map_or(u64::MAX, |v| v.version_number);
        versions
            .into_iter()
            .find(|v| v.state == VersionState::Ready && v.version_number < current)
            .ok_or_else(|| {
                ApiError::new(
                    axum::http::StatusCode::CONFLICT,
                    "no_previous_version",
                    "there is no earlier ready version to roll back to",
                )
            })
    }

    pub fn manifest(&self, digest: &str) -> Option<Arc<Manifest>> {
        if let Some(m) = self
            .cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(digest)
        {
            return Some(m.clone());
        }
        let m: Manifest = store::read_json(&self.manifests.join(format!("{digest}.json")))
            .ok()
            .flatten()?;
        let m = Arc::new(m);
        self.cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(digest.to_string(), m.clone());
        Some(m)
    }

    pub fn blob(&self, sha256: &str) -> PathBuf {
        self.blobs.join(sha256)
    }

    /// What the deployment serves now: its version and that version's manifest.
    pub fn serving(&self, d: &Deployment) -> Option<(Version, Arc<Manifest>)> {
        let vid = d.active_version_id.as_ref()?;
        let v = self.lock().versions.get(vid).cloned()?;
        let m = self.manifest(v.artifact_sha256.as_deref()?)?;
        Some((v, m))
    }

    /// Copies the output directory into the blob store and writes the manifest: blobs first,
    /// each by rename, then the manifest, so a manifest never names a missing blob.
    fn freeze(&self, root: &Path, entrypoint: &str) -> Result<(Manifest, String), String> {
        let mut files = Vec::new();
        let mut total = 0u64;
        let mut stack = vec![root.to_path_buf()];
        while let Some(dir) = stack.pop() {
            let rd = std::fs::read_dir(&dir).map_err(|e| format!("reading the output: {e}"))?;
            for e in rd {
                let e = e.map_err(|e| format!("reading the output: {e}"))?;
                let path = e.path();
                // Never followed: a link may point outside the output (or the sandbox).
                let meta = std::fs::symlink_metadata(&path).map_err(|e| e.to_string())?;
                if meta.is_dir() {
                    stack.push(path);
                    continue;
                }
                if !meta.is_file() {
                    continue;
                }
                let rel = path
                    .strip_prefix(root)
                    .map_err(|e| e.to_string())?
                    .to_string_lossy()
                    .into_owned();
                let bytes = std::fs::read(&path).map_err(|e| format!("reading {rel}: {e}"))?;
                total += bytes.len() as u64;
                if files.len() >= MAX_FILES || total > MAX_BYTES {
                    return Err(format!(
                        "the output is too large (at most {MAX_FILES} files and {} GiB)",
                        MAX_BYTES >> 30
                    ));
                }
                let sha = hex(&Sha256::digest(&bytes));
                let blob = self.blobs.join(&sha);
                if !blob.is_file() {
                    store::write_atomic(&blob, &bytes)
                        .map_err(|e| format!("storing {rel}: {e}"))?;
                }
                files.push(FileRef {
                    path: rel,
                    size: bytes.len() as u64,
                    sha256: sha,
                });
            }
        }
        files.sort_by(|a, b| a.path.cmp(&b.path));
        let manifest = Manifest {
            entrypoint: entrypoint.to_string(),
            files,
        };
        if manifest.find(entrypoint).is_none() {
            return Err(format!(
                "the output has no `{entrypoint}` (the entrypoint); files: {}",
                manifest
                    .files
                    .iter()
                    .take(10)
                    .map(|f| f.path.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        let digest = manifest.digest();
        store::write_json(&self.manifests.join(format!("{digest}.json")), &manifest)
            .map_err(|e| format!("storing the manifest: {e}"))?;
        Ok((manifest, digest))
    }
}

/// What a deploy asks for, checked.
#[derive(Clone, Debug)]
pub struct Begin {
    pub name: Option<String>,
    pub deployment_id: Option<String>,
    pub build_command: Option<String>,
    pub output_path: String,
    pub entrypoint: String,
}

impl Host {
    /// Runs the build in the sandbox, freezes the output and records the outcome. The sandbox
    /// cannot be destroyed while this runs (destroy waits for it).
    pub async fn build_version(
        self: Arc<Self>,
        deployments: Arc<Deployments>,
        entry: Arc<Entry>,
        v: Version,
    ) -> Version {
        let _building = entry.builds.clone().read_owned().await;
        let mut log = String::new();
        let outcome = async {
            if entry.state() == crate::model::State::Destroyed {
                return Err("the sandbox was destroyed before the build started".to_string());
            }
            if let Some(cmd) = &v.build_command {
                log.push_str(&format!("$ {cmd}\n"));
                let env = entry.snapshot().env;
                let c = crate::exec::run_captured(
                    &self,
                    &entry,
                    cmd,
                    crate::paths::WORKSPACE,
                    &env,
                    BUILD_TIMEOUT,
                )
                .await
                .map_err(|e| e.message)?;
                log.push_str(&String::from_utf8_lossy(&c.stdout));
                log.push_str(&String::from_utf8_lossy(&c.stderr));
                log.push_str(&format!(
                    "\n[exit code {} after {:.1} s]\n",
                    c.exit_code,
                    c.duration.as_secs_f64()
                ));
                if c.timed_out {
                    return Err(format!(
                        "the build timed out after {} s",
                        BUILD_TIMEOUT.as_secs()
                    ));
                }
                if c.exit_code != 0 {
                    return Err(format!("the build failed with exit code {}", c.exit_code));
                }
            }
            let resolved = crate::paths::resolve(&entry.workspace(), &v.output_path)
                .map_err(|e| e.to_string())?;
            if !resolved.host.is_dir() {
                return Err(format!("`{}` is not a directory", v.output_path));
            }
            // The output is read as one piece: no write batch lands halfway through it.
            let _files = entry.files_lock.lock().await;
            let (deps, root, entrypoint) = (
                deployments.clone(),
                resolved.host.clone(),
                v.entrypoint.clone(),
            );
            tokio::task::spawn_blocking(move || deps.freeze(&root, &entrypoint))
                .await
                .map_err(|e| e.to_string())?
        }
        .await;
        match &outcome {
            Ok((m, digest)) => log.push_str(&format!(
                "frozen {} files ({} bytes) as sha256:{digest}\n",
                m.files.len(),
                m.files.iter().map(|f| f.size).sum::<u64>()
            )),
            Err(e) => log.push_str(&format!("failed: {e}\n")),
        }
        if let Err(e) = std::fs::write(deployments.log_path(&v), &log) {
            tracing::warn!(version = %v.id, error = %e, "saving the build log");
        }
        deployments.finish(v, outcome)
    }
}
