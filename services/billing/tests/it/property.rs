//! A property: whatever the interleaving of publishes, duplicates (some long after the
//! original), replica restarts and handovers between two replicas, the totals in `BILLED` are
//! exactly the generator's and each event is billed once. Each case is a seeded random script
//! (`SLIPWAY_BILLING_PROPERTY_CASES` cases, 6 by default); a failure names its seed.

use std::collections::HashSet;
use std::time::Duration;

use slipway_test_support::Spawned;

use crate::generator::{self, Rng};
use crate::{Bus, totals};

fn cases() -> u64 {
    std::env::var("SLIPWAY_BILLING_PROPERTY_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(6)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_interleaving_of_duplicates_restarts_and_handovers_gives_the_exact_totals() {
    for seed in 0..cases() {
        let bus = Bus::start(&[]).await;
        let plan = generator::plan(1200, 30, 1000 + seed);
        let mut rng = Rng::new(seed);
        let mut replicas: [Option<Spawned>; 2] = [Some(bus.billing().await), None];
        let mut script = Vec::new();
        let mut at = 0;
        while at < plan.messages.len() {
            let n = 1 + rng.below(300) as usize;
            let end = (at + n).min(plan.messages.len());
            generator::publish(&bus.js, &plan.messages[at..end]).await;
            at = end;
            // Then one of: nothing, a restart of one replica, a handover (start one, stop the
            // other), both running.
            let which = rng.below(2) as usize;
            match rng.below(4) {
                0 => script.push("publish"),
                1 => {
                    if let Some(mut r) = replicas[which].take() {
                        r.stop().await.unwrap();
                    }
                    replicas[which] = Some(bus.billing().await);
                    script.push("restart");
                }
                2 => {
                    if replicas[1 - which].is_none() {
                        replicas[1 - which] = Some(bus.billing().await);
                    }
                    if let Some(mut r) = replicas[which].take() {
                        r.stop().await.unwrap();
                    }
                    script.push("handover");
                }
                _ => {
                    for r in replicas.iter_mut() {
                        if r.is_none() {
                            *r = Some(bus.billing().await);
                        }
                    }
                    script.push("both");
                }
            }
            tokio::time::sleep(Duration::from_millis(rng.below(300))).await;
        }
        if replicas.iter().all(Option::is_none) {
            replicas[0] = Some(bus.billing().await);
        }
        bus.settled(plan.accepted, plan.invalid, Duration::from_secs(120))
            .await;
        let billed = bus.billed().await;
        let (sums, ids) = totals(&billed);
        let unique: HashSet<_> = ids.iter().collect();
        assert_eq!(
            unique.len(),
            ids.len(),
            "seed {seed} ({script:?}): billed twice"
        );
        assert_eq!(sums, plan.expected, "seed {seed} ({script:?}): totals");
        for r in replicas.iter_mut().flatten() {
            r.stop().await.unwrap();
        }
    }
}
