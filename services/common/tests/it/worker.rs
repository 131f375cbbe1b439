//! The durable-consumer worker over a real nats-server: settling by outcome, in-progress acks
//! for long handlers, dead letters with reasons and their replay, shutdown with work in flight.
//! Counts are read at the streams and the consumer, not from the worker.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};
use slipway_common::Shutdown;
use slipway_common::deadletter;
use slipway_common::metrics::Metrics;
use slipway_common::worker::{self, BatchSpec, Delivery, HandlerError, WorkerContext, WorkerSpec};
use slipway_proto::codec::ContentType;
use slipway_proto::v1::GetSandboxRequest as Job;
use slipway_test_support::NatsServer;
use tokio::sync::Mutex;

const STREAM: &str = "TEST_JOBS";

/// A nats-server with the topology (for the `DLQ` stream) and a test stream and consumer:
/// `ack_wait` and `max_deliver` as given.
async fn setup(ack_wait: Duration, max_deliver: i64) -> (NatsServer, jetstream::Context) {
    let nats = NatsServer::start().unwrap();
    crate::helpers::admin_setup(&nats.url()).await;
    let js = jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    let s = js
        .create_stream(stream::Config {
            name: STREAM.into(),
            subjects: vec!["test.jobs.>".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    tester(&s, ack_wait, max_deliver).await;
    (nats, js)
}

/// The `tester` durable consumer on `s`.
async fn tester(s: &jetstream::stream::Stream, ack_wait: Duration, max_deliver: i64) {
    s.create_consumer(consumer::pull::Config {
        durable_name: Some("tester".into()),
        ack_policy: consumer::AckPolicy::Explicit,
        ack_wait,
        max_deliver,
        ..Default::default()
    })
    .await
    .unwrap();
}

fn context(js: &jetstream::Context, shutdown: &Shutdown) -> WorkerContext {
    WorkerContext {
        jetstream: js.clone(),
        shutdown: shutdown.clone(),
        metrics: Arc::new(Metrics::new()),
    }
}

async fn publish(js: &jetstream::Context, name: &str) {
    let headers = slipway_common::rpc::message_headers::<Job>(ContentType::Protobuf);
    let job = Job {
        sandbox_id: name.into(),
        name: String::new(),
    };
    js.publish_with_headers(
        format!("test.jobs.{name}"),
        headers,
        slipway_proto::codec::encode(&job, ContentType::Protobuf).into(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
}

/// The consumer's view: (acknowledged floor, pending, redelivered, ack-pending).
async fn consumer_state(js: &jetstream::Context) -> (u64, u64, usize, usize) {
    consumer_state_of(js, STREAM).await
}

/// The server's view of the "tester" consumer on `stream`.
async fn consumer_info(js: &jetstream::Context, stream: &str) -> consumer::Info {
    let mut c: consumer::PullConsumer = js
        .get_stream(stream)
        .await
        .unwrap()
        .get_consumer("tester")
        .await
        .unwrap();
    c.info().await.unwrap().clone()
}

async fn consumer_state_of(js: &jetstream::Context, stream: &str) -> (u64, u64, usize, usize) {
    let i = consumer_info(js, stream).await;
    (
        i.ack_floor.stream_sequence,
        i.num_pending,
        i.num_redelivered,
        i.num_ack_pending,
    )
}

async fn dead_letters(js: &jetstream::Context) -> Vec<deadletter::Entry> {
    deadletter::list(js, Some(STREAM)).await.unwrap()
}

async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..300 {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("never: {what}");
}

#[tokio::test]
async fn acks_naks_with_delay_and_dead_letters_by_the_handlers_outcome() {
    let (_nats, js) = setup(Duration::from_secs(5), 5).await;
    let shutdown = Shutdown::new();
    let seen: Arc<Mutex<Vec<(String, i64)>>> = Arc::default();
    let log = seen.clone();
    let ctx = context(&js, &shutdown);
    let metrics = ctx.metrics.clone();
    worker::start(
        ctx,
        WorkerSpec::new(STREAM, "tester"),
        move |job: Job, d: Delivery| {
            let log = log.clone();
            async move {
                log.lock().await.push((job.sandbox_id.clone(), d.delivered));
                match job.sandbox_id.as_str() {
                    "later" if d.delivered == 1 => {
                        Err(HandlerError::retry(Duration::from_millis(300), "not yet"))
                    }
                    "never" => Err(HandlerError::permanent(
                        "bad_job",
                        "this job cannot be\nrun",
                    )),
                    _ => Ok(()),
                }
            }
        },
    )
    .await
    .unwrap();
    let started = std::time::Instant::now();
    for name in ["fine", "later", "never"] {
        publish(&js, name).await;
    }
    eventually("all settled", || async {
        let (floor, pending, _, ack_pending) = consumer_state(&js).await;
        floor == 3 && pending == 0 && ack_pending == 0
    })
    .await;
    let seen = seen.lock().await.clone();
    assert!(seen.contains(&("fine".into(), 1)));
    // Nakked with its delay, then handled on the second delivery.
    assert!(seen.contains(&("later".into(), 2)), "{seen:?}");
    assert!(started.elapsed() >= Duration::from_millis(300));
    // Dead-lettered at once, with its reason (one line), where it came from, and its content.
    assert_eq!(seen.iter().filter(|(n, _)| n == "never").count(), 1);
    let dead = dead_letters(&js).await;
    assert_eq!(dead.len(), 1, "{dead:?}");
    let r = &dead[0].reason;
    assert_eq!(
        (r.code.as_str(), r.message.as_str(), r.subject.as_str()),
        ("bad_job", "this job cannot be run", "test.jobs.never")
    );
    assert_eq!(
        (r.stream_sequence, r.delivered, r.consumer.as_str()),
        (3, 1, "tester")
    );
    // The consumer's metrics, by outcome.
    let text = metrics.render();
    for (outcome, n) in [
        ("delivered", 4),
        ("redelivered", 1),
        ("acked", 2),
        ("nakked", 1),
        ("dead_lettered", 1),
    ] {
        let line = format!(
            "slipway_consumer_messages_total{{stream=\"{STREAM}\",consumer=\"tester\",outcome=\"{outcome}\"}} {n}"
        );
        assert!(text.contains(&line), "no `{line}` in:\n{text}");
    }
    let handled = "slipway_consumer_handler_duration_seconds_count{stream=\"TEST_JOBS\",consumer=\"tester\"} 4";
    assert!(text.contains(handled), "{text}");
    shutdown.trigger();
}

#[tokio::test]
async fn a_handler_three_times_longer_than_ack_wait_is_not_redelivered() {
    let ack_wait = Duration::from_millis(900);
    let (_nats, js) = setup(ack_wait, 5).await;
    let shutdown = Shutdown::new();
    let runs = Arc::new(AtomicUsize::new(0));
    let counted = runs.clone();
    // One handler at a time: the second message waits behind the first, held and kept alive.
    worker::start(
        context(&js, &shutdown),
        WorkerSpec::new(STREAM, "tester").max_in_flight(1),
        move |_: Job, _| {
            let counted = counted.clone();
            async move {
                counted.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(ack_wait * 3).await;
                Ok(())
            }
        },
    )
    .await
    .unwrap();
    publish(&js, "long").await;
    publish(&js, "queued").await;
    eventually("both settled", || async {
        let (floor, _, _, ack_pending) = consumer_state(&js).await;
        floor == 2 && ack_pending == 0
    })
    .await;
    // Delivered exactly twice in all: neither was delivered again.
    assert_eq!(
        consumer_info(&js, STREAM).await.delivered.consumer_sequence,
        2
    );
    assert_eq!(runs.load(Ordering::SeqCst), 2, "each handled once");
    shutdown.trigger();
}

/// Publishes a deploy job named `name` on the real `DEPLOY_JOBS` stream.
async fn publish_job(js: &jetstream::Context, name: &str) {
    let headers = slipway_common::rpc::message_headers::<Job>(ContentType::Protobuf);
    let job = Job {
        sandbox_id: name.into(),
        name: String::new(),
    };
    js.publish_with_headers(
        slipway_common::subjects::DEPLOY_JOBS,
        headers,
        slipway_proto::codec::encode(&job, ContentType::Protobuf).into(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
}

fn slipway(nats: &NatsServer, args: &[&str]) -> std::process::Output {
    std::process::Command::new(slipway_test_support::workspace_bin("slipway").unwrap())
        .args(args)
        .env("SLIPWAY__NATS__URL", nats.url())
        .output()
        .unwrap()
}

#[tokio::test]
async fn a_poison_message_is_dead_lettered_after_max_deliver_and_replays_once_fixed() {
    // The real deploy-job stream, its consumer replaced by one that gives up after 3 tries.
    let (nats, js) = setup(Duration::from_secs(5), 3).await;
    let jobs = js.get_stream("DEPLOY_JOBS").await.unwrap();
    jobs.delete_consumer("deployer").await.unwrap();
    tester(&jobs, Duration::from_secs(5), 3).await;
    let shutdown = Shutdown::new();
    let fixed = Arc::new(AtomicUsize::new(0));
    let handled: Arc<Mutex<Vec<(String, i64)>>> = Arc::default();
    let (is_fixed, log) = (fixed.clone(), handled.clone());
    worker::start(
        context(&js, &shutdown),
        WorkerSpec::new("DEPLOY_JOBS", "tester"),
        move |job: Job, d: Delivery| {
            let (is_fixed, log) = (is_fixed.clone(), log.clone());
            async move {
                if job.sandbox_id == "poison" && is_fixed.load(Ordering::SeqCst) == 0 {
                    assert_eq!(d.last_attempt, d.delivered == 3);
                    return Err(HandlerError::retry(Duration::from_millis(50), "the cause"));
                }
                log.lock().await.push((job.sandbox_id, d.delivered));
                Ok(())
            }
        },
    )
    .await
    .unwrap();
    publish_job(&js, "poison").await;
    for n in 0..5 {
        publish_job(&js, &format!("after-{n}")).await;
    }
    let dead_jobs = || async { deadletter::list(&js, Some("DEPLOY_JOBS")).await.unwrap() };
    eventually("the poison message given up", || async {
        dead_jobs().await.len() == 1
    })
    .await;
    eventually("the others handled", || async {
        handled.lock().await.len() == 5
    })
    .await;
    let dead = dead_jobs().await;
    let r = &dead[0].reason;
    assert_eq!((r.code.as_str(), r.delivered), ("max_deliver", 3));
    assert!(r.message.contains("the cause"), "{r:?}");
    assert_eq!(r.subject, slipway_common::subjects::DEPLOY_JOBS);

    // `slipway dlq list` shows it.
    let listed = slipway(&nats, &["dlq", "list", "DEPLOY_JOBS"]);
    let text = String::from_utf8_lossy(&listed.stdout);
    assert!(
        text.contains("max_deliver") && text.contains("the cause"),
        "{text}"
    );

    // The cause fixed, `slipway dlq replay` puts it back: handled once, and gone from the DLQ.
    fixed.store(1, Ordering::SeqCst);
    let out = slipway(&nats, &["dlq", "replay", &dead[0].sequence.to_string()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eventually("the replayed message handled", || async {
        handled.lock().await.iter().any(|(n, _)| n == "poison")
    })
    .await;
    // Replaying it again finds nothing: it is handled once.
    let again = slipway(&nats, &["dlq", "replay", &dead[0].sequence.to_string()]);
    assert!(!again.status.success());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let poison = handled
        .lock()
        .await
        .iter()
        .filter(|(n, _)| n == "poison")
        .count();
    assert_eq!(poison, 1);
    assert!(dead_jobs().await.is_empty());
    let listed = slipway(&nats, &["dlq", "list", "DEPLOY_JOBS"]);
    assert_eq!(
        String::from_utf8_lossy(&listed.stdout).trim(),
        "no dead letters"
    );
    shutdown.trigger();
}

#[tokio::test]
async fn a_forged_dead_letter_is_not_replayed_anywhere_else() {
    let (nats, js) = setup(Duration::from_secs(5), 3).await;
    let forge = |filed_on: &str, stream: &str, original: &str| {
        let mut h = async_nats::HeaderMap::new();
        h.insert(deadletter::ORIGINAL_SUBJECT, original);
        h.insert(deadletter::ORIGINAL_STREAM, stream);
        h.insert(deadletter::REASON_CODE, "x");
        (filed_on.to_string(), h)
    };
    let cases = [
        // A subject outside the stream it claims: a service's operation.
        forge(
            "slipway.dlq.DEPLOY_JOBS",
            "DEPLOY_JOBS",
            "slipway.deployer.v1.deploy",
        ),
        // Filed on another stream's dead letters than it claims.
        forge("slipway.dlq.PROMPTS", "DEPLOY_JOBS", "slipway.deploys.jobs"),
        // A stream that is not Slipway's.
        forge("slipway.dlq.TEST_JOBS", "TEST_JOBS", "test.jobs.x"),
    ];
    for (subject, headers) in cases {
        let ack = js
            .publish_with_headers(subject, headers, "payload".into())
            .await
            .unwrap()
            .await
            .unwrap();
        let out = slipway(&nats, &["dlq", "replay", &ack.sequence.to_string()]);
        assert!(!out.status.success(), "replayed {}", ack.sequence);
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("not replayed"),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Nothing reached the stream it named.
    let mut jobs = js.get_stream("DEPLOY_JOBS").await.unwrap();
    assert_eq!(jobs.info().await.unwrap().state.messages, 0);
}

#[tokio::test]
async fn a_malformed_message_is_dead_lettered_as_malformed() {
    let (_nats, js) = setup(Duration::from_secs(5), 5).await;
    let shutdown = Shutdown::new();
    worker::start(
        context(&js, &shutdown),
        WorkerSpec::new(STREAM, "tester"),
        |_: Job, _| async { Ok(()) },
    )
    .await
    .unwrap();
    let mut headers = slipway_common::rpc::message_headers::<Job>(ContentType::Protobuf);
    headers.insert("Nats-Msg-Id", "junk-1");
    js.publish_with_headers("test.jobs.junk", headers, "\u{0}\u{ff}not protobuf".into())
        .await
        .unwrap()
        .await
        .unwrap();
    eventually("dead-lettered", || async {
        dead_letters(&js).await.len() == 1
    })
    .await;
    let dead = dead_letters(&js).await;
    assert_eq!(dead[0].reason.code, "malformed");
    shutdown.trigger();
}

#[tokio::test]
async fn on_shutdown_work_in_flight_finishes_and_is_acked() {
    let (nats, js) = setup(Duration::from_secs(30), 5).await;
    // The service kit's own shutdown: what SIGTERM triggers, then `App::run` finishing (grace
    // period for work in flight, then draining NATS).
    let shutdown = Shutdown::new();
    let app = slipway_common::App::start(
        slipway_common::Service::Deployer,
        crate::helpers::settings(&nats.url(), &[]),
        shutdown.clone(),
    )
    .await
    .unwrap();
    let (started_tx, mut started_rx) = tokio::sync::mpsc::channel::<()>(1);
    let done = Arc::new(AtomicUsize::new(0));
    let finished = done.clone();
    app.worker(
        WorkerSpec::new(STREAM, "tester")
            .max_in_flight(1)
            .max_held(2),
        move |_: Job, _| {
            let (started_tx, finished) = (started_tx.clone(), finished.clone());
            async move {
                let _ = started_tx.send(()).await;
                tokio::time::sleep(Duration::from_millis(800)).await;
                finished.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }
        },
    )
    .await
    .unwrap();
    publish(&js, "in-flight").await;
    publish(&js, "held").await;
    started_rx.recv().await.unwrap();
    shutdown.trigger();
    app.run().await.unwrap();
    assert_eq!(done.load(Ordering::SeqCst), 1, "the running one finished");
    let (floor, _, _, _) = consumer_state(&js).await;
    assert_eq!(floor, 1, "the finished one is acked");
    // The one held but not started went back for another replica, which handles it.
    let other = Shutdown::new();
    let handled = Arc::new(AtomicUsize::new(0));
    let counted = handled.clone();
    worker::start(
        context(&js, &other),
        WorkerSpec::new(STREAM, "tester"),
        move |_: Job, _| {
            let counted = counted.clone();
            async move {
                counted.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }
        },
    )
    .await
    .unwrap();
    eventually("the held one handled by the next worker", || async {
        consumer_state(&js).await.0 == 2
    })
    .await;
    assert_eq!(handled.load(Ordering::SeqCst), 1);
    other.trigger();
}

#[tokio::test]
async fn a_worker_asks_only_for_what_it_can_hold() {
    let ack_wait = Duration::from_millis(600);
    let (_nats, js) = setup(ack_wait, 5).await;
    let shutdown = Shutdown::new();
    let (started_tx, mut started_rx) = tokio::sync::mpsc::channel::<()>(4);
    worker::start(
        context(&js, &shutdown),
        WorkerSpec::new(STREAM, "tester")
            .max_in_flight(1)
            .max_held(1),
        move |_: Job, _| {
            let started_tx = started_tx.clone();
            async move {
                let _ = started_tx.send(()).await;
                tokio::time::sleep(ack_wait * 3).await;
                Ok(())
            }
        },
    )
    .await
    .unwrap();
    for n in 0..3 {
        publish(&js, &format!("j{n}")).await;
    }
    started_rx.recv().await.unwrap();
    // One at a time: the others stay at the server for other replicas, unheld here.
    let (_, pending, _, ack_pending) = consumer_state(&js).await;
    assert_eq!((pending, ack_pending), (2, 1));
    eventually("all settled", || async {
        let (floor, _, _, ack_pending) = consumer_state(&js).await;
        floor == 3 && ack_pending == 0
    })
    .await;
    assert_eq!(
        consumer_info(&js, STREAM).await.delivered.consumer_sequence,
        3,
        "each delivered once"
    );
    shutdown.trigger();
}

#[tokio::test]
async fn a_panicking_handler_lets_its_message_be_delivered_again() {
    let (_nats, js) = setup(Duration::from_millis(600), 5).await;
    let shutdown = Shutdown::new();
    let attempts = Arc::new(AtomicUsize::new(0));
    let counted = attempts.clone();
    worker::start(
        context(&js, &shutdown),
        WorkerSpec::new(STREAM, "tester"),
        move |_: Job, d: Delivery| {
            let counted = counted.clone();
            async move {
                counted.fetch_add(1, Ordering::SeqCst);
                if d.delivered == 1 {
                    panic!("a bug in the handler");
                }
                Ok(())
            }
        },
    )
    .await
    .unwrap();
    publish(&js, "p").await;
    eventually("handled on its second delivery", || async {
        consumer_state(&js).await.0 == 1
    })
    .await;
    assert_eq!(attempts.load(Ordering::SeqCst), 2);
    shutdown.trigger();
}

#[tokio::test]
async fn batches_are_bounded_and_settled_per_item() {
    let (_nats, js) = setup(Duration::from_secs(5), 5).await;
    let shutdown = Shutdown::new();
    let sizes: Arc<Mutex<Vec<usize>>> = Arc::default();
    let log = sizes.clone();
    for n in 0..10 {
        publish(&js, &format!("b{n}")).await;
    }
    worker::start_batches(
        context(&js, &shutdown),
        WorkerSpec::new(STREAM, "tester"),
        BatchSpec {
            max_messages: 4,
            max_bytes: 1 << 20,
            max_wait: Duration::from_millis(200),
        },
        move |items: Vec<worker::Item<Job>>| {
            let log = log.clone();
            async move {
                log.lock().await.push(items.len());
                items
                    .iter()
                    .map(|i| match i.message.sandbox_id.as_str() {
                        "b3" => Err(HandlerError::permanent("refused", "b3 is invalid")),
                        _ => Ok(()),
                    })
                    .collect()
            }
        },
    )
    .await
    .unwrap();
    eventually("all settled", || async {
        let (floor, pending, _, ack_pending) = consumer_state(&js).await;
        floor == 10 && pending == 0 && ack_pending == 0
    })
    .await;
    let sizes = sizes.lock().await.clone();
    assert!(sizes.iter().all(|n| *n <= 4), "{sizes:?}");
    assert_eq!(sizes.iter().sum::<usize>(), 10);
    let dead = dead_letters(&js).await;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].reason.subject, "test.jobs.b3");
    shutdown.trigger();
}

#[test]
fn subject_patterns_match_as_nats_does() {
    use slipway_common::deadletter::subject_matches;
    for (pattern, subject, matches) in [
        ("slipway.deploys.jobs", "slipway.deploys.jobs", true),
        ("slipway.deploys.jobs", "slipway.deploys.job", false),
        ("slipway.deploys.jobs", "slipway.deploys.jobs.x", false),
        ("slipway.runs.*.commands", "slipway.runs.r1.commands", true),
        ("slipway.runs.*.commands", "slipway.runs.r1.events", false),
        ("slipway.runs.*.commands", "slipway.runs.commands", false),
        (
            "slipway.usage.>",
            "slipway.usage.executor.exec_count.u",
            true,
        ),
        ("slipway.usage.>", "slipway.usage", false),
        ("slipway.usage.*.*.*", "slipway.usage.a.b.c", true),
        ("slipway.usage.*.*.*", "slipway.usage.a.b", false),
        ("slipway.prompts", "slipway.deployer.v1.deploy", false),
    ] {
        assert_eq!(
            subject_matches(pattern, subject),
            matches,
            "{pattern} ~ {subject}"
        );
    }
}
