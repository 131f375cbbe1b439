use std::time::Duration;

use async_nats::{ConnectOptions, Event};
use slipway_common::Service;
use slipway_common::auth::{Credential, Principal, User, authorization_config, permissions};
use slipway_common::topology::Topology;
use slipway_test_support::NatsServer;
use tokio::sync::mpsc;

use crate::helpers::settings;

struct Keys(Vec<(Principal, nkeys::KeyPair)>);

impl Keys {
    fn new() -> Self {
        Keys(
            Principal::all()
                .into_iter()
                .map(|p| (p, nkeys::KeyPair::new_user()))
                .collect(),
        )
    }
    fn users(&self) -> Vec<User> {
        self.0
            .iter()
            .map(|(p, k)| User {
                principal: *p,
                credential: Credential::Nkey(k.public_key()),
            })
            .collect()
    }
    fn seed(&self, p: Principal) -> String {
        self.0
            .iter()
            .find(|(q, _)| *q == p)
            .unwrap()
            .1
            .seed()
            .unwrap()
    }
}

/// Connects as `p`, with its inbox prefix; server errors (permission violations) go to the channel.
async fn connect_as(
    server: &NatsServer,
    keys: &Keys,
    p: Principal,
) -> (async_nats::Client, mpsc::UnboundedReceiver<String>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let client = ConnectOptions::with_nkey(keys.seed(p))
        .custom_inbox_prefix(p.inbox_prefix())
        .event_callback(move |e| {
            let tx = tx.clone();
            async move {
                if let Event::ServerError(e) = e {
                    let _ = tx.send(e.to_string());
                }
            }
        })
        .connect(server.url())
        .await
        .unwrap();
    (client, rx)
}

async fn violation(rx: &mut mpsc::UnboundedReceiver<String>) -> String {
    tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("the server reports a permissions violation")
        .unwrap()
}

/// A nats-server with the generated authorization and the topology set up by the admin.
async fn secured() -> (Topology, Keys, NatsServer, async_nats::jetstream::Context) {
    let topo = Topology::new(&settings("nats://127.0.0.1:1", &[]).setup);
    let keys = Keys::new();
    let server = NatsServer::with_config(&authorization_config(&keys.users(), &topo)).unwrap();
    let (admin, _) = connect_as(&server, &keys, Principal::Admin).await;
    let js = async_nats::jetstream::new(admin);
    slipway_common::setup::apply(&js, &topo, slipway_common::setup::Mode::CreateMissing)
        .await
        .unwrap();
    (topo, keys, server, js)
}

