//! Durable-consumer workers, beside `ServiceHost::endpoint` and in its image: a service hands a
//! handler for the messages of one of the topology's durable consumers, and the kit pulls
//! them, decodes them with the codec, restores their trace, runs the handler under a bound on
//! work in flight, and settles each message by the handler's outcome: ack, nak with a delay, or
//! dead letter (with its reason) and terminate. Every message it holds, also one queued behind
//! a long handler, gets an in-progress ack every third of the consumer's `ack_wait`, so a
//! handler longer than `ack_wait` (a deploy build) is not redelivered meanwhile. On shutdown it
//! stops pulling, finishes and settles what is running, and hands back what it held unstarted.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::{self, AckKind};
use bytes::Bytes;
use futures::StreamExt;
use slipway_proto::WireMessage;
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::deadletter::{self, Reason};
use crate::metrics::Metrics;
use crate::rpc::decode_message;
use crate::shutdown::Shutdown;

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
    /// 1 on the first delivery.
    pub delivered: i64,
    pub headers: Option<async_nats::HeaderMap>,
    pub payload_len: usize,
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
    /// Messages held (running or waiting, each kept alive with in-progress acks); the worker
    /// stops pulling beyond it.
    pub max_held: usize,
}

impl WorkerSpec {
    pub fn new(stream: &str, durable: &str) -> Self {
        Self {
            stream: stream.to_string(),
            durable: durable.to_string(),
            max_in_flight: 16,
            max_held: 64,
        }
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

/// A message held by the worker: its acker, with the in-progress ticker that keeps it alive
/// until it is settled.
struct Held {
    message: async_nats::Message,
    acker: Arc<jetstream::message::Acker>,
    delivery: Delivery,
    stream: String,
    consumer: String,
    alive: CancellationToken,
}

impl Held {
    async fn settle(self, kind: AckKind) {
        self.alive.cancel();
        if let Err(e) = self.acker.ack_with(kind).await {
            tracing::warn!(error = %e, sequence = self.delivery.stream_sequence, "settling a message");
        }
    }
}

/// The consumer's settings the worker runs by.
#[derive(Clone, Copy)]
struct Limits {
    ack_wait: Duration,
    max_deliver: i64,
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
    };
    Ok((consumer, limits))
}

/// Starts pulling for `spec` and hands each message to `handler`, at most `max_in_flight` at
/// once. Returns once the pull is open.
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
    let (tx, mut rx) = mpsc::channel::<Held>(spec.max_held);
    spawn_puller(&ctx, &spec, consumer, limits, tx).await?;
    let handler = Arc::new(handler);
    let permits = Arc::new(Semaphore::new(spec.max_in_flight));
    let tracker = ctx.shutdown.tracker().clone();
    let token = ctx.shutdown.token().clone();
    tracker.clone().spawn(async move {
        loop {
            let held = tokio::select! {
                biased;
                _ = token.cancelled() => break,
                held = rx.recv() => match held { Some(h) => h, None => break },
            };
            let permit = tokio::select! {
                biased;
                _ = token.cancelled() => { held.settle(AckKind::Nak(None)).await; break; }
                p = permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            };
            let (handler, ctx) = (handler.clone(), ctx.clone());
            tracker.spawn(async move {
                let started = Instant::now();
                let outcome =
                    match decode_message::<M>(held.message.headers.as_ref(), &held.message.payload)
                    {
                        Ok(m) => {
                            let span = handler_span(&held);
                            handler(m, held.delivery.clone()).instrument(span).await
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
            });
        }
        // Held but never started: back to the stream at once, for another replica.
        rx.close();
        while let Some(held) = rx.recv().await {
            held.settle(AckKind::Nak(None)).await;
        }
    });
    Ok(())
}

/// As `start`, with a handler for batches (bounded by `batch`), one batch at a time. It returns
/// one outcome per item, in order; a missing outcome counts as a retry.
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
    let held = spec.max_held.max(batch.max_messages);
    let spec = spec.max_held(held);
    let (consumer, limits) = open(&ctx, &spec).await?;
    let (tx, mut rx) = mpsc::channel::<Held>(spec.max_held);
    spawn_puller(&ctx, &spec, consumer, limits, tx).await?;
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
            let started = Instant::now();
            let mut items = Vec::new();
            let mut slots = Vec::new();
            let mut settled = Vec::new();
            for held in gathered {
                match decode_message::<M>(held.message.headers.as_ref(), &held.message.payload) {
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
            let mut outcomes = if items.is_empty() {
                Vec::new()
            } else {
                handler(items).await
            };
            outcomes.resize(
                slots.len(),
                Err(HandlerError::retry(
                    Duration::from_secs(1),
                    "the batch handler gave no outcome",
                )),
            );
            if let Some(h) = slots.first() {
                ctx.metrics.observe_handler(
                    &h.stream,
                    &h.consumer,
                    started.elapsed().as_secs_f64(),
                );
            }
            settled.extend(slots.into_iter().zip(outcomes));
            for (held, outcome) in settled {
                settle(&ctx, held, outcome, limits).await;
            }
        }
        rx.close();
        while let Some(held) = rx.recv().await {
            held.settle(AckKind::Nak(None)).await;
        }
    });
    Ok(())
}

fn handler_span(held: &Held) -> tracing::Span {
    let span = tracing::info_span!(
        "consume",
        stream = %held.stream,
        consumer = %held.consumer,
        sequence = held.delivery.stream_sequence,
        delivered = held.delivery.delivered,
    );
    crate::telemetry::set_parent_from(&span, held.message.headers.as_ref());
    span
}

