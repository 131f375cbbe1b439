//! Durable-consumer workers, beside `ServiceHost::endpoint` and in its image: a service hands a
//! handler for the messages of one of the topology's durable consumers, and the kit pulls
//! them, decodes them with the codec, restores their trace, runs the handler under a bound on
//! work in flight, and settles each message by the handler's outcome: ack, nak with a delay, or
//! dead letter (with its reason) and terminate.
//!
//! The worker asks the server only for as many messages as it has room to hold (pull requests
//! sized to the free slots), so every message it has is held, and every held message, also one
//! queued behind a long handler, gets an in-progress ack every third of the consumer's
//! `ack_wait`: a handler longer than `ack_wait` (a deploy build) is not redelivered meanwhile.
//! On shutdown it stops asking, finishes and settles what is running, and hands back what it
//! held unstarted (a message on its last delivery is handled instead: handed back, it would be
//! lost).

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::{self, AckKind};
use futures::{FutureExt, StreamExt};
use slipway_proto::WireMessage;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::deadletter::{self, Reason};
use crate::metrics::Metrics;
use crate::rpc::decode_message;
use crate::shutdown::Shutdown;
use crate::topology::ConsumerSpec;

/// A handler's outcome other than success.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HandlerError {
    /// It may work later: delivered again after `delay`, until the consumer's `max_deliver` is
    /// used up, when the message is dead-lettered with `reason`.
    Retry { delay: Duration, reason: String },
    /// It can never work: dead-lettered at once (refused usage: to
    /// `slipway.rejected.usage.<service>`), with a stable `code` and a `message`.
    Permanent { code: String, message: String },
}

impl HandlerError {
    pub fn retry(delay: Duration, reason: impl Into<String>) -> Self {
        Self::Retry {
            delay,
            reason: reason.into(),
        }
    }

    pub fn permanent(code: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Permanent {
            code: code.into(),
            message: message.into(),
        }
    }
}

/// Where a message came from, for handlers that need more than its content.
#[derive(Clone, Debug)]
pub struct Delivery {
    pub subject: String,
    pub stream_sequence: u64,
    /// When the stream stored it (ms since the epoch): the same on every delivery, so a
    /// judgement made against it (billing's lateness) is the same on every delivery too.
    pub published_ms: i64,
    /// 1 on the first delivery.
    pub delivered: i64,
    /// This is the consumer's last delivery of it: a `Retry` now dead-letters it (a deployer
    /// publishes its failure event here rather than leave the run waiting).
    pub last_attempt: bool,
    pub headers: Option<std::sync::Arc<async_nats::HeaderMap>>,
    pub payload_len: usize,
    /// Triggered when the service shuts down: a long handler may checkpoint and stop early
    /// (its `Retry` hands the message on).
    pub shutdown: CancellationToken,
}

/// One decoded message of a batch.
#[derive(Clone, Debug)]
pub struct Item<M> {
    pub message: M,
    pub delivery: Delivery,
}

/// Which durable consumer, and how much of its work at once.
#[derive(Clone, Debug)]
pub struct WorkerSpec {
    pub stream: String,
    pub durable: String,
    /// Handlers running at once (per-message workers).
    pub max_in_flight: usize,
    /// Messages held at once (running or queued, each kept alive with in-progress acks). The
    /// worker asks for no more, so a replica does not hoard work other replicas could do.
    pub max_held: usize,
}

impl WorkerSpec {
    pub fn new(stream: &str, durable: &str) -> Self {
        Self {
            stream: stream.to_string(),
            durable: durable.to_string(),
            max_in_flight: 16,
            max_held: 16,
        }
    }

    /// The worker of one of the topology's durable consumers.
    pub fn for_consumer(consumer: &ConsumerSpec) -> Self {
        Self::new(consumer.stream, &consumer.durable)
    }

    pub fn max_in_flight(mut self, n: usize) -> Self {
        self.max_in_flight = n.max(1);
        self.max_held = self.max_held.max(self.max_in_flight);
        self
    }

    pub fn max_held(mut self, n: usize) -> Self {
        self.max_held = n.max(self.max_in_flight);
        self
    }
}

