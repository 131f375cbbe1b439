//! The run-event and usage publishers over a real nats-server, counted in the streams.

use async_nats::jetstream;
use slipway_common::Service;
use slipway_common::run_events::{PublishError, RunEventPublisher, Step};
use slipway_common::usage::UsagePublisher;
use slipway_proto::v1::run_event::Payload;
use slipway_proto::v1::{Attribution, DeployProgress, PreviewReady, RunEvent, UsageEvent};
use slipway_test_support::NatsServer;

async fn setup() -> (NatsServer, jetstream::Context) {
    let nats = NatsServer::start().unwrap();
    crate::helpers::admin_setup(&nats.url()).await;
    let js = jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    (nats, js)
}

/// Every message of `stream`, decoded as `M`, with its `Nats-Msg-Id`.
async fn stored<M: slipway_proto::WireMessage>(
    js: &jetstream::Context,
    stream: &str,
) -> Vec<(String, M)> {
    slipway_test_support::streams::stored(js, stream)
        .await
        .unwrap()
}

fn progress(phase: &str) -> Payload {
    Payload::DeployProgress(DeployProgress {
        job_id: "job_7".into(),
        phase: phase.into(),
        ..Default::default()
    })
}

#[tokio::test]
async fn run_events_get_their_id_and_repeating_kinds_are_not_dropped() {
    let (_nats, js) = setup().await;
    let deployer = RunEventPublisher::new(js.clone(), Service::Deployer);
    let who = Some(Attribution {
        user_id: "u1".into(),
        ..Default::default()
    });
    for phase in ["build", "verify"] {
        let (event, published) = deployer
            .publish(
                "run_1",
                &Step::deploy_phase("job_7", phase),
                "",
                who.clone(),
                progress(phase),
            )
            .await
            .unwrap();
        assert_eq!(
            event.event_id,
            format!("run_1:job_7-{phase}:deploy_progress")
        );
        assert!(!published.duplicate);
    }
    // The same fact again (a retry): stored once.
    let (_, again) = deployer
        .publish(
            "run_1",
            &Step::deploy_phase("job_7", "build"),
            "",
            who.clone(),
            progress("build"),
        )
        .await
        .unwrap();
    assert!(again.duplicate);
    // A kept event republished is the same event, bit for bit, and stored once.
    let kept = deployer
        .event(
            "run_1",
            &Step::deploy_phase("job_7", "done"),
            "",
            who.clone(),
            progress("done"),
        )
        .unwrap();
    assert!(!deployer.publish_event(&kept).await.unwrap().duplicate);
    assert!(deployer.publish_event(&kept).await.unwrap().duplicate);
    let events: Vec<(String, RunEvent)> = stored(&js, "RUN_EVENTS").await;
    let ids: Vec<&str> = events.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(
        ids,
        [
            "run_1:job_7-build:deploy_progress",
            "run_1:job_7-verify:deploy_progress",
            "run_1:job_7-done:deploy_progress"
        ]
    );
    assert_eq!(events[2].1, kept, "as it was built");
    let (_, first) = &events[0];
    assert_eq!(first.branch, "main");
    assert_eq!(first.attribution.as_ref().unwrap().user_id, "u1");
    assert!(first.time.is_some());
}

#[tokio::test]
async fn a_kind_another_service_owns_is_refused_and_nothing_is_stored() {
    let (_nats, js) = setup().await;
    let deployer = RunEventPublisher::new(js.clone(), Service::Deployer);
    let e = deployer
        .publish(
            "run_1",
            &Step::once("preview"),
            "main",
            None,
            Payload::PreviewReady(PreviewReady::default()),
        )
        .await
        .unwrap_err();
    assert!(matches!(e, PublishError::ForeignKind { .. }), "{e}");
    // A step that would make the id ambiguous, or not tell a repeating kind's facts apart (the
    // second would be dropped as a copy of the first).
    for step in [
        Step::once("a:b"),
        Step::once("deploy"),
        Step::deploy_phase("job_8", "x"),
    ] {
        let e = deployer
            .publish("run_1", &step, "main", None, progress("x"))
            .await
            .unwrap_err();
        assert!(matches!(e, PublishError::Invalid(_)), "{step:?}: {e}");
    }
    let planner = RunEventPublisher::new(js.clone(), Service::Planner);
    let e = planner
        .publish(
            "run_1",
            &Step::once("queued"),
            "main",
            None,
            Payload::Queued(Default::default()),
        )
        .await
        .unwrap_err();
    assert!(matches!(e, PublishError::Invalid(_)), "{e}");
    planner
        .publish(
            "run_1",
            &Step::nth("queued", 2),
            "main",
            None,
            Payload::Queued(Default::default()),
        )
        .await
        .unwrap();
    let stored_now: Vec<(String, RunEvent)> = stored(&js, "RUN_EVENTS").await;
    assert_eq!(stored_now.len(), 1);
    assert_eq!(stored_now[0].0, "run_1:queued-2:queued");
}

fn usage(id: &str) -> UsageEvent {
    UsageEvent {
        id: id.into(),
        subject: "user 1".into(),
        time: Some(pbjson_types::Timestamp {
            seconds: 1_790_000_000,
            nanos: 0,
        }),
        meter: slipway_proto::meters::SANDBOXES_CREATED.into(),
        unit: "sandbox".into(),
        quantity: "1".into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn a_republished_usage_event_is_the_same_event_stored_once() {
    let (_nats, js) = setup().await;
    let executor = UsagePublisher::new(js.clone(), Service::Executor);
    let unit = slipway_proto::meters::CATALOGUE
        .iter()
        .find(|m| m.name == slipway_proto::meters::SANDBOXES_CREATED)
        .unwrap()
        .unit;
    let mut event = usage("k1:sandboxes_created");
    event.unit = unit.into();
    assert!(!executor.publish(&event).await.unwrap().duplicate);
    assert!(executor.publish(&event).await.unwrap().duplicate);
    let events: Vec<(String, UsageEvent)> = stored(&js, "USAGE").await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].1, event, "bit for bit what was published");
    // Refused before the stream: no id, no time, an unknown meter, a wrong unit, no user.
    let mut bad = Vec::new();
    let mut e = event.clone();
    e.id.clear();
    bad.push(e);
    let mut e = event.clone();
    e.time = None;
    bad.push(e);
    let mut e = event.clone();
    e.meter = "free_lunch".into();
    bad.push(e);
    let mut e = event.clone();
    e.unit = "furlong".into();
    bad.push(e);
    let mut e = event.clone();
    e.subject.clear();
    bad.push(e);
    for e in bad {
        let err = executor.publish(&e).await.unwrap_err();
        assert!(matches!(err, PublishError::Invalid(_)), "{err}");
    }
    assert_eq!(stored::<UsageEvent>(&js, "USAGE").await.len(), 1);
}
