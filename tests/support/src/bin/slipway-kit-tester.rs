//! A replica of a partitioned worker for the kit's tests: it drives the keys of `RUN_COMMANDS`
//! (run ids) as the planner will, through `slipway_common::partition`, and counts each applied
//! message as an effect in a KV record per key, fenced by the record's revision.
//!
//! Per key the record keeps the stream cursor (last applied sequence), the count of applied
//! messages, the next index it expects (each message carries its index within its key) and
//! how many arrived out of order. A delivery at or below the cursor is acknowledged without an
//! effect; above it, the key's messages after the cursor are read by subject and applied in
//! stream order. A test then compares the records with what it published.
//!
//! Usage: `slipway-kit-tester <nats-url> <instance> <apply-delay-ms>`; answers
//! `kit.tester.<instance>.pins` with its pins as JSON; stops on SIGTERM (unpinning).
//! `SLIPWAY_KIT_MAX_BATCH_MS` bounds a batch (`PartitionSpec::max_batch_time`).
#![forbid(unsafe_code)]

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use async_nats::jetstream::{self, kv};
use async_nats::service::ServiceExt;
use futures::StreamExt;
use prost::Message;
use slipway_common::Shutdown;
use slipway_common::metrics::Metrics;
use slipway_common::partition::{self, BatchOutcome, Fenced, PartitionSpec};
use slipway_common::subjects::{Service, streams};
use slipway_common::worker::{BatchSpec, HandlerError, Item, WorkerContext};
use slipway_proto::v1::{RunCommand, run_command};

/// The bucket the effects are counted in (the test creates it).
pub const EFFECTS: &str = "kit_tester_effects";
/// The NATS service every tester registers, counted for balance.
pub const PRESENCE: &str = "slipway-kit-tester";

#[derive(serde::Serialize, serde::Deserialize, Default)]
struct Effect {
    cursor: u64,
    count: u64,
    next_index: u64,
    out_of_order: u64,
    worker: String,
}

struct Tester {
    instance: String,
    effects: kv::Store,
    stream: jetstream::stream::Stream,
    apply_delay: Duration,
}

impl Tester {
    async fn batch(&self, items: Vec<Item<RunCommand>>) -> BatchOutcome {
        let mut outcomes = Vec::with_capacity(items.len());
        for item in items {
            outcomes.push(self.apply(&item).await?);
        }
        Ok(outcomes)
    }

