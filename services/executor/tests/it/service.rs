//! The executor over NATS against a real sandboxd: a real nats-server, the real service kit,
//! sandboxes counted at sandboxd.

use std::time::Duration;

use slipway_common::{RpcClient, Service};
use slipway_proto::v1::{
    Attribution, CreateSandboxRequest, ErrorCode, ExecReply, ExecRequest, FileContent,
    GetSandboxRequest, ListSandboxesReply, ListSandboxesRequest, SandboxRecord, SandboxRef,
    SandboxReply, SandboxState, WriteFilesReply, WriteFilesRequest,
};
use slipway_test_support::{NatsServer, Sandboxd, Spawn, Spawned, workspace_bin};

/// The executor in this process (the kit's spawn helper) on `nats`, against `sd`.
pub(crate) async fn executor(nats: &NatsServer, sd: &Sandboxd) -> Spawned {
    executor_at(nats, sd.base_url()).await
}

/// The executor in this process against the platform at `base_url`.
pub(crate) async fn executor_at(nats: &NatsServer, base_url: &str) -> Spawned {
    executor_with(nats, base_url, &[]).await
}

/// As `executor_at`, with `extra` settings (as environment variables). Returns once the service
/// is ready (its `/readyz` answers 200).
pub(crate) async fn executor_with(
    nats: &NatsServer,
    base_url: &str,
    extra: &[(&str, &str)],
) -> Spawned {
    let mut spawn = Spawn::new(Service::Executor)
        .on_nats(nats)
        .env("SLIPWAY__PLATFORM__BASE_URL", base_url);
    for (k, v) in extra {
        spawn = spawn.env(k, v);
    }
    spawn.in_process(slipway_executor::serve).await.unwrap()
}

