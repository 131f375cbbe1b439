//! File operations inside a workspace, confined by the kernel. sandboxd works on sandbox files as
//! root while the sandbox's own processes may rename, swap and relink anything in them at any
//! moment; so no path is ever re-walked on the host. Each operation starts from a descriptor of
//! the workspace and resolves with `openat2(RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)`: symlinks
//! are followed as the sandbox sees them (an absolute target is inside the workspace), never out
//! of it. Below that, each step is one name relative to an open directory, without following a
//! link (`O_NOFOLLOW`, `*at` calls).

use std::fs::{File, Metadata};
use std::io::Read;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, Mode, OFlags, ResolveFlags};

use crate::jail::Owner;

/// A workspace, open.
pub struct Root(OwnedFd);

/// Deepest directory a walk (size, recursive delete) goes into.
pub const MAX_DEPTH: usize = 256;

/// Why a file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error("is a directory")]
    Directory,
    #[error("is not a regular file (a {0})")]
    NotRegular(&'static str),
    #[error("is larger than {0} bytes")]
    TooLarge(u64),
}

fn rel(parts: &[String]) -> PathBuf {
    if parts.is_empty() {
        PathBuf::from(".")
    } else {
        parts.iter().collect()
    }
}

/// What a file is, by its metadata.
pub fn kind(meta: &Metadata) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    let t = meta.file_type();
    if t.is_symlink() {
        "symlink"
    } else if t.is_dir() {
        "dir"
    } else if t.is_file() {
        "file"
    } else if t.is_fifo() {
        "fifo"
    } else if t.is_socket() {
        "socket"
    } else {
        "device"
    }
}

/// One name below an open directory, never following a link.
fn child(dir: impl AsFd, name: &str, flags: OFlags) -> std::io::Result<OwnedFd> {
    let extra = if flags.contains(OFlags::PATH) {
        OFlags::CLOEXEC
    } else {
        OFlags::CLOEXEC | OFlags::NOCTTY
    };
    Ok(rustix::fs::openat(
        dir,
        name,
        flags | OFlags::NOFOLLOW | extra,
        Mode::empty(),
    )?)
}

fn metadata(fd: OwnedFd) -> std::io::Result<Metadata> {
    File::from(fd).metadata()
}

