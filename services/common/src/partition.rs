//! Partitioned workers: a stream split by key into `P` partitions (the server's `partition()`
//! subject transform), one durable consumer per partition pinned to one client at a time (the
//! `pinned_client` priority policy, ADR-42), so one replica handles a key's messages however
//! many replicas run, with `P` consumers whatever the number of keys.
//!
//! Every replica keeps one pull open on every partition: the pinned one gets the messages, the
//! others wait on standby and take over when the pinned one stops pulling for the consumer's
//! `priority_timeout`. Pulls expire at a third of it and are read by their own task, so a
//! replica keeps its pin while a batch takes however long it takes (each held message gets
//! in-progress acks). A pull is reopened (after unpinning) only when it broke, was fenced, or
//! was given up for balance. A pin is not a lock: a replica that was stopped or cut off can
//! resume with a batch in hand, and a consumer leader change clears the pin. So the handler
//! fences every effect with a revision-checked write and says `Fenced` when one fails; the
//! worker then drops that partition's batch without acking it (it is delivered again to the
//! replica that holds the pin now) and reopens its pull.
//!
//! Balance: each replica aims for `ceil(partitions / live replicas)` pins, counting replicas by
//! the NATS service API (`$SRV.PING`), and gives up the excess: it finishes the batch in hand,
//! unpins the partition, hands back what the server had already sent it (nak), and stays off it
//! for a moment, so a new or restarted replica gets work. On shutdown it unpins what it holds,
//! so another replica takes over at once rather than after `priority_timeout`.

use std::collections::BTreeMap;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::consumer::pull::Stream as PullStream;
use async_nats::jetstream::{self, AckKind};
use futures::{FutureExt, StreamExt, TryStreamExt};
use slipway_proto::WireMessage;
use tokio::sync::{Notify, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

use crate::rpc::decode_message;
use crate::subjects::Service;
use crate::topology::parse_partition_consumer;
use crate::worker::{
    BatchSpec, HandlerError, Held, Item, Limits, WorkerContext, WorkerError, hold, settle,
};

/// A handler's word that an effect's revision-checked write failed: another replica holds the
/// partition now. The batch is dropped unacknowledged.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("fence conflict: {0}")]
pub struct Fenced(pub String);

/// Which partition a batch is of: its consumer `<owner>-<index>-of-<count>`. While `P` changes,
/// two counts run side by side, so state kept per partition is keyed by both.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PartitionId {
    pub index: u32,
    pub count: u32,
}

impl std::fmt::Display for PartitionId {
    /// `<index>-of-<count>`, as in the consumer's name.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-of-{}", self.index, self.count)
    }
}

/// One outcome per item, in order; or the whole batch fenced.
pub type BatchOutcome = Result<Vec<Result<(), HandlerError>>, Fenced>;

/// Which partitioned stream, whose partitions, and how.
#[derive(Clone, Debug)]
pub struct PartitionSpec {
    pub stream: String,
    /// Whose partition consumers (`<owner>-<p>-of-<P>`).
    pub owner: Service,
    pub batch: BatchSpec,
    /// The NATS service (`$SRV.PING.<name>`) whose live instances share the partitions.
    pub presence: String,
    /// How often partitions are looked up (a changed `P` adds consumers) and pins balanced.
    pub balance_every: Duration,
    /// How long a partition given up stays unpulled here, so another replica takes it.
    pub standby_pause: Duration,
    /// Longest a batch may run: past it the batch counts as fenced (dropped unacknowledged, the
    /// partition released), so a stuck handler cannot hold a partition for ever.
    pub max_batch_time: Duration,
}

impl PartitionSpec {
    pub fn new(stream: &str, owner: Service) -> Self {
        Self {
            stream: stream.to_string(),
            owner,
            batch: BatchSpec::default(),
            presence: owner.nats_service_name(),
            balance_every: Duration::from_secs(2),
            standby_pause: Duration::from_secs(5),
            max_batch_time: Duration::from_secs(600),
        }
    }
}

/// One partition consumer as seen by this replica.
struct Lane {
    consumer: String,
    partition: PartitionId,
    /// Asks the lane to drain and unpin (balance).
    release: Notify,
    /// The pin id this replica's pull holds, from the last message's `Nats-Pin-Id`.
    pin: Mutex<Option<String>>,
}

