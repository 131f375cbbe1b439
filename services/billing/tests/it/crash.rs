//! Three billing processes fold a filled stream while they are killed (abort at a failpoint: -9
//! in effect) between every pair of steps, again and again, each restarted at once; one is
//! stopped (SIGSTOP) past the pin timeout and resumed. At the end the totals are the
//! generator's, `BILLED` holds one message per accepted event and `USAGE_REJECTED` exactly the
//! invalid ones.

use std::collections::{BTreeMap, HashSet};
use std::os::unix::process::ExitStatusExt;
use std::time::{Duration, Instant};

use slipway_test_support::{FailpointRun, RunningProcess, workspace_bin};

use crate::{Bus, generator, totals};

/// Where a folder is killed, in turn: after its checkpoint, after applying it, after k of its
/// `BILLED` publishes, after `BILLED` before the ack.
const STEPS: [&str; 4] = [
    "billing.after_checkpoint",
    "billing.after_apply",
    "billing.billed.one",
    "billing.after_published",
];

fn events() -> u64 {
    std::env::var("SLIPWAY_BILLING_CRASH_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000)
}

struct Slot {
    process: RunningProcess,
    armed: Option<String>,
    since: Instant,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_folders_killed_at_every_step_bill_each_event_once() {
    let n = events();
    let bus = Bus::start(&[]).await;
    let plan = generator::plan(n, 1000, 42);
    generator::publish(&bus.js, &plan.messages).await;
    eprintln!(
        "{} messages: {} accepted, {} invalid, {} duplicates",
        plan.messages.len(),
        plan.accepted,
        plan.invalid,
        plan.messages.len() as u64 - plan.accepted - plan.invalid
    );

    let logs = tempfile::tempdir().unwrap();
    let mut run = FailpointRun::new(workspace_bin("slipway-billing").unwrap());
    for (k, v) in &bus.env {
        run = run.env(k, v);
    }
    // The schedule: every step, three rounds, at a small hit number (so it is reached soon).
    let mut schedule: Vec<String> = Vec::new();
    for round in 0..3u64 {
        for (i, step) in STEPS.iter().enumerate() {
            schedule.push(format!("{step}@{}", 1 + (round + i as u64) % 3));
        }
    }
    schedule.reverse();
    let log = |i: usize| logs.path().join(format!("billing-{i}.log"));
    let mut slots: Vec<Slot> = (0..3)
        .map(|i| {
            let armed = schedule.pop();
            Slot {
                process: run.spawn_logged(armed.as_deref(), &log(i)).unwrap(),
                armed,
                since: Instant::now(),
            }
        })
        .collect();
    let mut hit: BTreeMap<String, u32> = BTreeMap::new();
    let mut stopped_once = false;
    let started = Instant::now();
    let deadline = started + Duration::from_secs(900);
    loop {
        for (i, slot) in slots.iter_mut().enumerate() {
            let ended = slot.process.try_wait().unwrap();
            let stale = slot.armed.is_some() && slot.since.elapsed() > Duration::from_secs(60);
            if ended.is_none() && !stale {
                continue;
            }
            if let Some(status) = ended {
                let armed = slot.armed.clone().unwrap_or_default();
                let name = armed.split('@').next().unwrap_or_default().to_string();
                assert_eq!(
                    status.signal(),
                    Some(6),
                    "billing {i} ended otherwise than at its failpoint ({armed}): {status}; log:\n{}",
                    std::fs::read_to_string(log(i)).unwrap_or_default()
                );
                *hit.entry(name).or_default() += 1;
            } else {
                // Armed but never reached (it held no partition with work): restarted.
                slot.process.signal("KILL").unwrap();
            }
            let armed = schedule.pop();
            slot.process = run.spawn_logged(armed.as_deref(), &log(i)).unwrap();
            slot.armed = armed;
            slot.since = Instant::now();
        }
        // One folder frozen past the pin timeout (2 s), then thawed with its batch in hand.
        if !stopped_once && hit.values().sum::<u32>() >= 4 {
            stopped_once = true;
            let frozen = slots.iter().position(|s| s.armed.is_none()).unwrap_or(0);
            slots[frozen].process.signal("STOP").unwrap();
            tokio::time::sleep(Duration::from_secs(4)).await;
            slots[frozen].process.signal("CONT").unwrap();
        }
        let all_run = schedule.is_empty() && slots.iter().all(|s| s.armed.is_none());
        if all_run {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the crash schedule did not finish: {hit:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Every step was crashed at, at least once.
    for step in STEPS {
        assert!(
            hit.get(step).copied().unwrap_or(0) >= 1,
            "never killed at {step}: {hit:?}"
        );
    }
    bus.settled(plan.accepted, plan.invalid, Duration::from_secs(900))
        .await;
    let took = started.elapsed();
    for s in &slots {
        s.process.terminate().unwrap();
    }

    let billed = bus.billed().await;
    let (sums, ids) = totals(&billed);
    assert_eq!(
        billed.len() as u64,
        plan.accepted,
        "one BILLED message per accepted event"
    );
    let unique: HashSet<_> = ids.iter().collect();
    assert_eq!(unique.len(), ids.len(), "each (source, id) billed once");
    assert_eq!(sums, plan.expected, "per-user per-meter totals");
    assert_eq!(bus.count("USAGE_REJECTED").await, plan.invalid);
    assert_eq!(bus.count("DLQ").await, 0, "nothing dead-lettered");
    assert_eq!(bus.aggregates().await, plan.expected, "aggregates");
    eprintln!("folded through {hit:?} and a SIGSTOP in {took:?}");
}