impl Root {
    pub fn open(workspace: &Path) -> std::io::Result<Root> {
        Ok(Root(rustix::fs::open(
            workspace,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?))
    }

    /// Opens `parts` (under `/workspace`) as the sandbox would.
    fn resolve(&self, parts: &[String], flags: OFlags) -> std::io::Result<OwnedFd> {
        // openat2 refuses `O_PATH` with any flag but a few (where openat would ignore them).
        let extra = if flags.contains(OFlags::PATH) {
            OFlags::CLOEXEC
        } else {
            OFlags::CLOEXEC | OFlags::NOCTTY
        };
        // The kernel answers EAGAIN when a rename elsewhere races a `..` in the walk; a few
        // tries settle it.
        let mut tries = 0;
        loop {
            match rustix::fs::openat2(
                &self.0,
                rel(parts),
                flags | extra,
                Mode::empty(),
                ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS,
            ) {
                Err(rustix::io::Errno::AGAIN) if tries < 8 => tries += 1,
                other => return Ok(other?),
            }
        }
    }

    /// A regular file, open for reading, and its size (at most `max`); FIFOs, sockets and
    /// devices are refused without being opened for reading (`O_PATH` first).
    pub fn open_regular(&self, parts: &[String], max: u64) -> Result<(File, u64), ReadError> {
        let meta = metadata(self.resolve(parts, OFlags::PATH)?)?;
        match kind(&meta) {
            "file" => {}
            "dir" => return Err(ReadError::Directory),
            other => return Err(ReadError::NotRegular(other)),
        }
        // Opened again to read; checked again, since the name may have changed in between.
        let file = File::from(self.resolve(parts, OFlags::RDONLY | OFlags::NONBLOCK)?);
        let meta = file.metadata()?;
        if !meta.is_file() {
            return Err(ReadError::NotRegular(kind(&meta)));
        }
        if meta.len() > max {
            return Err(ReadError::TooLarge(max));
        }
        Ok((file, meta.len()))
    }

    /// The bytes of a regular file, at most `max` of them.
    pub fn read(&self, parts: &[String], max: u64) -> Result<Vec<u8>, ReadError> {
        let (file, len) = self.open_regular(parts, max)?;
        let mut out = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
        file.take(max + 1).read_to_end(&mut out)?;
        if out.len() as u64 > max {
            return Err(ReadError::TooLarge(max));
        }
        Ok(out)
    }

    /// The metadata of `parts`; with `follow`, of what a last-component symlink points to.
    pub fn stat(&self, parts: &[String], follow: bool) -> std::io::Result<Metadata> {
        let flags = if follow {
            OFlags::PATH
        } else {
            OFlags::PATH | OFlags::NOFOLLOW
        };
        metadata(self.resolve(parts, flags)?)
    }

    /// The directory `parts`, reached one name at a time without following any link.
    pub fn dir_nofollow(&self, parts: &[String]) -> std::io::Result<OwnedFd> {
        let mut cur = self.dir(&[])?;
        for name in parts {
            cur = child(&cur, name, OFlags::RDONLY | OFlags::DIRECTORY)?;
        }
        Ok(cur)
    }

    /// What the link `parts` points to, `None` if it is no link; its directories are reached
    /// without following links (for the sandbox-view resolution in `paths`).
    pub fn link_target(&self, parts: &[String]) -> std::io::Result<Option<String>> {
        let Some((name, above)) = parts.split_last() else {
            return Ok(None);
        };
        let parent = self.dir_nofollow(above)?;
        let meta = metadata(child(&parent, name, OFlags::PATH)?)?;
        if !meta.file_type().is_symlink() {
            return Ok(None);
        }
        let target = rustix::fs::readlinkat(&parent, name.as_str(), Vec::new())?;
        Ok(Some(target.to_string_lossy().into_owned()))
    }

    /// Bytes in the regular files under the directory `parts`, links not followed, at most
    /// `MAX_DEPTH` levels down (for the disk meter and snapshot sizes).
    pub fn size(&self, parts: &[String]) -> u64 {
        let Ok(top) = self.dir_nofollow(parts) else {
            return 0;
        };
        let mut total = 0;
        let mut stack = vec![(top, 0usize)];
        while let Some((dir, depth)) = stack.pop() {
            for (name, meta) in entries(&dir).unwrap_or_default() {
                if meta.is_file() {
                    total += meta.len();
                } else if meta.is_dir()
                    && depth < MAX_DEPTH
                    && let Ok(sub) = subdir(&dir, &name)
                {
                    stack.push((sub, depth + 1));
                }
            }
        }
        total
    }

    /// The directory `parts`, open for listing.
    pub fn dir(&self, parts: &[String]) -> std::io::Result<OwnedFd> {
        self.resolve(parts, OFlags::RDONLY | OFlags::DIRECTORY)
    }

    /// Creates the directories `parts` that do not exist, one name at a time (each created one
    /// given to `owner`), and returns the last, open. A name that exists as anything but a
    /// directory (a file, a link) fails it.
    pub fn make_dirs(&self, parts: &[String], owner: Option<Owner>) -> std::io::Result<OwnedFd> {
        let mut cur = self.dir(&[])?;
        for (i, name) in parts.iter().enumerate() {
            let created = match rustix::fs::mkdirat(&cur, name.as_str(), Mode::from_raw_mode(0o755))
            {
                Ok(()) => true,
                Err(rustix::io::Errno::EXIST) => false,
                Err(e) => return Err(e.into()),
            };
            let next = child(&cur, name, OFlags::RDONLY | OFlags::DIRECTORY).map_err(|e| {
                let not_a_dir = [rustix::io::Errno::LOOP, rustix::io::Errno::NOTDIR]
                    .iter()
                    .any(|n| e.raw_os_error() == Some(n.raw_os_error()));
                match (not_a_dir, i + 1 == parts.len()) {
                    // The directory asked for exists as something else.
                    (true, true) => std::io::Error::from(std::io::ErrorKind::AlreadyExists),
                    (true, false) => std::io::Error::from(std::io::ErrorKind::NotADirectory),
                    (false, _) => e,
                }
            })?;
            if created && let Some(o) = owner {
                std::os::unix::fs::fchown(&next, Some(o.uid), Some(o.gid))?;
            }
            cur = next;
        }
        Ok(cur)
    }

    /// Moves the host file `staged` (sandboxd's own, outside the workspace) to `parts`,
    /// creating the directories above it; returns the directory it landed in, open.
    pub fn place(
        &self,
        staged: &Path,
        parts: &[String],
        owner: Option<Owner>,
    ) -> std::io::Result<OwnedFd> {
        let Some((name, above)) = parts.split_last() else {
            return Err(std::io::Error::other("cannot write /workspace itself"));
        };
        let dir = self.make_dirs(above, owner)?;
        rustix::fs::renameat(rustix::fs::CWD, staged, &dir, name.as_str())?;
        Ok(dir)
    }

    /// Removes `parts` (a link itself, not what it points to); a directory only when empty, or
    /// with `recursive`.
    pub fn remove(&self, parts: &[String], recursive: bool) -> std::io::Result<()> {
        let Some((name, above)) = parts.split_last() else {
            return Err(std::io::Error::other("cannot remove /workspace itself"));
        };
        let parent = self.dir(above)?;
        let meta = metadata(child(&parent, name, OFlags::PATH)?)?;
        if !meta.is_dir() {
            return Ok(rustix::fs::unlinkat(
                &parent,
                name.as_str(),
                AtFlags::empty(),
            )?);
        }
        if recursive {
            remove_tree(&parent, name, 0)
        } else {
            Ok(rustix::fs::unlinkat(
                &parent,
                name.as_str(),
                AtFlags::REMOVEDIR,
            )?)
        }
    }
}

/// The entries of an open directory, sorted by name, with their own metadata (links not
/// followed).
pub fn entries(dir: &OwnedFd) -> std::io::Result<Vec<(String, Metadata)>> {
    let mut out = Vec::new();
    let mut d = rustix::fs::Dir::read_from(dir)?;
    while let Some(e) = d.read() {
        let e = e?;
        let name = e.file_name().to_string_lossy().into_owned();
        if name == "." || name == ".." {
            continue;
        }
        // An entry that went away meanwhile is left out.
        if let Ok(meta) = child(dir, &name, OFlags::PATH).and_then(metadata) {
            out.push((name, meta));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// The bytes of the regular file `name` in `dir` (not through a link), at most `max`.
pub fn read_child(dir: &OwnedFd, name: &str, max: u64) -> Result<Vec<u8>, ReadError> {
    let file = File::from(child(dir, name, OFlags::RDONLY | OFlags::NONBLOCK)?);
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(ReadError::NotRegular(kind(&meta)));
    }
    let mut out = Vec::new();
    file.take(max + 1).read_to_end(&mut out)?;
    if out.len() as u64 > max {
        return Err(ReadError::TooLarge(max));
    }
    Ok(out)
}

/// A directory below `dir`, open for listing (not through a link).
pub fn subdir(dir: &OwnedFd, name: &str) -> std::io::Result<OwnedFd> {
    child(dir, name, OFlags::RDONLY | OFlags::DIRECTORY)
}

fn remove_tree(parent: &OwnedFd, name: &str, depth: usize) -> std::io::Result<()> {
    if depth > MAX_DEPTH {
        return Err(std::io::Error::other(format!(
            "more than {MAX_DEPTH} directories deep"
        )));
    }
    let dir = subdir(parent, name)?;
    for (child_name, meta) in entries(&dir)? {
        if meta.is_dir() {
            remove_tree(&dir, &child_name, depth + 1)?;
        } else {
            rustix::fs::unlinkat(&dir, child_name.as_str(), AtFlags::empty())?;
        }
    }
    Ok(rustix::fs::unlinkat(parent, name, AtFlags::REMOVEDIR)?)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use std::os::unix::fs::symlink;

    fn parts(p: &str) -> Vec<String> {
        p.split('/').map(str::to_string).collect()
    }

    #[test]
    fn links_resolve_inside_the_root_and_never_out_of_it() {
        let host = tempfile::tempdir().unwrap();
        std::fs::write(host.path().join("secret"), "host").unwrap();
        let ws = tempfile::tempdir().unwrap();
        std::fs::create_dir(ws.path().join("etc")).unwrap();
        std::fs::write(ws.path().join("etc/secret"), "inside").unwrap();
        // An absolute link to the host's directory: inside, it names /workspace/<that path>.
        symlink(host.path(), ws.path().join("out")).unwrap();
        symlink("/etc", ws.path().join("abs")).unwrap();
        symlink("../../..", ws.path().join("up")).unwrap();
        let root = Root::open(ws.path()).unwrap();
        assert!(root.read(&parts("out/secret"), 100).is_err());
        assert_eq!(root.read(&parts("abs/secret"), 100).unwrap(), b"inside");
        // `..` stops at the root.
        assert_eq!(root.read(&parts("up/etc/secret"), 100).unwrap(), b"inside");
        assert!(root.remove(&parts("out/secret"), false).is_err());
        assert!(host.path().join("secret").exists());
        assert!(root.make_dirs(&parts("out/new"), None).is_err());
        assert!(!host.path().join("new").exists());
    }

    #[test]
    fn fifos_and_large_files_are_refused_and_directories_removed_whole() {
        let ws = tempfile::tempdir().unwrap();
        let status = std::process::Command::new("mkfifo")
            .arg(ws.path().join("pipe"))
            .status()
            .unwrap();
        assert!(status.success());
        std::fs::write(ws.path().join("big"), vec![0u8; 100]).unwrap();
        let root = Root::open(ws.path()).unwrap();
        assert!(matches!(
            root.read(&parts("pipe"), 1000),
            Err(ReadError::NotRegular("fifo"))
        ));
        assert!(matches!(
            root.read(&parts("big"), 99),
            Err(ReadError::TooLarge(99))
        ));
        assert_eq!(kind(&root.stat(&parts("pipe"), false).unwrap()), "fifo");
        root.make_dirs(&parts("a/b/c"), None).unwrap();
        std::fs::write(ws.path().join("a/b/c/f"), "x").unwrap();
        assert!(root.remove(&parts("a"), false).is_err());
        root.remove(&parts("a"), true).unwrap();
        assert!(!ws.path().join("a").exists());
    }
}
