//! Changing how a stream is partitioned without losing a message or handling one in two places:
//! the new consumers (named with the new count) start where the new partitioning starts and stay
//! paused until every old consumer has handled what was stored before it, then the old ones go.
//!
//! 1. record the stream's last sequence `S` and update the transform (`S + 1` is kept in the
//!    stream's metadata, so a run cut short carries on);
//! 2. create the new consumers from `S + 1`, paused;
//! 3. wait until every old consumer has acknowledged everything stored up to the transform
//!    change (read after it, so a message stored in between in the old form is handled by the
//!    old set);
//! 4. resume the new consumers and delete the old ones.
//!
//! Until they are deleted, the old consumers also receive new messages whose partition token
//! they share, and some messages reach both sets: a key may be worked in two places during the
//! move. The effects of a partition's work are fenced and deduplicated per key (a run's cursor,
//! billing's ids), so each applies once. A second change while one is in progress is refused.
//! The single durable of before partitioning is deleted, not drained: nothing pulls it, and what
//! it had not handled keeps its un-partitioned subjects in the stream.

use std::time::Duration;

use async_nats::jetstream::{self, consumer};

use super::{Drift, Mode, Report, SetupError, consumer_config, err};
use crate::topology::{
    Partitioning, StreamSpec, Topology, parse_partition_consumer, partition_consumers,
};

/// Stream metadata: the first sequence stored under the current partitioning.
const FROM_SEQ: &str = "slipway.partitions_from_seq";

/// How long `setup --update` waits for old partition consumers to drain.
#[derive(Clone, Copy, Debug)]
pub struct DrainWait {
    pub timeout: Duration,
    pub poll: Duration,
}

impl Default for DrainWait {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(120),
            poll: Duration::from_millis(500),
        }
    }
}

/// The partition consumers a stream holds.
#[derive(Debug, Default)]
pub struct PartitionState {
    /// Of the configured count.
    pub current: Vec<String>,
    /// Of another count, or the single durable named after the owner (before partitioning).
    pub stale: Vec<String>,
    /// The single durable of before partitioning, if it is still there.
    pub legacy: Option<String>,
}

pub async fn partition_state(
    js: &jetstream::Context,
    stream: &str,
    part: &Partitioning,
) -> Result<PartitionState, SetupError> {
    use futures::TryStreamExt;
    let resource = format!("stream {stream}");
    let s = js
        .get_stream_no_info(stream)
        .await
        .map_err(|e| err(&resource, e))?;
    let names: Vec<String> = s
        .consumer_names()
        .try_collect()
        .await
        .map_err(|e| err(&resource, e))?;
    let mut state = PartitionState::default();
    for name in names {
        match parse_partition_consumer(part.owner, &name) {
            Some((_, count)) if count == part.partitions => state.current.push(name),
            Some(_) => state.stale.push(name),
            None if name == part.owner.as_str() => {
                state.legacy = Some(name.clone());
                state.stale.push(name);
            }
            None => {}
        }
    }
    state.current.sort();
    state.stale.sort();
    Ok(state)
}

/// The old consumers a changed partition count leaves, as drift.
pub fn stale_drift(stream: &str, part: &Partitioning, state: &PartitionState) -> Vec<Drift> {
    state
        .stale
        .iter()
        .map(|name| Drift {
            resource: format!("consumer {stream}/{name}"),
            field: "partitions",
            expected: format!(
                "absent ({} partitions; `slipway setup --update` moves over)",
                part.partitions
            ),
            actual: "present".into(),
        })
        .collect()
}

/// Step 1: the new transform, with where it starts; refused while an earlier change is
/// unfinished.
pub(super) async fn update_transform(
    js: &jetstream::Context,
    spec: &StreamSpec,
    mut expected: jetstream::stream::Config,
) -> Result<(), SetupError> {
    let resource = format!("stream {}", spec.name);
    if let Some(part) = &spec.partitioning {
        // Consumers of two counts: an earlier change is not finished.
        let state = partition_state(js, spec.name, part).await?;
        let counts: std::collections::BTreeSet<u32> = state
            .current
            .iter()
            .chain(&state.stale)
            .filter_map(|c| parse_partition_consumer(part.owner, c))
            .map(|(_, count)| count)
            .collect();
        if counts.len() > 1 {
            return Err(err(
                &resource,
                format!(
                    "a change of partitions is still in progress (consumers of {counts:?} partitions); finish it with the count it was started with before changing it again"
                ),
            ));
        }
    }
    let mut stream = js
        .get_stream(spec.name)
        .await
        .map_err(|e| err(&resource, e))?;
    let info = stream.info().await.map_err(|e| err(&resource, e))?;
    expected.metadata = info.config.metadata.clone();
    expected
        .metadata
        .insert(FROM_SEQ.into(), (info.state.last_sequence + 1).to_string());
    js.update_stream(expected)
        .await
        .map_err(|e| err(&resource, format!("updating the partitioning: {e}")))?;
    tracing::info!(
        stream = spec.name,
        from_seq = info.state.last_sequence + 1,
        "partitioning changed"
    );
    Ok(())
}

