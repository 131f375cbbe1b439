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

/// What the relay says is passed on: a `resync` stays a `resync`; a burst with more paths than
/// `preview.max_paths` (or one too long) is capped and sent as a `resync`; an undecodable
/// change is dropped without losing the next.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resync_passes_through_paths_are_capped_and_garbage_is_dropped() {
    use slipway_common::rpc::message_headers;
    use slipway_proto::codec::{ContentType, encode};
    use slipway_proto::v1::{FileChange, FileChangeKind};

    let sys = System::start(2, &[("SLIPWAY__PREVIEW__MAX_PATHS", "10")]).await;
    let sb = sys.app("run_caps", "main").await;
    sys.open("run_caps", "main", &sb).await;
    let nats = &sys.executor.nats_client;
    let subject = format!("slipway.sandboxes.{sb}.files");
    let send = |kind: FileChangeKind, path: String| {
        let change = FileChange {
            sandbox_id: sb.clone(),
            kind: kind.into(),
            path,
            ..Default::default()
        };
        let subject = subject.clone();
        async move {
            nats.publish_with_headers(
                subject,
                message_headers::<FileChange>(ContentType::Protobuf),
                encode(&change, ContentType::Protobuf).into(),
            )
            .await
            .unwrap();
            nats.flush().await.unwrap();
        }
    };
    let bursts = || async {
        sys.events("run_caps")
            .await
            .into_iter()
            .filter_map(|e| match e.payload {
                Some(Payload::FilesChanged(f)) => Some(f),
                _ => None,
            })
            .collect::<Vec<_>>()
    };
    let settle = || async {
        let mut n = bursts().await.len();
        loop {
            tokio::time::sleep(Duration::from_millis(1200)).await;
            let now = bursts().await.len();
            if now == n {
                return n;
            }
            n = now;
        }
    };

    let before = settle().await;
    nats.publish(subject.clone(), "not a change".into())
        .await
        .unwrap();
    send(FileChangeKind::Resync, "/workspace".into()).await;
    sys.wait_for("run_caps", is_files_changed, before + 1).await;
    let before = settle().await;
    let got = bursts().await;
    assert_eq!(got.len(), before);
    assert!(got[before - 1].resync, "{:?}", got[before - 1]);

    for i in 0..15 {
        send(FileChangeKind::Modified, format!("/workspace/f{i:02}.txt")).await;
    }
    sys.wait_for("run_caps", is_files_changed, before + 1).await;
    let after = settle().await;
    assert_eq!(after, before + 1, "one burst");
    let capped = &bursts().await[before];
    assert_eq!(capped.paths.len(), 10, "{capped:?}");
    assert!(capped.resync);

    send(
        FileChangeKind::Modified,
        format!("/workspace/{}", "x".repeat(2000)),
    )
    .await;
    sys.wait_for("run_caps", is_files_changed, after + 1).await;
    let long = &bursts().await[after];
    assert!(long.resync && long.paths.is_empty(), "{long:?}");
}

/// A second port of the same branch: the platform mints tokens for the sandbox's preview port
/// only, so that preview's URL is the platform preview's own (until `close`); and one write is
/// still one `files_changed` for the branch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_port_has_its_own_url_and_a_write_is_still_one_event_for_the_branch() {
    use slipway_common::Service;
    use slipway_proto::v1::*;

    let sys = System::start(2, &[]).await;
    let sb = sys.app("run_ports", "main").await;
    let _: ProcessReply = sys
        .executor
        .rpc
        .call(
            &Service::Executor.op("process.start"),
            &StartProcessRequest {
                sandbox_id: sb.clone(),
                idempotency_key: "ports:second".into(),
                command: "node server.js".into(),
                env: [("PORT".to_string(), "3001".to_string())].into(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    sys.open("run_ports", "main", &sb).await;
    let second: OpenPreviewReply = sys
        .call(
            "open",
            &OpenPreviewRequest {
                run_id: "run_ports".into(),
                branch: "main".into(),
                port: 3001,
                sandbox_id: sb.clone(),
            },
        )
        .await
        .unwrap();
    assert!(second.token_expires_at.is_none(), "no token for that port");
    let (status, body) = sys.status(&format!("{}echo", second.url)).await;
    assert_eq!(status, 200);
    assert!(body.contains("\"port\":3001"), "{body}");
    assert_eq!(sys.platform_previews(&sb).await.len(), 2);

    let mut before = sys.count("run_ports", is_files_changed).await;
    loop {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let now = sys.count("run_ports", is_files_changed).await;
        if now == before {
            break;
        }
        before = now;
    }
    sys.write(&sb, "ports:write", "public/other.txt", "x").await;
    sys.wait_for("run_ports", is_files_changed, before + 1)
        .await;
    tokio::time::sleep(Duration::from_millis(2000)).await;
    assert_eq!(sys.count("run_ports", is_files_changed).await, before + 1);
}
