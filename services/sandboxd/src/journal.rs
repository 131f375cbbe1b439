//! Write-many, all or nothing, also across a crash. The batch is staged in
//! `<sandbox>/journal/<tx>/` (each file written and synced), then committed by writing its
//! manifest (one atomic rename), then applied file by file with renames into the workspace. On
//! start, a committed batch is rolled forward and an uncommitted one is discarded, so after any
//! crash the workspace holds all of a batch or none of it. What a batch creates (files and the
//! directories above them) belongs to the sandbox's root, and never carries set-user-id,
//! set-group-id or sticky bits.

use std::path::Path;

use serde::{Deserialize, Serialize};
use slipway_common::failpoint;

use crate::jail::Owner;
use crate::store;

/// One file of a batch: its path under the workspace (already resolved) and its content.
pub struct Item {
    pub parts: Vec<String>,
    pub content: Vec<u8>,
    pub mode: Option<u32>,
}

#[derive(Serialize, Deserialize)]
struct Manifest {
    entries: Vec<ManifestEntry>,
}

#[derive(Serialize, Deserialize)]
struct ManifestEntry {
    parts: Vec<String>,
    staged: String,
    mode: Option<u32>,
}

const MANIFEST: &str = "manifest.json";

/// Writes every item into `workspace` or, on error, none of them. `files_dir` holds the
/// workspace and the journal, on one filesystem.
pub fn write_batch(
    files_dir: &Path,
    workspace: &Path,
    items: &[Item],
    owner: Option<Owner>,
) -> std::io::Result<()> {
    let tx = files_dir.join("journal").join(format!(
        "{}-{}",
        crate::clock::now_ms(),
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(&tx)?;
    let staged = stage(&tx, items, owner);
    if let Err(e) = staged {
        let _ = std::fs::remove_dir_all(&tx);
        return Err(e);
    }
    // Committed but not appliable (the workspace changed under it): set aside now, so no
    // restart retries it.
    apply(&tx, workspace, owner).inspect_err(|e| {
        let _ = quarantine(files_dir, &tx, e);
    })
}

/// Permission bits a batch may set: no set-user-id, set-group-id or sticky bit.
const MODE_BITS: u32 = 0o777;

fn stage(tx: &Path, items: &[Item], owner: Option<Owner>) -> std::io::Result<()> {
    use std::io::Write;
    let mut entries = Vec::with_capacity(items.len());
    for (n, item) in items.iter().enumerate() {
        let name = format!("{n}.data");
        let mut f = std::fs::File::create(tx.join(&name))?;
        if let Some(o) = owner {
            std::os::unix::fs::fchown(&f, Some(o.uid), Some(o.gid))?;
        }
        f.write_all(&item.content)?;
        f.sync_all()?;
        entries.push(ManifestEntry {
            parts: item.parts.clone(),
            staged: name,
            mode: item.mode,
        });
        failpoint::hit("write_many.staged");
    }
    store::sync_dir(tx)?;
    // The commit point: once the manifest exists, the batch happens.
    store::write_json(&tx.join(MANIFEST), &Manifest { entries })?;
    failpoint::hit("write_many.committed");
    Ok(())
}

fn apply(tx: &Path, workspace: &Path, owner: Option<Owner>) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let manifest: Manifest = store::read_json(&tx.join(MANIFEST))?
        .ok_or_else(|| std::io::Error::other("journal manifest missing"))?;
    // Every name is one plain component: a manifest can only move its own staged files to
    // places under the workspace.
    let plain = |n: &str| !n.is_empty() && n != "." && n != ".." && !n.contains(['/', '\0']);
    if manifest
        .entries
        .iter()
        .any(|e| !plain(&e.staged) || e.parts.is_empty() || !e.parts.iter().all(|p| plain(p)))
    {
        return Err(std::io::Error::other(
            "journal manifest names a path that is not plain",
        ));
    }
    let root = crate::rooted::Root::open(workspace)?;
    // File by file, grouped by directory: each directory is open only while its files land,
    // then synced and closed (a batch over many directories holds one descriptor at a time).
    let mut order: Vec<&ManifestEntry> = manifest.entries.iter().collect();
    order.sort_by(|a, b| a.parts[..a.parts.len() - 1].cmp(&b.parts[..b.parts.len() - 1]));
    let mut open: Option<(&[String], std::os::fd::OwnedFd)> = None;
    for entry in order {
        let staged = tx.join(&entry.staged);
        if !staged.exists() {
            // Applied before a crash.
            continue;
        }
        if let Some(mode) = entry.mode {
            std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(mode & MODE_BITS))?;
        }
        let above = &entry.parts[..entry.parts.len() - 1];
        if open.as_ref().is_some_and(|(p, _)| *p != above)
            && let Some((_, dir)) = open.take()
        {
            rustix::fs::fsync(&dir)?;
        }
        // Placed through the workspace's own root: whatever a process inside did to the
        // directories meanwhile, the file lands inside.
        let dir = root.place(&staged, &entry.parts, owner)?;
        open = Some((above, dir));
        failpoint::hit("write_many.applying");
    }
    if let Some((_, dir)) = open {
        rustix::fs::fsync(&dir)?;
    }
    std::fs::remove_dir_all(tx)?;
    Ok(())
}

/// Completes committed batches and discards uncommitted ones (at start, before serving). A
/// committed batch that cannot be applied (the workspace changed under it) is moved aside to
/// `<files>/quarantine/<tx>/` with the reason, and logged, so sandboxd still starts; what of
/// it was applied stays applied.
pub fn recover(files_dir: &Path, owner: Option<Owner>) -> std::io::Result<()> {
    let journal = files_dir.join("journal");
    let Ok(txs) = std::fs::read_dir(&journal) else {
        return Ok(());
    };
    let workspace = files_dir.join("workspace");
    for tx in txs.flatten().map(|e| e.path()) {
        if tx.join(MANIFEST).exists() {
            tracing::info!(tx = %tx.display(), "rolling an interrupted file batch forward");
            if let Err(e) = apply(&tx, &workspace, owner) {
                quarantine(files_dir, &tx, &e)?;
            }
        } else {
            tracing::info!(tx = %tx.display(), "discarding an uncommitted file batch");
            std::fs::remove_dir_all(&tx)?;
        }
    }
    Ok(())
}

/// Where batches that could not be applied are kept, under a sandbox's files directory.
pub const QUARANTINE: &str = "quarantine";

fn quarantine(files_dir: &Path, tx: &Path, why: &std::io::Error) -> std::io::Result<()> {
    let dir = files_dir.join(QUARANTINE);
    std::fs::create_dir_all(&dir)?;
    let name = tx.file_name().unwrap_or_default();
    let kept = dir.join(name);
    std::fs::rename(tx, &kept)?;
    std::fs::write(kept.join("reason"), format!("{why}\n"))?;
    tracing::warn!(
        batch = %kept.display(),
        error = %why,
        "a committed file batch could not be applied; it is quarantined"
    );
    Ok(())
}