/// Steps 2 to 4 (or, without `Mode::Update`, the drift that calls for them).
#[allow(clippy::too_many_arguments)]
pub(super) async fn repartition(
    js: &jetstream::Context,
    topo: &Topology,
    stream: &StreamSpec,
    part: &Partitioning,
    state: &PartitionState,
    mode: Mode,
    drain: DrainWait,
    report: &mut Report,
) -> Result<(), SetupError> {
    let resource = format!("stream {}", stream.name);
    let expected = partition_consumers(stream.name, part, max_deliver(topo, stream.name));
    if mode != Mode::Update {
        report.drifted.extend(stale_drift(stream.name, part, state));
        for c in expected
            .iter()
            .filter(|c| !state.current.contains(&c.durable))
        {
            report.drifted.push(Drift {
                resource: format!("consumer {}/{}", c.stream, c.durable),
                field: "existence",
                expected: "present".into(),
                actual: "missing (`slipway setup --update` moves over)".into(),
            });
        }
        return Ok(());
    }
    let mut s = js
        .get_stream(stream.name)
        .await
        .map_err(|e| err(&resource, e))?;
    let info = s.info().await.map_err(|e| err(&resource, e))?.clone();
    let from_seq = info
        .config
        .metadata
        .get(FROM_SEQ)
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(info.state.last_sequence + 1);
    for c in expected
        .iter()
        .filter(|c| !state.current.contains(&c.durable))
    {
        let config = consumer::pull::Config {
            deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                start_sequence: from_seq,
            },
            pause_until: Some(time::OffsetDateTime::now_utc() + time::Duration::days(3650)),
            ..consumer_config(c)
        };
        s.create_consumer(config)
            .await
            .map_err(|e| err(&format!("consumer {}/{}", c.stream, c.durable), e))?;
        report
            .created
            .push(format!("consumer {}/{} (paused)", c.stream, c.durable));
    }
    // Everything stored up to now, read after the transform changed: a message stored between
    // the first read of `S` and the change still has the old form, so the old set must handle
    // it too.
    let drain_to = info.state.last_sequence;
    let deadline = tokio::time::Instant::now() + drain.timeout;
    let waiting = loop {
        let mut waiting = Vec::new();
        // The single durable of before is not pulled by any partitioned worker: what it holds
        // keeps its un-partitioned subjects in the stream (a rebuild reads both forms).
        for name in state
            .stale
            .iter()
            .filter(|n| Some(*n) != state.legacy.as_ref())
        {
            let info = s
                .consumer_info(name)
                .await
                .map_err(|e| err(&format!("consumer {}/{name}", stream.name), e))?;
            if !drained(&info, drain_to) {
                waiting.push(name.clone());
            }
        }
        if waiting.is_empty() || tokio::time::Instant::now() >= deadline {
            break waiting;
        }
        tokio::time::sleep(drain.poll).await;
    };
    if !waiting.is_empty() {
        report.drifted.push(Drift {
            resource,
            field: "partitions",
            expected: part.partitions.to_string(),
            actual: format!(
                "moving: waiting for {} to handle what was stored up to {} (run `slipway setup --update` again)",
                waiting.join(", "),
                drain_to
            ),
        });
        return Ok(());
    }
    for c in &expected {
        s.resume_consumer(&c.durable)
            .await
            .map_err(|e| err(&format!("consumer {}/{}", c.stream, c.durable), e))?;
    }
    for name in &state.stale {
        if Some(name) == state.legacy.as_ref() {
            let left = s
                .consumer_info(name)
                .await
                .map(|i| i.num_pending + i.num_ack_pending as u64)
                .unwrap_or(0);
            tracing::warn!(consumer = %name, left, "deleting the durable of before partitioning; what it had not handled stays in the stream under its un-partitioned subjects");
        }
        s.delete_consumer(name)
            .await
            .map_err(|e| err(&format!("consumer {}/{name}", stream.name), e))?;
        report
            .deleted
            .push(format!("consumer {}/{name}", stream.name));
    }
    report
        .updated
        .push(format!("{resource}: {} partitions", part.partitions));
    Ok(())
}

/// Whether a consumer has acknowledged every message of its filter stored up to `last`.
fn drained(info: &consumer::Info, last: u64) -> bool {
    info.ack_floor.stream_sequence >= last
        || (info.num_ack_pending == 0
            && (info.num_pending == 0 || info.delivered.stream_sequence >= last))
}

fn max_deliver(topo: &Topology, stream: &str) -> i64 {
    topo.consumers
        .iter()
        .find(|c| c.stream == stream && c.pinned.is_some())
        .map(|c| c.max_deliver)
        .unwrap_or(5)
}
