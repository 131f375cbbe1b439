//! Usage events from cumulative counters survive crashes: a real `slipway-executor` process is
//! aborted between reading a counter and writing the pending interval, between writing it and
//! publishing, and between publishing and moving the watermark; afterwards the published deltas
//! per sandbox and meter (deduplicated by event id only) sum to sandboxd's final counters.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use slipway_common::RpcClient;
use slipway_proto::v1::{
    CreateSandboxRequest, ExecReply, ExecRequest, SandboxRef, SandboxReply, UsageEvent,
};

use crate::harness::{op, sandboxes_at_sandboxd, setup, wait_for_service};

const METERS: [&str; 5] = [
    "sandbox_vcpu_ms",
    "active_cpu_ms",
    "memory_mib_ms",
    "disk_gib_ms",
    "exec_count",
];

/// Every usage event in the USAGE stream, read at the stream itself.
pub(crate) async fn events(js: &async_nats::jetstream::Context) -> Vec<UsageEvent> {
    slipway_test_support::streams::messages(js, "USAGE")
        .await
        .unwrap()
}

/// Per meter: the deduplicated intervals' sum, and whether they chain from 0 without gaps or
/// overlaps.
fn sums(events: &[UsageEvent], sandbox: &str) -> BTreeMap<String, (u64, bool)> {
    let mut by_id: HashMap<&str, &UsageEvent> = HashMap::new();
    for e in events.iter().filter(|e| e.sandbox_id == sandbox) {
        by_id.entry(e.id.as_str()).or_insert(e);
    }
    let mut per: BTreeMap<String, Vec<&UsageEvent>> = BTreeMap::new();
    for e in by_id.values() {
        per.entry(e.meter.clone()).or_default().push(e);
    }
    per.into_iter()
        .map(|(meter, mut es)| {
            es.sort_by_key(|e| e.counter_from);
            let chained = es.first().is_some_and(|e| e.counter_from == 0)
                && es.windows(2).all(|w| w[0].counter_to == w[1].counter_from);
            let sum = es.iter().map(|e| e.quantity.parse::<u64>().unwrap()).sum();
            (meter, (sum, chained))
        })
        .collect()
}

