//! Sandbox paths: what a client names (`/workspace/src/app.js`, `src/app.js`) to a host path
//! under the sandbox's directory. Absolute paths outside `/workspace`, `..` escapes, NUL bytes
//! and symlinks that lead outside are refused. Symlinks are resolved the way the sandbox sees
//! them: an absolute target is read inside the sandbox (`/workspace/x`), never on the host.

use std::path::{Component, Path};

/// Where the sandbox's files live, as its processes see them.
pub const WORKSPACE: &str = "/workspace";

const MAX_SYMLINKS: usize = 40;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("path contains a NUL byte")]
    Nul,
    #[error("`{0}` is outside /workspace")]
    Outside(String),
    #[error("`{0}` escapes /workspace")]
    Escape(String),
    #[error("`{0}` leads through a symlink outside /workspace")]
    SymlinkEscape(String),
    #[error("`{0}`: too many levels of symlinks")]
    Loop(String),
    #[error("`{0}` is too long: a name is at most {MAX_NAME_BYTES} bytes, a path {MAX_PATH_BYTES}")]
    TooLong(String),
}

/// Longest name of one file or directory (the kernel's `NAME_MAX`).
pub const MAX_NAME_BYTES: usize = 255;
/// Longest path (the kernel's `PATH_MAX`, less room for the host prefix).
pub const MAX_PATH_BYTES: usize = 3072;

/// A resolved path: the names under `/workspace`, for `rooted` to reach through the
/// workspace's own descriptor (there is deliberately no host path to reopen).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// The components under `/workspace` (empty for `/workspace` itself).
    pub parts: Vec<String>,
}

impl Resolved {
    /// The path as the sandbox sees it: `/workspace/...`.
    pub fn sandbox_path(&self) -> String {
        sandbox_path(&self.parts)
    }
}

pub fn sandbox_path(parts: &[String]) -> String {
    if parts.is_empty() {
        WORKSPACE.to_string()
    } else {
        format!("{WORKSPACE}/{}", parts.join("/"))
    }
}

/// The components of `path` under `/workspace`, lexically normalised.
pub fn parts_of(path: &str) -> Result<Vec<String>, PathError> {
    if path.contains('\0') {
        return Err(PathError::Nul);
    }
    // Checked here, before anything is staged or committed: a name the kernel would refuse
    // must never reach the write journal.
    if path.len() > MAX_PATH_BYTES || path.split('/').any(|c| c.len() > MAX_NAME_BYTES) {
        return Err(PathError::TooLong(path.chars().take(64).collect()));
    }
    let rest = if path.starts_with('/') {
        match path.strip_prefix(WORKSPACE) {
            Some("") => "",
            Some(r) if r.starts_with('/') => r,
            _ => return Err(PathError::Outside(path.to_string())),
        }
    } else {
        path
    };
    normalise(&[], rest).ok_or_else(|| PathError::Escape(path.to_string()))
}

/// `base` joined with the relative `rest`, with `.` and `..` applied; `None` if it escapes.
fn normalise(base: &[String], rest: &str) -> Option<Vec<String>> {
    let mut parts = base.to_vec();
    for c in Path::new(rest).components() {
        match c {
            Component::Normal(s) => parts.push(s.to_string_lossy().into_owned()),
            Component::ParentDir => {
                parts.pop()?;
            }
            Component::CurDir | Component::RootDir | Component::Prefix(_) => {}
        }
    }
    Some(parts)
}

/// Resolves `path` under `root` (the host directory mounted at `/workspace`), following every
/// symlink, the last component's too.
pub fn resolve(root: &Path, path: &str) -> Result<Resolved, PathError> {
    let parts = parts_of(path)?;
    let parts = follow(root, parts, path)?;
    Ok(Resolved { parts })
}

/// Like [`resolve`], but a symlink in the last component is not followed (to delete or stat the
/// link itself).
pub fn resolve_nofollow(root: &Path, path: &str) -> Result<Resolved, PathError> {
    let mut parts = parts_of(path)?;
    let Some(last) = parts.pop() else {
        return Ok(Resolved { parts });
    };
    let mut parts = follow(root, parts, path)?;
    parts.push(last);
    Ok(Resolved { parts })
}

fn follow(root: &Path, mut parts: Vec<String>, original: &str) -> Result<Vec<String>, PathError> {
    let Ok(workspace) = crate::rooted::Root::open(root) else {
        // No workspace (yet): nothing to follow.
        return Ok(parts);
    };
    let mut hops = 0;
    'restart: loop {
        for i in 0..parts.len() {
            // Looked at from the workspace's own descriptor, one name at a time: a name a
            // process inside swaps for a link meanwhile never sends this walk onto the host.
            let target = match workspace.link_target(&parts[..=i]) {
                Ok(Some(t)) => t,
                Ok(None) => continue,
                // Nothing exists from here on: nothing more to follow.
                Err(_) => return Ok(parts),
            };
            hops += 1;
            if hops > MAX_SYMLINKS {
                return Err(PathError::Loop(original.to_string()));
            }
            let escape = || PathError::SymlinkEscape(original.to_string());
            let mut resolved = if target.starts_with('/') {
                parts_of(&target).map_err(|_| escape())?
            } else {
                normalise(&parts[..i], &target).ok_or_else(escape)?
            };
            resolved.extend(parts[i + 1..].iter().cloned());
            parts = resolved;
            continue 'restart;
        }
        return Ok(parts);
    }
}