impl Lane {
    fn pin(&self) -> Option<String> {
        self.pin.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set_pin(&self, pin: Option<String>) {
        *self.pin.lock().unwrap_or_else(|p| p.into_inner()) = pin;
    }

    /// Records the pin a delivered message carries (`Nats-Pin-Id`).
    fn saw(&self, m: &jetstream::Message) {
        if let Some(pin) = m
            .headers
            .as_ref()
            .and_then(|h| h.get_last(async_nats::header::NATS_PIN_ID))
        {
            self.set_pin(Some(pin.as_str().to_string()));
        }
    }
}

/// What runs of a partitioned worker: the lanes (one per partition consumer) of this replica.
#[derive(Clone, Default)]
pub struct Partitions {
    lanes: Arc<Mutex<BTreeMap<String, Arc<Lane>>>>,
}

impl Partitions {
    /// For each partition consumer this replica pulls from, the pin id it was given, if any
    /// (whether it is still the server's pin is the server's to say: `priority_groups`).
    pub fn pins(&self) -> BTreeMap<String, Option<String>> {
        self.lanes()
            .into_iter()
            .map(|l| (l.consumer.clone(), l.pin()))
            .collect()
    }

    fn lanes(&self) -> Vec<Arc<Lane>> {
        self.lanes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }
}

/// Starts the lanes of `spec`'s partitions and hands each batch of a partition (in stream
/// order) to `handler`, one batch per partition at a time. Returns once the stream is found.
pub async fn start_partitioned<M, F, Fut>(
    ctx: WorkerContext,
    spec: PartitionSpec,
    handler: F,
) -> Result<Partitions, WorkerError>
where
    M: WireMessage + 'static,
    F: Fn(PartitionId, Vec<Item<M>>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = BatchOutcome> + Send + 'static,
{
    let stream = ctx
        .jetstream
        .get_stream(&spec.stream)
        .await
        .map_err(|e| WorkerError {
            stream: spec.stream.clone(),
            durable: format!("{}-*", spec.owner.as_str()),
            message: format!("the stream: {e}"),
        })?;
    let partitions = Partitions::default();
    let handler = Arc::new(handler);
    let supervisor = {
        let (ctx, spec, partitions) = (ctx.clone(), spec.clone(), partitions.clone());
        async move {
            loop {
                discover(&ctx, &spec, &stream, &partitions, &handler).await;
                balance(&ctx, &spec, &stream, &partitions).await;
                tokio::select! {
                    _ = ctx.shutdown.triggered() => break,
                    _ = tokio::time::sleep(spec.balance_every) => {}
                }
            }
        }
    };
    ctx.shutdown.tracker().spawn(supervisor);
    Ok(partitions)
}

/// Opens a lane for every partition consumer of the owner not pulled yet.
async fn discover<M, F, Fut>(
    ctx: &WorkerContext,
    spec: &PartitionSpec,
    stream: &jetstream::stream::Stream,
    partitions: &Partitions,
    handler: &Arc<F>,
) where
    M: WireMessage + 'static,
    F: Fn(PartitionId, Vec<Item<M>>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = BatchOutcome> + Send + 'static,
{
    let names: Vec<String> = match stream.consumer_names().try_collect().await {
        Ok(n) => n,
        Err(e) => {
            tracing::warn!(stream = %spec.stream, error = %e, "listing partition consumers");
            return;
        }
    };
    for name in names {
        let Some((index, count)) = parse_partition_consumer(spec.owner, &name) else {
            continue;
        };
        let lane = {
            let mut lanes = partitions.lanes.lock().unwrap_or_else(|p| p.into_inner());
            if lanes.contains_key(&name) {
                continue;
            }
            let lane = Arc::new(Lane {
                consumer: name.clone(),
                partition: PartitionId { index, count },
                release: Notify::new(),
                pin: Mutex::new(None),
            });
            lanes.insert(name.clone(), lane.clone());
            lane
        };
        let run = run_lane(
            ctx.clone(),
            spec.clone(),
            stream.clone(),
            lane,
            partitions.clone(),
            handler.clone(),
        );
        ctx.shutdown.tracker().spawn(run);
    }
}

/// Why a lane's pull ended.
#[derive(Debug, PartialEq, Eq)]
enum Ended {
    Shutdown,
    Fenced,
    Released,
    Deleted,
    Failed,
}

async fn run_lane<M, F, Fut>(
    ctx: WorkerContext,
    spec: PartitionSpec,
    stream: jetstream::stream::Stream,
    lane: Arc<Lane>,
    partitions: Partitions,
    handler: Arc<F>,
) where
    M: WireMessage + 'static,
    F: Fn(PartitionId, Vec<Item<M>>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = BatchOutcome> + Send + 'static,
{
    let group = spec.owner.as_str().to_string();
    let mut backoff = Duration::from_millis(200);
    loop {
        if ctx.shutdown.is_triggered() {
            break;
        }
        // A release asked for before this pull opened is stale: this pull's pins are new.
        let _ = lane.release.notified().now_or_never();
        let opened = open(&stream, &lane.consumer, &group, &spec.batch).await;
        let ended = match opened {
            Ok((pull, limits)) => {
                backoff = Duration::from_millis(200);
                let stop = CancellationToken::new();
                let (mut read, reader) =
                    spawn_reader(&ctx, &spec, lane.clone(), pull, limits, stop.clone());
                let ended = pull_batches(&ctx, &spec, &lane, &mut read, limits, &*handler).await;
                stop.cancel();
                read.close();
                let mut held: Vec<Held> = Vec::new();
                while let Some(r) = read.recv().await {
                    if let Read::Message(h) = r {
                        held.push(*h);
                    }
                }
                if let Ok((pull, unsent)) = reader.await {
                    held.extend(unsent);
                    let left = Leftover { pull, held, limits };
                    hand_back(&ctx, &spec, &stream, &lane, &group, left, &ended, &*handler).await;
                }
                ended
            }
            Err(Some(e)) => {
                tracing::warn!(consumer = %lane.consumer, error = %e, "opening a partition");
                Ended::Failed
            }
            Err(None) => Ended::Deleted,
        };
        if ended != Ended::Deleted {
            release_pin(&stream, &lane, &group).await;
        }
        lane.set_pin(None);
        let pause = match ended {
            Ended::Shutdown | Ended::Deleted => break,
            Ended::Fenced => Duration::from_millis(500),
            Ended::Released => spec.standby_pause,
            Ended::Failed => {
                backoff = (backoff * 2).min(Duration::from_secs(10));
                backoff
            }
        };
        tokio::select! {
            _ = ctx.shutdown.triggered() => break,
            _ = tokio::time::sleep(pause) => {}
        }
    }
    partitions
        .lanes
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&lane.consumer);
}

/// What a stint leaves: its pull, and messages read but not handled.
struct Leftover {
    pull: PullStream,
    held: Vec<Held>,
    limits: Limits,
}

/// Settles what a stint leaves. On release or shutdown the partition is unpinned (so the server
/// sends this pull nothing more) and what it had sent goes back at once (nak) to the next holder;
/// fenced or broken, it comes back after its ack_wait. A message on its last delivery is never
/// handed back, which would lose it: it is handled here on release or shutdown, and otherwise
/// dead-lettered with the reason.
#[allow(clippy::too_many_arguments)]
async fn hand_back<M, F, Fut>(
    ctx: &WorkerContext,
    spec: &PartitionSpec,
    stream: &jetstream::stream::Stream,
    lane: &Lane,
    group: &str,
    left: Leftover,
    ended: &Ended,
    handler: &F,
) where
    M: WireMessage + 'static,
    F: Fn(PartitionId, Vec<Item<M>>) -> Fut,
    Fut: Future<Output = BatchOutcome>,
{
    let Leftover {
        mut pull,
        held,
        limits,
    } = left;
    let releasing = matches!(ended, Ended::Released | Ended::Shutdown);
    let (last, rest): (Vec<Held>, Vec<Held>) =
        held.into_iter().partition(|h| h.delivery.last_attempt);
    let mut rest = rest;
    if releasing {
        if !last.is_empty() {
            handle(ctx, spec, lane, last, limits, handler).await;
        }
        // A standby pull (no pin) was sent nothing.
        if lane.pin().is_some() {
            release_pin(stream, lane, group).await;
            let slots = Arc::new(Semaphore::new(Semaphore::MAX_PERMITS));
            let mut late_last = Vec::new();
            for m in unread(&mut pull, lane, limits.max_held).await {
                let Ok(slot) = slots.clone().try_acquire_owned() else {
                    break;
                };
                if let Some(h) = hold(ctx, m, &spec.stream, &lane.consumer, limits, slot) {
                    if h.delivery.last_attempt {
                        late_last.push(h);
                    } else {
                        rest.push(h);
                    }
                }
            }
            if !late_last.is_empty() {
                handle(ctx, spec, lane, late_last, limits, handler).await;
            }
        }
        drop(pull);
        for h in rest {
            h.settle(AckKind::Nak(None)).await;
        }
    } else {
        drop(pull);
        for h in last {
            give_up_last(ctx, h, limits, "the partition moved to another replica").await;
        }
        // `rest` is dropped unacknowledged: delivered again after its ack_wait.
    }
}

/// A message on its last delivery that this replica may no longer handle: dead-lettered with the
/// reason (a nak or a drop would let the server discard it).
async fn give_up_last(ctx: &WorkerContext, h: Held, limits: Limits, why: &str) {
    settle(
        ctx,
        h,
        Err(HandlerError::retry(Duration::ZERO, why)),
        limits,
    )
    .await;
}

/// Messages a pull already holds in its buffer, read for at most half a second (at most `max`);
/// a pin id they carry is recorded, so the lane can release it.
async fn unread(pull: &mut PullStream, lane: &Lane, max: usize) -> Vec<jetstream::Message> {
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_millis(500);
    while out.len() < max {
        let wait = tokio::time::Instant::now() + Duration::from_millis(50);
        match tokio::time::timeout_at(wait.min(deadline), pull.next()).await {
            Ok(Some(Ok(m))) => {
                lane.saw(&m);
                out.push(m);
            }
            _ => break,
        }
    }
    out
}

/// The lane's pull on its consumer's priority group, with expiries a third of the consumer's
/// `priority_timeout`. `Err(None)`: the consumer is gone.
async fn open(
    stream: &jetstream::stream::Stream,
    consumer: &str,
    group: &str,
    batch: &BatchSpec,
) -> Result<(PullStream, Limits), Option<String>> {
    match stream.consumer_info(consumer).await {
        Ok(_) => {}
        Err(e) if e.kind() == jetstream::context::ConsumerInfoErrorKind::NotFound => {
            return Err(None);
        }
        Err(e) => return Err(Some(e.to_string())),
    }
    let consumer: PullConsumer = stream
        .get_consumer(consumer)
        .await
        .map_err(|e| Some(e.to_string()))?;
    let config = &consumer.cached_info().config;
    let limits = Limits {
        ack_wait: config.ack_wait.max(Duration::from_millis(300)),
        max_deliver: config.max_deliver,
        max_held: usize::try_from(config.max_ack_pending)
            .unwrap_or(0)
            .clamp(1, 10_000)
            + batch.max_messages,
    };
    let timeout = if config.priority_timeout.is_zero() {
        Duration::from_secs(120)
    } else {
        config.priority_timeout
    };
    let expires = (timeout / 3).max(Duration::from_secs(1));
    let pull = consumer
        .stream()
        .group(group)
        .max_messages_per_batch(batch.max_messages)
        .expires(expires)
        .heartbeat(expires / 4)
        .messages()
        .await
        .map_err(|e| Some(e.to_string()))?;
    Ok((pull, limits))
}

/// What a lane's reader hands to the lane.
enum Read {
    Message(Box<Held>),
    Ended(Ended),
}

/// Reads the lane's pull in its own task, so the pull is renewed (and the pin kept) while a
/// batch is being handled however long it takes; each message is held (in-progress acks) from
/// the moment it arrives. Returns the pull when stopped, for what is still in its buffer.
fn spawn_reader(
    ctx: &WorkerContext,
    spec: &PartitionSpec,
    lane: Arc<Lane>,
    mut pull: PullStream,
    limits: Limits,
    stop: CancellationToken,
) -> (
    mpsc::UnboundedReceiver<Read>,
    tokio::task::JoinHandle<(PullStream, Vec<Held>)>,
) {
    let (tx, rx) = mpsc::unbounded_channel();
    let (ctx, stream) = (ctx.clone(), spec.stream.clone());
    // The server sends no more than the consumer's `max_ack_pending` unacknowledged: that is the
    // bound on what a replica holds, so the reader never refuses a message (a nak would come
    // straight back to this pinned pull and use up its deliveries).
    let slots = Arc::new(Semaphore::new(Semaphore::MAX_PERMITS));
    let task = tokio::spawn(async move {
        use async_nats::jetstream::consumer::pull::MessagesErrorKind as K;
        let mut unsent = Vec::new();
        loop {
            let next = tokio::select! {
                biased;
                _ = stop.cancelled() => break,
                next = pull.next() => next,
            };
            let read = match next {
                Some(Ok(m)) => {
                    lane.saw(&m);
                    let Ok(slot) = slots.clone().try_acquire_owned() else {
                        break;
                    };
                    match hold(&ctx, m, &stream, &lane.consumer, limits, slot) {
                        Some(h) => Read::Message(Box::new(h)),
                        None => continue,
                    }
                }
                // The pull carries on (a slow machine, a stopped process resumed).
                Some(Err(e)) if e.kind() == K::MissingHeartbeat => {
                    tracing::debug!(consumer = %lane.consumer, "a missed heartbeat");
                    continue;
                }
                Some(Err(e)) if e.kind() == K::ConsumerDeleted => Read::Ended(Ended::Deleted),
                Some(Err(e)) => {
                    tracing::debug!(consumer = %lane.consumer, error = %e, "a partition pull ended");
                    Read::Ended(Ended::Failed)
                }
                None => Read::Ended(Ended::Failed),
            };
            let last = matches!(read, Read::Ended(_));
            if let Err(mpsc::error::SendError(read)) = tx.send(read) {
                // The lane stopped reading: the message is handed back with the pull.
                if let Read::Message(h) = read {
                    unsent.push(*h);
                }
                break;
            }
            if last {
                break;
            }
        }
        (pull, unsent)
    });
    (rx, task)
}

/// Gathers batches from the lane's reader and hands them to the handler, one at a time, until
/// the pull ends, the partition is fenced or released, or shutdown.
async fn pull_batches<M, F, Fut>(
    ctx: &WorkerContext,
    spec: &PartitionSpec,
    lane: &Lane,
    read: &mut mpsc::UnboundedReceiver<Read>,
    limits: Limits,
    handler: &F,
) -> Ended
where
    M: WireMessage + 'static,
    F: Fn(PartitionId, Vec<Item<M>>) -> Fut,
    Fut: Future<Output = BatchOutcome>,
{
    loop {
        let first = tokio::select! {
            biased;
            _ = ctx.shutdown.triggered() => return Ended::Shutdown,
            _ = lane.release.notified() => return Ended::Released,
            r = read.recv() => r,
        };
        let first = match first {
            Some(Read::Message(h)) => *h,
            Some(Read::Ended(ended)) => return ended,
            None => return Ended::Failed,
        };
        let mut bytes = first.delivery.payload_len;
        let mut gathered = vec![first];
        let mut ended = None;
        let deadline = tokio::time::Instant::now() + spec.batch.max_wait;
        while gathered.len() < spec.batch.max_messages && bytes < spec.batch.max_bytes {
            match tokio::time::timeout_at(deadline, read.recv()).await {
                Ok(Some(Read::Message(h))) => {
                    bytes += h.delivery.payload_len;
                    gathered.push(*h);
                }
                Ok(Some(Read::Ended(e))) => {
                    ended = Some(e);
                    break;
                }
                Ok(None) => {
                    ended = Some(Ended::Failed);
                    break;
                }
                Err(_) => break,
            }
        }
        if !handle(ctx, spec, lane, gathered, limits, handler).await {
            // A pull that ended meanwhile says more (a deleted consumer is not reopened).
            return ended.unwrap_or(Ended::Fenced);
        }
        if let Some(ended) = ended {
            return ended;
        }
    }
}

/// Runs one batch and settles it; false when it was fenced (nothing settled).
async fn handle<M, F, Fut>(
    ctx: &WorkerContext,
    spec: &PartitionSpec,
    lane: &Lane,
    gathered: Vec<Held>,
    limits: Limits,
    handler: &F,
) -> bool
where
    M: WireMessage,
    F: Fn(PartitionId, Vec<Item<M>>) -> Fut,
    Fut: Future<Output = BatchOutcome>,
{
    let started = Instant::now();
    let mut items = Vec::new();
    let mut held = Vec::new();
    let mut settled = Vec::new();
    for h in gathered {
        match decode_message::<M>(h.delivery.headers.as_deref(), &h.message().payload) {
            Ok(message) => {
                items.push(Item {
                    message,
                    delivery: h.delivery.clone(),
                });
                held.push(h);
            }
            Err(e) => settled.push((h, Err(HandlerError::permanent("malformed", e.to_string())))),
        }
    }
    let count = items.len();
    let outcome = if items.is_empty() {
        Ok(Vec::new())
    } else {
        let call = AssertUnwindSafe(handler(lane.partition, items)).catch_unwind();
        match tokio::time::timeout(spec.max_batch_time, call).await {
            Ok(outcome) => outcome,
            // A stuck handler must not hold the partition for ever: its writes are fenced.
            Err(_) => Ok(Err(Fenced(format!(
                "the batch took longer than {:?}",
                spec.max_batch_time
            )))),
        }
        .unwrap_or_else(|_| {
            Ok(vec![
                Err(HandlerError::retry(
                    Duration::from_secs(1),
                    "the handler panicked"
                ));
                count
            ])
        })
    };
    ctx.metrics.observe_handler(
        &spec.stream,
        &lane.consumer,
        started.elapsed().as_secs_f64(),
    );
    let mut outcomes = match outcome {
        Ok(o) => o,
        Err(Fenced(reason)) => {
            tracing::warn!(
                stream = %spec.stream,
                consumer = %lane.consumer,
                partition = %lane.partition,
                %reason,
                dropped = held.len(),
                "fence conflict: another replica holds this partition now; dropping the batch unacknowledged"
            );
            for h in held {
                ctx.metrics
                    .count_consumer(&spec.stream, &lane.consumer, "fenced");
                if h.delivery.last_attempt {
                    give_up_last(ctx, h, limits, "fenced on its last delivery").await;
                }
                // Dropped: its in-progress acks stop, and the new holder gets it.
            }
            for (h, outcome) in settled {
                settle(ctx, h, outcome, limits).await;
            }
            return false;
        }
    };
    if outcomes.len() != count {
        tracing::error!(
            items = count,
            outcomes = outcomes.len(),
            "the partition handler's outcomes do not match its items: those without one are retried"
        );
    }
    outcomes.resize(
        count,
        Err(HandlerError::retry(
            Duration::from_secs(1),
            "the partition handler gave no outcome for it",
        )),
    );
    settled.extend(held.into_iter().zip(outcomes));
    for (h, outcome) in settled {
        settle(ctx, h, outcome, limits).await;
    }
    true
}

/// Unpins the lane's partition if the server's pin is still the one this replica was given
/// (never another replica's).
async fn release_pin(stream: &jetstream::stream::Stream, lane: &Lane, group: &str) {
    let Some(mine) = lane.pin() else { return };
    if server_pin(stream, &lane.consumer).await.as_deref() == Some(mine.as_str()) {
        match stream.unpin_consumer(&lane.consumer, group).await {
            Ok(()) => tracing::info!(consumer = %lane.consumer, "unpinned"),
            Err(e) => tracing::debug!(consumer = %lane.consumer, error = %e, "unpinning"),
        }
    }
}

/// The pin id the server holds for a partition consumer's group.
async fn server_pin(stream: &jetstream::stream::Stream, consumer: &str) -> Option<String> {
    let info = stream.consumer_info(consumer).await.ok()?;
    info.priority_groups
        .first()
        .and_then(|g| g.pinned_client_id.clone())
        .filter(|p| !p.is_empty())
}

/// Counts this replica's pins at the server and gives up those past its share.
async fn balance(
    ctx: &WorkerContext,
    spec: &PartitionSpec,
    stream: &jetstream::stream::Stream,
    partitions: &Partitions,
) {
    let lanes = partitions.lanes();
    let mut mine = Vec::new();
    for lane in &lanes {
        if let Some(pin) = lane.pin()
            && server_pin(stream, &lane.consumer).await.as_deref() == Some(pin.as_str())
        {
            mine.push(lane.clone());
        }
    }
    ctx.metrics.set_pinned(
        &spec.stream,
        spec.owner.as_str(),
        i64::try_from(mine.len()).unwrap_or(i64::MAX),
    );
    let Some(replicas) = live_replicas(&ctx.jetstream.client(), &spec.presence).await else {
        return;
    };
    let share = lanes.len().div_ceil(replicas.max(1));
    if mine.len() > share {
        for lane in mine.iter().rev().take(mine.len() - share) {
            tracing::info!(consumer = %lane.consumer, replicas, share, "giving up a partition for balance");
            lane.release.notify_one();
        }
    }
}

/// The live instances of a NATS service: one answer each to `$SRV.PING.<name>`.
async fn live_replicas(client: &async_nats::Client, name: &str) -> Option<usize> {
    let inbox = client.new_inbox();
    let mut answers = client.subscribe(inbox.clone()).await.ok()?;
    client
        .publish_with_reply(format!("$SRV.PING.{name}"), inbox, bytes::Bytes::new())
        .await
        .ok()?;
    // Distinct instances of that name only: a stray answer does not count.
    let mut ids = std::collections::BTreeSet::new();
    let mut wait = Duration::from_secs(1);
    while let Ok(Some(answer)) = tokio::time::timeout(wait, answers.next()).await {
        #[derive(serde::Deserialize)]
        struct Ping {
            name: String,
            id: String,
        }
        if let Ok(ping) = serde_json::from_slice::<Ping>(&answer.payload)
            && ping.name == name
        {
            ids.insert(ping.id);
        }
        wait = Duration::from_millis(300);
    }
    (!ids.is_empty()).then_some(ids.len())
}

/// A key's message read by subject, after the key's cursor.
#[derive(Clone, Debug)]
pub struct Stored {
    pub sequence: u64,
    pub subject: String,
    pub headers: async_nats::HeaderMap,
    pub payload: bytes::Bytes,
}

/// The messages of one key (`filter`: its subjects as stored) after `after` and up to `upto`,
/// in stream order, read with direct gets. A delivery wakes a key up; it is not the unit of
/// order: after a handover or a nak, the replica that holds the key applies what follows the
/// key's cursor in stream order, and acks what is at or below it.
///
/// `upto` is the sequence of the delivered message, which matches `filter`: a read that does not
/// reach it (a lagging replica answering a direct get) is an error to retry, never a short list
/// that would let the caller ack a message it did not apply.
pub async fn read_after(
    stream: &jetstream::stream::Stream,
    filter: &str,
    after: u64,
    upto: u64,
) -> Result<Vec<Stored>, String> {
    use jetstream::stream::DirectGetErrorKind as K;
    let mut out = Vec::new();
    let mut next = after + 1;
    while next <= upto {
        match stream.direct_get_next_for_subject(filter, Some(next)).await {
            Ok(m) if m.sequence <= upto => {
                next = m.sequence + 1;
                out.push(Stored {
                    sequence: m.sequence,
                    subject: m.subject.to_string(),
                    headers: m.headers,
                    payload: m.payload,
                });
            }
            Ok(_) => break,
            Err(e) if e.kind() == K::NotFound => break,
            Err(e) => return Err(format!("reading `{filter}` after {after}: {e}")),
        }
    }
    match out.last() {
        Some(m) if m.sequence == upto => Ok(out),
        _ if upto <= after => Ok(out),
        _ => Err(format!(
            "reading `{filter}` after {after} did not reach {upto} (a replica behind?)"
        )),
    }
}
