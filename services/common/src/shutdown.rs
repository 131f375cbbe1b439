//! Graceful shutdown: one token every long-running task watches, one tracker that knows what is
//! still in flight. SIGTERM or SIGINT triggers the token; the service then stops taking work,
//! finishes what it has under a deadline, drains NATS and flushes telemetry.

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

#[derive(Clone, Debug, Default)]
pub struct Shutdown {
    token: CancellationToken,
    tracker: TaskTracker,
}

impl Shutdown {
    pub fn new() -> Self {
        Self::default()
    }

    /// Triggers on SIGTERM or SIGINT (spawned on the current runtime).
    pub fn listen_for_signals(&self) -> std::io::Result<()> {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let token = self.token.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
                _ = int.recv() => tracing::info!("SIGINT: shutting down"),
                _ = token.cancelled() => return,
            }
            token.cancel();
        });
        Ok(())
    }

    pub fn trigger(&self) {
        self.token.cancel();
    }

    pub fn is_triggered(&self) -> bool {
        self.token.is_cancelled()
    }

    /// Resolves once shutdown has been triggered.
    pub async fn triggered(&self) {
        self.token.cancelled().await
    }

    pub fn token(&self) -> &CancellationToken {
        &self.token
    }

    /// Tracks in-flight work: tasks spawned here are waited for on shutdown.
    pub fn tracker(&self) -> &TaskTracker {
        &self.tracker
    }

    /// Waits for tracked work to finish, at most `deadline`. Returns whether everything finished.
    pub async fn wait_in_flight(&self, deadline: Duration) -> bool {
        self.tracker.close();
        tokio::time::timeout(deadline, self.tracker.wait())
            .await
            .is_ok()
    }
}