pub(crate) fn create(key: &str) -> CreateSandboxRequest {
    CreateSandboxRequest {
        idempotency_key: key.into(),
        run_id: slipway_proto::run_id_for("req-1"),
        branch: "main".into(),
        attribution: Some(Attribution {
            user_id: "a.b@c d".into(),
            project_id: "p1".into(),
            workspace_id: String::new(),
        }),
        template_id: "node".into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn sandbox_operations_over_nats_against_sandboxd() {
    let nats = NatsServer::start().unwrap();
    let sd = Sandboxd::start(workspace_bin("slipway-sandboxd").unwrap(), &[]).unwrap();
    let mut ex = executor(&nats, &sd).await;
    let rpc = RpcClient::new(
        async_nats::connect(nats.url()).await.unwrap(),
        Duration::from_secs(30),
    );
    let op = |name: &str| format!("slipway.executor.v1.{name}");

    let run_key = format!("{}:sandbox:1", slipway_proto::run_id_for("req-1"));
    let first: SandboxReply = rpc
        .call(&op("sandbox.create"), &create(&run_key))
        .await
        .unwrap();
    let again: SandboxReply = rpc
        .call(&op("sandbox.create"), &create(&run_key))
        .await
        .unwrap();
    let sb = first.sandbox.unwrap();
    assert_eq!(
        sb.id,
        again.sandbox.unwrap().id,
        "the same request delivered twice leaves one sandbox"
    );
    assert_eq!(sb.state, SandboxState::Running as i32);
    assert_eq!(sb.attribution.clone().unwrap().user_id, "a.b@c d");
    assert_eq!(sb.run_id, slipway_proto::run_id_for("req-1"));
    assert_eq!(sb.branch, "main");
    let at_sandboxd: serde_json::Value = slipway_test_support::http()
        .get(format!("{}/sandboxes", sd.base_url()))
        .bearer_auth("msk_test")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        at_sandboxd["data"].as_array().unwrap().len(),
        1,
        "counted at sandboxd"
    );

    // The registry holds it, with the key that created it.
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    let records = slipway_common::records::Records::<SandboxRecord>::new(
        js.get_key_value("slipway_sandboxes").await.unwrap(),
    );
    let (record, _) = records
        .get(&sb.id)
        .await
        .unwrap()
        .expect("a registry record");
    assert_eq!(record.created_by, run_key);

    let listed: ListSandboxesReply = rpc
        .call(
            &op("sandbox.list"),
            &ListSandboxesRequest {
                user_id: "a.b@c d".into(),
                run_id: sb.run_id.clone(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(listed.sandboxes.len(), 1);

    let wrote: WriteFilesReply = rpc
        .call(
            &op("files.write_many"),
            &WriteFilesRequest {
                sandbox_id: sb.id.clone(),
                idempotency_key: "k:files:1".into(),
                files: vec![FileContent {
                    path: "index.html".into(),
                    content: b"<h1>hi</h1>".to_vec(),
                    mode: 0,
                }],
            },
        )
        .await
        .unwrap();
    assert_eq!((wrote.files, wrote.bytes), (1, 11));
    let ran: ExecReply = rpc
        .call(
            &op("exec"),
            &ExecRequest {
                sandbox_id: sb.id.clone(),
                command: "cat index.html; exit 3".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(
        (ran.exit_code, ran.stdout.as_slice()),
        (3, b"<h1>hi</h1>".as_slice())
    );

    // Refusals keep their meaning.
    let e = rpc
        .call::<_, SandboxReply>(
            &op("sandbox.get"),
            &GetSandboxRequest {
                sandbox_id: "sbx_nope".into(),
                name: String::new(),
            },
        )
        .await
        .unwrap_err();
    assert_eq!(e.service_error().unwrap().code, ErrorCode::NotFound, "{e}");
    assert_eq!(
        e.service_error()
            .unwrap()
            .details
            .get("platform_code")
            .map(String::as_str),
        Some("sandbox_not_found")
    );
    let mut no_key = create("");
    no_key.idempotency_key.clear();
    let e = rpc
        .call::<_, SandboxReply>(&op("sandbox.create"), &no_key)
        .await
        .unwrap_err();
    assert_eq!(e.service_error().unwrap().code, ErrorCode::InvalidInput);
    let mut bad_template = create("k:sandbox:bad");
    bad_template.template_id = "cobol".into();
    let e = rpc
        .call::<_, SandboxReply>(&op("sandbox.create"), &bad_template)
        .await
        .unwrap_err();
    assert_eq!(
        e.service_error().unwrap().code,
        ErrorCode::InvalidInput,
        "{e}"
    );

    let gone: SandboxReply = rpc
        .call(
            &op("sandbox.destroy"),
            &SandboxRef {
                sandbox_id: sb.id.clone(),
                idempotency_key: "k:destroy:1".into(),
            },
        )
        .await
        .unwrap();
    assert_eq!(gone.sandbox.unwrap().state, SandboxState::Destroyed as i32);
    let (record, _) = records.get(&sb.id).await.unwrap().unwrap();
    assert_eq!(
        record.sandbox.unwrap().state,
        SandboxState::Destroyed as i32,
        "the registry follows"
    );

    ex.stop().await.unwrap();
}

#[tokio::test]
async fn with_its_nats_server_gone_the_executor_exits_at_once_on_sigterm() {
    // A grace period far longer than `stop` waits: waiting it out, or a drain, fails the test.
    let mut ex = Spawn::new(Service::Executor)
        .with_sandboxd()
        .env("SLIPWAY__SERVICE__GRACE_PERIOD_MS", "60000")
        .process()
        .await
        .unwrap();
    drop(ex.nats.take());
    // It notices: not ready, naming NATS.
    let url = format!("http://{}/readyz", ex.health);
    let http = slipway_test_support::http();
    let mut seen = serde_json::Value::Null;
    for _ in 0..200 {
        let r = http.get(&url).send().await.unwrap();
        if r.status() == 503 {
            seen = r.json().await.unwrap();
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(seen["failing"]["nats"].is_string(), "{seen}");
    let started = std::time::Instant::now();
    ex.stop().await.expect("exits cleanly on SIGTERM");
    // At once: nothing in flight, nothing to drain (the grace period is 60 s).
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn the_executor_serves_exactly_the_operations_in_the_table() {
    let nats = NatsServer::start().unwrap();
    let sd = Sandboxd::start(workspace_bin("slipway-sandboxd").unwrap(), &[]).unwrap();
    let mut ex = executor(&nats, &sd).await;
    let client = async_nats::connect(nats.url()).await.unwrap();
    let info = client
        .request("$SRV.INFO.slipway-executor", "".into())
        .await
        .unwrap();
    let info: serde_json::Value = serde_json::from_slice(&info.payload).unwrap();
    let mut served: Vec<String> = info["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["subject"].as_str().unwrap().to_string())
        .collect();
    served.sort();
    let mut table: Vec<String> = slipway_common::operations::of(slipway_common::Service::Executor)
        .map(|o| o.subject())
        .collect();
    table.sort();
    assert_eq!(served, table);
    ex.stop().await.unwrap();
}

#[tokio::test]
async fn the_executor_binary_reports_its_health_address_and_serves() {
    // The spawn helper's process mode: its own nats-server and sandboxd, the real binary, the
    // health address the process printed (no port guessed), readiness, then SIGTERM.
    let mut ex = Spawn::new(Service::Executor)
        .with_sandboxd()
        .process()
        .await
        .unwrap();
    let created: SandboxReply = ex
        .rpc
        .call(&crate::harness::op("sandbox.create"), &create("spawned:1"))
        .await
        .unwrap();
    let id = created.sandbox.unwrap().id;
    let at_sandboxd = crate::harness::sandboxes_at_sandboxd(ex.sandboxd.as_ref().unwrap()).await;
    assert!(at_sandboxd.iter().any(|s| s["id"] == id.as_str()));
    ex.stop().await.unwrap();
}
