//! Every other executor operation over NATS against a real sandboxd; sandboxes counted at
//! sandboxd where a test is about how many exist.

use std::time::Duration;

use slipway_common::RpcClient;
use slipway_proto::v1::*;
use slipway_test_support::{NatsServer, Sandboxd, workspace_bin};

use crate::harness::{op, sandboxes_at_sandboxd};
use crate::service::{create, executor};

/// Live sandboxes at sandboxd (the source of truth), not in the executor's records.
async fn live_at_sandboxd(sd: &Sandboxd) -> usize {
    sandboxes_at_sandboxd(sd)
        .await
        .iter()
        .filter(|s| s["state"] != "destroyed")
        .count()
}

async fn write(rpc: &RpcClient, id: &str, key: &str, path: &str, content: &[u8]) {
    let _: WriteFilesReply = rpc
        .call(
            &op("files.write_many"),
            &WriteFilesRequest {
                sandbox_id: id.into(),
                idempotency_key: key.into(),
                files: vec![FileContent {
                    path: path.into(),
                    content: content.to_vec(),
                    mode: 0,
                }],
            },
        )
        .await
        .unwrap();
}

async fn read(rpc: &RpcClient, id: &str, path: &str) -> Result<Vec<u8>, slipway_common::RpcError> {
    rpc.call::<_, ReadFileReply>(
        &op("files.read"),
        &ReadFileRequest {
            sandbox_id: id.into(),
            path: path.into(),
        },
    )
    .await
    .map(|r| r.content)
}

fn code(e: &slipway_common::RpcError) -> i32 {
    e.service_error().map(|s| s.code as i32).unwrap_or(-1)
}

