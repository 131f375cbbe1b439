use std::time::Duration;

use async_nats::jetstream;
use slipway_common::Service;
use slipway_common::setup::{self, Mode};
use slipway_common::subjects::streams;
use slipway_common::topology::Topology;
use slipway_test_support::NatsServer;

use crate::helpers::{readyz_until, settings, spawn_app};

async fn js(server: &NatsServer) -> jetstream::Context {
    jetstream::new(async_nats::connect(server.url()).await.unwrap())
}

fn topology(server: &NatsServer) -> Topology {
    Topology::new(&settings(&server.url(), &[]).setup)
}

#[tokio::test]
async fn setup_creates_everything_once_and_reopens_it() {
    let server = NatsServer::start().unwrap();
    let js = js(&server).await;
    let topo = topology(&server);
    let expected =
        topo.streams.len() + topo.buckets.len() + topo.object_stores.len() + topo.consumers.len();

    let first = setup::apply(&js, &topo, Mode::CreateMissing).await.unwrap();
    assert_eq!(first.created.len(), expected, "{:?}", first.created);
    assert!(first.unchanged.is_empty() && first.drifted.is_empty());
    let created_at = js
        .get_stream(streams::USAGE)
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .created;
    js.publish("slipway.usage.executor.exec_count.u1", "x".into())
        .await
        .unwrap()
        .await
        .unwrap();

    let second = setup::apply(&js, &topo, Mode::CreateMissing).await.unwrap();
    assert!(second.created.is_empty(), "{:?}", second.created);
    assert_eq!(second.unchanged.len(), expected);
    assert!(second.drifted.is_empty(), "{:?}", second.drifted);
    let mut usage = js.get_stream(streams::USAGE).await.unwrap();
    let info = usage.info().await.unwrap();
    assert_eq!(
        info.created, created_at,
        "the stream was re-opened, not recreated"
    );
    assert_eq!(
        info.state.messages, 1,
        "its messages survive a second setup"
    );
    assert!(setup::verify(&js, &topo).await.unwrap().is_empty());
    // The buckets are usable key-value stores.
    let kv = js.get_key_value("slipway_runs").await.unwrap();
    kv.put("k", "v".into()).await.unwrap();
}

#[tokio::test]
async fn drift_makes_readyz_fail_naming_it_and_update_corrects_it() {
    let server = NatsServer::start().unwrap();
    let js = js(&server).await;
    let topo = topology(&server);

    // Before setup, the service is up but not ready, and says what is missing.
    let app = spawn_app(Service::Billing, settings(&server.url(), &[]), |_| async {}).await;
    let (_, body) = readyz_until(app.health, "missing topology", |s, b| {
        s == 503
            && b["failing"]["topology"]
                .as_str()
                .is_some_and(|t| t.contains("stream USAGE: existence"))
    })
    .await;
    assert!(
        body["failing"]["topology"]
            .as_str()
            .unwrap()
            .contains("slipway setup"),
        "{body}"
    );

    setup::apply(&js, &topo, Mode::CreateMissing).await.unwrap();
    readyz_until(app.health, "ready after setup", |s, _| s == 200).await;

    // An operator changes USAGE behind Slipway's back.
    let mut config = js
        .get_stream(streams::USAGE)
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .config
        .clone();
    config.max_age = Duration::from_secs(3 * 86_400);
    js.update_stream(config).await.unwrap();
    let (_, body) = readyz_until(app.health, "drift reported", |s, _| s == 503).await;
    let why = body["failing"]["topology"].as_str().unwrap();
    assert!(
        why.contains("stream USAGE") && why.contains("max_age is 259200s"),
        "{why}"
    );

    let report = setup::apply(&js, &topo, Mode::CreateMissing).await.unwrap();
    assert_eq!(report.drifted.len(), 1, "{:?}", report.drifted);
    assert_eq!(report.drifted[0].resource, "stream USAGE");
    let report = setup::apply(&js, &topo, Mode::Update).await.unwrap();
    assert_eq!(report.updated, vec!["stream USAGE".to_string()]);
    readyz_until(app.health, "ready after update", |s, _| s == 200).await;

    // A service verifies only what it uses: a drifted deploy queue does not concern billing.
    let mut config = js
        .get_stream(streams::DEPLOY_JOBS)
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .config
        .clone();
    config.max_age = Duration::from_secs(2 * 86_400);
    js.update_stream(config).await.unwrap();
    let drifts = setup::verify(&js, &topo).await.unwrap();
    assert_eq!(drifts.len(), 1);
    assert!(
        setup::verify(&js, &topo.for_service(Service::Billing))
            .await
            .unwrap()
            .is_empty()
    );
    app.shutdown.trigger();
    app.task.await.unwrap().unwrap();
}

