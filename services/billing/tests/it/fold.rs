//! One replica folding a mixed stream: exact totals, one `BILLED` message per accepted event,
//! the invalid refused with their reasons, prices applied exactly, and an event for a closed
//! period billed as an adjustment in the open one.

use std::collections::HashSet;
use std::time::Duration;

use slipway_proto::v1::{UsageAggregate, UsageEvent};

use crate::{Bus, generator, totals};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mixed_stream_is_folded_exactly_once_with_the_invalid_refused() {
    // Small batches: each partition folds several, one after another on the same subjects.
    let bus = Bus::start(&[
        ("SLIPWAY__BILLING__PRICES__LLM_INPUT_TOKENS", "0.000003"),
        ("SLIPWAY__BILLING__BATCH_MAX_EVENTS", "50"),
    ])
    .await;
    let plan = generator::plan(3000, 40, 7);
    let billing = bus.billing().await;
    generator::publish(&bus.js, &plan.messages).await;
    bus.settled(plan.accepted, plan.invalid, Duration::from_secs(120))
        .await;

    let billed = bus.billed().await;
    let (sums, ids) = totals(&billed);
    assert_eq!(sums, plan.expected, "per-user per-meter totals");
    let unique: HashSet<_> = ids.iter().collect();
    assert_eq!(unique.len(), ids.len(), "each (source, id) billed once");

    // Prices: exact decimals, rounded half up to 9 places; unpriced meters carry none.
    for b in &billed {
        let e = b.event.as_ref().unwrap();
        if e.meter == "llm_input_tokens" {
            assert_eq!(b.unit_price, "0.000003");
            assert_eq!(b.currency, "USD");
            let want = generator::nanos(&e.quantity) * 3_000; // nanos x price in nanos / 1e9
            let want = (want + 500_000_000) / 1_000_000_000;
            assert_eq!(generator::nanos(&b.amount), want, "{b:?}");
        } else {
            assert!(b.unit_price.is_empty() && b.amount.is_empty(), "{b:?}");
        }
        assert!(b.usage_sequence > 0);
    }

    // The refused, each with its reason.
    let rejected = slipway_test_support::streams::stored::<UsageEvent>(&bus.js, "USAGE_REJECTED")
        .await
        .unwrap();
    assert_eq!(rejected.len() as u64, plan.invalid);
    let mut js = bus.js.get_stream("USAGE_REJECTED").await.unwrap();
    let first = js.info().await.unwrap().state.first_sequence;
    let raw = js.get_raw_message(first).await.unwrap();
    // Filed under the service that published it, not the partition it was stored in.
    assert!(
        ["executor", "planner", "deployer"]
            .iter()
            .any(|p| raw.subject.as_str() == format!("slipway.rejected.usage.{p}")),
        "{}",
        raw.subject
    );
    let reasons = format!("{:?}", raw.headers);
    assert!(
        [
            "unknown_meter",
            "wrong_unit",
            "invalid_quantity",
            "too_late"
        ]
        .iter()
        .any(|r| reasons.contains(r)),
        "{reasons}"
    );

    // The aggregates agree with the stream.
    assert_eq!(bus.aggregates().await, plan.expected, "aggregates");
    // One replica is never its own second writer, nor fenced: its remembered floors and the
    // sequences it read off its batches' acks were right.
    let text = billing.metrics().await.unwrap();
    for zero in [
        "slipway_billing_second_writers_total 0",
        "slipway_billing_fence_conflicts_total 0",
    ] {
        assert!(text.contains(zero), "{zero}: {text}");
    }
    drop(billing);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_of_a_closed_period_is_billed_as_an_adjustment_in_the_open_one() {
    let bus = Bus::start(&[]).await;
    let _billing = bus.billing().await;
    // The last hour of the previous month (within the 35 days of lateness).
    let now = time::OffsetDateTime::now_utc();
    let month_start = now
        .replace_day(1)
        .unwrap()
        .replace_time(time::Time::MIDNIGHT);
    let last_hour = month_start - time::Duration::hours(1);
    let previous = format!("{:04}-{:02}", last_hour.year(), u8::from(last_hour.month()));
    let current = format!("{:04}-{:02}", now.year(), u8::from(now.month()));
    // Closed (as Billing 2/2 will close it) for this user.
    let kv = bus.js.get_key_value("slipway_billing").await.unwrap();
    let token = slipway_common::subjects::user_token("u1").unwrap();
    let closed = UsageAggregate {
        user_id: "u1".into(),
        period: previous.clone(),
        closed: true,
        ..Default::default()
    };
    kv.put(
        format!("agg.{token}.{previous}"),
        slipway_common::records::encode(&closed),
    )
    .await
    .unwrap();
    let mut rng = generator::Rng::new(1);
    let (subject, mut e) = generator::event(&mut rng, 1, "u1", 6);
    e.time = Some(pbjson_types::Timestamp {
        seconds: last_hour.unix_timestamp(),
        nanos: 0,
    });
    generator::publish(
        &bus.js,
        &[generator::Publish {
            subject,
            msg_id: "late".into(),
            event: e,
        }],
    )
    .await;
    bus.settled(1, 0, Duration::from_secs(60)).await;
    let billed = bus.billed().await;
    assert!(billed[0].adjustment);
    assert_eq!(billed[0].period, current);
    assert_eq!(billed[0].original_period, previous);
}
