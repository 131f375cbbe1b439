//! File changes to `files_changed`: every replica hears the executor's relayed `FileChange`s
//! (core NATS), but only the one holding the sandbox's lease (`preview.files.<sandbox>`) turns
//! them into events. A burst ends after `preview.debounce_ms` without a change, or
//! `preview.debounce_max_ms` after it began, and becomes one event per run and branch the
//! sandbox serves, so there is one event per burst however many replicas run. The lease is
//! taken at a burst's first change, renewed before its publish (a replica that lost it
//! publishes nothing) and given up after; a burst that finds it expired, not given up, follows
//! a replica that died mid-burst and is sent as a `resync`.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use slipway_common::health::Health;
use slipway_common::lease::{Held, Leases};
use slipway_common::run_events::Step;
use slipway_common::{Shutdown, subjects};
use slipway_proto::v1::run_event::Payload;
use slipway_proto::v1::{FileChange, FileChangeKind, FilesChanged};
use tokio::time::Instant;

use crate::service::Preview;

/// Longest path a `files_changed` carries; a longer one turns the burst into a `resync`.
const MAX_PATH_BYTES: usize = 1024;
/// How long a sandbox's lease holds without a burst to renew it: also how long changes go
/// unpublished when its holder dies without releasing it (a burst lasts at most
/// `debounce_max_ms`, which the settings keep under this).
const LEASE: Duration = Duration::from_secs(3);
/// After another replica was found holding a sandbox, how long before asking again.
const BACKOFF: Duration = Duration::from_secs(1);

struct Burst {
    first: Instant,
    last: Instant,
    /// The first change's wall time (ms): the burst's number in its event id.
    first_ms: u64,
    paths: BTreeSet<String>,
    resync: bool,
}

impl Burst {
    fn due(&self, quiet: Duration, most: Duration) -> Instant {
        (self.last + quiet).min(self.first + most)
    }
}

/// What this replica does for one sandbox.
enum Role {
    /// Holding its lease, last renewed at the instant given.
    Holding(Held, Instant),
    /// Another replica holds it; ask again after this.
    Elsewhere(Instant),
}

pub struct Debouncer {
    preview: Arc<Preview>,
    leases: Leases,
    roles: HashMap<String, Role>,
    bursts: HashMap<String, Burst>,
    quiet: Duration,
    most: Duration,
    max_paths: usize,
}

impl Debouncer {
    pub fn new(preview: Arc<Preview>, leases: Leases) -> Self {
        let s = &preview.settings;
        Self {
            quiet: Duration::from_millis(s.debounce_ms),
            most: Duration::from_millis(s.debounce_max_ms),
            max_paths: s.max_paths,
            preview,
            leases,
            roles: HashMap::new(),
            bursts: HashMap::new(),
        }
    }

    fn lease_name(sandbox: &str) -> String {
        format!("preview.files.{sandbox}")
    }

    /// Whether this replica handles the sandbox's changes: its lease is held (renewed once half
    /// of it has passed, so it cannot lapse mid-burst) or free to take. `Some(true)` when it was
    /// just taken from a holder that died without giving it up: changes may have been missed.
    async fn ours(&mut self, sandbox: &str) -> Option<bool> {
        let now = Instant::now();
        match self.roles.remove(sandbox) {
            Some(Role::Holding(held, at)) if now < at + LEASE / 2 => {
                self.roles
                    .insert(sandbox.to_string(), Role::Holding(held, at));
                return Some(false);
            }
            Some(Role::Holding(held, _)) => {
                if let Ok(held) = self.leases.renew(&held, LEASE).await {
                    self.roles
                        .insert(sandbox.to_string(), Role::Holding(held, now));
                    return Some(false);
                }
            }
            Some(Role::Elsewhere(until)) if now < until => {
                self.roles
                    .insert(sandbox.to_string(), Role::Elsewhere(until));
                return None;
            }
            _ => {}
        }
        let name = Self::lease_name(sandbox);
        let before = self.leases.current(&name).await.ok().flatten();
        match self.leases.try_acquire(&name, LEASE).await {
            Ok(Some(held)) => {
                self.roles
                    .insert(sandbox.to_string(), Role::Holding(held, now));
                Some(before.is_some())
            }
            Ok(None) | Err(_) => {
                self.roles
                    .insert(sandbox.to_string(), Role::Elsewhere(now + BACKOFF));
                None
            }
        }
    }

