//! Where sandbox files live, and how they are snapshotted and forked. With `btrfs`, each sandbox
//! is a subvolume of a loop-mounted btrfs image under the data dir (or of the data dir itself when
//! it is btrfs): a snapshot or a fork is a subvolume snapshot, constant time and copy-on-write.
//! With `copy`, they are directories and snapshots are full copies: slow, but it works anywhere.
//! Both keep the same layout per sandbox: `<files>/workspace` (mounted at `/workspace`, owned by
//! the uid that is root inside the sandbox) and `<files>/journal` (write-many staging, on the
//! same filesystem so its renames are atomic; sandboxd's own).
//!
//! Disk: with btrfs, each sandbox's subvolume has a quota group limited to its `disk_size_mb`,
//! so the kernel refuses a write past it (`EDQUOT`), from a process inside or from the API
//! alike. The copy backend has no kernel limit: the API refuses writes that would take a
//! workspace past its size, but processes inside are not held (see `docs/sandboxd.md`).

use std::path::{Path, PathBuf};

use crate::jail::Owner;
use crate::tools::{is_mountpoint, run};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Choice {
    /// btrfs when it can be had (root, loop devices, btrfs-progs), else copy.
    Auto,
    Btrfs,
    Copy,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Storage {
    Copy { root: PathBuf },
    Btrfs { root: PathBuf },
}

/// Sets `path`'s permission bits.
fn chmod(path: &Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

/// Gives a workspace to the sandbox's root: a new one at once; one made before sandboxes had
/// their own user (root-owned files, which root inside could no longer change), whether found
/// at start or restored from an old snapshot, whole (`chown -R`, not following links).
fn adopt(workspace: &Path, owner: Owner) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    if std::fs::symlink_metadata(workspace)?.uid() == owner.uid {
        return Ok(());
    }
    if std::fs::read_dir(workspace)?.next().is_none() {
        return owner.give(workspace);
    }
    tracing::info!(workspace = %workspace.display(), "giving the workspace to the sandbox's user");
    run(&[
        "chown",
        "-R",
        "-P",
        &format!("{}:{}", owner.uid, owner.gid),
        &workspace.display().to_string(),
    ])
    .map(|_| ())
}

/// A write refused because the sandbox's disk is full.
#[derive(Debug, thiserror::Error)]
#[error("the sandbox's disk ({limit_mb} MB) is full: {used} bytes used, {incoming} more asked")]
pub struct DiskFull {
    pub limit_mb: u64,
    pub used: u64,
    pub incoming: u64,
}

fn is_btrfs(path: &Path) -> bool {
    run(&["stat", "-f", "-c", "%T", &path.display().to_string()]).is_ok_and(|t| t.trim() == "btrfs")
}

impl Storage {
    /// Opens the storage under `data_dir`; says which backend it chose and why.
    pub fn open(
        data_dir: &Path,
        choice: Choice,
        image_gb: u64,
    ) -> anyhow::Result<(Storage, String)> {
        match choice {
            Choice::Copy => Ok((Self::copy(data_dir)?, "copy (as asked)".into())),
            Choice::Btrfs => Ok((Self::btrfs(data_dir, image_gb)?, "btrfs (as asked)".into())),
            Choice::Auto => match Self::btrfs(data_dir, image_gb) {
                Ok(s) => Ok((
                    s,
                    "btrfs (auto: snapshots and forks are subvolume snapshots)".into(),
                )),
                Err(e) => Ok((
                    Self::copy(data_dir)?,
                    format!("copy (auto: btrfs unavailable: {e:#})"),
                )),
            },
        }
    }

    fn copy(data_dir: &Path) -> anyhow::Result<Storage> {
        let root = data_dir.join("files");
        std::fs::create_dir_all(root.join("sandboxes"))?;
        std::fs::create_dir_all(root.join("snapshots"))?;
        Ok(Storage::Copy { root })
    }

    fn btrfs(data_dir: &Path, image_gb: u64) -> anyhow::Result<Storage> {
        if is_btrfs(data_dir) {
            let root = data_dir.join("files");
            std::fs::create_dir_all(root.join("sandboxes"))?;
            std::fs::create_dir_all(root.join("snapshots"))?;
            run(&["btrfs", "quota", "enable", &root.display().to_string()])
                .map_err(|e| anyhow::anyhow!("btrfs quotas: {e}"))?;
            return Ok(Storage::Btrfs { root });
        }
        run(&["btrfs", "--version"]).map_err(|e| anyhow::anyhow!("btrfs-progs: {e}"))?;
        let root = data_dir.join("btrfs");
        std::fs::create_dir_all(&root)?;
        if !is_btrfs(&root) {
            let image = data_dir.join("btrfs.img");
            if !image.exists() {
                let f = std::fs::File::create(&image)?;
                f.set_len(image_gb * 1024 * 1024 * 1024)?;
                drop(f);
                run(&["mkfs.btrfs", "-q", &image.display().to_string()])?;
            }
            // Nothing on it runs set-user-id or opens a device node on the host.
            run(&[
                "mount",
                "-o",
                "loop,nosuid,nodev",
                &image.display().to_string(),
                &root.display().to_string(),
            ])?;
        } else if is_mountpoint(&root) {
            // Mounted by an earlier sandboxd, perhaps without those options.
            run(&[
                "mount",
                "-o",
                "remount,nosuid,nodev",
                &root.display().to_string(),
            ])?;
        }
        // Quota groups hold each sandbox to its disk size (idempotent).
        run(&["btrfs", "quota", "enable", &root.display().to_string()])
            .map_err(|e| anyhow::anyhow!("btrfs quotas: {e}"))?;
        std::fs::create_dir_all(root.join("sandboxes"))?;
        std::fs::create_dir_all(root.join("snapshots"))?;
        Ok(Storage::Btrfs { root })
    }

    pub fn name(&self) -> &'static str {
        match self {
            Storage::Copy { .. } => "copy",
            Storage::Btrfs { .. } => "btrfs",
        }
    }

    /// Where every sandbox's files and every snapshot live.
    pub fn root(&self) -> &Path {
        match self {
            Storage::Copy { root } | Storage::Btrfs { root } => root,
        }
    }

    /// The files directory of sandbox `id` (`workspace/` and `journal/` inside).
    pub fn sandbox_dir(&self, id: &str) -> PathBuf {
        self.root().join("sandboxes").join(id)
    }

    /// Where snapshot `id` is kept.
    pub fn snapshot_dir(&self, id: &str) -> PathBuf {
        self.root().join("snapshots").join(id)
    }

    /// Sets the storage tree's permissions: the sandboxes' user passes through `sandboxes/`
    /// (to its own workspaces, by name) but lists nothing; snapshots are sandboxd's alone.
    pub fn secure(&self) -> std::io::Result<()> {
        chmod(self.root(), 0o711)?;
        chmod(&self.root().join("sandboxes"), 0o711)?;
        chmod(&self.root().join("snapshots"), 0o700)
    }

    /// Creates an empty files directory for a new sandbox (`prepare` completes it).
    pub fn create(&self, dir: &Path) -> std::io::Result<()> {
        if !dir.exists() {
            match self {
                Storage::Copy { .. } => std::fs::create_dir_all(dir)?,
                Storage::Btrfs { .. } => {
                    run(&["btrfs", "subvolume", "create", &dir.display().to_string()])?;
                }
            }
        }
        Ok(())
    }

    /// Completes a sandbox's files directory (new, forked or restored): `workspace/` owned by
    /// `owner` (the sandbox's root), `journal/` by sandboxd, and with btrfs the subvolume's
    /// quota limited to `disk_bytes`.
    pub fn prepare(
        &self,
        dir: &Path,
        owner: Option<Owner>,
        disk_bytes: u64,
    ) -> std::io::Result<()> {
        let workspace = dir.join("workspace");
        std::fs::create_dir_all(&workspace)?;
        std::fs::create_dir_all(dir.join("journal"))?;
        chmod(dir, 0o711)?;
        chmod(&dir.join("journal"), 0o700)?;
        if let Some(owner) = owner {
            adopt(&workspace, owner)?;
        }
        if let Storage::Btrfs { .. } = self {
            run(&[
                "btrfs",
                "qgroup",
                "limit",
                &disk_bytes.to_string(),
                &dir.display().to_string(),
            ])?;
        }
        Ok(())
    }

    /// Whether `incoming` more bytes fit in the workspace under `files` (sized `limit_mb`).
    /// With btrfs the kernel is the judge at write time; the copy backend counts here.
    /// `replaced` says how many of the bytes in use the write replaces (asked only here).
    pub fn room(
        &self,
        files: &Path,
        limit_mb: u64,
        incoming: u64,
        replaced: impl FnOnce() -> u64,
    ) -> Result<(), DiskFull> {
        if let Storage::Btrfs { .. } = self {
            return Ok(());
        }
        let used = Self::size(&files.join("workspace")).saturating_sub(replaced());
        if used.saturating_add(incoming) > limit_mb.saturating_mul(1024 * 1024) {
            return Err(DiskFull {
                limit_mb,
                used,
                incoming,
            });
        }
        Ok(())
    }

    /// Makes `dst` a point-in-time copy of `src` (a files directory or a snapshot): read-only
    /// for a snapshot, writable for a fork or a restore.
    pub fn snapshot(&self, src: &Path, dst: &Path, writable: bool) -> std::io::Result<()> {
        if let Some(parent) = dst.parent() {
            std::fs::create_dir_all(parent)?;
        }
        match self {
            Storage::Btrfs { .. } => {
                let (s, d) = (src.display().to_string(), dst.display().to_string());
                if writable {
                    run(&["btrfs", "subvolume", "snapshot", &s, &d])?;
                } else {
                    run(&["btrfs", "subvolume", "snapshot", "-r", &s, &d])?;
                }
            }
            Storage::Copy { .. } => {
                let tmp = dst.with_extension("partial");
                let _ = std::fs::remove_dir_all(&tmp);
                std::fs::create_dir_all(&tmp)?;
                run(&[
                    "cp",
                    "-a",
                    "--reflink=auto",
                    &format!("{}/.", src.display()),
                    &tmp.display().to_string(),
                ])?;
                std::fs::rename(&tmp, dst)?;
            }
        }
        Ok(())
    }

    /// Removes a files directory or a snapshot.
    pub fn delete(&self, dir: &Path) -> std::io::Result<()> {
        if !dir.exists() {
            return Ok(());
        }
        match self {
            Storage::Btrfs { .. } => {
                let d = dir.display().to_string();
                // A read-only snapshot must be made writable before its contents can go.
                let _ = run(&["btrfs", "property", "set", "-ts", &d, "ro", "false"]);
                run(&["btrfs", "subvolume", "delete", &d]).map(|_| ())
            }
            Storage::Copy { .. } => std::fs::remove_dir_all(dir),
        }
    }

    /// Unmounts the btrfs image sandboxd mounted (`--purge`).
    pub fn release(&self) {
        if let Storage::Btrfs { root } = self
            && root.file_name().is_some_and(|n| n == "btrfs")
        {
            let _ = run(&["umount", "-l", &root.display().to_string()]);
        }
    }

    /// Bytes used under `dir` (for the disk meter and snapshot sizes): walked from an open
    /// descriptor of `dir`, never following a link a process inside may have put there.
    pub fn size(dir: &Path) -> u64 {
        crate::rooted::Root::open(dir).map_or(0, |r| r.size(&[]))
    }
}
