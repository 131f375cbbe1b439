//! What the executor does with MIOSA's answers and inputs that MIOSA's shapes constrain: a
//! restore that makes a new sandbox, processes relaunched after a resume, logs without a tail,
//! and requests refused before they reach the platform.

use std::time::Duration;

use slipway_common::records::Records;
use slipway_common::topology::buckets;
use slipway_proto::v1::*;
use slipway_test_support::{NatsServer, Sandboxd, Spawned, workspace_bin};

use crate::fake::{Fake, reply};
use crate::harness::op;

/// The executor's sandbox registry, read at the bucket.
async fn registry(ex: &Spawned) -> Records<SandboxRecord> {
    let js = async_nats::jetstream::new(ex.nats_client.clone());
    Records::new(js.get_key_value(buckets::SANDBOXES).await.unwrap())
}

#[tokio::test]
async fn a_restore_that_makes_a_new_sandbox_is_recorded_tagged_and_billed_once() {
    let nats = NatsServer::start().unwrap();
    let fake = Fake::default();
    // MIOSA (as a local server playing it) answers the restore with another sandbox.
    fake.on(
        "GET /sandboxes/sbx_src",
        vec![reply(
            200,
            r#"{"data":{"id":"sbx_src","state":"running","external_user_id":"u1",
                "metadata":{"slipway_run_id":"run_1","slipway_branch":"main"}}}"#,
        )],
    );
    fake.on(
        "POST /sandboxes/sbx_src/restore/snap_1",
        vec![reply(
            200,
            r#"{"data":{"id":"sbx_new","state":"running","external_user_id":"u1"}}"#,
        )],
    );
    // Its metadata, which the tag must keep (a platform may replace metadata on PATCH).
    fake.on(
        "GET /sandboxes/sbx_new",
        vec![reply(
            200,
            r#"{"data":{"id":"sbx_new","state":"running","external_user_id":"u1",
                "metadata":{"miosa_persistent":true}}}"#,
        )],
    );
    fake.on(
        "PATCH /sandboxes/sbx_new",
        vec![reply(
            200,
            r#"{"data":{"id":"sbx_new","state":"running","external_user_id":"u1",
                "metadata":{"slipway_run_id":"run_1","slipway_branch":"main",
                "slipway_created_by":"run_1:restore:1"}}}"#,
        )],
    );
    let base = fake.serve().await;
    let mut ex = crate::service::executor_at(&nats, &base).await;
    let rpc = ex.rpc.clone();
    let request = RestoreSnapshotRequest {
        sandbox_id: "sbx_src".into(),
        snapshot_id: "snap_1".into(),
        idempotency_key: "run_1:restore:1".into(),
        ..Default::default()
    };
    for _ in 0..2 {
        // The caller's retry goes through the same steps and counts nothing twice.
        let got: SandboxReply = rpc.call(&op("snapshot.restore"), &request).await.unwrap();
        let sandbox = got.sandbox.unwrap();
        assert_eq!(
            (sandbox.id.as_str(), sandbox.run_id.as_str()),
            ("sbx_new", "run_1")
        );
    }
    // The restore went with MIOSA's body: nothing.
    let restores = fake.requests("POST /sandboxes/sbx_src/restore/snap_1");
    let body: serde_json::Value = serde_json::from_str(&restores[0].body).unwrap();
    assert_eq!(body, serde_json::json!({}));
    // The new sandbox carries the run, so reaping by run finds it.
    let patch = fake.requests("PATCH /sandboxes/sbx_new");
    let patched: serde_json::Value = serde_json::from_str(&patch[0].body).unwrap();
    assert_eq!(patched["metadata"]["slipway_run_id"], "run_1");
    assert_eq!(patched["metadata"]["slipway_branch"], "main");
    assert_eq!(
        patched["metadata"]["miosa_persistent"], true,
        "merged, not replaced"
    );
    // Recorded, with the key that made it.
    let records = registry(&ex).await;
    let (record, _) = records.get("sbx_new").await.unwrap().expect("recorded");
    assert_eq!(record.created_by, "run_1:restore:1");
    // Billed once, counted at the stream.
    let created: Vec<UsageEvent> =
        crate::usage::events(&async_nats::jetstream::new(ex.nats_client.clone()))
            .await
            .into_iter()
            .filter(|e| e.meter == slipway_proto::meters::SANDBOXES_CREATED)
            .collect();
    assert_eq!(created.len(), 1, "{created:?}");
    assert_eq!(created[0].id, "sbx_new:sandboxes_created");
    ex.stop().await.unwrap();
}

