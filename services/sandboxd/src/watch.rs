//! File watch: inotify over a sandbox's whole workspace, so writes made by processes inside the
//! sandbox are seen like writes made through the API. One watcher per sandbox, started by the
//! first subscriber; an inotify queue overflow (or a subscriber falling behind) becomes an
//! explicit `resync` event, so nobody silently misses changes.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use futures::StreamExt;
use inotify::{EventMask, Inotify, WatchDescriptor, WatchMask};
use serde::Serialize;
use tokio::sync::broadcast;

/// One change, with both the `event` key (Python SDK) and the `type` key (TypeScript, Elixir).
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct FileEvent {
    pub event: &'static str,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub path: String,
    pub is_dir: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub old_path: Option<String>,
}

impl FileEvent {
    fn new(kind: &'static str, path: String, is_dir: bool) -> Self {
        Self {
            event: kind,
            kind,
            path,
            is_dir,
            old_path: None,
        }
    }

    pub fn resync(path: &str) -> Self {
        Self::new("resync", path.to_string(), true)
    }
}

pub struct Hub {
    workspace: PathBuf,
    tx: Mutex<Option<broadcast::Sender<FileEvent>>>,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

const MASK: WatchMask = WatchMask::CREATE
    .union(WatchMask::CLOSE_WRITE)
    .union(WatchMask::DELETE)
    .union(WatchMask::MOVED_FROM)
    .union(WatchMask::MOVED_TO)
    .union(WatchMask::ATTRIB)
    .union(WatchMask::ONLYDIR);

/// Deepest directory watched below the workspace.
const MAX_DEPTH: usize = 64;

impl Hub {
    pub fn new(workspace: PathBuf) -> Self {
        Self {
            workspace,
            tx: Mutex::new(None),
            task: Mutex::new(None),
        }
    }

    /// Subscribes to the sandbox's changes, starting the watcher if needed.
    pub fn subscribe(&self) -> std::io::Result<broadcast::Receiver<FileEvent>> {
        let mut tx = self.tx.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(tx) = tx.as_ref() {
            return Ok(tx.subscribe());
        }
        let (sender, receiver) = broadcast::channel(4096);
        let task = spawn_watcher(self.workspace.clone(), sender.clone())?;
        *self.task.lock().unwrap_or_else(|p| p.into_inner()) = Some(task);
        *tx = Some(sender);
        Ok(receiver)
    }

    /// Watches the workspace afresh (its directory was replaced by a restore); subscribers stay
    /// and are told to resync.
    pub fn rewatch(&self) {
        let tx = self.tx.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let Some(tx) = tx else { return };
        if let Some(task) = self.task.lock().unwrap_or_else(|p| p.into_inner()).take() {
            task.abort();
        }
        match spawn_watcher(self.workspace.clone(), tx.clone()) {
            Ok(task) => *self.task.lock().unwrap_or_else(|p| p.into_inner()) = Some(task),
            Err(e) => tracing::warn!(error = %e, "re-watching a restored workspace"),
        }
        let _ = tx.send(FileEvent::resync(crate::paths::WORKSPACE));
    }

    /// Ends the watcher and every subscription (the sandbox is destroyed).
    pub fn close(&self) {
        self.tx.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(task) = self.task.lock().unwrap_or_else(|p| p.into_inner()).take() {
            task.abort();
        }
    }
}

fn spawn_watcher(
    root: PathBuf,
    tx: broadcast::Sender<FileEvent>,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let inotify = Inotify::init()?;
    let mut dirs: HashMap<WatchDescriptor, PathBuf> = HashMap::new();
    add_tree(&inotify.watches(), &root, &root, &mut dirs, None)?;
    let mut stream = inotify.into_event_stream([0u8; 64 * 1024])?;
    Ok(tokio::spawn(async move {
        while let Some(event) = stream.next().await {
            let Ok(event) = event else { break };
            if event.mask.contains(EventMask::Q_OVERFLOW) {
                let _ = tx.send(FileEvent::resync(crate::paths::WORKSPACE));
                continue;
            }
            if event.mask.contains(EventMask::IGNORED) {
                dirs.remove(&event.wd);
                continue;
            }
            let (Some(dir), Some(name)) = (dirs.get(&event.wd).cloned(), event.name) else {
                continue;
            };
            let host = dir.join(&name);
            let is_dir = event.mask.contains(EventMask::ISDIR);
            let path = sandbox_path(&root, &host);
            let kind = if event
                .mask
                .intersects(EventMask::CREATE | EventMask::MOVED_TO)
            {
                "created"
            } else if event
                .mask
                .intersects(EventMask::DELETE | EventMask::MOVED_FROM)
            {
                "deleted"
            } else {
                "modified"
            };
            // A send fails only when nobody listens; the watch goes on for the next subscriber.
            let _ = tx.send(FileEvent::new(kind, path, is_dir));
            if is_dir && kind == "created" {
                // Watch the new directory, and report what was created in it before the watch
                // (after the directory itself, so readers see parents first).
                let watches = stream.watches();
                let _ = add_tree(&watches, &root, &host, &mut dirs, Some(&tx));
            }
        }
    }))
}

/// Watches `dir` (a host path under `root`, used only as a label) and every directory below it.
/// The directories are opened from the workspace's own descriptor one name at a time without
/// following links, and each watch is added on the open directory (`/proc/self/fd/N`): a name
/// a process inside swaps for a link meanwhile can point the walk nowhere outside.
fn add_tree(
    watches: &inotify::Watches,
    root: &Path,
    dir: &Path,
    dirs: &mut HashMap<WatchDescriptor, PathBuf>,
    report: Option<&broadcast::Sender<FileEvent>>,
) -> std::io::Result<()> {
    let parts: Vec<String> = dir
        .strip_prefix(root)
        .map_err(|_| std::io::Error::other("outside the workspace"))?
        .iter()
        .map(|c| c.to_string_lossy().into_owned())
        .collect();
    let depth = parts.len();
    let fd = crate::rooted::Root::open(root)?.dir_nofollow(&parts)?;
    add_open(watches, root, dir, fd, depth, dirs, report)
}

fn add_open(
    watches: &inotify::Watches,
    root: &Path,
    dir: &Path,
    fd: std::os::fd::OwnedFd,
    depth: usize,
    dirs: &mut HashMap<WatchDescriptor, PathBuf>,
    report: Option<&broadcast::Sender<FileEvent>>,
) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let wd = watches
        .clone()
        .add(format!("/proc/self/fd/{}", fd.as_raw_fd()), MASK)?;
    dirs.insert(wd, dir.to_path_buf());
    for (name, meta) in crate::rooted::entries(&fd)? {
        let path = dir.join(&name);
        if let Some(tx) = report {
            let _ = tx.send(FileEvent::new(
                "created",
                sandbox_path(root, &path),
                meta.is_dir(),
            ));
        }
        if meta.is_dir()
            && depth < MAX_DEPTH
            && let Ok(sub) = crate::rooted::subdir(&fd, &name)
        {
            add_open(watches, root, &path, sub, depth + 1, dirs, report)?;
        }
    }
    Ok(())
}

fn sandbox_path(root: &Path, host: &Path) -> String {
    let rel = host.strip_prefix(root).unwrap_or(host);
    let rel = rel.to_string_lossy();
    if rel.is_empty() {
        crate::paths::WORKSPACE.to_string()
    } else {
        format!("{}/{rel}", crate::paths::WORKSPACE)
    }
}