/// Batches for a batch handler: at most `max_messages` and `max_bytes` of payload, gathered for
/// at most `max_wait` after the first message.
#[derive(Clone, Copy, Debug)]
pub struct BatchSpec {
    pub max_messages: usize,
    pub max_bytes: usize,
    pub max_wait: Duration,
}

impl Default for BatchSpec {
    fn default() -> Self {
        Self {
            max_messages: 256,
            max_bytes: 1 << 20,
            max_wait: Duration::from_millis(50),
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("worker for `{stream}`/`{durable}`: {message}")]
pub struct WorkerError {
    pub stream: String,
    pub durable: String,
    pub message: String,
}

/// What a worker shares with the tasks it starts.
#[derive(Clone)]
pub struct WorkerContext {
    pub jetstream: jetstream::Context,
    pub shutdown: Shutdown,
    pub metrics: Arc<Metrics>,
}

/// How a held message's acks go out: one at a time, and none after the final one (an
/// in-progress ack after a nak would restart its `ack_wait` and undo the nak's delay).
struct Acks {
    acker: jetstream::message::Acker,
    settled: tokio::sync::Mutex<bool>,
}

impl Acks {
    /// An in-progress ack, unless settled. Returns whether the message is still held.
    async fn progress(&self) -> bool {
        let settled = self.settled.lock().await;
        if *settled {
            return false;
        }
        self.acker.ack_with(AckKind::Progress).await.is_ok()
    }

    async fn settle(&self, kind: AckKind, sequence: u64) {
        let mut settled = self.settled.lock().await;
        if *settled {
            return;
        }
        *settled = true;
        if let Err(e) = self.acker.ack_with(kind).await {
            tracing::warn!(error = %e, sequence, "settling a message");
        }
    }
}

/// A message held by the worker: its acks, kept alive by a ticker until settled, and its slot.
pub(crate) struct Held {
    message: async_nats::Message,
    acks: Arc<Acks>,
    pub(crate) delivery: Delivery,
    stream: String,
    consumer: String,
    alive: CancellationToken,
    _slot: OwnedSemaphorePermit,
}

impl Held {
    pub(crate) fn message(&self) -> &async_nats::Message {
        &self.message
    }

    pub(crate) async fn settle(&self, kind: AckKind) {
        self.alive.cancel();
        self.acks.settle(kind, self.delivery.stream_sequence).await;
    }
}

impl Drop for Held {
    /// However a handler ends (a panic too), the ticker stops, so an unsettled message is
    /// redelivered after its `ack_wait` instead of being kept alive for ever.
    fn drop(&mut self) {
        self.alive.cancel();
    }
}

/// The consumer's settings the worker runs by.
#[derive(Clone, Copy)]
pub(crate) struct Limits {
    pub(crate) ack_wait: Duration,
    pub(crate) max_deliver: i64,
    /// Messages held at once (partition lanes: the consumer's `max_ack_pending`).
    pub(crate) max_held: usize,
}

async fn open(
    ctx: &WorkerContext,
    spec: &WorkerSpec,
) -> Result<(PullConsumer, Limits), WorkerError> {
    let err = |message: String| WorkerError {
        stream: spec.stream.clone(),
        durable: spec.durable.clone(),
        message,
    };
    let stream = ctx
        .jetstream
        .get_stream(&spec.stream)
        .await
        .map_err(|e| err(format!("the stream: {e}")))?;
    let mut consumer: PullConsumer = stream
        .get_consumer(&spec.durable)
        .await
        .map_err(|e| err(format!("the durable consumer: {e}")))?;
    let info = consumer
        .info()
        .await
        .map_err(|e| err(format!("the consumer's settings: {e}")))?;
    let limits = Limits {
        ack_wait: info.config.ack_wait.max(Duration::from_millis(300)),
        max_deliver: info.config.max_deliver,
        max_held: spec.max_held,
    };
    Ok((consumer, limits))
}

/// Starts pulling for `spec` and hands each message to `handler`, at most `max_in_flight` at
/// once. Returns once the consumer is found.
pub async fn start<M, F, Fut>(
    ctx: WorkerContext,
    spec: WorkerSpec,
    handler: F,
) -> Result<(), WorkerError>
where
    M: WireMessage + 'static,
    F: Fn(M, Delivery) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
{
    let (consumer, limits) = open(&ctx, &spec).await?;
    let mut rx = spawn_puller(&ctx, &spec, consumer, limits);
    let handler = Arc::new(handler);
    let permits = Arc::new(Semaphore::new(spec.max_in_flight));
    let tracker = ctx.shutdown.tracker().clone();
    let token = ctx.shutdown.token().clone();
    let run = move |held: Held, permit: Option<OwnedSemaphorePermit>, ctx: WorkerContext| {
        let handler = handler.clone();
        async move {
            let started = Instant::now();
            let outcome = match decode_message::<M>(
                held.delivery.headers.as_deref(),
                &held.message.payload,
            ) {
                Ok(m) => {
                    let span = handler_span(&held);
                    let call = AssertUnwindSafe(handler(m, held.delivery.clone()).instrument(span));
                    match call.catch_unwind().await {
                        Ok(outcome) => outcome,
                        Err(_) => Err(HandlerError::retry(
                            Duration::from_secs(1),
                            "the handler panicked",
                        )),
                    }
                }
                Err(e) => Err(HandlerError::permanent("malformed", e.to_string())),
            };
            ctx.metrics.observe_handler(
                &held.stream,
                &held.consumer,
                started.elapsed().as_secs_f64(),
            );
            settle(&ctx, held, outcome, limits).await;
            drop(permit);
        }
    };
    tracker.clone().spawn(async move {
        loop {
            let held = tokio::select! {
                biased;
                _ = token.cancelled() => break,
                held = rx.recv() => match held { Some(h) => h, None => break },
            };
            let permit = tokio::select! {
                biased;
                _ = token.cancelled() => { hand_back(held, &tracker, &run, &ctx).await; break; }
                p = permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            };
            tracker.spawn(run(held, Some(permit), ctx.clone()));
        }
        rx.close();
        while let Some(held) = rx.recv().await {
            hand_back(held, &tracker, &run, &ctx).await;
        }
    });
    Ok(())
}

/// On shutdown, a held message that never started goes back to the stream (with a short delay,
/// so it is not sent straight back to this worker's still-open pull); one on its last delivery
/// is handled instead, since a nak would use up that delivery and lose it.
async fn hand_back<R, Fut>(
    held: Held,
    tracker: &tokio_util::task::TaskTracker,
    run: &R,
    ctx: &WorkerContext,
) where
    R: Fn(Held, Option<OwnedSemaphorePermit>, WorkerContext) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    if held.delivery.last_attempt {
        tracker.spawn(run(held, None, ctx.clone()));
    } else {
        held.settle(AckKind::Nak(Some(HAND_BACK_DELAY))).await;
    }
}

/// How long a handed-back message waits before it is delivered again.
pub(crate) const HAND_BACK_DELAY: Duration = Duration::from_secs(1);

/// As `start`, with a handler for batches (bounded by `batch`), one batch at a time. It returns
/// one outcome per item, in order; a mismatch is logged, and items without one are retried.
pub async fn start_batches<M, F, Fut>(
    ctx: WorkerContext,
    spec: WorkerSpec,
    batch: BatchSpec,
    handler: F,
) -> Result<(), WorkerError>
where
    M: WireMessage + 'static,
    F: Fn(Vec<Item<M>>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Vec<Result<(), HandlerError>>> + Send + 'static,
{
    let room = spec.max_held.max(batch.max_messages);
    let spec = spec.max_held(room);
    let (consumer, limits) = open(&ctx, &spec).await?;
    let mut rx = spawn_puller(&ctx, &spec, consumer, limits);
    let token = ctx.shutdown.token().clone();
    let inner = ctx.clone();
    ctx.shutdown.tracker().spawn(async move {
        let ctx = inner;
        loop {
            let first = tokio::select! {
                biased;
                _ = token.cancelled() => break,
                held = rx.recv() => match held { Some(h) => h, None => break },
            };
            let mut bytes = first.delivery.payload_len;
            let mut gathered = vec![first];
            let deadline = tokio::time::Instant::now() + batch.max_wait;
            while gathered.len() < batch.max_messages && bytes < batch.max_bytes {
                match tokio::time::timeout_at(deadline, rx.recv()).await {
                    Ok(Some(h)) => {
                        bytes += h.delivery.payload_len;
                        gathered.push(h);
                    }
                    _ => break,
                }
            }
            run_batch(&ctx, gathered, &handler, limits).await;
        }
        rx.close();
        // Unstarted: back to the stream, except those on their last delivery, run as a batch.
        let mut last = Vec::new();
        while let Some(held) = rx.recv().await {
            if held.delivery.last_attempt {
                last.push(held);
            } else {
                held.settle(AckKind::Nak(Some(HAND_BACK_DELAY))).await;
            }
        }
        if !last.is_empty() {
            run_batch(&ctx, last, &handler, limits).await;
        }
    });
    Ok(())
}

async fn run_batch<M, F, Fut>(ctx: &WorkerContext, gathered: Vec<Held>, handler: &F, limits: Limits)
where
    M: WireMessage,
    F: Fn(Vec<Item<M>>) -> Fut,
    Fut: Future<Output = Vec<Result<(), HandlerError>>>,
{
    let started = Instant::now();
    let mut items = Vec::new();
    let mut slots = Vec::new();
    let mut settled = Vec::new();
    for held in gathered {
        match decode_message::<M>(held.delivery.headers.as_deref(), &held.message.payload) {
            Ok(message) => {
                items.push(Item {
                    message,
                    delivery: held.delivery.clone(),
                });
                slots.push(held);
            }
            Err(e) => settled.push((
                held,
                Err(HandlerError::permanent("malformed", e.to_string())),
            )),
        }
    }
    let count = items.len();
    let mut outcomes = if items.is_empty() {
        Vec::new()
    } else {
        // A panicking batch handler leaves every item without an outcome: retried.
        AssertUnwindSafe(handler(items))
            .catch_unwind()
            .await
            .unwrap_or_default()
    };
    if outcomes.len() != count {
        tracing::error!(
            items = count,
            outcomes = outcomes.len(),
            "the batch handler's outcomes do not match its items: those without one are retried"
        );
    }
    outcomes.resize(
        count,
        Err(HandlerError::retry(
            Duration::from_secs(1),
            "the batch handler gave no outcome for it",
        )),
    );
    if let Some(h) = slots.first() {
        ctx.metrics
            .observe_handler(&h.stream, &h.consumer, started.elapsed().as_secs_f64());
    }
    settled.extend(slots.into_iter().zip(outcomes));
    for (held, outcome) in settled {
        settle(ctx, held, outcome, limits).await;
    }
}

fn handler_span(held: &Held) -> tracing::Span {
    let span = tracing::info_span!(
        "consume",
        stream = %held.stream,
        consumer = %held.consumer,
        sequence = held.delivery.stream_sequence,
        delivered = held.delivery.delivered,
    );
    crate::telemetry::set_parent_from(&span, held.delivery.headers.as_deref());
    span
}

/// How long one pull request waits for messages before the worker asks again.
const PULL_EXPIRES: Duration = Duration::from_secs(5);

/// Pulls from `consumer` until shutdown, asking each time for as many messages as there are free
/// slots (so none waits unheld in a client buffer); each message gets its slot and its
/// in-progress ticker as it arrives. A consumer that cannot be read (deleted, recreated by
/// setup, a server restart) is opened again with backoff.
fn spawn_puller(
    ctx: &WorkerContext,
    spec: &WorkerSpec,
    consumer: PullConsumer,
    limits: Limits,
) -> mpsc::UnboundedReceiver<Held> {
    // Unbounded, but never holding more than `max_held`: each message takes a slot first.
    let (tx, rx) = mpsc::unbounded_channel::<Held>();
    let slots = Arc::new(Semaphore::new(spec.max_held));
    let (stream, durable) = (spec.stream.clone(), spec.durable.clone());
    let ctx = ctx.clone();
    let spec = spec.clone();
    let token = ctx.shutdown.token().clone();
    tokio::spawn(report_pending(ctx.clone(), consumer.clone()));
    tokio::spawn(async move {
        let mut consumer = consumer;
        let mut backoff = Duration::from_millis(100);
        'pull: loop {
            let first = tokio::select! {
                biased;
                _ = token.cancelled() => break,
                p = slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            };
            let mut free = vec![first];
            while let Ok(p) = slots.clone().try_acquire_owned() {
                free.push(p);
            }
            let batch = consumer
                .batch()
                .max_messages(free.len())
                .expires(PULL_EXPIRES)
                .messages()
                .await;
            let mut batch = match batch {
                Ok(b) => b,
                Err(e) => {
                    // Said once when it starts failing, not at every retry.
                    if backoff == Duration::from_millis(100) {
                        tracing::warn!(%stream, %durable, error = %e, "pulling failed; retrying with backoff");
                    } else {
                        tracing::debug!(%stream, %durable, error = %e, ?backoff, "pulling; trying again");
                    }
                    drop(free);
                    tokio::select! {
                        _ = token.cancelled() => break,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                    if let Ok((c, _)) = open(&ctx, &spec).await {
                        consumer = c;
                    }
                    continue;
                }
            };
            backoff = Duration::from_millis(100);
            loop {
                let next = tokio::select! {
                    biased;
                    _ = token.cancelled() => {
                        // What the server already sent for this request (no more than its
                        // slots) goes back now rather than after its ack_wait.
                        while let Ok(Some(Ok(m))) =
                            tokio::time::timeout(Duration::from_millis(200), batch.next()).await
                        {
                            let Some(slot) = free.pop() else { break };
                            if let Some(held) = hold(&ctx, m, &stream, &durable, limits, slot) {
                                if held.delivery.last_attempt {
                                    let _ = tx.send(held);
                                } else {
                                    held.settle(AckKind::Nak(Some(HAND_BACK_DELAY))).await;
                                }
                            }
                        }
                        break 'pull;
                    }
                    next = batch.next() => next,
                };
                let message = match next {
                    Some(Ok(m)) => m,
                    Some(Err(e)) => {
                        tracing::debug!(%stream, %durable, error = %e, "a pull request ended");
                        break;
                    }
                    None => break,
                };
                let Some(slot) = free.pop() else {
                    // More than asked for: not held, so back at once.
                    let _ = message.ack_with(AckKind::Nak(None)).await;
                    continue;
                };
                if let Some(held) = hold(&ctx, message, &stream, &durable, limits, slot)
                    && let Err(mpsc::error::SendError(held)) = tx.send(held)
                {
                    held.settle(AckKind::Nak(Some(HAND_BACK_DELAY))).await;
                    break 'pull;
                }
            }
        }
    });
    rx
}

pub(crate) fn hold(
    ctx: &WorkerContext,
    message: jetstream::Message,
    stream: &str,
    durable: &str,
    limits: Limits,
    slot: OwnedSemaphorePermit,
) -> Option<Held> {
    let (delivered, sequence, published_ms) = match message.info() {
        Ok(info) => (
            info.delivered,
            info.stream_sequence,
            (info.published.unix_timestamp_nanos() / 1_000_000) as i64,
        ),
        Err(e) => {
            tracing::warn!(error = %e, "a message without JetStream metadata");
            return None;
        }
    };
    let (mut message, acker) = message.split();
    let acks = Arc::new(Acks {
        acker,
        settled: tokio::sync::Mutex::new(false),
    });
    ctx.metrics.count_consumer(stream, durable, "delivered");
    if delivered > 1 {
        ctx.metrics.count_consumer(stream, durable, "redelivered");
    }
    let alive = CancellationToken::new();
    let (ticker, stop) = (acks.clone(), alive.clone());
    let every = limits.ack_wait / 3;
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep(every) => {
                    if !ticker.progress().await {
                        break;
                    }
                }
            }
        }
    });
    Some(Held {
        delivery: Delivery {
            subject: message.subject.to_string(),
            stream_sequence: sequence,
            published_ms,
            delivered,
            last_attempt: limits.max_deliver > 0 && delivered >= limits.max_deliver,
            payload_len: message.payload.len(),
            // Moved, not copied: the held message's headers are read from here.
            headers: message.headers.take().map(std::sync::Arc::new),
            shutdown: ctx.shutdown.token().clone(),
        },
        message,
        acks,
        stream: stream.to_string(),
        consumer: durable.to_string(),
        alive,
        _slot: slot,
    })
}

