//! The tenant event stream (`GET /events/stream`, SSE): sandbox lifecycle events, each with an
//! increasing id (`evt_<n>`), kept in `events.jsonl` so a client that reconnects with
//! `Last-Event-ID` gets what it missed, across sandboxd restarts too.

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TenantEvent {
    pub seq: u64,
    /// `sandbox.created`, `sandbox.ready`, `sandbox.paused`, `sandbox.resumed`,
    /// `sandbox.stopped`, `sandbox.destroyed`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The resource the event is about.
    pub id: String,
    pub ts: String,
    #[serde(default)]
    pub data: serde_json::Map<String, serde_json::Value>,
}

impl TenantEvent {
    pub fn event_id(&self) -> String {
        format!("evt_{}", self.seq)
    }
}

pub struct EventLog {
    path: PathBuf,
    next: Mutex<u64>,
    tx: broadcast::Sender<TenantEvent>,
}

impl EventLog {
    pub fn open(data_dir: &std::path::Path) -> std::io::Result<EventLog> {
        let path = data_dir.join("events.jsonl");
        let last = Self::read_from(&path, 0)?
            .last()
            .map(|e| e.seq)
            .unwrap_or(0);
        Ok(EventLog {
            path,
            next: Mutex::new(last + 1),
            tx: broadcast::channel(1024).0,
        })
    }

    fn read_from(path: &std::path::Path, after: u64) -> std::io::Result<Vec<TenantEvent>> {
        let file = match std::fs::File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        Ok(std::io::BufReader::new(file)
            .lines()
            .map_while(Result::ok)
            // A line cut by a crash is skipped, not fatal.
            .filter_map(|l| serde_json::from_str::<TenantEvent>(&l).ok())
            .filter(|e| e.seq > after)
            .collect())
    }

    /// Records and broadcasts an event.
    pub fn emit(&self, kind: &str, id: &str, data: serde_json::Map<String, serde_json::Value>) {
        let mut next = self.next.lock().unwrap_or_else(|p| p.into_inner());
        let event = TenantEvent {
            seq: *next,
            kind: kind.to_string(),
            id: id.to_string(),
            ts: crate::clock::rfc3339(crate::clock::now_ms()),
            data,
        };
        let line = serde_json::to_string(&event).unwrap_or_default();
        let written = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .and_then(|mut f| writeln!(f, "{line}"));
        if let Err(e) = written {
            tracing::warn!(error = %e, "recording a tenant event");
        }
        *next += 1;
        let _ = self.tx.send(event);
    }

    /// Events after `after` (from the log), and a receiver for the live ones. Subscribing before
    /// reading means nothing falls between the two; duplicates are skipped by `seq`.
    pub fn replay_and_subscribe(
        &self,
        after: u64,
    ) -> std::io::Result<(Vec<TenantEvent>, broadcast::Receiver<TenantEvent>)> {
        let rx = self.tx.subscribe();
        Ok((Self::read_from(&self.path, after)?, rx))
    }

    /// Events after `after`, from the log (to catch up a reader that fell behind).
    pub fn replay(&self, after: u64) -> std::io::Result<Vec<TenantEvent>> {
        Self::read_from(&self.path, after)
    }

    /// The last event's sequence number.
    pub fn last_seq(&self) -> u64 {
        self.next
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .saturating_sub(1)
    }
}
