//! The planner binary as an operator runs it: a real process, a real nats-server, signals.
#![allow(clippy::unwrap_used)] // Tests fail loudly on the first surprise.

use std::time::Duration;

use slipway_test_support::{FailpointRun, NatsServer};

async fn readyz(port: u16) -> Option<u16> {
    slipway_test_support::http()
        .get(format!("http://127.0.0.1:{port}/readyz"))
        .send()
        .await
        .ok()
        .map(|r| r.status().as_u16())
}

/// A free port outside the ephemeral range, so no other test's `127.0.0.1:0` lands on it between
/// this check and the planner's bind.
fn free_port() -> u16 {
    let seed = std::process::id() as u64 * 7919
        + std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos() as u64;
    (0..1000)
        .map(|i| 20_000 + ((seed + i * 104_729) % 10_000) as u16)
        .find(|p| std::net::TcpListener::bind(("127.0.0.1", *p)).is_ok())
        .unwrap()
}

#[tokio::test]
async fn sigterm_turns_it_unready_and_it_exits_cleanly_within_the_grace_period() {
    let nats = NatsServer::start().unwrap();
    let port = free_port();
    let planner = FailpointRun::new(env!("CARGO_BIN_EXE_slipway-planner"))
        .env("SLIPWAY__NATS__URL", nats.url())
        .env("SLIPWAY__HEALTH__LISTEN", format!("127.0.0.1:{port}"))
        .env("SLIPWAY__SERVICE__GRACE_PERIOD_MS", "5000")
        .spawn(None)
        .unwrap();
    let mut status = None;
    for _ in 0..100 {
        status = readyz(port).await;
        if status.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(status, Some(503), "up, and not ready without its streams");
    let livez = slipway_test_support::http()
        .get(format!("http://127.0.0.1:{port}/livez"))
        .send()
        .await
        .unwrap();
    assert_eq!(livez.status(), 200);

    planner.terminate().unwrap();
    let out = planner.wait(Duration::from_secs(10)).unwrap();
    assert!(out.status.success(), "exit status {}", out.status);
    let log = String::from_utf8_lossy(&out.stdout);
    assert!(
        log.contains("SIGTERM") && log.contains("shutdown complete"),
        "{log}"
    );
}