/// Settles one message by its handler's outcome.
pub(crate) async fn settle(
    ctx: &WorkerContext,
    held: Held,
    outcome: Result<(), HandlerError>,
    limits: Limits,
) {
    let (stream, consumer) = (held.stream.clone(), held.consumer.clone());
    let give_up = match outcome {
        Ok(()) => {
            ctx.metrics.count_consumer(&stream, &consumer, "acked");
            held.settle(AckKind::Ack).await;
            return;
        }
        Err(HandlerError::Retry { delay, reason }) if !held.delivery.last_attempt => {
            tracing::info!(%stream, %consumer, sequence = held.delivery.stream_sequence, %reason, ?delay, "retrying later");
            ctx.metrics.count_consumer(&stream, &consumer, "nakked");
            held.settle(AckKind::Nak(Some(delay))).await;
            return;
        }
        Err(HandlerError::Retry { reason, .. }) => (
            "max_deliver".to_string(),
            format!(
                "delivered {} times (max_deliver {}); last: {reason}",
                held.delivery.delivered, limits.max_deliver
            ),
            false,
        ),
        // Refused usage goes to the refusals, except what is not usage at all.
        Err(HandlerError::Permanent { code, message }) => {
            let refused = code != "malformed";
            (code, message, refused)
        }
    };
    let (code, message, refused) = give_up;
    let reason = Reason {
        code,
        message,
        subject: held.delivery.subject.clone(),
        stream: stream.clone(),
        stream_sequence: held.delivery.stream_sequence,
        delivered: held.delivery.delivered,
        consumer: consumer.clone(),
    };
    let target = deadletter::target(&stream, &held.delivery.subject, refused);
    // The ticker keeps the message held while this tries: on its last delivery a nak would
    // lose it, so the dead letter is retried until it is stored (or shutdown's grace ends).
    let mut wait = Duration::from_millis(200);
    loop {
        match deadletter::publish(
            &ctx.jetstream,
            &target,
            held.delivery.headers.as_deref(),
            held.message.payload.clone(),
            &reason,
        )
        .await
        {
            Ok(()) => {
                tracing::warn!(%stream, %consumer, sequence = reason.stream_sequence, code = %reason.code, reason = %reason.message, %target, "dead-lettered");
                ctx.metrics
                    .count_consumer(&stream, &consumer, "dead_lettered");
                held.settle(AckKind::Term).await;
                return;
            }
            Err(e) if !held.delivery.last_attempt => {
                // Not lost: it comes back and is given up again.
                tracing::warn!(error = %e, "could not dead-letter; delivered again later");
                held.settle(AckKind::Nak(Some(Duration::from_secs(5))))
                    .await;
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, ?wait, "could not dead-letter on the last delivery; trying again");
                if ctx.shutdown.is_triggered() && wait >= Duration::from_secs(5) {
                    tracing::error!(%stream, %consumer, sequence = reason.stream_sequence, "shutting down with a dead letter unsent: its message will not be delivered again");
                    return;
                }
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(10));
            }
        }
    }
}

/// Keeps `slipway_consumer_pending` current from the consumer's info.
async fn report_pending(ctx: WorkerContext, mut consumer: PullConsumer) {
    loop {
        if let Ok(info) = consumer.info().await {
            ctx.metrics.set_pending(
                &info.stream_name,
                &info.name,
                i64::try_from(info.num_pending).unwrap_or(i64::MAX),
            );
        }
        tokio::select! {
            _ = ctx.shutdown.triggered() => break,
            _ = tokio::time::sleep(Duration::from_secs(15)) => {}
        }
    }
}
