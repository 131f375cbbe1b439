//! Deployments: a sandbox's built output frozen into a content-addressed artifact outside the
//! sandbox, so it outlives it. A deploy answers at once with a version in `building`; the build
//! runs in the sandbox; its output's files are stored by their sha256 and listed in a manifest
//! whose own sha256 is the version's digest. A finished version never changes; the deployment
//! serves one version at a time (the newest ready one, or what rollback or promote points it at).
//!
//! On disk, under the data dir: `deployments/<id>/deployment.json`, `…/versions/<vid>.json` and
//! `.log`; `artifacts/blobs/<sha256>`, `artifacts/manifests/<digest>.json`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use crate::api::ApiError;
use crate::clock::now_ms;
use crate::host::hex;
use crate::store;

mod artifacts;
mod build;
mod runtime;

pub use artifacts::{Artifacts, FileRef, Manifest};
pub use build::BUILD_TIMEOUT;
pub use runtime::RUNTIME_KEY;

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
    /// A dynamic deployment: the command that serves the app, and its port.
    #[serde(default)]
    pub runtime: Option<Runtime>,
    pub artifact_sha256: Option<String>,
    pub artifact_files: u64,
    pub artifact_bytes: u64,
    pub error: Option<String>,
    pub created_at_ms: i64,
    pub finished_at_ms: Option<i64>,
}

pub struct Deployments {
    dir: PathBuf,
    pub artifacts: Artifacts,
    state: Mutex<State>,
    /// Version id -> the sandbox serving it (dynamic versions), kept in `runtimes.json`.
    runtimes: Mutex<BTreeMap<String, String>>,
    /// One runtime started at a time.
    runtime_lock: tokio::sync::Mutex<()>,
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
        std::fs::create_dir_all(&dir)?;
        let artifacts = Artifacts::open(&data_dir.join("artifacts"))?;
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
        let runtimes = store::read_json(&dir.join("runtimes.json"))?.unwrap_or_default();
        Ok(Self {
            dir,
            artifacts,
            state: Mutex::new(state),
            runtimes: Mutex::new(runtimes),
            runtime_lock: tokio::sync::Mutex::new(()),
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

    /// Deletes a deployment: it stops serving at once (its host name no longer resolves to
    /// it), its records go, and its name may be deployed again as a new deployment. Returns the
    /// sandboxes that served its dynamic versions, for the caller to destroy. Artifacts stay
    /// (content-addressed, possibly shared).
    pub fn delete(&self, id: &str) -> Result<Vec<String>, ApiError> {
        let versions: Vec<String> = {
            let mut st = self.lock();
            if st.deployments.remove(id).is_none() {
                return Err(ApiError::not_found(
                    "deployment_not_found",
                    format!("deployment `{id}` not found"),
                ));
            }
            let ids: Vec<String> = st
                .versions
                .values()
                .filter(|v| v.deployment_id == id)
                .map(|v| v.id.clone())
                .collect();
            for v in &ids {
                st.versions.remove(v);
            }
            ids
        };
        let serving: Vec<String> = {
            let mut runtimes = self.runtimes.lock().unwrap_or_else(|p| p.into_inner());
            let gone: Vec<String> = versions.iter().filter_map(|v| runtimes.remove(v)).collect();
            self.save_runtimes(&runtimes)?;
            gone
        };
        std::fs::remove_dir_all(self.deployment_dir(id)).or_else(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Ok(())
            } else {
                Err(ApiError::internal(format!("removing deployment {id}: {e}")))
            }
        })?;
        Ok(serving)
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
            runtime: req.runtime.clone(),
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
        if !self.artifacts.has(&digest) {
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

    /// What the deployment serves now: its version and that version's manifest.
    pub fn serving(&self, d: &Deployment) -> Option<(Version, Arc<Manifest>)> {
        let vid = d.active_version_id.as_ref()?;
        let v = self.lock().versions.get(vid).cloned()?;
        let m = self.artifacts.manifest(v.artifact_sha256.as_deref()?)?;
        Some((v, m))
    }
}

/// How a dynamic version is served: `command` runs in a sandbox of its own made from the artifact
/// (see `runtime`), listening on `port`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Runtime {
    pub command: String,
    pub port: u16,
}

/// What a deploy asks for, checked.
#[derive(Clone, Debug)]
pub struct Begin {
    pub name: Option<String>,
    pub deployment_id: Option<String>,
    pub build_command: Option<String>,
    pub output_path: String,
    pub entrypoint: String,
    pub runtime: Option<Runtime>,
}
