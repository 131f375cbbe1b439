//! Test support for Slipway (not published): a real `nats-server` per test on a random port,
//! killed and cleaned on drop; a service spawned in this process or as its binary, with its own
//! nats-server and sandboxd (`Spawn`); runs of real binaries to a named failpoint and back; real
//! sandboxd processes; what a stream holds; a headless browser; the size of randomized suites.
#![forbid(unsafe_code)]

pub mod browser;
pub mod nats;
pub mod process;
pub mod sandboxd;
pub mod spawn;
pub mod streams;

pub use nats::NatsServer;
pub use process::{FailpointRun, RunningProcess};
pub use sandboxd::Sandboxd;
pub use spawn::{Spawn, Spawned, set_up_topology};

/// A binary of another crate of the workspace, built next to the running test (nextest and
/// `cargo test --workspace` build every binary before running tests).
pub fn workspace_bin(name: &str) -> anyhow::Result<std::path::PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .ok_or_else(|| anyhow::anyhow!("no target directory above {}", exe.display()))?;
    let bin = dir.join(name);
    if !bin.is_file() {
        anyhow::bail!(
            "{} is not built: run `cargo build --workspace` first",
            bin.display()
        );
    }
    Ok(bin)
}

/// An HTTP client for tests (the process's TLS provider installed first).
pub fn http() -> reqwest::Client {
    slipway_common::tls::install_default_provider();
    reqwest::Client::new()
}

/// How many cases each randomized test runs: `SLIPWAY_TEST_CASES`, 256 by default.
pub fn random_cases() -> usize {
    std::env::var("SLIPWAY_TEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256)
}
