//! Partitioned streams with real worker processes (`slipway-kit-tester`) over one nats-server:
//! failover after kill -9, fencing after SIGSTOP, balance when a replica joins, and a changed
//! partition count moved over by `setup --update`. Effects are counted at the store (a KV record
//! per key, revision-checked) and compared with what the test published.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, kv};
use futures::StreamExt;
use prost::Message;
use slipway_common::Settings;
use slipway_common::setup::{self, DrainWait, Mode};
use slipway_common::subjects::streams;
use slipway_common::topology::Topology;
use slipway_proto::v1::{RunCommand, run_command};
use slipway_test_support::{NatsServer, workspace_bin};

use crate::helpers::settings;

const PRIORITY_TIMEOUT: Duration = Duration::from_secs(2);
const ACK_WAIT: Duration = Duration::from_secs(4);

fn partitioned_settings(url: &str, partitions: u32) -> Settings {
    settings(
        url,
        &[
            (
                "SLIPWAY__SETUP__RUN_COMMAND_PARTITIONS",
                &partitions.to_string(),
            ),
            (
                "SLIPWAY__SETUP__PRIORITY_TIMEOUT_MS",
                &PRIORITY_TIMEOUT.as_millis().to_string(),
            ),
            (
                "SLIPWAY__SETUP__PARTITION_ACK_WAIT_SEC",
                &ACK_WAIT.as_secs().to_string(),
            ),
        ],
    )
}

/// One `slipway-kit-tester` process, its log in a file; killed on drop (also when stopped).
struct Replica {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Replica {
    fn start(dir: &Path, url: &str, name: &str, apply_delay_ms: u64) -> Replica {
        Self::start_with(dir, url, name, apply_delay_ms, &[])
    }

    fn start_with(
        dir: &Path,
        url: &str,
        name: &str,
        apply_delay_ms: u64,
        env: &[(&str, &str)],
    ) -> Replica {
        let log = dir.join(format!("{name}.log"));
        let child = Command::new(workspace_bin("slipway-kit-tester").unwrap())
            .args([url, name, &apply_delay_ms.to_string()])
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Replica {
            name: name.to_string(),
            child,
            log,
        }
    }

    fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(status.success(), "kill -{signal}");
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    async fn ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.log().contains("ready ") {
            assert!(
                Instant::now() < deadline,
                "{} never ready: {}",
                self.name,
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The test's own record of what it published: per key, how many messages.
#[derive(Default)]
struct Published {
    per_key: HashMap<String, u64>,
}

impl Published {
    /// Publishes the next message of each key (all keys at once, then awaits the acks, so each
    /// key's messages are stored in index order). Returns each key's stored sequence.
    async fn wave(&mut self, js: &jetstream::Context, keys: &[String]) -> Vec<u64> {
        // In chunks: the client bounds the acks it waits for at once.
        let mut sequences = Vec::with_capacity(keys.len());
        for chunk in keys.chunks(500) {
            let mut acks = Vec::with_capacity(chunk.len());
            for key in chunk {
                let index = self.per_key.entry(key.clone()).or_default();
                acks.push(publish(js, key, *index).await);
                *index += 1;
            }
            for ack in acks {
                sequences.push(ack.await.unwrap().sequence);
            }
        }
        sequences
    }
}

async fn publish(
    js: &jetstream::Context,
    key: &str,
    index: u64,
) -> jetstream::context::PublishAckFuture {
    let command = RunCommand {
        command_id: format!("{key}-{index}"),
        run_id: key.to_string(),
        command: Some(run_command::Command::Feedback(run_command::Feedback {
            text: index.to_string(),
            branch: String::new(),
        })),
        ..Default::default()
    };
    js.publish(
        format!("slipway.runs.{key}.commands"),
        command.encode_to_vec().into(),
    )
    .await
    .unwrap()
}

fn keys(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("run{i:05}")).collect()
}

async fn prepare(server: &NatsServer, partitions: u32) -> (jetstream::Context, kv::Store) {
    let client = async_nats::connect(server.url()).await.unwrap();
    let js = jetstream::new(client);
    let topo = Topology::new(&partitioned_settings(&server.url(), partitions).setup);
    setup::apply(&js, &topo, Mode::CreateMissing).await.unwrap();
    let effects = js
        .create_key_value(kv::Config {
            bucket: "kit_tester_effects".into(),
            history: 1,
            ..Default::default()
        })
        .await
        .unwrap();
    (js, effects)
}

/// The partition consumers of `RUN_COMMANDS` at the server.
async fn partition_consumers(js: &jetstream::Context) -> Vec<String> {
    use futures::TryStreamExt;
    let stream = js.get_stream(streams::RUN_COMMANDS).await.unwrap();
    let mut names: Vec<String> = stream.consumer_names().try_collect().await.unwrap();
    names.retain(|n| n.starts_with("planner-"));
    names.sort();
    names
}

/// Waits until every partition consumer has nothing pending or unacknowledged.
async fn drained(js: &jetstream::Context, within: Duration) {
    let stream = js.get_stream(streams::RUN_COMMANDS).await.unwrap();
    let deadline = Instant::now() + within;
    loop {
        let mut busy = Vec::new();
        for name in partition_consumers(js).await {
            let info = stream.consumer_info(&name).await.unwrap();
            if info.num_pending > 0 || info.num_ack_pending > 0 {
                busy.push(format!(
                    "{name}: {} pending, {} unacked",
                    info.num_pending, info.num_ack_pending
                ));
            }
        }
        if busy.is_empty() {
            return;
        }
        assert!(Instant::now() < deadline, "not drained: {busy:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The pin the server holds per partition consumer.
async fn server_pins(js: &jetstream::Context) -> BTreeMap<String, Option<String>> {
    let stream = js.get_stream(streams::RUN_COMMANDS).await.unwrap();
    let mut pins = BTreeMap::new();
    for name in partition_consumers(js).await {
        let info = stream.consumer_info(&name).await.unwrap();
        let pin = info
            .priority_groups
            .first()
            .and_then(|g| g.pinned_client_id.clone())
            .filter(|p| !p.is_empty());
        pins.insert(name, pin);
    }
    pins
}

/// Which replica holds which partition: the server's pin, matched with the pin id each live
/// replica says it was given.
async fn owners(
    client: &async_nats::Client,
    js: &jetstream::Context,
    replicas: &[&Replica],
) -> BTreeMap<String, Vec<String>> {
    let server = server_pins(js).await;
    let mut owners: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for r in replicas {
        let said: BTreeMap<String, Option<String>> = match tokio::time::timeout(
            Duration::from_secs(2),
            client.request(format!("kit.tester.{}.pins", r.name), "".into()),
        )
        .await
        {
            Ok(Ok(m)) => serde_json::from_slice(&m.payload).unwrap(),
            _ => BTreeMap::new(),
        };
        let mine = server
            .iter()
            .filter(|(c, pin)| pin.is_some() && said.get(*c).cloned().flatten() == **pin)
            .map(|(c, _)| c.clone())
            .collect();
        owners.insert(r.name.clone(), mine);
    }
    owners
}

#[derive(serde::Deserialize)]
struct Effect {
    count: u64,
    next_index: u64,
    out_of_order: u64,
}

async fn effect(effects: &kv::Store, key: &str) -> Option<Effect> {
    effects
        .get(key)
        .await
        .unwrap()
        .map(|v| serde_json::from_slice(&v).unwrap())
}

/// Every key's effects are exactly what was published: no message lost, none applied twice,
/// none out of order.
async fn assert_exactly_once(effects: &kv::Store, published: &Published) {
    let keys: Vec<(String, u64)> = published
        .per_key
        .iter()
        .map(|(k, n)| (k.clone(), *n))
        .collect();
    let results: Vec<(String, u64, Option<Effect>)> = futures::stream::iter(keys)
        .map(|(k, n)| async move {
            let e = effect(effects, &k).await;
            (k, n, e)
        })
        .buffer_unordered(64)
        .collect()
        .await;
    let mut wrong = Vec::new();
    for (key, expected, e) in &results {
        match e {
            Some(e) if e.count == *expected && e.next_index == *expected && e.out_of_order == 0 => {
            }
            Some(e) => wrong.push(format!(
                "{key}: published {expected}, applied {} (next index {}, {} out of order)",
                e.count, e.next_index, e.out_of_order
            )),
            None => wrong.push(format!("{key}: published {expected}, applied none")),
        }
    }
    assert!(
        wrong.is_empty(),
        "{} keys wrong, e.g. {:?}",
        wrong.len(),
        &wrong[..wrong.len().min(5)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pinned_partitions_fail_over_fence_and_balance_with_10000_keys() {
    const P: u32 = 8;
    let server = NatsServer::start().unwrap();
    let (js, effects) = prepare(&server, P).await;
    let client = async_nats::connect(server.url()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let url = server.url();

    // The server holds exactly P consumers per partitioned stream, whatever the number of keys.
    assert_eq!(partition_consumers(&js).await.len(), P as usize);
    let usage = js.get_stream(streams::USAGE).await.unwrap();
    let mut usage_consumers: Vec<String> = {
        use futures::TryStreamExt;
        usage.consumer_names().try_collect().await.unwrap()
    };
    usage_consumers.sort();
    assert_eq!(
        usage_consumers,
        (0..8)
            .map(|p| format!("billing-{p}-of-8"))
            .collect::<Vec<_>>()
    );

    let a = Replica::start(dir.path(), &url, "a", 2);
    let b = Replica::start(dir.path(), &url, "b", 2);
    let c = Replica::start(dir.path(), &url, "c", 2);
    for r in [&a, &b, &c] {
        r.ready().await;
    }
    let keys = keys(
        std::env::var("SLIPWAY_KIT_KEYS")
            .ok()
            .and_then(|k| k.parse().ok())
            .unwrap_or(10_000),
    );
    let started = Instant::now();
    let phase = |what: &str| println!("[{:>6.1}s] {what}", started.elapsed().as_secs_f64());
    let mut published = Published::default();
    published.wave(&js, &keys).await;
    phase("first wave published");
    drained(&js, Duration::from_secs(180)).await;
    phase("first wave applied");
    assert_exactly_once(&effects, &published).await;

    // kill -9 the replica with the most pins while the next wave is being applied.
    published.wave(&js, &keys).await;
    let held = owners(&client, &js, &[&a, &b, &c]).await;
    println!("pins before the kill: {held:?}");
    let (victim, lost) = held.iter().max_by_key(|(_, p)| p.len()).unwrap();
    assert!(!lost.is_empty(), "someone holds partitions: {held:?}");
    let mut replicas = vec![a, b, c];
    let at = replicas.iter().position(|r| &r.name == victim).unwrap();
    let victim = replicas.remove(at);
    let lost = lost.clone();
    victim.signal("KILL");
    let killed_at = Instant::now();
    // Served again: another replica holds the pin and has settled everything the victim had
    // been delivered (its batch in hand comes back after ack_wait), counted at the server.
    let stream = js.get_stream(streams::RUN_COMMANDS).await.unwrap();
    let mut at_kill = Vec::new();
    for name in &lost {
        let info = stream.consumer_info(name).await.unwrap();
        let pin = info.priority_groups[0].pinned_client_id.clone();
        at_kill.push((name.clone(), pin, info.delivered.consumer_sequence));
    }
    // The pin moves after PRIORITY_TIMEOUT and the victim's deliveries come back after
    // ACK_WAIT; the slack is for the new holder's pulls on a loaded 2-core machine (CI once
    // took 8.02 s against a 2 s slack). What is bounded is that nothing else is waited for.
    let bound = PRIORITY_TIMEOUT + ACK_WAIT + Duration::from_secs(4);
    let mut moved: Vec<Option<Duration>> = vec![None; at_kill.len()];
    let mut settled: Vec<Option<Duration>> = vec![None; at_kill.len()];
    while settled.iter().any(Option::is_none) {
        for (i, (name, pin, delivered)) in at_kill.iter().enumerate() {
            let info = stream.consumer_info(name).await.unwrap();
            let now = info.priority_groups[0].pinned_client_id.clone();
            if moved[i].is_none() && now.is_some() && now != *pin {
                moved[i] = Some(killed_at.elapsed());
            }
            if settled[i].is_none()
                && moved[i].is_some()
                && info.ack_floor.consumer_sequence >= *delivered
            {
                settled[i] = Some(killed_at.elapsed());
            }
        }
        assert!(
            killed_at.elapsed() < Duration::from_secs(60),
            "not served again: {at_kill:?} {moved:?} {settled:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let served: Vec<(String, Duration, Duration)> = at_kill
        .iter()
        .zip(moved.iter().zip(&settled))
        .map(|((name, _, _), (m, s))| (name.clone(), m.unwrap_or_default(), s.unwrap_or_default()))
        .collect();
    let worst = served.iter().map(|(_, _, t)| *t).max().unwrap();
    println!(
        "failover (partition, pinned elsewhere after, victim's deliveries settled after): {served:?}; bound {bound:?}"
    );
    assert!(
        worst <= bound,
        "served again after {worst:?}, bound {bound:?}"
    );
    drained(&js, Duration::from_secs(180)).await;
    assert_exactly_once(&effects, &published).await;
    drop(victim);
    phase("failover checked");

    // SIGSTOP the live replica with the most pins for longer than priority_timeout (and
    // ack_wait, so its batch is delivered to the new holder), then SIGCONT: it resumes with a
    // batch in hand, its writes meet newer revisions, and it reports the fence conflict.
    published.wave(&js, &keys).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let live: Vec<&Replica> = replicas.iter().collect();
    let held = owners(&client, &js, &live).await;
    let deposed = held.iter().max_by_key(|(_, p)| p.len()).unwrap().0.clone();
    let deposed = replicas.iter().find(|r| r.name == deposed).unwrap();
    let logged_before = deposed.log().len();
    deposed.signal("STOP");
    tokio::time::sleep(PRIORITY_TIMEOUT + ACK_WAIT + Duration::from_secs(4)).await;
    deposed.signal("CONT");
    phase("deposed replica resumed");
    drained(&js, Duration::from_secs(180)).await;
    assert_exactly_once(&effects, &published).await;
    // The resumed replica may report after the others drained the stream (a loaded machine
    // schedules it late): its log is read until the report is there, within a bound.
    let mut log = String::new();
    for _ in 0..100 {
        log = deposed.log()[logged_before..].to_string();
        if log.contains("fence conflict") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        log.contains("fence conflict"),
        "the deposed replica reports a fence conflict: {log}"
    );

    // A restarted replica and a fourth join while traffic flows: within 30 s the pin counts
    // per replica differ by at most one.
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = {
        let (js, keys, stop) = (js.clone(), keys.clone(), stop.clone());
        let mut published = published;
        tokio::spawn(async move {
            for chunk in keys.chunks(40).cycle() {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                published.wave(&js, chunk).await;
                tokio::time::sleep(Duration::from_millis(40)).await;
            }
            published
        })
    };
    replicas.push(Replica::start(dir.path(), &url, "d", 2));
    replicas.push(Replica::start(dir.path(), &url, "e", 2));
    for r in &replicas {
        r.ready().await;
    }
    phase("two replicas joined");
    let joined = Instant::now();
    let balanced = loop {
        let live: Vec<&Replica> = replicas.iter().collect();
        let held = owners(&client, &js, &live).await;
        let counts: Vec<usize> = held.values().map(Vec::len).collect();
        let (min, max) = (*counts.iter().min().unwrap(), *counts.iter().max().unwrap());
        if counts.len() == 4 && max - min <= 1 && counts.iter().sum::<usize>() >= P as usize - 1 {
            break held;
        }
        assert!(
            joined.elapsed() < Duration::from_secs(30),
            "not balanced within 30 s: {held:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    println!("balanced after {:?}: {balanced:?}", joined.elapsed());

    // SIGTERM: the replica unpins what it holds (it says so, and the server's pins change), so
    // its partitions move without waiting for priority_timeout (the time is printed, not
    // asserted: the machine is shared).
    let leaving = replicas
        .iter()
        .find(|r| !balanced[&r.name].is_empty())
        .unwrap();
    let its = balanced[&leaving.name].clone();
    let before = server_pins(&js).await;
    leaving.signal("TERM");
    let termed = Instant::now();
    loop {
        let now = server_pins(&js).await;
        if its.iter().all(|c| now[c] != before[c]) {
            break;
        }
        assert!(
            termed.elapsed() < Duration::from_secs(30),
            "{its:?} still pinned to the stopping replica: {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let released = termed.elapsed();
    let log = leaving.log();
    for c in &its {
        assert!(
            log.lines()
                .any(|l| l.contains("unpinned") && l.contains(c.as_str())),
            "{} unpinned {c}: {log}",
            leaving.name
        );
    }
    println!(
        "after SIGTERM, {its:?} released within {released:?} (priority_timeout {PRIORITY_TIMEOUT:?})"
    );
    stop.store(true, Ordering::Relaxed);
    let published = traffic.await.unwrap();
    drained(&js, Duration::from_secs(180)).await;
    assert_exactly_once(&effects, &published).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_partition_count_is_drift_and_update_moves_over_with_nothing_lost_or_doubled() {
    let server = NatsServer::start().unwrap();
    let (js, effects) = prepare(&server, 4).await;
    let dir = tempfile::tempdir().unwrap();
    let url = server.url();
    let four: Vec<String> = (0..4).map(|p| format!("planner-{p}-of-4")).collect();
    let eight_names: Vec<String> = (0..8).map(|p| format!("planner-{p}-of-8")).collect();
    assert_eq!(partition_consumers(&js).await, four);
    let stream = js.get_stream(streams::RUN_COMMANDS).await.unwrap();

    // A first wave waits in the four partitions: no worker runs yet.
    let keys = keys(10_000);
    let mut published = Published::default();
    published.wave(&js, &keys).await;

    // Eight partitions now: reported as drift, changed by nothing but `--update`.
    let eight = Topology::new(&partitioned_settings(&url, 8).setup);
    let drift = setup::verify(&js, &eight).await.unwrap();
    let fields: Vec<String> = drift
        .iter()
        .map(|d| format!("{} {}", d.resource, d.field))
        .collect();
    assert!(
        fields.contains(&"stream RUN_COMMANDS subject_transform".to_string()),
        "{fields:?}"
    );
    for old in &four {
        assert!(
            fields.contains(&format!("consumer RUN_COMMANDS/{old} partitions")),
            "{fields:?}"
        );
    }
    let report = setup::apply(&js, &eight, Mode::CreateMissing)
        .await
        .unwrap();
    assert!(!report.drifted.is_empty());
    assert_eq!(
        partition_consumers(&js).await,
        four,
        "without --update nothing moves"
    );

    // `--update` with nobody draining the old set: cut short, the new set waits paused and
    // has delivered nothing.
    let short = DrainWait {
        timeout: Duration::from_secs(1),
        poll: Duration::from_millis(100),
    };
    let report = setup::apply_with(&js, &eight, Mode::Update, short)
        .await
        .unwrap();
    assert!(
        report
            .drifted
            .iter()
            .any(|d| d.field == "partitions" && d.actual.contains("waiting")),
        "{:?}",
        report.drifted
    );
    let mut both = four.clone();
    both.extend(eight_names.clone());
    both.sort();
    assert_eq!(partition_consumers(&js).await, both);
    for name in &eight_names {
        let info = stream.consumer_info(name).await.unwrap();
        assert!(info.paused, "{name} waits paused");
        assert_eq!(
            (info.delivered.consumer_sequence, info.num_ack_pending),
            (0, 0),
            "{name} delivered nothing"
        );
    }
    // A different count while that change is unfinished is refused.
    let sixteen = Topology::new(&partitioned_settings(&url, 16).setup);
    let refused = setup::apply_with(&js, &sixteen, Mode::Update, short)
        .await
        .unwrap_err();
    assert!(refused.message.contains("still in progress"), "{refused}");

    // Workers start; `--update` again, while a second wave is published: it carries on.
    let replicas = [
        Replica::start(dir.path(), &url, "a", 1),
        Replica::start(dir.path(), &url, "b", 1),
    ];
    for r in &replicas {
        r.ready().await;
    }
    let publishing = {
        let (js, keys) = (js.clone(), keys.clone());
        tokio::spawn(async move {
            published.wave(&js, &keys).await;
            published
        })
    };
    let drain = DrainWait {
        timeout: Duration::from_secs(120),
        poll: Duration::from_millis(200),
    };
    let report = setup::apply_with(&js, &eight, Mode::Update, drain)
        .await
        .unwrap();
    assert!(report.drifted.is_empty(), "{:?}", report.drifted);
    let mut deleted = report.deleted.clone();
    deleted.sort();
    assert_eq!(
        deleted,
        four.iter()
            .map(|c| format!("consumer RUN_COMMANDS/{c}"))
            .collect::<Vec<_>>()
    );
    let mut published = publishing.await.unwrap();
    published.wave(&js, &keys).await;

    assert_eq!(partition_consumers(&js).await, eight_names);
    for name in &eight_names {
        let info = stream.consumer_info(name).await.unwrap();
        assert!(!info.paused, "{name} resumed");
    }
    assert!(setup::verify(&js, &eight).await.unwrap().is_empty());
    drained(&js, Duration::from_secs(180)).await;
    assert_exactly_once(&effects, &published).await;
    // New messages are stored under the new partitioning.
    let last = stream
        .direct_get_last_for_subject(format!("slipway.runs.{}.commands.*", keys[0]))
        .await
        .unwrap();
    let p: u32 = last.subject.rsplit('.').next().unwrap().parse().unwrap();
    assert!(p < 8);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_longer_than_priority_timeout_keeps_its_pin() {
    let server = NatsServer::start().unwrap();
    let (js, effects) = prepare(&server, 8).await;
    let dir = tempfile::tempdir().unwrap();
    let url = server.url();
    // Each message takes longer than priority_timeout to apply; a standby replica waits.
    let slow = PRIORITY_TIMEOUT + Duration::from_millis(500);
    let replicas = [
        Replica::start(dir.path(), &url, "a", slow.as_millis() as u64),
        Replica::start(dir.path(), &url, "b", slow.as_millis() as u64),
    ];
    for r in &replicas {
        r.ready().await;
    }
    let keys = keys(24);
    let mut published = Published::default();
    published.wave(&js, &keys).await;
    // Sampled at the server while the batches run: a pin, once given, never moves.
    let mut first: BTreeMap<String, String> = BTreeMap::new();
    let started = Instant::now();
    loop {
        for (consumer, pin) in server_pins(&js).await {
            if let Some(pin) = pin {
                let was = first.entry(consumer.clone()).or_insert_with(|| pin.clone());
                assert_eq!(*was, pin, "{consumer} moved while its batch ran");
            }
        }
        let stream = js.get_stream(streams::RUN_COMMANDS).await.unwrap();
        let mut busy = false;
        for name in partition_consumers(&js).await {
            let info = stream.consumer_info(&name).await.unwrap();
            busy |= info.num_pending > 0 || info.num_ack_pending > 0;
        }
        if !busy {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(120), "not drained");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(!first.is_empty());
    assert_exactly_once(&effects, &published).await;
    for r in &replicas {
        assert!(!r.log().contains("fence conflict"), "{}", r.log());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_batch_gives_its_partition_up_and_another_replica_applies_it() {
    let server = NatsServer::start().unwrap();
    let (js, effects) = prepare(&server, 8).await;
    let dir = tempfile::tempdir().unwrap();
    let url = server.url();
    // "stuck" never finishes a message within its batch bound; "well" does.
    let stuck = Replica::start_with(
        dir.path(),
        &url,
        "stuck",
        60_000,
        &[("SLIPWAY_KIT_MAX_BATCH_MS", "1000")],
    );
    stuck.ready().await;
    let keys = keys(16);
    let mut published = Published::default();
    published.wave(&js, &keys).await;
    let well = Replica::start(dir.path(), &url, "well", 1);
    well.ready().await;
    drained(&js, Duration::from_secs(120)).await;
    assert_exactly_once(&effects, &published).await;
    let log = stuck.log();
    assert!(log.contains("took longer than"), "{log}");
}