#[tokio::test]
async fn a_service_user_is_refused_subjects_outside_its_job() {
    let (_topo, keys, server, _admin) = secured().await;

    let (billing, mut errors) =
        connect_as(&server, &keys, Principal::Service(Service::Billing)).await;
    // Billing may read its own stream's configuration...
    let billing_js = async_nats::jetstream::new(billing.clone());
    billing_js
        .get_stream("USAGE")
        .await
        .expect("billing reads USAGE");
    // ...but not publish prompts, and not pose as the planner.
    billing
        .publish("slipway.prompts", "{}".into())
        .await
        .unwrap();
    billing.flush().await.unwrap();
    let e = violation(&mut errors).await;
    assert!(
        e.to_lowercase().contains("permissions violation") && e.contains("slipway.prompts"),
        "{e}"
    );
    let _sub = billing.subscribe("slipway.planner.v1.>").await.unwrap();
    billing.flush().await.unwrap();
    let e = violation(&mut errors).await;
    assert!(e.contains("slipway.planner.v1.>"), "{e}");

    // The platform may publish a prompt, which lands in the stream.
    let (platform, mut platform_errors) = connect_as(&server, &keys, Principal::Platform).await;
    let pjs = async_nats::jetstream::new(platform.clone());
    pjs.publish("slipway.prompts", r#"{"prompt":"x","user_id":"u"}"#.into())
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(platform_errors.try_recv().is_err());
    // But it may not publish usage, which only services produce.
    platform
        .publish("slipway.usage.executor.exec_count.u", "x".into())
        .await
        .unwrap();
    platform.flush().await.unwrap();
    assert!(
        violation(&mut platform_errors)
            .await
            .contains("slipway.usage")
    );
}

#[test]
fn each_service_publishes_only_its_own_event_kinds_and_usage() {
    let topo = Topology::new(&settings("nats://127.0.0.1:1", &[]).setup);
    let preview = permissions(Principal::Service(Service::Preview), &topo);
    assert!(
        preview
            .publish
            .contains("slipway.runs.*.events.preview_ready")
    );
    assert!(!preview.publish.contains("slipway.runs.*.events.deployed"));
    assert!(
        !preview
            .publish
            .iter()
            .any(|s| s.starts_with("slipway.usage"))
    );
    let deployer = permissions(Principal::Service(Service::Deployer), &topo);
    assert!(deployer.publish.contains("slipway.runs.*.events.deployed"));
    assert!(deployer.publish.contains("slipway.usage.deployer.>"));
    assert!(!deployer.publish.contains("slipway.usage.executor.>"));
    let executor = permissions(Principal::Service(Service::Executor), &topo);
    assert!(executor.subscribe.contains("slipway.executor.v1.>"));
    assert!(
        !executor.publish.iter().any(|s| s.contains(".events.")),
        "the executor publishes no run events"
    );
    let platform = permissions(Principal::Platform, &topo);
    assert!(
        !platform.publish.contains("slipway.executor.v1.>"),
        "only services call the executor"
    );
}

#[tokio::test]
async fn consumers_may_file_their_dead_letters_and_billing_its_refusals() {
    use slipway_common::deadletter::{self, Reason};
    let (_topo, keys, server, admin_js) = secured().await;
    let reason = |stream: &str, subject: &str| Reason {
        code: "test".into(),
        message: "filed by its consumer".into(),
        subject: subject.into(),
        stream: stream.into(),
        stream_sequence: 1,
        delivered: 1,
        consumer: "c".into(),
    };
    for (service, stream, subject, refused) in [
        (
            Service::Billing,
            "USAGE",
            "slipway.usage.executor.exec_count.u",
            true,
        ),
        (
            Service::Billing,
            "USAGE",
            "slipway.usage.executor.exec_count.u",
            false,
        ),
        (
            Service::Deployer,
            "DEPLOY_JOBS",
            "slipway.deploys.jobs",
            false,
        ),
        (Service::Planner, "PROMPTS", "slipway.prompts", false),
    ] {
        let (client, _) = connect_as(&server, &keys, Principal::Service(service)).await;
        let js = async_nats::jetstream::new(client);
        let target = deadletter::target(stream, subject, refused);
        deadletter::publish(&js, &target, None, "x".into(), &reason(stream, subject))
            .await
            .unwrap_or_else(|e| panic!("{service:?} filing on {target}: {e}"));
    }
    // What they filed is there: one refusal, three dead letters.
    let mut rejected = admin_js.get_stream("USAGE_REJECTED").await.unwrap();
    assert_eq!(rejected.info().await.unwrap().state.messages, 1);
    let listed = deadletter::list(&admin_js, None).await.unwrap();
    assert_eq!(listed.len(), 3);
    // The platform files nothing there.
    let (platform, mut errors) = connect_as(&server, &keys, Principal::Platform).await;
    platform
        .publish("slipway.dlq.PROMPTS", "x".into())
        .await
        .unwrap();
    platform.flush().await.unwrap();
    assert!(violation(&mut errors).await.contains("slipway.dlq.PROMPTS"));
}

/// Every operation in the table answered by a responder connected as its service.
async fn responders(server: &NatsServer, keys: &Keys) -> Vec<async_nats::Client> {
    let mut out = Vec::new();
    for service in Service::ALL {
        let (client, _) = connect_as(server, keys, Principal::Service(service)).await;
        let mut sub = client.subscribe(service.all_ops()).await.unwrap();
        let answering = client.clone();
        tokio::spawn(async move {
            use futures::StreamExt;
            while let Some(m) = sub.next().await {
                if let Some(reply) = m.reply {
                    let _ = answering.publish(reply, "ok".into()).await;
                }
            }
        });
        client.flush().await.unwrap();
        out.push(client);
    }
    out
}

#[tokio::test]
async fn the_operations_table_is_the_authorization_both_ways() {
    use slipway_common::operations::{OPERATIONS, may_call};
    let topo = Topology::new(&settings("nats://127.0.0.1:1", &[]).setup);
    let keys = Keys::new();
    let server = NatsServer::with_config(&authorization_config(&keys.users(), &topo)).unwrap();
    let _responders = responders(&server, &keys).await;
    let mut clients = std::collections::BTreeMap::new();
    for p in Principal::all() {
        clients.insert(p, connect_as(&server, &keys, p).await);
    }
    // Every allowed call in the table is answered.
    for o in OPERATIONS {
        for p in o.callers.iter().copied().chain([Principal::Admin]) {
            assert!(may_call(p, o.service, o.op), "{p:?} {}", o.subject());
            let (client, _) = &clients[&p];
            let answer = tokio::time::timeout(
                Duration::from_secs(5),
                client.request(o.subject(), "x".into()),
            )
            .await
            .unwrap_or_else(|_| panic!("{p:?} calling {}: no answer", o.subject()))
            .unwrap_or_else(|e| panic!("{p:?} calling {}: {e}", o.subject()));
            assert_eq!(&answer.payload[..], b"ok");
        }
    }
    // The platform's calls are exactly the public queries the issue lists.
    let mut public: Vec<String> = slipway_common::operations::callable_by(Principal::Platform)
        .map(|o| o.subject())
        .collect();
    public.sort();
    let mut expected: Vec<String> = [
        "slipway.planner.v1.runs.list",
        "slipway.planner.v1.run.get",
        "slipway.preview.v1.token",
        "slipway.preview.v1.share.list",
        "slipway.preview.v1.ticket",
        "slipway.billing.v1.usage.get",
        "slipway.billing.v1.usage.rollup",
        "slipway.billing.v1.invoice.export",
        "slipway.billing.v1.quota.get",
        "slipway.billing.v1.quota.set",
        "slipway.deployer.v1.deployments.list",
        "slipway.deployer.v1.deployment.get",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    expected.sort();
    assert_eq!(public, expected);
    // Every call outside the table is refused by the server, for every principal but admin;
    // and so are consuming USAGE (billing's alone) and reading DLQ (admin's alone).
    let forbidden: Vec<(Principal, String)> = Principal::all()
        .into_iter()
        .filter(|p| *p != Principal::Admin)
        .flat_map(|p| {
            OPERATIONS
                .iter()
                .filter(move |o| !o.callers.contains(&p))
                .map(move |o| (p, o.subject()))
        })
        .chain(
            Principal::all()
                .into_iter()
                .filter(|p| !matches!(p, Principal::Admin | Principal::Service(Service::Billing)))
                .map(|p| (p, "$JS.API.CONSUMER.MSG.NEXT.USAGE.billing".to_string())),
        )
        .chain(
            Principal::all()
                .into_iter()
                .filter(|p| *p != Principal::Admin)
                .flat_map(|p| {
                    [
                        (p, "$JS.API.STREAM.MSG.GET.DLQ".to_string()),
                        (p, "$JS.API.CONSUMER.CREATE.DLQ".to_string()),
                        (p, "$JS.API.DIRECT.GET.DLQ".to_string()),
                    ]
                }),
        )
        .collect();
    // Those named in the issue are among them.
    for (p, subject) in [
        (
            Principal::Service(Service::Preview),
            Service::Executor.op("sandbox.destroy"),
        ),
        (Principal::Platform, Service::Billing.op("period.close")),
        (Principal::Platform, Service::Executor.op("sandbox.create")),
    ] {
        assert!(forbidden.contains(&(p, subject.clone())), "{p:?} {subject}");
    }
    for (p, subject) in forbidden {
        if let Some(rest) = subject.strip_prefix("slipway.") {
            let (svc, op) = rest.split_once(".v1.").unwrap();
            let service = Service::ALL
                .into_iter()
                .find(|s| s.as_str() == svc)
                .unwrap();
            assert!(
                !may_call(p, service, op),
                "{p:?} may call {subject} in the table"
            );
        }
        let (client, errors) = clients.get_mut(&p).unwrap();
        client.publish(subject.clone(), "x".into()).await.unwrap();
        client.flush().await.unwrap();
        let e = violation(errors).await;
        assert!(
            e.to_lowercase().contains("permissions violation") && e.contains(&subject),
            "{p:?} → {subject}: {e}"
        );
    }
}

#[tokio::test]
async fn each_service_verifies_its_part_and_owners_release_their_partitions_only() {
    let (topo, keys, server, js) = secured().await;

    // What each service checks before it is ready, with its own permissions.
    for service in Service::ALL {
        let (client, _) = connect_as(&server, &keys, Principal::Service(service)).await;
        let sjs = async_nats::jetstream::new(client);
        let drift = slipway_common::setup::verify(&sjs, &topo.for_service(service))
            .await
            .unwrap_or_else(|e| panic!("{service:?} cannot verify its part: {e}"));
        assert!(drift.is_empty(), "{service:?}: {drift:?}");
    }

    // Billing releases its own partitions, and may neither delete one nor touch the planner's.
    let (billing, _) = connect_as(&server, &keys, Principal::Service(Service::Billing)).await;
    let bjs = async_nats::jetstream::new(billing);
    let usage = bjs.get_stream("USAGE").await.unwrap();
    usage
        .unpin_consumer("billing-0-of-8", "billing")
        .await
        .expect("billing unpins its partition");
    assert!(usage.delete_consumer("billing-0-of-8").await.is_err());
    let runs = bjs.get_stream_no_info("RUN_COMMANDS").await.unwrap();
    assert!(
        runs.unpin_consumer("planner-0-of-8", "planner")
            .await
            .is_err()
    );
    let still: Vec<String> = {
        use futures::TryStreamExt;
        js.get_stream("USAGE")
            .await
            .unwrap()
            .consumer_names()
            .try_collect()
            .await
            .unwrap()
    };
    assert_eq!(still.len(), 8, "no consumer was deleted: {still:?}");
}

/// The jobs added for previews and billing work under their own users, with no permission
/// violation: preview reads a run's events with an ordered consumer, keeps tickets and hears
/// file changes; billing reads a user's last `BILLED` message directly and publishes with an
/// expected subject sequence.
#[tokio::test]
async fn preview_reads_run_events_and_tickets_and_billing_reads_billed_back() {
    use futures::StreamExt;
    let (_topo, keys, server, admin) = secured().await;
    admin
        .publish("slipway.runs.r1.events.accepted", "x".into())
        .await
        .unwrap()
        .await
        .unwrap();

    let (preview, mut errors) =
        connect_as(&server, &keys, Principal::Service(Service::Preview)).await;
    let pjs = async_nats::jetstream::new(preview.clone());
    let stream = pjs.get_stream_no_info("RUN_EVENTS").await.unwrap();
    let consumer = stream
        .create_consumer(async_nats::jetstream::consumer::pull::OrderedConfig {
            filter_subject: "slipway.runs.r1.events.>".into(),
            ..Default::default()
        })
        .await
        .expect("preview opens an ordered consumer on RUN_EVENTS");
    let mut messages = consumer.messages().await.unwrap();
    let first = tokio::time::timeout(Duration::from_secs(5), messages.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(first.subject.as_str(), "slipway.runs.r1.events.accepted");
    let tickets = pjs.get_key_value("slipway_tickets").await.unwrap();
    tickets.put("t.abc", "x".into()).await.unwrap();
    assert!(tickets.get("t.abc").await.unwrap().is_some());
    let _files = preview
        .subscribe("slipway.sandboxes.*.files")
        .await
        .unwrap();
    preview.flush().await.unwrap();
    assert!(errors.try_recv().is_err(), "{:?}", errors.try_recv());

    let (billing, mut errors) =
        connect_as(&server, &keys, Principal::Service(Service::Billing)).await;
    let bjs = async_nats::jetstream::new(billing.clone());
    let billed = bjs.get_stream_no_info("BILLED").await.unwrap();
    let none = billed
        .direct_get_last_for_subject("slipway.billed.u1")
        .await;
    assert_eq!(
        none.unwrap_err().kind(),
        async_nats::jetstream::stream::DirectGetErrorKind::NotFound
    );
    let publish = async_nats::jetstream::message::PublishMessage::build()
        .payload("x".into())
        .expected_last_subject_sequence(0);
    let ack = bjs
        .send_publish("slipway.billed.u1", publish)
        .await
        .unwrap()
        .await
        .expect("billing publishes BILLED with an expected subject sequence");
    let last = billed
        .direct_get_last_for_subject("slipway.billed.u1")
        .await
        .expect("billing reads a user's last BILLED message");
    assert_eq!(last.sequence, ack.sequence);
    billing.flush().await.unwrap();
    assert!(errors.try_recv().is_err(), "{:?}", errors.try_recv());
}
