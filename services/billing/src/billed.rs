//! Publishing a checkpoint's `BILLED` messages, guarded per user: each user's messages go to
//! `slipway.billed.<user>` one after another, each with the subject's expected last sequence, so
//! a second writer is refused by the stream rather than interleaved. On recovery the last
//! message on the user's subject says how far an interrupted publish got: if it is the k-th of
//! the checkpoint's messages for that user, publishing goes on at k+1; otherwise all of them go.

use std::collections::HashMap;
use std::sync::Mutex;

use async_nats::jetstream::{self, context::PublishErrorKind, message::PublishMessage};
use futures::{StreamExt, TryStreamExt};
use slipway_common::rpc::{decode_message, message_headers};
use slipway_common::subjects::{self, streams};
use slipway_proto::codec::{ContentType, encode};
use slipway_proto::v1::{BilledUsage, FoldCheckpoint, UserBilled};

/// Users published to at once (each user's messages stay in order).
const USERS_AT_ONCE: usize = 128;

#[derive(Debug, thiserror::Error)]
pub enum BilledError {
    /// The subject moved under us outside recovery: another writer publishes for this user.
    #[error("a second writer on `{subject}`: expected its last sequence {expected}")]
    SecondWriter { subject: String, expected: u64 },
    #[error("BILLED: {0}")]
    Stream(String),
}

/// Per partition: the checkpoint number the users' sequences are valid after, and each user's
/// last subject sequence this replica wrote.
type Known = HashMap<String, (u64, HashMap<String, u64>)>;

/// Publishes `BILLED` and remembers, per partition, each user's last subject sequence it wrote.
pub struct BilledPublisher {
    jetstream: jetstream::Context,
    stream: jetstream::stream::Stream<()>,
    /// Partition -> (the checkpoint number the cache is valid after, user -> last sequence).
    known: Mutex<Known>,
}

fn same(a: &BilledUsage, b: &BilledUsage) -> bool {
    a.usage_sequence == b.usage_sequence
        && a.event.as_ref().map(|e| (&e.source, &e.id))
            == b.event.as_ref().map(|e| (&e.source, &e.id))
}

impl BilledPublisher {
    pub async fn new(jetstream: jetstream::Context) -> anyhow::Result<Self> {
        let stream = jetstream
            .get_stream_no_info(streams::BILLED)
            .await
            .map_err(|e| anyhow::anyhow!("the {} stream: {e}", streams::BILLED))?;
        Ok(Self {
            jetstream,
            stream,
            known: Mutex::new(HashMap::new()),
        })
    }

    fn known(&self) -> std::sync::MutexGuard<'_, Known> {
        self.known.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The last message on `subject` and its sequence (0 when there is none).
    async fn last(&self, subject: &str) -> Result<(u64, Option<BilledUsage>), BilledError> {
        match self.stream.direct_get_last_for_subject(subject).await {
            Ok(m) => {
                let message = decode_message::<BilledUsage>(Some(&m.headers), &m.payload).ok();
                Ok((m.sequence, message))
            }
            Err(e) if e.kind() == jetstream::stream::DirectGetErrorKind::NotFound => Ok((0, None)),
            Err(e) => Err(BilledError::Stream(format!("reading {subject}: {e}"))),
        }
    }

    /// Publishes the checkpoint's messages. `recovering`: the checkpoint was written by an
    /// earlier attempt, so each user's subject is read to find where it stopped.
    pub async fn publish(&self, cp: &FoldCheckpoint, recovering: bool) -> Result<(), BilledError> {
        let cached: HashMap<String, u64> = {
            let known = self.known();
            match known.get(&cp.partition) {
                // Valid only when this replica wrote every checkpoint since.
                Some((after, users)) if !recovering && *after + 1 == cp.number => users.clone(),
                _ => HashMap::new(),
            }
        };
        let cached = &cached;
        let done: Vec<(String, u64)> = futures::stream::iter(cp.billed.clone())
            .map(|user| async move {
                let start = cached.get(&user.user_token).copied();
                self.publish_user(&user, start).await
            })
            .buffer_unordered(USERS_AT_ONCE)
            .try_collect()
            .await?;
        let mut known = self.known();
        let entry = known
            .entry(cp.partition.clone())
            .or_insert_with(|| (0, HashMap::new()));
        // Only this checkpoint's users: a user not in the next one is read back then (the
        // cache stays the size of a batch).
        entry.0 = cp.number;
        entry.1 = done.into_iter().collect();
        Ok(())
    }

    /// One user's messages in order. `known`: the subject's last sequence when this replica
    /// knows it (it wrote it); otherwise the subject is read, and a message of this batch found
    /// there is where publishing resumes.
    async fn publish_user(
        &self,
        user: &UserBilled,
        known: Option<u64>,
    ) -> Result<(String, u64), BilledError> {
        let subject = format!("{}.billed.{}", subjects::ROOT, user.user_token);
        let (mut from, mut last) = match known {
            Some(seq) => (0, seq),
            None => {
                let (seq, message) = self.last(&subject).await?;
                let at = message
                    .as_ref()
                    .and_then(|m| user.messages.iter().position(|x| same(x, m)));
                (at.map_or(0, |k| k + 1), seq)
            }
        };
        while from < user.messages.len() {
            let message = &user.messages[from];
            let publish = PublishMessage::build()
                .payload(encode(message, ContentType::Protobuf).into())
                .headers(message_headers::<BilledUsage>(ContentType::Protobuf))
                .expected_last_subject_sequence(last);
            let acked = match self.jetstream.send_publish(subject.clone(), publish).await {
                Ok(ack) => ack.await,
                Err(e) => Err(e),
            };
            match acked {
                Ok(ack) => last = ack.sequence,
                Err(e) => {
                    // The write may have landed with its answer lost: if the subject's last
                    // message is this one, go on from it; anything else is another writer.
                    let (seq, found) = self.last(&subject).await?;
                    if found.as_ref().is_some_and(|m| same(m, message)) {
                        last = seq;
                    } else if e.kind() == PublishErrorKind::WrongLastSequence {
                        return Err(BilledError::SecondWriter {
                            subject,
                            expected: last,
                        });
                    } else {
                        return Err(BilledError::Stream(format!("publishing to {subject}: {e}")));
                    }
                }
            }
            slipway_common::failpoint::hit("billing.billed.one");
            from += 1;
        }
        Ok((user.user_token.clone(), last))
    }
}
