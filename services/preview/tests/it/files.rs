//! A write inside the sandbox becomes exactly one `files_changed`, with two replicas hearing
//! every relayed change.

use std::time::{Duration, Instant};

use slipway_proto::v1::run_event::Payload;

use crate::{System, is_files_changed};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_gives_exactly_one_files_changed_with_two_replicas() {
    let sys = System::start(2, &[]).await;
    let sb = sys.app("run_files", "main").await;
    sys.open("run_files", "main", &sb).await;
    // Let whatever the app's start wrote settle into its own bursts first.
    let mut before = sys.count("run_files", is_files_changed).await;
    loop {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let now = sys.count("run_files", is_files_changed).await;
        if now == before {
            break;
        }
        before = now;
    }

    let wrote = Instant::now();
    sys.write(
        &sb,
        "files:one",
        "public/index.html",
        "<h1 id=\"title\">VERSION_TWO</h1>",
    )
    .await;
    sys.wait_for("run_files", is_files_changed, before + 1)
        .await;
    let took = wrote.elapsed();
    // Quiet for well past the longest burst: nothing more comes.
    tokio::time::sleep(Duration::from_millis(2000)).await;
    let events = sys.events("run_files").await;
    let bursts: Vec<_> = events
        .iter()
        .filter_map(|e| match &e.payload {
            Some(Payload::FilesChanged(f)) => Some(f.clone()),
            _ => None,
        })
        .skip(before)
        .collect();
    assert_eq!(bursts.len(), 1, "{bursts:?}");
    assert_eq!(bursts[0].sandbox_id, sb);
    assert!(
        bursts[0]
            .paths
            .iter()
            .any(|p| p.ends_with("public/index.html"))
            || bursts[0].resync,
        "{:?}",
        bursts[0]
    );
    eprintln!(
        "files_changed {} ms after the write returned",
        took.as_millis()
    );
}
