//! The sandboxes' way to their files. sandboxd's data directory is root's alone (mode 0700), yet
//! bubblewrap runs as the sandboxes' unprivileged host uid and opens its bind sources by path.
//! So the storage tree is mounted a second time, `nosuid,nodev`, at
//! `/run/slipway-sandboxd/<key>/files`, where `<key>` (mode 0710, group: the sandboxes' gid)
//! lets only root and that gid through. `<key>` names the data directory, so several sandboxd
//! processes on one host (tests run many) keep apart.

use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

use crate::jail::Owner;
use crate::tools::{is_mountpoint, run};

const BASE: &str = "/run/slipway-sandboxd";

/// The directory that holds the view of the sandboxd whose data directory is `data_dir`.
fn key_dir(data_dir: &Path) -> std::io::Result<PathBuf> {
    let canonical = std::fs::canonicalize(data_dir)?;
    let digest = Sha256::digest(canonical.as_os_str().as_encoded_bytes());
    let key: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    Ok(Path::new(BASE).join(key))
}

/// Where the sandboxes' user reaches the storage tree of the sandboxd at `data_dir`.
pub fn path(data_dir: &Path) -> std::io::Result<PathBuf> {
    Ok(key_dir(data_dir)?.join("files"))
}

/// Mounts the view of `files_root` at `path(data_dir)` (replacing one a previous sandboxd left).
pub fn mount(data_dir: &Path, files_root: &Path, owner: Owner) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(BASE)?;
    std::fs::set_permissions(BASE, std::fs::Permissions::from_mode(0o711))?;
    let key = key_dir(data_dir)?;
    let view = key.join("files");
    std::fs::create_dir_all(&view)?;
    std::os::unix::fs::chown(&key, Some(0), Some(owner.gid))?;
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o710))?;
    if is_mountpoint(&view) {
        run(&["umount", "-l", &view.display().to_string()])?;
    }
    let (src, dst) = (files_root.display().to_string(), view.display().to_string());
    run(&["mount", "--bind", &src, &dst])?;
    run(&["mount", "-o", "remount,bind,nosuid,nodev", &dst])?;
    Ok(())
}

/// Unmounts and removes the view (`--purge`).
pub fn unmount(data_dir: &Path) {
    let Ok(key) = key_dir(data_dir) else {
        return;
    };
    let view = key.join("files");
    if is_mountpoint(&view) {
        let _ = run(&["umount", "-l", &view.display().to_string()]);
    }
    let _ = std::fs::remove_dir(&view);
    let _ = std::fs::remove_dir(&key);
}
