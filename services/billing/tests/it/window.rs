//! Duplicates past the stream's own duplicate window (one second here): billing's dedupe is by
//! (`source`, `id`) and outlives it, across a restart, whatever the duplicate's event time.

use std::time::Duration;

use crate::{Bus, generator};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_after_the_duplicate_window_and_a_restart_is_counted_once() {
    let bus = Bus::start(&[("SLIPWAY__SETUP__USAGE_DUPLICATE_WINDOW_SEC", "1")]).await;
    let mut rng = generator::Rng::new(3);
    let (subject, e) = generator::event(&mut rng, 1, "user3@example.com", 0);
    let first = generator::Publish {
        subject: subject.clone(),
        msg_id: "first".into(),
        event: e.clone(),
    };
    let mut billing = bus.billing().await;
    generator::publish(&bus.js, &[first]).await;
    bus.settled(1, 0, Duration::from_secs(60)).await;
    billing.stop().await.unwrap();

    // Past the window: the stream keeps the same message id again, and another one.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut later = e.clone();
    later.time.as_mut().unwrap().seconds += 3600;
    let again = [
        generator::Publish {
            subject: subject.clone(),
            msg_id: "first".into(),
            event: e.clone(),
        },
        generator::Publish {
            subject,
            msg_id: "another".into(),
            event: later,
        },
    ];
    generator::publish(&bus.js, &again).await;
    assert_eq!(bus.count("USAGE").await, 3, "the stream kept both repeats");
    let _billing = bus.billing().await;
    bus.settled(1, 0, Duration::from_secs(60)).await;
    let billed = bus.billed().await;
    assert_eq!(billed.len(), 1);
    assert_eq!(billed[0].event.as_ref().unwrap().time, e.time, "first wins");
}

/// A store that fails (the dedupe bucket gone) is not a conflict: the batches come back, nothing
/// is billed, refused or dead-lettered meanwhile, and once the bucket is back every event is
/// billed exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_store_holds_the_batches_back_until_it_returns() {
    let bus = Bus::start(&[]).await;
    let plan = generator::plan(400, 10, 11);
    let _billing = bus.billing().await;
    bus.js
        .delete_key_value("slipway_billing_dedupe")
        .await
        .unwrap();
    generator::publish(&bus.js, &plan.messages).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(bus.count("BILLED").await, 0);
    assert_eq!(bus.count("DLQ").await, 0);
    assert!(!bus.idle().await, "the batches are still held back");
    // The bucket back (as `slipway setup` would make it).
    slipway_test_support::set_up_topology(&bus.nats.url(), &bus.env)
        .await
        .unwrap();
    bus.settled(plan.accepted, plan.invalid, Duration::from_secs(120))
        .await;
    let (sums, _) = crate::totals(&bus.billed().await);
    assert_eq!(sums, plan.expected);
    assert_eq!(bus.count("DLQ").await, 0);
}
