//! The fold rate against what NATS does raw on this machine, in one run: a `USAGE` stream filled
//! with events (1,000 users, every meter), then
//! - the raw pull rate: every event read back from the same stream (an ordered consumer);
//! - the raw acked publish rate into a `BILLED`-shaped stream (one subject per user, acks awaited
//!   in windows of 500);
//! - the fold: one billing replica (in this process) from start until `BILLED` holds every event.
//!
//! `cargo bench -p slipway-billing --bench fold`; SLIPWAY_BENCH_EVENTS (1000000), and any
//! `SLIPWAY__BILLING__*` setting passes through to the folder. Target: the
//! fold at least half the lower of the two raw rates. Prints rates, the ratio and the peak RSS.
#![allow(clippy::unwrap_used)] // A benchmark fails loudly on the first surprise.

use std::time::{Duration, Instant};

use async_nats::jetstream;
use futures::StreamExt;
use slipway_common::rpc::message_headers;
use slipway_proto::codec::{ContentType, encode};
use slipway_proto::meters::CATALOGUE;
use slipway_proto::v1::{BilledUsage, UsageEvent};
use slipway_test_support::{NatsServer, Spawn};

fn events() -> u64 {
    std::env::var("SLIPWAY_BENCH_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000)
}

fn now_s() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn event(n: u64) -> (String, UsageEvent) {
    let meter = &CATALOGUE[(n % CATALOGUE.len() as u64) as usize];
    let user = format!("u{}", n % 1000);
    let e = UsageEvent {
        id: format!("run{n}:step:0:{}", meter.name),
        source: format!("slipway/{}", meter.producer),
        r#type: "slipway.usage.v1".into(),
        subject: user.clone(),
        time: Some(pbjson_types::Timestamp {
            seconds: now_s() - 3600 - (n % 86_400) as i64,
            nanos: 0,
        }),
        spec_version: "1.0".into(),
        meter: meter.name.into(),
        quantity: (1 + n % 1000).to_string(),
        unit: meter.unit.into(),
        ..Default::default()
    };
    (
        format!("slipway.usage.{}.{}.{user}", meter.producer, meter.name),
        e,
    )
}

async fn publish_all<F: Fn(u64) -> (String, Vec<u8>)>(
    js: &jetstream::Context,
    n: u64,
    make: F,
    headers: async_nats::HeaderMap,
) {
    let mut acks = Vec::with_capacity(500);
    for i in 0..n {
        let (subject, body) = make(i);
        acks.push(
            js.publish_with_headers(subject, headers.clone(), body.into())
                .await
                .unwrap(),
        );
        if acks.len() == 500 {
            for a in acks.drain(..) {
                a.await.unwrap();
            }
        }
    }
    for a in acks {
        a.await.unwrap();
    }
}

fn rss_peak_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// The allocator the `slipway-billing` binary runs with.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() {
    let n = events();
    let nats = NatsServer::start().unwrap();
    let mut env: Vec<(String, String)> = vec![
        ("SLIPWAY__NATS__URL".into(), nats.url()),
        ("SLIPWAY__HEALTH__LISTEN".into(), "127.0.0.1:0".into()),
    ];
    // Billing's own settings pass through (batch sizes, for example).
    env.extend(
        std::env::vars().filter(|(k, _)| {
            k.starts_with("SLIPWAY__BILLING__") || k.starts_with("SLIPWAY__SETUP__")
        }),
    );
    let (_, client) = slipway_test_support::set_up_topology(&nats.url(), &env)
        .await
        .unwrap();
    let js = jetstream::new(client.clone());

    let t = Instant::now();
    publish_all(
        &js,
        n,
        |i| {
            let (s, e) = event(i);
            (s, encode(&e, ContentType::Protobuf))
        },
        message_headers::<UsageEvent>(ContentType::Protobuf),
    )
    .await;
    println!(
        "filled USAGE with {n} events in {:.1} s",
        t.elapsed().as_secs_f64()
    );

    // Raw pull: every event read back.
    let stream = js.get_stream("USAGE").await.unwrap();
    let consumer = stream
        .create_consumer(jetstream::consumer::pull::OrderedConfig::default())
        .await
        .unwrap();
    let t = Instant::now();
    let mut messages = consumer.messages().await.unwrap();
    let mut read = 0;
    while read < n {
        messages.next().await.unwrap().unwrap();
        read += 1;
    }
    let pull = n as f64 / t.elapsed().as_secs_f64();

    // Raw acked publish into a BILLED-shaped stream.
    js.create_stream(jetstream::stream::Config {
        name: "BENCH_BILLED".into(),
        subjects: vec!["bench.billed.>".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let t = Instant::now();
    publish_all(
        &js,
        n,
        |i| {
            let (_, e) = event(i);
            let b = BilledUsage {
                period: "2026-11".into(),
                usage_sequence: i + 1,
                event: Some(e),
                ..Default::default()
            };
            (
                format!("bench.billed.u{}", i % 1000),
                encode(&b, ContentType::Protobuf),
            )
        },
        message_headers::<BilledUsage>(ContentType::Protobuf),
    )
    .await;
    let publish = n as f64 / t.elapsed().as_secs_f64();

    // The fold.
    let mut spawn = Spawn::new(slipway_common::Service::Billing).on_nats(&nats);
    for (k, v) in &env {
        spawn = spawn.env(k, v);
    }
    let t = Instant::now();
    let billing = spawn.in_process(slipway_billing::serve).await.unwrap();
    let billed = js.get_stream("BILLED").await.unwrap();
    loop {
        let done = billed.get_info().await.unwrap().state.messages;
        if done >= n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let fold = n as f64 / t.elapsed().as_secs_f64();
    drop(billing);

    let floor = pull.min(publish);
    println!("raw pull        {pull:>10.0} events/s");
    println!("raw acked pub   {publish:>10.0} events/s");
    println!("fold            {fold:>10.0} events/s");
    println!("fold / min(raw) {:>10.2} (target >= 0.50)", fold / floor);
    println!(
        "peak RSS        {:>10.1} MiB (this process: client, raw readers and the folder)",
        rss_peak_mib()
    );
}