    async fn apply(&self, item: &Item<RunCommand>) -> Result<Result<(), HandlerError>, Fenced> {
        // The key the partition was chosen from: the subject's, never the payload's.
        let Some(key) = item.delivery.subject.split('.').nth(2).map(str::to_string) else {
            return Ok(Err(HandlerError::permanent("subject", "not a run subject")));
        };
        let retry = |e: String| Ok(Err(HandlerError::retry(Duration::from_millis(200), e)));
        let entry = match self.effects.entry(&key).await {
            Ok(e) => e,
            Err(e) => return retry(e.to_string()),
        };
        let (mut effect, revision) = match entry {
            Some(e) if e.operation == kv::Operation::Put => {
                match serde_json::from_slice(&e.value) {
                    Ok(effect) => (effect, Some(e.revision)),
                    Err(e) => return Ok(Err(HandlerError::permanent("corrupt", e.to_string()))),
                }
            }
            _ => (Effect::default(), None),
        };
        let sequence = item.delivery.stream_sequence;
        if sequence <= effect.cursor {
            return Ok(Ok(()));
        }
        let filter = format!("slipway.runs.{key}.*.*");
        let stored =
            match partition::read_after(&self.stream, &filter, effect.cursor, sequence).await {
                Ok(s) => s,
                Err(e) => return retry(e),
            };
        for m in stored {
            let index = RunCommand::decode(m.payload.as_ref())
                .ok()
                .and_then(|c| match c.command {
                    Some(run_command::Command::Feedback(f)) => f.text.parse::<u64>().ok(),
                    _ => None,
                });
            match index {
                Some(i) if i == effect.next_index => {}
                Some(_) | None => effect.out_of_order += 1,
            }
            effect.next_index = index.map_or(effect.next_index, |i| i + 1);
            effect.count += 1;
            effect.cursor = m.sequence;
        }
        effect.worker = self.instance.clone();
        // The window in which another replica may take the partition over.
        tokio::time::sleep(self.apply_delay).await;
        let value = match serde_json::to_vec(&effect) {
            Ok(v) => bytes::Bytes::from(v),
            Err(e) => return retry(e.to_string()),
        };
        let written = match revision {
            Some(r) => self
                .effects
                .update(&key, value, r)
                .await
                .map(|_| ())
                .map_err(|e| {
                    (
                        e.kind() == kv::UpdateErrorKind::WrongLastRevision,
                        e.to_string(),
                    )
                }),
            None => self
                .effects
                .create(&key, value)
                .await
                .map(|_| ())
                .map_err(|e| {
                    (
                        e.kind() == kv::CreateErrorKind::AlreadyExists,
                        e.to_string(),
                    )
                }),
        };
        match written {
            Ok(()) => Ok(Ok(())),
            Err((true, e)) => Err(Fenced(format!("key {key}: {e}"))),
            Err((false, e)) => retry(e),
        }
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_env_filter("warn,slipway_common::partition=info")
        .init();
    let args: Vec<String> = std::env::args().collect();
    let [_, url, instance, delay] = args.as_slice() else {
        anyhow::bail!("usage: slipway-kit-tester <nats-url> <instance> <apply-delay-ms>");
    };
    let apply_delay = Duration::from_millis(delay.parse().context("apply-delay-ms")?);
    let client = async_nats::connect(url.as_str()).await?;
    let js = jetstream::new(client.clone());
    let shutdown = Shutdown::new();
    shutdown.listen_for_signals()?;
    let _presence = client
        .service_builder()
        .start(PRESENCE, "0.1.0")
        .await
        .map_err(|e| anyhow::anyhow!("registering {PRESENCE}: {e}"))?;
    let tester = Arc::new(Tester {
        instance: instance.clone(),
        effects: js.get_key_value(EFFECTS).await?,
        stream: js.get_stream(streams::RUN_COMMANDS).await?,
        apply_delay,
    });
    let ctx = WorkerContext {
        jetstream: js,
        shutdown: shutdown.clone(),
        metrics: Arc::new(Metrics::new()),
    };
    let spec = PartitionSpec {
        presence: PRESENCE.to_string(),
        balance_every: Duration::from_secs(1),
        standby_pause: Duration::from_secs(3),
        batch: BatchSpec {
            max_messages: 64,
            max_bytes: 1 << 20,
            max_wait: Duration::from_millis(20),
        },
        max_batch_time: std::env::var("SLIPWAY_KIT_MAX_BATCH_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .map_or(Duration::from_secs(600), Duration::from_millis),
        ..PartitionSpec::new(streams::RUN_COMMANDS, Service::Planner)
    };
    let handler = {
        let tester = tester.clone();
        move |_partition: partition::PartitionId, items: Vec<Item<RunCommand>>| {
            let tester = tester.clone();
            async move { tester.batch(items).await }
        }
    };
    let partitions = partition::start_partitioned(ctx, spec, handler).await?;
    let mut pins = client
        .subscribe(format!("kit.tester.{instance}.pins"))
        .await?;
    eprintln!("ready {instance}");
    loop {
        tokio::select! {
            _ = shutdown.triggered() => break,
            request = pins.next() => {
                let Some(request) = request else { break };
                if let Some(reply) = request.reply {
                    let body = serde_json::to_vec(&partitions.pins())?;
                    client.publish(reply, body.into()).await?;
                }
            }
        }
    }
    shutdown.wait_in_flight(Duration::from_secs(10)).await;
    Ok(())
}
