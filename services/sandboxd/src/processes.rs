//! Background processes of a sandbox (a dev server): started under the jail, outliving the
//! request that started them, logged to files, streamed live, stopped with SIGTERM then SIGKILL
//! after 5 s, and ended with their sandbox.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustix::process::{Pid, Signal as OsSignal, kill_process_group};
use serde::Serialize;
use tokio::sync::{broadcast, watch};

use crate::clock::now_ms;
pub use crate::proclog::Line;

/// How long a stopped process has between SIGTERM and SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(5);

#[derive(Clone, Copy, Debug)]
pub enum Signal {
    Term,
    Kill,
    Stop,
    Continue,
}

impl Signal {
    fn os(self) -> OsSignal {
        match self {
            Signal::Term => OsSignal::TERM,
            Signal::Kill => OsSignal::KILL,
            Signal::Stop => OsSignal::STOP,
            Signal::Continue => OsSignal::CONT,
        }
    }
}

/// Sends `signal` to the process group led by `os_pid` (the jail and everything in it).
pub fn signal_group(os_pid: u32, signal: Signal) {
    if let Some(pid) = i32::try_from(os_pid).ok().and_then(Pid::from_raw) {
        // The group may already be gone; that is the outcome a signal wants anyway.
        let _ = kill_process_group(pid, signal.os());
    }
}

/// The processes of process group `pgid`, with their command names, read from /proc.
pub fn group_members(pgid: u32) -> Vec<(i32, String)> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let open = stat.find('(')?;
            let close = stat.rfind(')')?;
            let comm = stat.get(open + 1..close)?.to_string();
            // After the command: state, ppid, pgrp.
            let pgrp: u32 = stat
                .get(close + 1..)?
                .split_whitespace()
                .nth(2)?
                .parse()
                .ok()?;
            (pgrp == pgid).then_some((pid, comm))
        })
        .collect()
}

#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Running,
    Exited,
    Killed,
}

pub struct Proc {
    pub pid: u64,
    pub name: Option<String>,
    pub command: String,
    pub cwd: String,
    pub restart: bool,
    pub started_at_ms: i64,
    os_pid: u32,
    status: Mutex<(Status, Option<i32>)>,
    lines: broadcast::Sender<Line>,
    done: watch::Receiver<bool>,
    log_path: PathBuf,
}

impl Proc {
    pub fn view(&self) -> serde_json::Value {
        let (status, exit_code) = self
            .status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        serde_json::json!({
            "pid": self.pid,
            "id": self.pid.to_string(),
            "name": self.name,
            "command": self.command,
            "cwd": self.cwd,
            "status": status,
            "state": status,
            "running": status == Status::Running,
            "exit_code": exit_code,
            "restart": self.restart,
            "started_at": crate::clock::rfc3339(self.started_at_ms),
        })
    }

    pub fn is_running(&self) -> bool {
        self.status.lock().unwrap_or_else(|p| p.into_inner()).0 == Status::Running
    }

    /// The last `tail` lines of its output (all that is kept when 0), stdout and stderr
    /// interleaved.
    pub fn logs(&self, tail: usize) -> String {
        crate::proclog::tail(&self.log_path, tail)
    }

    pub fn subscribe(&self) -> (broadcast::Receiver<Line>, watch::Receiver<bool>) {
        (self.lines.subscribe(), self.done.clone())
    }

    /// SIGTERM, then SIGKILL if it is still running after `STOP_GRACE`.
    pub async fn stop(&self) {
        if !self.is_running() {
            return;
        }
        signal_group(self.os_pid, Signal::Continue);
        // SIGTERM goes to the sandbox's own processes, not to the jail around them: bubblewrap
        // would die of it at once and take them down without their grace period.
        for pid in group_members(self.os_pid)
            .into_iter()
            .filter(|(_, comm)| comm != "bwrap")
        {
            if let Some(p) = Pid::from_raw(pid.0) {
                let _ = rustix::process::kill_process(p, Signal::Term.os());
            }
        }
        let mut done = self.done.clone();
        let ended = tokio::time::timeout(STOP_GRACE, finished(&mut done))
            .await
            .is_ok();
        if !ended {
            signal_group(self.os_pid, Signal::Kill);
            finished(&mut done).await;
            self.status.lock().unwrap_or_else(|p| p.into_inner()).0 = Status::Killed;
        }
    }
}

