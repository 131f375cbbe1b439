//! Artifacts: a build's output stored outside any sandbox, content-addressed. Each regular file
//! is stored once under `blobs/<sha256>`; a manifest (entrypoint and files sorted by path, each
//! with size and sha256) is stored under `manifests/<digest>.json`, its digest being the sha256 of
//! its canonical JSON. Blobs are written before the manifest, so a manifest never names a missing
//! blob; nothing here is ever changed once written.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::host::hex;
use crate::store;

/// Largest artifact: files and bytes.
const MAX_FILES: usize = 50_000;
const MAX_BYTES: u64 = 2 << 30;

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

pub struct Artifacts {
    blobs: PathBuf,
    manifests: PathBuf,
    /// Manifests read so far (they never change).
    cache: Mutex<HashMap<String, Arc<Manifest>>>,
}

impl Artifacts {
    pub fn open(dir: &Path) -> std::io::Result<Self> {
        let (blobs, manifests) = (dir.join("blobs"), dir.join("manifests"));
        std::fs::create_dir_all(&blobs)?;
        std::fs::create_dir_all(&manifests)?;
        Ok(Self {
            blobs,
            manifests,
            cache: Mutex::default(),
        })
    }

    /// Whether the artifact `digest` is stored.
    pub fn has(&self, digest: &str) -> bool {
        self.manifests.join(format!("{digest}.json")).is_file()
    }

    /// The manifest of artifact `digest`, if stored.
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

    /// Where blobs are stored (for `unpack` on a blocking thread).
    pub fn blobs_dir(&self) -> PathBuf {
        self.blobs.clone()
    }

    /// Where the file with this sha256 is stored.
    pub fn blob(&self, sha256: &str) -> PathBuf {
        self.blobs.join(sha256)
    }

    /// Copies the output directory into the blob store and writes its manifest; returns the
    /// manifest and its digest.
    pub fn freeze(
        &self,
        output: std::os::fd::OwnedFd,
        entrypoint: &str,
    ) -> Result<(Manifest, String), String> {
        let mut files = Vec::new();
        let mut total = 0u64;
        // Directories to visit, by their names under the output, each opened from the output
        // one name at a time when its turn comes (links never followed, one open at a time).
        let mut stack: Vec<Vec<String>> = vec![Vec::new()];
        let mut dirs = 0usize;
        while let Some(names) = stack.pop() {
            let prefix = names.join("/");
            let mut dir = output
                .try_clone()
                .map_err(|e| format!("reading the output: {e}"))?;
            for name in &names {
                dir = crate::rooted::subdir(&dir, name)
                    .map_err(|e| format!("reading {prefix}: {e}"))?;
            }
            dirs += 1;
            if dirs > MAX_FILES {
                return Err(format!("the output has more than {MAX_FILES} directories"));
            }
            let listed =
                crate::rooted::entries(&dir).map_err(|e| format!("reading the output: {e}"))?;
            for (name, meta) in listed {
                let rel = if prefix.is_empty() {
                    name.clone()
                } else {
                    format!("{prefix}/{name}")
                };
                if meta.is_dir() {
                    let mut sub = names.clone();
                    sub.push(name);
                    stack.push(sub);
                    continue;
                }
                if !meta.is_file() {
                    continue;
                }
                let bytes = match crate::rooted::read_child(&dir, &name, MAX_BYTES) {
                    Ok(b) => b,
                    // Replaced by something else meanwhile: not part of the output.
                    Err(crate::rooted::ReadError::NotRegular(_)) => continue,
                    Err(e) => return Err(format!("reading {rel}: {e}")),
                };
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
        // A dynamic deployment's command decides what it serves: no entrypoint to check.
        if !entrypoint.is_empty() && manifest.find(entrypoint).is_none() {
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

/// Writes an artifact's files under `root` (a new runtime's workspace), from the blob store.
pub fn unpack(blobs: &Path, manifest: &Manifest, root: &Path) -> std::io::Result<()> {
    for f in &manifest.files {
        let to = root.join(&f.path);
        if let Some(dir) = to.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::copy(blobs.join(&f.sha256), &to)?;
    }
    Ok(())
}