#[test]
fn partition_consumer_names_read_back_only_in_their_one_form() {
    use slipway_common::topology::parse_partition_consumer;
    assert_eq!(
        parse_partition_consumer(Service::Billing, "billing-3-of-8"),
        Some((3, 8))
    );
    for bad in [
        "billing",
        "billing-8-of-8",
        "billing-03-of-8",
        "billing--1-of-8",
        "billing-1-of-08",
        "billing-1-of-",
        "billingx-1-of-8",
        "planner-1-of-8",
        "billing-1-of-8-of-9",
        "billing-+1-of-8",
    ] {
        assert_eq!(
            parse_partition_consumer(Service::Billing, bad),
            None,
            "{bad}"
        );
    }
}

#[test]
fn partitioned_streams_place_the_partition_token_and_name_p_consumers() {
    let topo = Topology::new(
        &settings(
            "nats://127.0.0.1:1",
            &[("SLIPWAY__SETUP__USAGE_PARTITIONS", "3")],
        )
        .setup,
    );
    let usage = topo.stream(streams::USAGE).unwrap();
    let part = usage.partitioning.as_ref().unwrap();
    assert_eq!(
        part.destination(),
        "slipway.usage.{{partition(3,3)}}.{{wildcard(1)}}.{{wildcard(2)}}.{{wildcard(3)}}"
    );
    let runs = topo.stream(streams::RUN_COMMANDS).unwrap();
    assert_eq!(
        runs.partitioning.as_ref().unwrap().destination(),
        "slipway.runs.{{wildcard(1)}}.{{wildcard(2)}}.{{partition(8,1)}}"
    );
    let billing: Vec<(&str, &str)> = topo
        .consumers
        .iter()
        .filter(|c| c.stream == streams::USAGE)
        .map(|c| (c.durable.as_str(), c.filter_subject.as_str()))
        .collect();
    assert_eq!(
        billing,
        [
            ("billing-0-of-3", "slipway.usage.0.*.*.*"),
            ("billing-1-of-3", "slipway.usage.1.*.*.*"),
            ("billing-2-of-3", "slipway.usage.2.*.*.*"),
        ]
    );
    // Only the owner may unpin its partitions, and only the planner reads runs by subject.
    let billing = slipway_common::auth::permissions(
        slipway_common::auth::Principal::Service(Service::Billing),
        &topo,
    );
    assert!(billing.publish.contains("$JS.API.CONSUMER.UNPIN.USAGE.*"));
    assert!(
        !billing
            .publish
            .iter()
            .any(|s| s.contains("UNPIN.RUN_COMMANDS"))
    );
    let planner = slipway_common::auth::permissions(
        slipway_common::auth::Principal::Service(Service::Planner),
        &topo,
    );
    assert!(
        planner
            .publish
            .contains("$JS.API.DIRECT.GET.RUN_COMMANDS.>")
    );
    assert!(planner.publish.contains("slipway.runs.*.steps"));
    assert!(!planner.publish.contains("slipway.runs.*.commands"));
    for bad in ["0", "257"] {
        let err = slipway_common::config::Settings::load(&slipway_common::config::Sources {
            env: [(
                "SLIPWAY__SETUP__USAGE_PARTITIONS".to_string(),
                bad.to_string(),
            )]
            .into(),
            ..Default::default()
        })
        .unwrap_err();
        assert!(err.to_string().contains("setup.usage_partitions"), "{err}");
    }
}

/// An installation whose `USAGE` partitions still give up after 5 deliveries (as before usage
/// was never given up on): readiness names the drift, and `--update` fixes the consumers in
/// place, keeping their positions.
#[tokio::test]
async fn usage_partitions_with_a_delivery_limit_drift_and_update_lifts_it() {
    let server = NatsServer::start().unwrap();
    let js = js(&server).await;
    let topo = topology(&server);
    let mut old = topo.clone();
    for c in old.consumers.iter_mut().filter(|c| c.stream == "USAGE") {
        c.max_deliver = 5;
    }
    setup::apply(&js, &old, Mode::CreateMissing).await.unwrap();
    let report = setup::apply(&js, &topo, Mode::CreateMissing).await.unwrap();
    assert!(
        report
            .drifted
            .iter()
            .any(|d| d.resource.contains("billing-0-of-") && d.field == "max_deliver"),
        "{:?}",
        report.drifted
    );
    setup::apply(&js, &topo, Mode::Update).await.unwrap();
    let usage = js.get_stream("USAGE").await.unwrap();
    for c in topo.consumers.iter().filter(|c| c.stream == "USAGE") {
        let info = usage.consumer_info(&c.durable).await.unwrap();
        assert_eq!(info.config.max_deliver, -1, "{}", c.durable);
    }
    let again = setup::apply(&js, &topo, Mode::CreateMissing).await.unwrap();
    assert!(again.drifted.is_empty(), "{:?}", again.drifted);
}