/// The processes of one sandbox.
pub struct Processes {
    dir: PathBuf,
    table: Mutex<(u64, BTreeMap<u64, Arc<Proc>>)>,
}

impl Processes {
    pub fn new(dir: PathBuf) -> Self {
        Self {
            dir,
            table: Mutex::new((0, BTreeMap::new())),
        }
    }

    /// Starts `cmd` (built by the jail) in the background.
    pub fn start(
        &self,
        mut cmd: tokio::process::Command,
        command: String,
        cwd: String,
        name: Option<String>,
        restart: bool,
    ) -> std::io::Result<Arc<Proc>> {
        std::fs::create_dir_all(&self.dir)?;
        // The process outlives the request; the sandbox's teardown ends it.
        cmd.kill_on_drop(false);
        let mut child = cmd.spawn()?;
        let os_pid = child
            .id()
            .ok_or_else(|| std::io::Error::other("process exited at once"))?;
        let pid = {
            let mut t = self.table.lock().unwrap_or_else(|p| p.into_inner());
            t.0 += 1;
            t.0
        };
        let log_path = self.dir.join(format!("{pid}.log"));
        let (lines, _) = broadcast::channel(crate::proclog::QUEUE);
        let (done_tx, done) = watch::channel(false);
        let proc = Arc::new(Proc {
            pid,
            name,
            command,
            cwd,
            restart,
            started_at_ms: now_ms(),
            os_pid,
            status: Mutex::new((Status::Running, None)),
            lines,
            done,
            log_path: log_path.clone(),
        });
        let (log_tx, log_rx) = tokio::sync::mpsc::channel::<Line>(crate::proclog::QUEUE);
        let pumps: Vec<_> = [
            child.stdout.take().map(|s| {
                crate::proclog::pump(Box::new(s), "stdout", log_tx.clone(), proc.lines.clone())
            }),
            child.stderr.take().map(|s| {
                crate::proclog::pump(Box::new(s), "stderr", log_tx.clone(), proc.lines.clone())
            }),
        ]
        .into_iter()
        .flatten()
        .collect();
        drop(log_tx);
        crate::proclog::spawn_writer(log_path, log_rx);
        let waiter = proc.clone();
        tokio::spawn(async move {
            let status = child.wait().await;
            for p in pumps {
                let _ = p.await;
            }
            let mut s = waiter.status.lock().unwrap_or_else(|p| p.into_inner());
            match status.ok().and_then(|s| s.code()) {
                Some(code) => *s = (Status::Exited, Some(code)),
                None => *s = (Status::Killed, None),
            }
            drop(s);
            let _ = done_tx.send(true);
        });
        self.table
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .1
            .insert(pid, proc.clone());
        Ok(proc)
    }

    pub fn get(&self, pid: u64) -> Option<Arc<Proc>> {
        self.table
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .1
            .get(&pid)
            .cloned()
    }

    pub fn list(&self) -> Vec<Arc<Proc>> {
        self.table
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .1
            .values()
            .cloned()
            .collect()
    }

    pub fn signal_all(&self, signal: Signal) {
        for p in self.list().into_iter().filter(|p| p.is_running()) {
            signal_group(p.os_pid, signal);
        }
    }

    /// Ends every process at once (the sandbox is going away).
    pub async fn kill_all(&self) {
        for p in self.list() {
            if p.is_running() {
                signal_group(p.os_pid, Signal::Continue);
                signal_group(p.os_pid, Signal::Kill);
                let mut done = p.done.clone();
                let _ = tokio::time::timeout(STOP_GRACE, finished(&mut done)).await;
            }
        }
    }
}

/// Resolves when the process has ended.
pub async fn finished(done: &mut watch::Receiver<bool>) {
    let _ = done.wait_for(|d| *d).await.is_ok();
}