#[tokio::test]
async fn lifecycle_files_processes_snapshots_and_forks_over_nats() {
    let nats = NatsServer::start().unwrap();
    let sd = Sandboxd::start(workspace_bin("slipway-sandboxd").unwrap(), &[]).unwrap();
    let mut ex = executor(&nats, &sd).await;
    let rpc = RpcClient::new(
        async_nats::connect(nats.url()).await.unwrap(),
        Duration::from_secs(30),
    );
    let sb: SandboxReply = rpc
        .call(&op("sandbox.create"), &create("r:s:1"))
        .await
        .unwrap();
    let id = sb.sandbox.unwrap().id;

    let up: SandboxReply = rpc
        .call(
            &op("sandbox.update"),
            &UpdateSandboxRequest {
                sandbox_id: id.clone(),
                always_on: Some(true),
                idempotency_key: "r:s:2".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert!(up.sandbox.unwrap().always_on);
    let e = rpc
        .call::<_, SandboxReply>(
            &op("sandbox.update"),
            &UpdateSandboxRequest {
                sandbox_id: id.clone(),
                idempotency_key: "r:s:3".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert_eq!(code(&e), ErrorCode::InvalidInput as i32, "{e}");
    let r = |key: &str| SandboxRef {
        sandbox_id: id.clone(),
        idempotency_key: key.into(),
    };
    let paused: SandboxReply = rpc.call(&op("sandbox.pause"), &r("r:s:4")).await.unwrap();
    assert_eq!(paused.sandbox.unwrap().state, SandboxState::Paused as i32);
    let resumed: SandboxReply = rpc.call(&op("sandbox.resume"), &r("r:s:5")).await.unwrap();
    assert_eq!(resumed.sandbox.unwrap().state, SandboxState::Running as i32);
    let ready: ReadinessReply = rpc
        .call(
            &op("sandbox.readiness"),
            &ReadinessRequest {
                sandbox_id: id.clone(),
                wait_ms: 1000,
            },
        )
        .await
        .unwrap();
    assert!(ready.ready);
    let templates: ListTemplatesReply = rpc
        .call(&op("templates.list"), &ListTemplatesRequest {})
        .await
        .unwrap();
    assert!(
        templates
            .templates
            .iter()
            .any(|t| t.id == "node" && t.preview_port == 3000)
    );

    // Files.
    write(&rpc, &id, "r:f:1", "app/notes.txt", b"first").await;
    assert_eq!(read(&rpc, &id, "app/notes.txt").await.unwrap(), b"first");
    let listed: ListFilesReply = rpc
        .call(
            &op("files.list"),
            &ListFilesRequest {
                sandbox_id: id.clone(),
                path: "/workspace/app".into(),
                recursive: false,
            },
        )
        .await
        .unwrap();
    assert_eq!(listed.entries.len(), 1);
    assert_eq!(listed.entries[0].path, "/workspace/app/notes.txt");
    assert_eq!(listed.entries[0].size, 5);
    let tree: FileTreeReply = rpc
        .call(
            &op("files.tree"),
            &FileTreeRequest {
                sandbox_id: id.clone(),
                path: String::new(),
                depth: 2,
            },
        )
        .await
        .unwrap();
    let root = tree.root.unwrap();
    assert_eq!(root.entry.unwrap().kind, FileKind::Dir as i32);
    let app = root
        .children
        .iter()
        .find(|c| c.entry.as_ref().unwrap().path == "/workspace/app")
        .expect("app/ in the tree");
    assert_eq!(
        app.children[0].entry.as_ref().unwrap().path,
        "/workspace/app/notes.txt"
    );
    let e = read(&rpc, &id, "../../etc/passwd").await.unwrap_err();
    assert_ne!(code(&e), ErrorCode::Internal as i32, "{e}");

    // A background process and its logs.
    let started: ProcessReply = rpc
        .call(
            &op("process.start"),
            &StartProcessRequest {
                sandbox_id: id.clone(),
                idempotency_key: "r:p:1".into(),
                command: "echo started-ok; sleep 30".into(),
                name: "sleeper".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let p = started.process.unwrap();
    assert_eq!(p.state, ProcessState::Running as i32);
    let pref = ProcessRef {
        sandbox_id: id.clone(),
        process_id: p.id.clone(),
        ..Default::default()
    };
    let mut logs = String::new();
    for _ in 0..100 {
        let l: ProcessLogsReply = rpc
            .call(
                &op("process.logs"),
                &ProcessLogsRequest {
                    sandbox_id: id.clone(),
                    process_id: p.id.clone(),
                    tail: 10,
                },
            )
            .await
            .unwrap();
        logs = l.stdout;
        if logs.contains("started-ok") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(logs.contains("started-ok"), "{logs}");
    let list: ListProcessesReply = rpc
        .call(
            &op("process.list"),
            &ListProcessesRequest {
                sandbox_id: id.clone(),
            },
        )
        .await
        .unwrap();
    assert_eq!(list.processes.len(), 1);
    let got: ProcessReply = rpc.call(&op("process.get"), &pref).await.unwrap();
    assert_eq!(got.process.unwrap().name, "sleeper");
    let _: ProcessReply = rpc.call(&op("process.stop"), &pref).await.unwrap();

    // Snapshot, change, restore; fork from the snapshot.
    let snap: SnapshotReply = rpc
        .call(
            &op("snapshot.create"),
            &CreateSnapshotRequest {
                sandbox_id: id.clone(),
                idempotency_key: "r:c:1".into(),
                comment: "before".into(),
            },
        )
        .await
        .unwrap();
    let snap = snap.snapshot.unwrap();
    write(&rpc, &id, "r:f:2", "app/notes.txt", b"second").await;
    let snaps: ListSnapshotsReply = rpc
        .call(
            &op("snapshot.list"),
            &ListSnapshotsRequest {
                sandbox_id: id.clone(),
            },
        )
        .await
        .unwrap();
    assert_eq!(snaps.snapshots.len(), 1);
    let fork: SandboxReply = rpc
        .call(
            &op("sandbox.fork"),
            &ForkSandboxRequest {
                sandbox_id: id.clone(),
                snapshot_id: snap.id.clone(),
                idempotency_key: "r:k:1".into(),
                branch: "variant-b".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let fork = fork.sandbox.unwrap();
    assert_ne!(fork.id, id);
    assert_eq!(fork.branch, "variant-b");
    assert_eq!(fork.attribution.unwrap().user_id, "a.b@c d");
    assert_eq!(
        read(&rpc, &fork.id, "app/notes.txt").await.unwrap(),
        b"first"
    );
    assert_eq!(live_at_sandboxd(&sd).await, 2);
    let _: SandboxReply = rpc
        .call(
            &op("snapshot.restore"),
            &RestoreSnapshotRequest {
                sandbox_id: id.clone(),
                snapshot_id: snap.id.clone(),
                idempotency_key: "r:c:2".into(),
                attribution: None,
            },
        )
        .await
        .unwrap();
    assert_eq!(read(&rpc, &id, "app/notes.txt").await.unwrap(), b"first");

    let _: DeleteFileReply = rpc
        .call(
            &op("files.delete"),
            &DeleteFileRequest {
                sandbox_id: id.clone(),
                path: "app/notes.txt".into(),
                recursive: false,
                idempotency_key: "r:f:3".into(),
            },
        )
        .await
        .unwrap();
    let e = read(&rpc, &id, "app/notes.txt").await.unwrap_err();
    assert_eq!(code(&e), ErrorCode::NotFound as i32, "{e}");

    // Reap by run: both sandboxes of the run go, counted at sandboxd.
    let reaped: ReapReply = rpc
        .call(
            &op("reap"),
            &ReapRequest {
                run_id: slipway_proto::run_id_for("req-1"),
                dry_run: false,
            },
        )
        .await
        .unwrap();
    assert_eq!(reaped.destroyed.len(), 2);
    assert_eq!(live_at_sandboxd(&sd).await, 0);
    ex.stop().await.unwrap();
}

#[tokio::test]
async fn previews_shares_deploys_usage_and_quotas_over_nats() {
    let nats = NatsServer::start().unwrap();
    let sd = Sandboxd::start(workspace_bin("slipway-sandboxd").unwrap(), &[]).unwrap();
    let mut ex = executor(&nats, &sd).await;
    let rpc = RpcClient::new(
        async_nats::connect(nats.url()).await.unwrap(),
        Duration::from_secs(30),
    );
    let sb: SandboxReply = rpc
        .call(&op("sandbox.create"), &create("r:s:1"))
        .await
        .unwrap();
    let id = sb.sandbox.unwrap().id;

    let preview: PreviewReply = rpc
        .call(
            &op("preview.create"),
            &CreatePreviewRequest {
                sandbox_id: id.clone(),
                port: 3000,
                idempotency_key: "r:v:1".into(),
            },
        )
        .await
        .unwrap();
    let preview = preview.preview.unwrap();
    assert!(preview.url.contains(".preview.localhost:"), "{preview:?}");
    let token: PreviewTokenReply = rpc
        .call(
            &op("preview.token"),
            &PreviewTokenRequest {
                sandbox_id: id.clone(),
                port: 3000,
                expires_in_sec: 600,
                scope: TokenScope::Read as i32,
            },
        )
        .await
        .unwrap();
    assert!(token.token.starts_with("mp_") && token.url.contains("?mt=mp_"));
    assert!(token.expires_at.is_some());
    let e = rpc
        .call::<_, PreviewTokenReply>(
            &op("preview.token"),
            &PreviewTokenRequest {
                sandbox_id: id.clone(),
                expires_in_sec: 90_000,
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert_eq!(code(&e), ErrorCode::InvalidInput as i32);
    let shared: PreviewShareReply = rpc
        .call(
            &op("preview.share"),
            &CreatePreviewShareRequest {
                sandbox_id: id.clone(),
                preview_id: preview.id.clone(),
                ttl_sec: 600,
                idempotency_key: "r:v:2".into(),
            },
        )
        .await
        .unwrap();
    assert!(shared.url.contains("preview_token=miosa_pv_"), "{shared:?}");
    let revoked: RevokeReply = rpc
        .call(
            &op("preview.revoke"),
            &RevokePreviewSharesRequest {
                sandbox_id: id.clone(),
                preview_id: preview.id.clone(),
            },
        )
        .await
        .unwrap();
    assert_eq!(revoked.revoked, 1);
    let share: ShareReply = rpc
        .call(
            &op("share.create"),
            &CreateShareRequest {
                sandbox_id: id.clone(),
                expires_in_sec: 600,
                idempotency_key: "r:h:1".into(),
            },
        )
        .await
        .unwrap();
    let share = share.share.unwrap();
    assert!(share.id.starts_with("shr_") && share.url.contains("?ms=ms_"));
    let listed: ListSharesReply = rpc
        .call(
            &op("share.list"),
            &ListSharesRequest {
                sandbox_id: id.clone(),
            },
        )
        .await
        .unwrap();
    assert_eq!(listed.shares.len(), 1);
    let _: RevokeReply = rpc
        .call(
            &op("share.revoke"),
            &RevokeShareRequest {
                sandbox_id: id.clone(),
                share_id: share.id.clone(),
            },
        )
        .await
        .unwrap();

    // Deploy twice, follow the jobs, roll back, promote.
    let mut versions = Vec::new();
    for (n, body) in [b"<p>1</p>".as_slice(), b"<p>2</p>"].iter().enumerate() {
        write(&rpc, &id, &format!("r:d:w{n}"), "site/index.html", body).await;
        let deployed: DeployReply = rpc
            .call(
                &op("deploy"),
                &DeployRequest {
                    sandbox_id: id.clone(),
                    idempotency_key: format!("r:d:{n}"),
                    name: "site".into(),
                    output_path: "/workspace/site".into(),
                    deployment_id: versions
                        .first()
                        .map(|(d, _): &(String, String)| d.clone())
                        .unwrap_or_default(),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        let d = deployed.deployment.unwrap();
        let v = deployed.version.unwrap();
        assert_eq!(v.state, VersionState::Building as i32);
        let mut state = v.state;
        for _ in 0..200 {
            let got: VersionReply = rpc
                .call(
                    &op("version.get"),
                    &GetVersionRequest {
                        deployment_id: d.id.clone(),
                        version_id: v.id.clone(),
                    },
                )
                .await
                .unwrap();
            state = got.version.unwrap().state;
            if state != VersionState::Building as i32 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(state, VersionState::Ready as i32);
        versions.push((d.id.clone(), v.id.clone()));
    }
    let (dep, v1) = versions[0].clone();
    let v2 = versions[1].1.clone();
    let logs: VersionLogsReply = rpc
        .call(
            &op("version.logs"),
            &VersionLogsRequest {
                deployment_id: dep.clone(),
                version_id: v2.clone(),
            },
        )
        .await
        .unwrap();
    assert!(
        logs.lines.iter().any(|l| l.contains("frozen 1 files")),
        "{logs:?}"
    );
    let all: ListVersionsReply = rpc
        .call(
            &op("version.list"),
            &ListVersionsRequest {
                deployment_id: dep.clone(),
            },
        )
        .await
        .unwrap();
    assert_eq!(
        all.versions.iter().map(|v| v.number).collect::<Vec<_>>(),
        vec![2, 1]
    );
    let back: DeploymentReply = rpc
        .call(
            &op("deployment.rollback"),
            &SetVersionRequest {
                deployment_id: dep.clone(),
                version_id: String::new(),
                idempotency_key: "r:d:rb".into(),
            },
        )
        .await
        .unwrap();
    assert_eq!(back.deployment.unwrap().current_version_id, v1);
    let fwd: DeploymentReply = rpc
        .call(
            &op("deployment.promote"),
            &SetVersionRequest {
                deployment_id: dep.clone(),
                version_id: v2.clone(),
                idempotency_key: "r:d:pr".into(),
            },
        )
        .await
        .unwrap();
    let fwd = fwd.deployment.unwrap();
    assert_eq!(fwd.current_version_id, v2);
    let got: DeploymentReply = rpc
        .call(
            &op("deployment.get"),
            &GetDeploymentRequest {
                deployment_id: dep.clone(),
            },
        )
        .await
        .unwrap();
    let got = got.deployment.unwrap();
    assert_eq!(
        (got.id.as_str(), got.current_version_id.as_str()),
        (dep.as_str(), v2.as_str())
    );
    assert_eq!(got.url, fwd.url);
    assert!(fwd.url.contains(".apps.localhost:"), "{fwd:?}");

    // Usage and quotas, as the platform reports and enforces them.
    let usage: SandboxUsageReply = rpc
        .call(
            &op("usage.sandbox"),
            &SandboxUsageRequest {
                sandbox_id: id.clone(),
            },
        )
        .await
        .unwrap();
    assert!(usage.counters.unwrap().vcpu_ms > 0);
    let rollup: UsageRollupReply = rpc
        .call(&op("usage.rollup"), &UsageRollupRequest::default())
        .await
        .unwrap();
    assert_eq!(rollup.rows.len(), 1);
    assert_eq!(rollup.rows[0].key, "a.b@c d");
    let set: QuotaReply = rpc
        .call(
            &op("quota.set"),
            &SetQuotaRequest {
                user_id: "a.b@c d".into(),
                limits: Some(QuotaLimits {
                    max_sandboxes: Some(1),
                    ..Default::default()
                }),
            },
        )
        .await
        .unwrap();
    assert_eq!(set.quota.unwrap().limits.unwrap().max_sandboxes, Some(1));
    let got: QuotaReply = rpc
        .call(
            &op("quota.get"),
            &GetQuotaRequest {
                user_id: "a.b@c d".into(),
            },
        )
        .await
        .unwrap();
    assert_eq!(got.quota.unwrap().total_sandboxes, 1);
    // The platform now refuses a second sandbox for that user: quota exceeded keeps its meaning.
    let e = rpc
        .call::<_, SandboxReply>(&op("sandbox.create"), &create("r:s:2"))
        .await
        .unwrap_err();
    assert_eq!(code(&e), ErrorCode::QuotaExceeded as i32, "{e}");
    assert_eq!(live_at_sandboxd(&sd).await, 1);
    ex.stop().await.unwrap();
}

#[tokio::test]
async fn reap_without_a_run_destroys_only_sandboxes_past_their_timeout() {
    let nats = NatsServer::start().unwrap();
    // sandboxd's own reaper is slowed down, so the executor's is the one that acts.
    let sd = Sandboxd::start(
        workspace_bin("slipway-sandboxd").unwrap(),
        &["--idle-check-ms", "600000"],
    )
    .unwrap();
    let mut ex = executor(&nats, &sd).await;
    let rpc = RpcClient::new(
        async_nats::connect(nats.url()).await.unwrap(),
        Duration::from_secs(30),
    );
    let short = CreateSandboxRequest {
        timeout_sec: 1,
        ..create("r:s:short")
    };
    let expiring: SandboxReply = rpc.call(&op("sandbox.create"), &short).await.unwrap();
    let expiring = expiring.sandbox.unwrap().id;
    let lasting: SandboxReply = rpc
        .call(&op("sandbox.create"), &create("r:s:long"))
        .await
        .unwrap();
    let lasting = lasting.sandbox.unwrap().id;
    // Past the one-second timeout (a deadline on the clock).
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let dry: ReapReply = rpc
        .call(
            &op("reap"),
            &ReapRequest {
                run_id: String::new(),
                dry_run: true,
            },
        )
        .await
        .unwrap();
    assert_eq!(dry.destroyed, vec![expiring.clone()]);
    assert_eq!(live_at_sandboxd(&sd).await, 2, "a dry run destroys nothing");
    let reaped: ReapReply = rpc
        .call(
            &op("reap"),
            &ReapRequest {
                run_id: String::new(),
                dry_run: false,
            },
        )
        .await
        .unwrap();
    assert_eq!(reaped.destroyed, vec![expiring]);
    let left: Vec<String> = sandboxes_at_sandboxd(&sd)
        .await
        .iter()
        .filter(|s| s["state"] != "destroyed")
        .map(|s| s["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(left, vec![lasting]);
    ex.stop().await.unwrap();
}