#[tokio::test]
async fn processes_flagged_to_restart_are_relaunched_by_resume_and_logs_need_no_tail() {
    let nats = NatsServer::start().unwrap();
    let sd = Sandboxd::start(workspace_bin("slipway-sandboxd").unwrap(), &[]).unwrap();
    let mut ex = crate::service::executor(&nats, &sd).await;
    let rpc = ex.rpc.clone();
    let created: SandboxReply = rpc
        .call(&op("sandbox.create"), &crate::service::create("relaunch:1"))
        .await
        .unwrap();
    let id = created.sandbox.unwrap().id;
    let start = |key: &str, restart: bool| StartProcessRequest {
        sandbox_id: id.clone(),
        idempotency_key: key.into(),
        command: "echo up; sleep 300".into(),
        restart_on_resume: restart,
        ..Default::default()
    };
    let kept: ProcessReply = rpc
        .call(&op("process.start"), &start("relaunch:p1", true))
        .await
        .unwrap();
    let kept = kept.process.unwrap();
    assert!(kept.restart_on_resume);
    let other: ProcessReply = rpc
        .call(&op("process.start"), &start("relaunch:p2", false))
        .await
        .unwrap();
    let other = other.process.unwrap();
    // A `tail`-less logs call returns the lines (MIOSA's default of 200, not none).
    let mut logs = String::new();
    for _ in 0..100 {
        let got: ProcessLogsReply = rpc
            .call(
                &op("process.logs"),
                &ProcessLogsRequest {
                    sandbox_id: id.clone(),
                    process_id: kept.id.clone(),
                    tail: 0,
                },
            )
            .await
            .unwrap();
        logs = got.stdout;
        if logs.contains("up") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(logs.contains("up"), "{logs:?}");
    // Both die (as all processes do across a MIOSA pause; here ended at sandboxd itself, not
    // through the executor), then the sandbox resumes.
    for p in [&kept, &other] {
        let status = slipway_test_support::http()
            .delete(format!(
                "{}/sandboxes/{id}/processes/{}",
                sd.base_url(),
                p.id
            ))
            .bearer_auth("msk_test")
            .send()
            .await
            .unwrap()
            .status();
        assert!(status.is_success(), "{status}");
    }
    assert_ne!(other.name, kept.name);
    let sandbox = |key: &str| SandboxRef {
        sandbox_id: id.clone(),
        idempotency_key: key.into(),
    };
    let _: SandboxReply = rpc
        .call(&op("sandbox.pause"), &sandbox("relaunch:pause"))
        .await
        .unwrap();
    for _ in 0..2 {
        // A retried resume relaunches nothing twice.
        let _: SandboxReply = rpc
            .call(&op("sandbox.resume"), &sandbox("relaunch:resume"))
            .await
            .unwrap();
    }
    // The resume answers at once; the relaunch follows once the sandbox is command-ready.
    for _ in 0..300 {
        let listed: ListProcessesReply = rpc
            .call(
                &op("process.list"),
                &ListProcessesRequest {
                    sandbox_id: id.clone(),
                },
            )
            .await
            .unwrap();
        if listed
            .processes
            .iter()
            .any(|p| p.state == ProcessState::Running as i32)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Settled: a second relaunch would have shown by now (the first one's record is written).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let listed: ListProcessesReply = rpc
        .call(
            &op("process.list"),
            &ListProcessesRequest {
                sandbox_id: id.clone(),
            },
        )
        .await
        .unwrap();
    let running: Vec<&Process> = listed
        .processes
        .iter()
        .filter(|p| p.state == ProcessState::Running as i32)
        .collect();
    assert_eq!(running.len(), 1, "{:?}", listed.processes);
    assert_eq!(
        running[0].name, kept.name,
        "the flagged one, under its name"
    );
    assert_eq!(running[0].command, "echo up; sleep 300");
    // Nothing about restarting went to the platform: it lives in the executor's record.
    let records = registry(&ex).await;
    let (record, _) = records.get(&id).await.unwrap().unwrap();
    assert_eq!(record.restart.len(), 1);
    assert_eq!(record.restart[0].name, kept.name);
    assert_eq!(
        record.created_by, "relaunch:1",
        "the record keeps who made it"
    );
    // A process the caller stops is not relaunched again.
    let _: ProcessReply = rpc
        .call(
            &op("process.stop"),
            &ProcessRef {
                sandbox_id: id.clone(),
                process_id: running[0].id.clone(),
                idempotency_key: "relaunch:stop".into(),
            },
        )
        .await
        .unwrap();
    let (record, _) = records.get(&id).await.unwrap().unwrap();
    assert!(record.restart.is_empty(), "{:?}", record.restart);
    ex.stop().await.unwrap();
}

#[tokio::test]
async fn inputs_outside_miosas_shapes_are_refused_before_the_platform() {
    let nats = NatsServer::start().unwrap();
    let sd = Sandboxd::start(workspace_bin("slipway-sandboxd").unwrap(), &[]).unwrap();
    let mut ex = crate::service::executor(&nats, &sd).await;
    let rpc = ex.rpc.clone();
    let created: SandboxReply = rpc
        .call(&op("sandbox.create"), &crate::service::create("refuse:1"))
        .await
        .unwrap();
    let id = created.sandbox.unwrap().id;
    let refused = |e: slipway_common::RpcError| match e.service_error() {
        Some(s) => {
            assert_eq!(s.code, ErrorCode::InvalidInput, "{s:?}");
            s.message.clone()
        }
        None => panic!("expected a refusal, got {e:?}"),
    };
    // Tree depth: 1 to 10, as MIOSA documents.
    let e = rpc
        .call::<_, FileTreeReply>(
            &op("files.tree"),
            &FileTreeRequest {
                sandbox_id: id.clone(),
                path: "/workspace".into(),
                depth: 11,
            },
        )
        .await
        .unwrap_err();
    assert!(refused(e).contains("depth"));
    // A preview token opens the sandbox's preview port only (the node template's 3000).
    let token = |port: u32| PreviewTokenRequest {
        sandbox_id: id.clone(),
        port,
        ..Default::default()
    };
    let e = rpc
        .call::<_, PreviewTokenReply>(&op("preview.token"), &token(8080))
        .await
        .unwrap_err();
    assert!(refused(e).contains("3000"));
    let ok: PreviewTokenReply = rpc.call(&op("preview.token"), &token(3000)).await.unwrap();
    assert!(!ok.token.is_empty());
    // A fork keeps its parent's project and workspace.
    let e = rpc
        .call::<_, SandboxReply>(
            &op("sandbox.fork"),
            &ForkSandboxRequest {
                sandbox_id: id.clone(),
                idempotency_key: "refuse:fork".into(),
                attribution: Some(Attribution {
                    user_id: "u".into(),
                    project_id: "other".into(),
                    workspace_id: String::new(),
                }),
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert!(refused(e).contains("project"));
    // Extend: 1 s to 30 days.
    for t in [0, 30 * 86_400 + 1] {
        let e = rpc
            .call::<_, SandboxReply>(
                &op("sandbox.extend"),
                &ExtendSandboxRequest {
                    sandbox_id: id.clone(),
                    idempotency_key: "refuse:extend".into(),
                    timeout_sec: Some(t),
                },
            )
            .await
            .unwrap_err();
        assert!(refused(e).contains("timeout_sec"));
    }
    // Paths that would climb out of the route they ride in.
    for path in ["../sbx_other/files/x", "/workspace/../../x", "a/./b", ".."] {
        let e = rpc
            .call::<_, ReadFileReply>(
                &op("files.read"),
                &ReadFileRequest {
                    sandbox_id: id.clone(),
                    path: path.into(),
                },
            )
            .await
            .unwrap_err();
        assert!(refused(e).contains("segments"), "{path}");
    }
    // A process name that cannot be a name; an hour-plus exec; a snapshot id that is a path.
    let e = rpc
        .call::<_, ProcessReply>(
            &op("process.start"),
            &StartProcessRequest {
                sandbox_id: id.clone(),
                idempotency_key: "refuse:p".into(),
                command: "true".into(),
                name: "dev\nserver".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert!(refused(e).contains("name"));
    let e = rpc
        .call::<_, ExecReply>(
            &op("exec"),
            &ExecRequest {
                sandbox_id: id.clone(),
                command: "true".into(),
                timeout_ms: 3_600_001,
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert!(refused(e).contains("timeout_ms"));
    let e = rpc
        .call::<_, SandboxReply>(
            &op("sandbox.fork"),
            &ForkSandboxRequest {
                sandbox_id: id.clone(),
                snapshot_id: "../snap".into(),
                idempotency_key: "refuse:fork:snap".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert!(refused(e).contains("snapshot_id"));
    // None of it reached the platform: still one sandbox, no fork.
    let at_sandboxd = crate::harness::sandboxes_at_sandboxd(&sd).await;
    assert_eq!(at_sandboxd.len(), 1);
    // Extend with no timeout restarts the deadline with the current one; stop keeps the disk.
    let extended: SandboxReply = rpc
        .call(
            &op("sandbox.extend"),
            &ExtendSandboxRequest {
                sandbox_id: id.clone(),
                idempotency_key: "refuse:extend:ok".into(),
                timeout_sec: None,
            },
        )
        .await
        .unwrap();
    assert_eq!(extended.sandbox.unwrap().id, id);
    // Naming the parent's own project is no change, so the fork goes ahead, with the run's tags.
    let forked: SandboxReply = rpc
        .call(
            &op("sandbox.fork"),
            &ForkSandboxRequest {
                sandbox_id: id.clone(),
                idempotency_key: "refuse:fork:same".into(),
                run_id: "run_f".into(),
                branch: "b2".into(),
                attribution: Some(Attribution {
                    user_id: "a.b@c d".into(),
                    project_id: "p1".into(),
                    workspace_id: String::new(),
                }),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let forked = forked.sandbox.unwrap();
    assert_eq!(
        (forked.run_id.as_str(), forked.branch.as_str()),
        ("run_f", "b2")
    );
    let stopped: SandboxReply = rpc
        .call(
            &op("sandbox.stop"),
            &SandboxRef {
                sandbox_id: id.clone(),
                idempotency_key: "refuse:stop".into(),
            },
        )
        .await
        .unwrap();
    assert_ne!(
        stopped.sandbox.unwrap().state,
        SandboxState::Running as i32,
        "stopped"
    );
    ex.stop().await.unwrap();
}

#[tokio::test]
async fn a_fork_from_a_platform_that_takes_only_the_public_body_is_recorded_then_tagged() {
    let nats = NatsServer::start().unwrap();
    let fake = Fake::default();
    // The fork's answer has none of what was asked beyond the public body.
    fake.on(
        "POST /sandboxes/sbx_p/fork",
        vec![reply(
            201,
            r#"{"data":{"id":"sbx_f","state":"running","external_user_id":"u1"}}"#,
        )],
    );
    fake.on(
        "GET /sandboxes/sbx_f",
        vec![reply(
            200,
            r#"{"data":{"id":"sbx_f","state":"running","external_user_id":"u1",
                "metadata":{"copied":"from the parent"}}}"#,
        )],
    );
    fake.on(
        "PATCH /sandboxes/sbx_f",
        vec![reply(
            200,
            r#"{"data":{"id":"sbx_f","name":"variant","state":"running","external_user_id":"u1",
                "metadata":{"copied":"from the parent","slipway_run_id":"run_9",
                "slipway_branch":"b1","slipway_created_by":"run_9:fork:1"}}}"#,
        )],
    );
    let base = fake.serve().await;
    let mut ex = crate::service::executor_at(&nats, &base).await;
    let rpc = ex.rpc.clone();
    let got: SandboxReply = rpc
        .call(
            &op("sandbox.fork"),
            &ForkSandboxRequest {
                sandbox_id: "sbx_p".into(),
                idempotency_key: "run_9:fork:1".into(),
                name: "variant".into(),
                run_id: "run_9".into(),
                branch: "b1".into(),
                attribution: Some(Attribution {
                    user_id: "u1".into(),
                    ..Default::default()
                }),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let sandbox = got.sandbox.unwrap();
    assert_eq!(
        (
            sandbox.id.as_str(),
            sandbox.run_id.as_str(),
            sandbox.branch.as_str()
        ),
        ("sbx_f", "run_9", "b1")
    );
    // The fork went with the Python SDK's body.
    let fork = fake.requests("POST /sandboxes/sbx_p/fork");
    let body: serde_json::Value = serde_json::from_str(&fork[0].body).unwrap();
    let mut fields: Vec<&String> = body.as_object().unwrap().keys().collect();
    fields.sort();
    assert_eq!(fields, ["external_user_id", "metadata", "name"]);
    // The tag: the run's metadata merged into what the sandbox had, and the name.
    let patch = fake.requests("PATCH /sandboxes/sbx_f");
    let patched: serde_json::Value = serde_json::from_str(&patch[0].body).unwrap();
    assert_eq!(patched["metadata"]["copied"], "from the parent");
    assert_eq!(patched["metadata"]["slipway_run_id"], "run_9");
    assert_eq!(patched["metadata"]["slipway_created_by"], "run_9:fork:1");
    assert_eq!(patched["name"], "variant");
    // Recorded and billed once.
    let records = registry(&ex).await;
    let (record, _) = records.get("sbx_f").await.unwrap().expect("recorded");
    assert_eq!(record.sandbox.unwrap().run_id, "run_9");
    let created = crate::usage::events(&async_nats::jetstream::new(ex.nats_client.clone()))
        .await
        .into_iter()
        .filter(|e| e.meter == slipway_proto::meters::SANDBOXES_CREATED)
        .count();
    assert_eq!(created, 1);
    ex.stop().await.unwrap();
}