    async fn heard(&mut self, sandbox: &str, change: FileChange) {
        if self.preview.index.previews_of(sandbox).is_empty() {
            return;
        }
        let Some(taken_over) = self.ours(sandbox).await else {
            return;
        };
        let now = Instant::now();
        let burst = self
            .bursts
            .entry(sandbox.to_string())
            .or_insert_with(|| Burst {
                first: now,
                last: now,
                first_ms: crate::shares::now_ms().max(0) as u64,
                paths: BTreeSet::new(),
                resync: false,
            });
        burst.last = now;
        if taken_over || change.kind == FileChangeKind::Resync as i32 {
            burst.resync = true;
        }
        for p in [change.path, change.old_path] {
            if p.is_empty() {
                continue;
            }
            if p.len() > MAX_PATH_BYTES || burst.paths.len() >= self.max_paths {
                burst.resync = true;
            } else {
                burst.paths.insert(p);
            }
        }
    }

    fn next_due(&self) -> Option<Instant> {
        self.bursts
            .values()
            .map(|b| b.due(self.quiet, self.most))
            .min()
    }

    /// Publishes every burst that is due, each after renewing its sandbox's lease.
    async fn flush(&mut self, all: bool) {
        let now = Instant::now();
        let due: Vec<String> = self
            .bursts
            .iter()
            .filter(|(_, b)| all || b.due(self.quiet, self.most) <= now)
            .map(|(s, _)| s.clone())
            .collect();
        for sandbox in due {
            let Some(burst) = self.bursts.remove(&sandbox) else {
                continue;
            };
            let Some(Role::Holding(held, _)) = self.roles.remove(&sandbox) else {
                continue;
            };
            match self.leases.renew(&held, LEASE).await {
                Ok(held) => {
                    self.roles
                        .insert(sandbox.clone(), Role::Holding(held, Instant::now()));
                }
                Err(e) => {
                    tracing::info!(%sandbox, error = %e, "file-change lease lost: burst left to its holder");
                    continue;
                }
            }
            self.publish(&sandbox, burst).await;
            // Held for a burst only: given up at once, so a lease found expired at the next
            // burst means its holder died in the middle of one.
            if let Some(Role::Holding(held, _)) = self.roles.remove(&sandbox) {
                let _ = self.leases.release(held).await;
            }
        }
        // Forget the sandboxes other replicas held, once it is time to ask again anyway.
        self.roles
            .retain(|_, r| !matches!(r, Role::Elsewhere(until) if *until <= now));
    }

    /// One event per run and branch the sandbox serves (its previews on several ports are
    /// one app).
    async fn publish(&self, sandbox: &str, burst: Burst) {
        let mut seen = BTreeSet::new();
        for preview in self.preview.index.previews_of(sandbox) {
            if !seen.insert((preview.run_id.clone(), preview.branch.clone())) {
                continue;
            }
            let payload = Payload::FilesChanged(FilesChanged {
                sandbox_id: sandbox.to_string(),
                paths: burst.paths.iter().cloned().collect(),
                resync: burst.resync,
            });
            let step = Step::nth(
                &format!("files.{}", crate::ids::digest(&[sandbox])),
                burst.first_ms,
            );
            let sent = self
                .preview
                .events
                .publish(
                    &preview.run_id,
                    &step,
                    &preview.branch,
                    preview.attribution.clone(),
                    payload,
                )
                .await;
            match sent {
                Ok(_) => self.preview.metrics.burst(),
                Err(e) => tracing::warn!(%sandbox, error = %e, "publishing files_changed"),
            }
        }
    }

    /// Gives up every held lease (at shutdown), so another replica takes over at once.
    async fn release_all(&mut self) {
        for (_, role) in self.roles.drain() {
            if let Role::Holding(held, _) = role {
                let _ = self.leases.release(held).await;
            }
        }
    }
}

/// Runs the debouncer until shutdown: what is buffered then is published first.
pub async fn run(
    mut debouncer: Debouncer,
    nats: async_nats::Client,
    shutdown: Shutdown,
    health: Health,
) {
    let subject = format!("{}.sandboxes.*.files", subjects::ROOT);
    let mut sub = loop {
        match nats.subscribe(subject.clone()).await {
            Ok(s) => break s,
            Err(e) => {
                health.report(
                    "file_changes",
                    Err(format!("subscribing to {subject}: {e}")),
                );
                tokio::select! {
                    _ = shutdown.triggered() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
    };
    health.report("file_changes", Ok(()));
    loop {
        let due = debouncer.next_due();
        tokio::select! {
            _ = shutdown.triggered() => break,
            _ = async {
                match due {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            } => debouncer.flush(false).await,
            msg = sub.next() => {
                let Some(msg) = msg else { break };
                // `slipway.sandboxes.<sandbox>.files`: the sandbox comes from the subject.
                let Some(sandbox) = msg.subject.split('.').nth(2).map(str::to_string) else {
                    continue;
                };
                match slipway_common::rpc::decode_message::<FileChange>(msg.headers.as_ref(), &msg.payload) {
                    Ok(change) => debouncer.heard(&sandbox, change).await,
                    Err(e) => tracing::debug!(%sandbox, error = %e, "an undecodable file change"),
                }
            }
        }
    }
    debouncer.flush(true).await;
    debouncer.release_all().await;
}
