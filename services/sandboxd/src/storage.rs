//! Where sandbox files live, and how they are snapshotted and forked. With `btrfs`, each sandbox
//! is a subvolume of a loop-mounted btrfs image under the data dir (or of the data dir itself when
//! it is btrfs): a snapshot or a fork is a subvolume snapshot, constant time and copy-on-write.
//! With `copy`, they are directories and snapshots are full copies: slow, but it works anywhere.
//! Both keep the same layout per sandbox: `<files>/workspace` (mounted at `/workspace`) and
//! `<files>/journal` (write-many staging, on the same filesystem so its renames are atomic).

use std::path::{Path, PathBuf};
use std::process::Command;

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

fn run(args: &[&str]) -> std::io::Result<String> {
    let out = Command::new(args[0]).args(&args[1..]).output()?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(std::io::Error::other(format!(
            "`{}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
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
            run(&[
                "mount",
                "-o",
                "loop",
                &image.display().to_string(),
                &root.display().to_string(),
            ])?;
        }
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

    fn root(&self) -> &Path {
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

    /// Creates an empty files directory for a new sandbox.
    pub fn create(&self, dir: &Path) -> std::io::Result<()> {
        if !dir.exists() {
            match self {
                Storage::Copy { .. } => std::fs::create_dir_all(dir)?,
                Storage::Btrfs { .. } => {
                    run(&["btrfs", "subvolume", "create", &dir.display().to_string()])?;
                }
            }
        }
        std::fs::create_dir_all(dir.join("workspace"))?;
        std::fs::create_dir_all(dir.join("journal"))
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

    /// Bytes used under `dir` (for the disk meter and snapshot sizes).
    pub fn size(dir: &Path) -> u64 {
        fn walk(p: &Path) -> u64 {
            let Ok(entries) = std::fs::read_dir(p) else {
                return 0;
            };
            entries
                .flatten()
                .map(|e| match e.file_type() {
                    Ok(t) if t.is_dir() => walk(&e.path()),
                    Ok(t) if t.is_file() => e.metadata().map(|m| m.len()).unwrap_or(0),
                    _ => 0,
                })
                .sum()
        }
        walk(dir)
    }
}
