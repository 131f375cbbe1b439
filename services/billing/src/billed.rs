//! Publishing a checkpoint's `BILLED` messages, guarded per user: each user's messages go to
//! `slipway.billed.<user>` one after another, each with the subject's expected last sequence, so
//! a second writer is refused by the stream rather than interleaved. The checkpoint records each
//! user's floor, the subject's last sequence when it was written; on recovery the subject is
//! read from there, and only this checkpoint's messages not found go out, so a message already
//! in the stream is never published again, whoever else wrote to the subject meanwhile.

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

    /// Each user's subject's last sequence now: what this replica wrote last when it wrote the
    /// partition's previous checkpoint (`number - 1`), read back otherwise.
    pub async fn floors(
        &self,
        partition: &str,
        number: u64,
        users: Vec<String>,
    ) -> Result<HashMap<String, u64>, BilledError> {
        let cached: HashMap<String, u64> = match self.known().get(partition) {
            Some((after, users)) if *after + 1 == number => users.clone(),
            _ => HashMap::new(),
        };
        let cached = &cached;
        futures::stream::iter(users)
            .map(|user| async move {
                if let Some(seq) = cached.get(&user) {
                    return Ok((user, *seq));
                }
                let subject = subject(&user);
                let (seq, _) = self.last(&subject).await?;
                Ok((user, seq))
            })
            .buffer_unordered(USERS_AT_ONCE)
            .try_collect()
            .await
    }

    /// Publishes the checkpoint's messages. `recovering`: an earlier attempt may have published
    /// some, so each user's subject is read from the checkpoint's floor and only what is not
    /// there goes out.
    pub async fn publish(&self, cp: &FoldCheckpoint, recovering: bool) -> Result<(), BilledError> {
        let done: Vec<(String, u64)> = futures::stream::iter(cp.billed.clone())
            .map(|user| async move { self.publish_user(&user, recovering).await })
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

    /// The messages of `user` on its subject after the floor that are this checkpoint's, and
    /// the subject's last sequence.
    async fn published_since_floor(
        &self,
        subject: &str,
        user: &UserBilled,
    ) -> Result<(Vec<bool>, u64), BilledError> {
        let mut there = vec![false; user.messages.len()];
        let mut last = user.floor;
        loop {
            match self
                .stream
                .direct_get_next_for_subject(subject, Some(last + 1))
                .await
            {
                Ok(m) => {
                    last = m.sequence;
                    if let Ok(found) = decode_message::<BilledUsage>(Some(&m.headers), &m.payload)
                        && let Some(k) = user.messages.iter().position(|x| same(x, &found))
                    {
                        there[k] = true;
                    }
                }
                Err(e) if e.kind() == jetstream::stream::DirectGetErrorKind::NotFound => {
                    return Ok((there, last));
                }
                Err(e) => return Err(BilledError::Stream(format!("reading {subject}: {e}"))),
            }
        }
    }

    /// One user's messages in order, each with the subject's expected last sequence.
    async fn publish_user(
        &self,
        user: &UserBilled,
        recovering: bool,
    ) -> Result<(String, u64), BilledError> {
        let subject = subject(&user.user_token);
        let (there, mut last) = if recovering {
            self.published_since_floor(&subject, user).await?
        } else {
            (vec![false; user.messages.len()], user.floor)
        };
        for (message, _) in user.messages.iter().zip(there).filter(|(_, t)| !t) {
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
        }
        Ok((user.user_token.clone(), last))
    }
}

fn subject(user_token: &str) -> String {
    format!("{}.billed.{user_token}", subjects::ROOT)
}
