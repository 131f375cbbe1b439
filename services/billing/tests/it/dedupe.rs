//! Dedupe per end-user, through the running service: two users' events never hide each other,
//! and a completed checkpoint is not applied again by the next holder, even once its
//! duplicates' keys are gone.

use std::time::Duration;

use crate::{Bus, generator};

fn publish(
    subject: &str,
    msg_id: &str,
    event: &slipway_proto::v1::UsageEvent,
) -> generator::Publish {
    generator::Publish {
        subject: subject.to_string(),
        msg_id: msg_id.to_string(),
        event: event.clone(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_id_under_two_users_in_one_batch_is_billed_for_each() {
    // One partition: both users' events are in the same batch.
    let bus = Bus::start(&[("SLIPWAY__SETUP__USAGE_PARTITIONS", "1")]).await;
    let mut rng = generator::Rng::new(5);
    let (a_subject, a) = generator::event(&mut rng, 1, "alice@example.com", 0);
    let (b_subject, mut b) = generator::event(&mut rng, 1, "bob@example.com", 0);
    b.id = a.id.clone();
    b.source = a.source.clone();
    generator::publish(
        &bus.js,
        &[
            publish(&a_subject, "a", &a),
            publish(&b_subject, "b", &b),
            // And a true duplicate of alice's, in the same batch.
            publish(&a_subject, "a-again", &a),
        ],
    )
    .await;
    let _billing = bus.billing().await;
    bus.settled(2, 0, Duration::from_secs(60)).await;
    let mut users: Vec<String> = bus
        .billed()
        .await
        .iter()
        .map(|m| m.event.as_ref().unwrap().subject.clone())
        .collect();
    users.sort();
    assert_eq!(users, ["alice@example.com", "bob@example.com"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completed_checkpoint_is_not_applied_again_after_its_keys_are_gone() {
    let bus = Bus::start(&[("SLIPWAY__SETUP__USAGE_PARTITIONS", "1")]).await;
    let mut rng = generator::Rng::new(9);
    let user = "carol@example.com";
    let originals: Vec<(String, slipway_proto::v1::UsageEvent)> = (0..10)
        .map(|n| generator::event(&mut rng, n, user, (n % 3) as usize))
        .collect();
    let first: Vec<_> = originals
        .iter()
        .enumerate()
        .map(|(n, (s, e))| publish(s, &format!("o{n}"), e))
        .collect();
    let again: Vec<_> = originals
        .iter()
        .enumerate()
        .map(|(n, (s, e))| publish(s, &format!("d{n}"), e))
        .collect();

    let mut billing = bus.billing().await;
    generator::publish(&bus.js, &first).await;
    bus.settled(10, 0, Duration::from_secs(60)).await;
    // The partition's last checkpoint is now one of duplicates only.
    generator::publish(&bus.js, &again).await;
    bus.settled(10, 0, Duration::from_secs(60)).await;
    billing.stop().await.unwrap();

    // Its keys age out (as after 36 idle days), and a new replica folds the next event.
    let dedupe = bus
        .js
        .get_key_value("slipway_billing_dedupe")
        .await
        .unwrap();
    let token = slipway_common::subjects::user_token(user).unwrap();
    dedupe.purge(format!("u.{token}")).await.unwrap();
    let _billing = bus.billing().await;
    let (s, e) = generator::event(&mut rng, 100, "dave@example.com", 1);
    generator::publish(&bus.js, &[publish(&s, "new", &e)]).await;
    bus.settled(11, 0, Duration::from_secs(60)).await;
    // Counted at the stream: the duplicates were not billed by completing that checkpoint again.
    assert_eq!(bus.count("BILLED").await, 11);
}