/// Pulls from `consumer` into `tx` until shutdown; each message gets its in-progress ticker as
/// soon as it arrives.
async fn spawn_puller(
    ctx: &WorkerContext,
    spec: &WorkerSpec,
    consumer: PullConsumer,
    limits: Limits,
    tx: mpsc::Sender<Held>,
) -> Result<(), WorkerError> {
    let batch_size = spec.max_in_flight.max(1);
    let mut messages = consumer
        .stream()
        .max_messages_per_batch(batch_size)
        .heartbeat(Duration::from_secs(5))
        .expires(Duration::from_secs(30))
        .messages()
        .await
        .map_err(|e| WorkerError {
            stream: spec.stream.clone(),
            durable: spec.durable.clone(),
            message: format!("pulling: {e}"),
        })?;
    let (stream, durable) = (spec.stream.clone(), spec.durable.clone());
    let ctx = ctx.clone();
    let token = ctx.shutdown.token().clone();
    let pending_every = Duration::from_secs(15);
    tokio::spawn(report_pending(ctx.clone(), consumer, pending_every));
    // Not tracked: it only feeds the dispatcher, which is; it ends with the token.
    tokio::spawn(async move {
        loop {
            let next = tokio::select! {
                biased;
                _ = token.cancelled() => {
                    // What the server already sent (at most one pull batch) goes back now, for
                    // another replica, rather than after its ack_wait. With a delay, so it is not
                    // sent straight back here; and no more than the batch, so the drain does not
                    // pull the backlog through.
                    let settle_every = Duration::from_millis(200);
                    for _ in 0..batch_size {
                        let Ok(Some(Ok(m))) = tokio::time::timeout(settle_every, messages.next()).await else {
                            break;
                        };
                        if let Some(held) = hold(&ctx, m, &stream, &durable, limits) {
                            held.settle(AckKind::Nak(Some(Duration::from_secs(1)))).await;
                        }
                    }
                    break;
                }
                next = messages.next() => next,
            };
            let message = match next {
                Some(Ok(m)) => m,
                Some(Err(e)) => {
                    tracing::warn!(%stream, %durable, error = %e, "pulling messages");
                    continue;
                }
                None => break,
            };
            let Some(held) = hold(&ctx, message, &stream, &durable, limits) else {
                continue;
            };
            // Back-pressure: a full channel stops the pull until the handlers catch up.
            if let Err(mpsc::error::SendError(held)) = tx.send(held).await {
                held.settle(AckKind::Nak(None)).await;
                break;
            }
        }
    });
    Ok(())
}

fn hold(
    ctx: &WorkerContext,
    message: jetstream::Message,
    stream: &str,
    durable: &str,
    limits: Limits,
) -> Option<Held> {
    let (delivered, sequence) = match message.info() {
        Ok(info) => (info.delivered, info.stream_sequence),
        Err(e) => {
            tracing::warn!(error = %e, "a message without JetStream metadata");
            return None;
        }
    };
    let (message, acker) = message.split();
    let acker = Arc::new(acker);
    ctx.metrics.count_consumer(stream, durable, "delivered");
    if delivered > 1 {
        ctx.metrics.count_consumer(stream, durable, "redelivered");
    }
    let alive = CancellationToken::new();
    let ticker = acker.clone();
    let stop = alive.clone();
    let every = limits.ack_wait / 3;
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep(every) => {
                    if ticker.ack_with(AckKind::Progress).await.is_err() {
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
            delivered,
            headers: message.headers.clone(),
            payload_len: message.payload.len(),
        },
        message,
        acker,
        stream: stream.to_string(),
        consumer: durable.to_string(),
        alive,
    })
}

/// Settles one message by its handler's outcome.
async fn settle(
    ctx: &WorkerContext,
    held: Held,
    outcome: Result<(), HandlerError>,
    limits: Limits,
) {
    let (stream, consumer) = (held.stream.clone(), held.consumer.clone());
    let last_try = limits.max_deliver > 0 && held.delivery.delivered >= limits.max_deliver;
    let give_up = match outcome {
        Ok(()) => {
            ctx.metrics.count_consumer(&stream, &consumer, "acked");
            held.settle(AckKind::Ack).await;
            return;
        }
        Err(HandlerError::Retry { delay, reason }) if !last_try => {
            tracing::info!(%stream, %consumer, sequence = held.delivery.stream_sequence, %reason, ?delay, "retrying later");
            ctx.metrics.count_consumer(&stream, &consumer, "nakked");
            held.settle(AckKind::Nak(Some(delay))).await;
            return;
        }
        Err(HandlerError::Retry { reason, .. }) => (
            "max_deliver".to_string(),
            format!(
                "delivered {} times (max_deliver); last: {reason}",
                held.delivery.delivered
            ),
            false,
        ),
        Err(HandlerError::Permanent { code, message }) => (code, message, true),
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
    let payload: Bytes = held.message.payload.clone();
    match deadletter::publish(
        &ctx.jetstream,
        &target,
        held.message.headers.as_ref(),
        payload,
        &reason,
    )
    .await
    {
        Ok(()) => {
            tracing::warn!(%stream, %consumer, sequence = reason.stream_sequence, code = %reason.code, reason = %reason.message, %target, "dead-lettered");
            ctx.metrics
                .count_consumer(&stream, &consumer, "dead_lettered");
            held.settle(AckKind::Term).await;
        }
        Err(e) => {
            // Not lost: it comes back and is given up again.
            tracing::warn!(error = %e, "could not dead-letter; retrying later");
            held.settle(AckKind::Nak(Some(Duration::from_secs(5))))
                .await;
        }
    }
}

/// Keeps `slipway_consumer_pending` current from the consumer's info.
async fn report_pending(ctx: WorkerContext, mut consumer: PullConsumer, every: Duration) {
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
            _ = tokio::time::sleep(every) => {}
        }
    }
}
