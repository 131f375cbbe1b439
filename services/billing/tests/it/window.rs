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
