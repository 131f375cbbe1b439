//! File-watch relays across two real executor processes: the replica running a relay is killed,
//! the other takes it over (with a resync), and changes made inside the sandbox keep arriving.

use std::time::Duration;

use futures::StreamExt;
use slipway_common::RpcClient;
use slipway_proto::v1::{
    Attribution, CreateSandboxRequest, ExecReply, ExecRequest, FileChange, FileChangeKind,
    RelayRecord, RelayReply, RelayRequest, SandboxRef, SandboxReply,
};

use crate::harness::{op, setup, wait_for_service};

async fn next_change(
    sub: &mut async_nats::Subscriber,
    what: &str,
    matches: impl Fn(&FileChange) -> bool,
) -> FileChange {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let msg = tokio::time::timeout_at(deadline, sub.next())
            .await
            .unwrap_or_else(|_| panic!("no {what} within 20 s"))
            .unwrap();
        let change =
            slipway_common::rpc::decode_message::<FileChange>(msg.headers.as_ref(), &msg.payload)
                .unwrap();
        if matches(&change) {
            return change;
        }
    }
}

async fn exec(rpc: &RpcClient, id: &str, command: &str) {
    let ran: ExecReply = rpc
        .call(
            &op("exec"),
            &ExecRequest {
                sandbox_id: id.into(),
                command: command.into(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(ran.exit_code, 0);
}

#[tokio::test]
async fn a_relay_survives_the_death_of_the_replica_that_ran_it() {
    let all = setup(&[]).await;
    let (run, rpc, js) = (&all.run, &all.rpc, &all.js);
    let client = rpc.nats().clone();
    let mut replicas = [
        Some(run.spawn(None).unwrap()),
        Some(run.spawn(None).unwrap()),
    ];
    wait_for_service(rpc).await;

    let created: SandboxReply = rpc
        .call(
            &op("sandbox.create"),
            &CreateSandboxRequest {
                idempotency_key: "relay-run:1:1".into(),
                run_id: "relay-run".into(),
                attribution: Some(Attribution {
                    user_id: "u1".into(),
                    ..Default::default()
                }),
                template_id: "node".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let id = created.sandbox.unwrap().id;
    let mut sub = client
        .subscribe(slipway_common::subjects::sandbox_files(&id).unwrap())
        .await
        .unwrap();
    client.flush().await.unwrap();
    let started: RelayReply = rpc
        .call(
            &op("relay.start"),
            &RelayRequest {
                sandbox_id: id.clone(),
                run_id: "relay-run".into(),
            },
        )
        .await
        .unwrap();
    assert!(started.active);
    exec(rpc, &id, "echo one > /workspace/one.txt").await;
    let c = next_change(&mut sub, "change of one.txt", |c| {
        c.path == "/workspace/one.txt"
    })
    .await;
    assert_ne!(c.kind, FileChangeKind::Resync as i32);

    // Which replica runs it: the relay's lease names the holder, which carries the process id.
    let records = slipway_common::records::Records::<RelayRecord>::new(
        js.get_key_value("slipway_relays").await.unwrap(),
    );
    let leases = slipway_common::lease::Leases::new(
        js.get_key_value("slipway_leases").await.unwrap(),
        "the test",
    )
    .unwrap();
    let lease = slipway_executor::relay::lease_name(&id);
    let holder = || async { leases.current(&lease).await.unwrap().unwrap().0.holder };
    let (record, _) = records.get(&id).await.unwrap().unwrap();
    assert_eq!(
        (record.sandbox_id.as_str(), record.run_id.as_str()),
        (id.as_str(), "relay-run")
    );
    let pid_of = |holder: &str| holder.split('-').nth(1).unwrap().parse::<u32>().unwrap();
    let holder_pid = pid_of(&holder().await);
    let dying = replicas
        .iter()
        .position(|r| r.as_ref().unwrap().id() == Some(holder_pid))
        .expect("the holder is one of the two replicas");
    // SIGKILL: no goodbye, the lease just stops being renewed.
    replicas[dying] = None;

    let resync = next_change(&mut sub, "a resync from the other replica", |c| {
        c.kind == FileChangeKind::Resync as i32
    })
    .await;
    assert_eq!(resync.sandbox_id, id);
    exec(rpc, &id, "echo two > /workspace/two.txt").await;
    next_change(&mut sub, "change of two.txt", |c| {
        c.path == "/workspace/two.txt"
    })
    .await;
    assert_ne!(pid_of(&holder().await), holder_pid);

    // Destroying the sandbox ends the relay and removes its record and its lease.
    let _: SandboxReply = rpc
        .call(
            &op("sandbox.destroy"),
            &SandboxRef {
                sandbox_id: id.clone(),
                idempotency_key: "relay-run:1:2".into(),
            },
        )
        .await
        .unwrap();
    for _ in 0..200 {
        if records.get(&id).await.unwrap().is_none()
            && leases.current(&lease).await.unwrap().is_none()
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the relay record or lease outlived its sandbox");
}

/// A watch stream that ends is reopened with `Last-Event-ID`, and a `resync` tells consumers
/// that changes in the gap may be missing (against a local server playing MIOSA, whose stream
/// ends after each answer).
#[tokio::test]
async fn a_watch_that_ends_is_reopened_with_last_event_id_and_a_resync() {
    use crate::fake::{Fake, reply};
    let nats = slipway_test_support::NatsServer::start().unwrap();
    let settings = slipway_common::config::Settings::load(&slipway_common::config::Sources {
        env: [("SLIPWAY__NATS__URL".to_string(), nats.url())].into(),
        ..Default::default()
    })
    .unwrap();
    let client = async_nats::connect(nats.url()).await.unwrap();
    slipway_common::setup::apply(
        &async_nats::jetstream::new(client.clone()),
        &slipway_common::topology::Topology::new(&settings.setup),
        slipway_common::setup::Mode::CreateMissing,
    )
    .await
    .unwrap();
    let fake = Fake::default();
    fake.on(
        "GET /sandboxes/sbx_1",
        vec![reply(200, r#"{"data":{"id":"sbx_1","state":"running"}}"#)],
    );
    let mut first = reply(
        200,
        "id: 7\nevent: created\ndata: {\"type\":\"created\",\"path\":\"/workspace/a.txt\"}\n\n",
    );
    first
        .headers
        .push(("content-type", "text/event-stream".into()));
    let mut later = reply(200, ": nothing new\n\n");
    later
        .headers
        .push(("content-type", "text/event-stream".into()));
    later.delay = Duration::from_millis(200);
    fake.on("GET /sandboxes/sbx_1/files/watch", vec![first, later]);
    let miosa =
        slipway_executor::miosa::MiosaClient::new(slipway_executor::miosa::ClientConfig::new(
            fake.serve().await,
            slipway_common::config::Secret::new("msk_test_executor"),
        ))
        .unwrap();
    let executor = std::sync::Arc::new(slipway_executor::service::Executor::new(
        miosa,
        client.clone(),
    ));
    let relays = slipway_executor::relay::Relays::new(executor);
    let mut sub = client
        .subscribe(slipway_common::subjects::sandbox_files("sbx_1").unwrap())
        .await
        .unwrap();
    client.flush().await.unwrap();
    let started = relays
        .start(RelayRequest {
            sandbox_id: "sbx_1".into(),
            run_id: "r".into(),
        })
        .await
        .unwrap();
    assert!(started.active);
    let created = next_change(&mut sub, "the created change", |c| {
        c.kind == FileChangeKind::Created as i32
    })
    .await;
    assert_eq!(created.path, "/workspace/a.txt");
    next_change(&mut sub, "a resync after the stream ended", |c| {
        c.kind == FileChangeKind::Resync as i32
    })
    .await;
    let watches = fake.requests("GET /sandboxes/sbx_1/files/watch");
    assert!(watches.len() >= 2, "{watches:?}");
    assert!(watches[0].headers.get("last-event-id").is_none());
    assert_eq!(watches[1].headers["last-event-id"], "7");

    // The relay's lease is this replica's, in `slipway_leases`; a stop ends it with the record.
    let js = async_nats::jetstream::new(client.clone());
    let leases = slipway_common::lease::Leases::new(
        js.get_key_value("slipway_leases").await.unwrap(),
        "the test",
    )
    .unwrap();
    let lease = slipway_executor::relay::lease_name("sbx_1");
    let (held, _) = leases.current(&lease).await.unwrap().unwrap();
    assert_eq!(held.holder, relays.holder());
    relays
        .stop(RelayRequest {
            sandbox_id: "sbx_1".into(),
            run_id: "r".into(),
        })
        .await
        .unwrap();
    assert_eq!(leases.current(&lease).await.unwrap(), None);
    let relay_records = js.get_key_value("slipway_relays").await.unwrap();
    assert!(relay_records.get("sbx_1").await.unwrap().is_none());
}
