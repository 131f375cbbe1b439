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

    // Which replica runs it: its record names the holder, which carries the process id.
    let records = slipway_common::records::Records::<RelayRecord>::new(
        js.get_key_value("slipway_relays").await.unwrap(),
    );
    let (record, _) = records.get(&id).await.unwrap().unwrap();
    let pid_of = |holder: &str| holder.split('-').nth(1).unwrap().parse::<u32>().unwrap();
    let holder_pid = pid_of(&record.holder);
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
    let (record, _) = records.get(&id).await.unwrap().unwrap();
    assert_ne!(pid_of(&record.holder), holder_pid);

    // Destroying the sandbox ends the relay and removes its record.
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
        if records.get(&id).await.unwrap().is_none() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the relay record outlived its sandbox");
}