fn create_request(key: &str) -> CreateSandboxRequest {
    CreateSandboxRequest {
        idempotency_key: key.into(),
        run_id: "usage-run".into(),
        attribution: Some(slipway_proto::v1::Attribution {
            user_id: "metered user".into(),
            ..Default::default()
        }),
        template_id: "node".into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn a_sandbox_created_just_before_a_crash_is_recorded_and_counted_once() {
    // Bound whole: its nats-server and key file live as long as the test.
    let all = setup(&[("SLIPWAY__PLATFORM__USAGE_SAMPLE_MS", "200")]).await;
    let (sd, run, rpc, js) = (&all.sd, &all.run, &all.rpc, &all.js);
    let crashing = run.spawn(Some("executor.create.after_platform")).unwrap();
    wait_for_service(rpc).await;
    let short = RpcClient::new(rpc.nats().clone(), Duration::from_secs(5));
    let lost = short
        .call::<_, SandboxReply>(&op("sandbox.create"), &create_request("orphan-run:1:1"))
        .await;
    assert!(
        lost.is_err(),
        "the executor should have died before replying"
    );
    let out = crashing.wait(Duration::from_secs(20)).unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("executor.create.after_platform"),
        "{stderr}"
    );
    let at_sandboxd = sandboxes_at_sandboxd(sd).await;
    assert_eq!(at_sandboxd.len(), 1, "the platform created it");
    let id = at_sandboxd[0]["id"].as_str().unwrap().to_string();
    let records = slipway_common::records::Records::<slipway_proto::v1::SandboxRecord>::new(
        js.get_key_value("slipway_sandboxes").await.unwrap(),
    );
    assert!(records.get(&id).await.unwrap().is_none(), "no record yet");

    // A healthy executor finds it at the platform and records it, without any retry.
    let service = run.spawn(None).unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let record = loop {
        if let Some((r, _)) = records.get(&id).await.unwrap() {
            break r;
        }
        assert!(tokio::time::Instant::now() < deadline, "never adopted");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(record.created_by, "orphan-run:1:1");

    // The caller's retry gets the same sandbox; one sandbox, one `sandboxes_created`.
    wait_for_service(rpc).await;
    let again: SandboxReply = rpc
        .call(&op("sandbox.create"), &create_request("orphan-run:1:1"))
        .await
        .unwrap();
    assert_eq!(again.sandbox.unwrap().id, id);
    assert_eq!(sandboxes_at_sandboxd(sd).await.len(), 1);
    let created: std::collections::HashSet<String> = events(js)
        .await
        .into_iter()
        .filter(|e| e.meter == "sandboxes_created")
        .map(|e| e.id)
        .collect();
    assert_eq!(created, [format!("{id}:sandboxes_created")].into());
    service.terminate().unwrap();
    service.wait(Duration::from_secs(30)).unwrap();
}

#[tokio::test]
async fn published_deltas_sum_to_the_platform_counters_across_crashes_at_each_step() {
    // Bound whole: its nats-server and key file live as long as the test.
    let all = setup(&[("SLIPWAY__PLATFORM__USAGE_SAMPLE_MS", "200")]).await;
    let (sd, run, rpc, js) = (&all.sd, &all.run, &all.rpc, &all.js);

    // A sandbox that uses CPU, memory and disk, created through the executor.
    let service = run.spawn(None).unwrap();
    wait_for_service(rpc).await;
    let created: SandboxReply = rpc
        .call(&op("sandbox.create"), &create_request("usage-run:1:1"))
        .await
        .unwrap();
    let id = created.sandbox.unwrap().id;
    let _: ExecReply = rpc
        .call(
            &op("exec"),
            &ExecRequest {
                sandbox_id: id.clone(),
                command: "head -c 3000000 /dev/urandom > blob; timeout 0.5 sh -c 'while :; do :; done'; true".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    service.terminate().unwrap();
    service.wait(Duration::from_secs(30)).unwrap();

    // Abort at each step of billing an interval, then start again.
    for failpoint in [
        "executor.usage.after_read",
        "executor.usage.after_pending",
        "executor.usage.after_publish",
        "executor.usage.after_pending@3",
    ] {
        run.run_to_failpoint(failpoint).unwrap();
    }

    // Destroy through a healthy executor, which then bills the final counters.
    let service = run.spawn(None).unwrap();
    wait_for_service(rpc).await;
    let _: SandboxReply = rpc
        .call(
            &op("sandbox.destroy"),
            &SandboxRef {
                sandbox_id: id.clone(),
                idempotency_key: "usage-run:1:9".into(),
            },
        )
        .await
        .unwrap();
    // The source of truth: sandboxd's counters after destroy (they no longer move).
    let final_counters: serde_json::Value = slipway_test_support::http()
        .get(format!("{}/sandboxes/{id}/usage", sd.base_url()))
        .bearer_auth("msk_test")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let d = &final_counters["data"];
    let expected: BTreeMap<String, u64> = [
        (
            "sandbox_vcpu_ms",
            d["provisioned_vcpu_ms"].as_u64().unwrap(),
        ),
        ("active_cpu_ms", d["active_cpu_ms"].as_u64().unwrap()),
        ("memory_mib_ms", d["memory_mib_ms"].as_u64().unwrap()),
        ("disk_gib_ms", d["disk_gib_ms"].as_u64().unwrap()),
        ("exec_count", d["exec_count"].as_u64().unwrap()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    assert!(expected.values().all(|v| *v > 0), "{expected:?}");

    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let all = events(js).await;
        let got = sums(&all, &id);
        let totals: BTreeMap<String, u64> = got
            .iter()
            .filter(|(k, _)| METERS.contains(&k.as_str()))
            .map(|(k, (s, _))| (k.clone(), *s))
            .collect();
        if totals == expected {
            for meter in METERS {
                assert!(
                    got[meter].1,
                    "{meter}: intervals do not chain from 0: {all:?}"
                );
            }
            assert!(
                all.iter()
                    .all(|e| e.subject == "metered user" && e.run_id == "usage-run")
            );
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "published {totals:?}, sandboxd says {expected:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    service.terminate().unwrap();
    service.wait(Duration::from_secs(30)).unwrap();
}

#[tokio::test]
async fn a_sampling_pass_sets_live_sandboxes_per_user_in_the_metrics() {
    let all = setup(&[]).await;
    let nats = all.rpc.nats().clone();
    let registry = slipway_common::metrics::Metrics::new();
    let client =
        slipway_executor::miosa::MiosaClient::new(slipway_executor::miosa::ClientConfig::new(
            all.sd.base_url(),
            slipway_common::config::Secret::new("msk_test_executor"),
        ))
        .unwrap()
        .with_metrics(slipway_executor::miosa::metrics::PlatformMetrics::register(
            &registry,
        ));
    let executor = std::sync::Arc::new(slipway_executor::service::Executor::new(client, nats));
    let user = |key: &str, user: &str| CreateSandboxRequest {
        attribution: Some(slipway_proto::v1::Attribution {
            user_id: user.into(),
            ..Default::default()
        }),
        ..create_request(key)
    };
    executor.create(user("m:1:1", "alice")).await.unwrap();
    executor.create(user("m:1:2", "alice")).await.unwrap();
    let bob = executor.create(user("m:1:3", "bob")).await.unwrap();
    executor
        .destroy(SandboxRef {
            sandbox_id: bob.sandbox.unwrap().id,
            idempotency_key: "m:1:4".into(),
        })
        .await
        .unwrap();
    slipway_executor::sampler::Sampler::new(executor)
        .sample_once()
        .await
        .unwrap();
    let text = registry.render();
    assert!(
        text.contains(r#"slipway_live_sandboxes{user="alice"} 2"#),
        "{text}"
    );
    assert!(!text.contains(r#"user="bob""#), "{text}");
}

/// One sampler across replicas: it holds the lease `executor.usage_sampler` in `slipway_leases`,
/// and when its replica is killed the other takes the lease over once it expires.
#[tokio::test]
async fn one_replica_samples_at_a_time_and_another_takes_over_when_it_dies() {
    let all = setup(&[("SLIPWAY__PLATFORM__USAGE_SAMPLE_MS", "200")]).await;
    let (run, rpc, js) = (&all.run, &all.rpc, &all.js);
    let mut replicas = [
        Some(run.spawn(None).unwrap()),
        Some(run.spawn(None).unwrap()),
    ];
    wait_for_service(rpc).await;
    let leases = slipway_common::lease::Leases::new(
        js.get_key_value("slipway_leases").await.unwrap(),
        "the test",
    )
    .unwrap();
    let pid_of = |holder: &str| holder.split('-').nth(1).unwrap().parse::<u32>().unwrap();
    let holder = || async {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let current = leases
                .current(slipway_executor::sampler::LEASE)
                .await
                .unwrap();
            if let Some((lease, revision)) = current {
                return (pid_of(&lease.holder), revision);
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "nobody took the sampler lease"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let (first, revision) = holder().await;
    let dying = replicas
        .iter()
        .position(|r| r.as_ref().unwrap().id() == Some(first))
        .expect("the holder is one of the two replicas");
    // Renewed while its replica lives: the revision moves, the holder stays.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let (still, renewed) = holder().await;
    assert_eq!(still, first);
    assert!(
        renewed > revision,
        "renewed at {renewed}, taken at {revision}"
    );

    // SIGKILL: the lease is not renewed, and the other replica takes it once it has expired.
    replicas[dying] = None;
    let survivor = replicas[1 - dying].as_ref().unwrap().id();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (now, _) = holder().await;
        if Some(now) == survivor {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the sampler lease stayed with {now}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
