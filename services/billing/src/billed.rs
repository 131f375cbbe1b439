//! Publishing a checkpoint's `BILLED` messages, guarded per user: each user's messages go to
//! `slipway.billed.<user>` one after another, each with the subject's expected last sequence, so
//! a second writer is refused by the stream rather than interleaved. The checkpoint records each
//! user's floor, the subject's last sequence when it was written; on recovery the subject is
//! read from there, and only this checkpoint's messages not found go out, so a message already
//! in the stream is never published again, whoever else wrote to the subject meanwhile.

use std::collections::HashMap;
use std::sync::Mutex;

use async_nats::header::{
    NATS_BATCH_COMMIT, NATS_BATCH_COMMIT_FINAL, NATS_BATCH_ID, NATS_BATCH_SEQUENCE,
    NATS_EXPECTED_LAST_SUBJECT_SEQUENCE,
};
use async_nats::jetstream::{self, context::PublishErrorKind, message::PublishMessage};
use futures::{StreamExt, TryStreamExt};
use slipway_common::rpc::{decode_message, message_headers};
use slipway_common::subjects::{self, streams};
use slipway_proto::codec::{ContentType, encode};
use slipway_proto::v1::{BilledUsage, UserBilled};

/// Users published to at once (each user's messages stay in order).
const USERS_AT_ONCE: usize = 128;

/// The most messages the server takes in one atomic batch.
const MAX_BATCH: usize = 1000;

/// Users whose last sequence is remembered per partition (past it, they are read back).
const KNOWN_USERS_MAX: usize = 100_000;

#[derive(Debug, thiserror::Error)]
pub enum BilledError {
    /// A user's subject moved under us: another writer publishes for the user.
    #[error("a second writer on BILLED: {0}")]
    SecondWriter(String),
    #[error("BILLED: {0}")]
    Stream(String),
}

/// Per partition: the checkpoint number the users' sequences are valid after, and each user's
/// last subject sequence this replica wrote.
type Known = HashMap<String, (u64, HashMap<String, u64>)>;

/// Publishes `BILLED` and remembers, per partition, each user's last subject sequence it wrote.
pub struct BilledPublisher {
    jetstream: jetstream::Context,
    client: async_nats::Client,
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
            client: jetstream.client(),
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

    /// Publishes checkpoint `number`'s messages, every user's in order, as atomic batches: all of
    /// a batch is stored or none of it. Each user's first message in a batch carries the
    /// subject's expected last sequence, so a second writer fails the whole batch rather than
    /// interleaving. `recovering`: an earlier attempt may have published them, so each user's
    /// subject is read from the checkpoint's floor and only what is not there goes out.
    pub async fn publish(
        &self,
        partition: &str,
        number: u64,
        users: &[UserBilled],
        recovering: bool,
    ) -> Result<(), BilledError> {
        // Each user's messages still to go out, after the subject's last sequence.
        let pending: Vec<(Vec<&BilledUsage>, &str, u64)> = if recovering {
            futures::stream::iter(0..users.len())
                .map(|i| async move {
                    let user = &users[i];
                    let (there, last) = self.published_since_floor(user).await?;
                    let missing = user
                        .messages
                        .iter()
                        .zip(there)
                        .filter(|(_, t)| !t)
                        .map(|(m, _)| m)
                        .collect();
                    Ok::<_, BilledError>((missing, user.user_token.as_str(), last))
                })
                .buffer_unordered(USERS_AT_ONCE)
                .try_collect()
                .await?
        } else {
            users
                .iter()
                .map(|u| (u.messages.iter().collect(), u.user_token.as_str(), u.floor))
                .collect()
        };
        let mut last: HashMap<String, u64> = pending
            .iter()
            .map(|(_, user, seq)| (user.to_string(), *seq))
            .collect();
        let outgoing: Vec<(&str, &BilledUsage)> = pending
            .iter()
            .flat_map(|(messages, user, _)| messages.iter().map(|m| (*user, *m)))
            .collect();
        let mut trusted = true;
        for chunk in outgoing.chunks(MAX_BATCH) {
            trusted &= self.publish_batch(chunk, &mut last).await?;
        }
        let mut known = self.known();
        let entry = known
            .entry(partition.to_string())
            .or_insert_with(|| (0, HashMap::new()));
        // Valid while the partition's checkpoints follow one another here: a gap means another
        // holder wrote in between, and the users are read back.
        if !trusted || entry.0 + 1 != number || entry.1.len() > KNOWN_USERS_MAX {
            entry.1.clear();
        }
        entry.0 = number;
        entry.1.extend(last);
        Ok(())
    }

    /// One atomic batch: every message but the last published without waiting, the last with
    /// the commit, whose ack carries the last sequence (the batch's messages are stored one
    /// after another). `last` holds each user's subject sequence before, and after on return;
    /// `false` when the ack could not be read as the batch's (then they are read back later).
    async fn publish_batch(
        &self,
        batch: &[(&str, &BilledUsage)],
        last: &mut HashMap<String, u64>,
    ) -> Result<bool, BilledError> {
        let id = format!("{:032x}", rand::random::<u128>());
        let n = batch.len();
        let mut guarded = std::collections::HashSet::new();
        for (i, (user, message)) in batch.iter().enumerate() {
            let subject = subject(user);
            let mut headers = message_headers::<BilledUsage>(ContentType::Protobuf);
            if guarded.insert(*user) {
                let expected = last.get(*user).copied().unwrap_or(0);
                headers.insert(NATS_EXPECTED_LAST_SUBJECT_SEQUENCE, expected.to_string());
            }
            let payload = bytes::Bytes::from(encode(*message, ContentType::Protobuf));
            if n > 1 {
                headers.insert(NATS_BATCH_ID, id.as_str());
                headers.insert(NATS_BATCH_SEQUENCE, (i + 1).to_string());
            }
            if i + 1 < n {
                self.client
                    .publish_with_headers(subject, headers, payload)
                    .await
                    .map_err(|e| BilledError::Stream(format!("publishing a batch: {e}")))?;
                slipway_common::failpoint::hit("billing.billed.one");
                continue;
            }
            if n > 1 {
                headers.insert(NATS_BATCH_COMMIT, NATS_BATCH_COMMIT_FINAL);
            }
            let final_subject = subject.clone();
            let publish = PublishMessage::build().payload(payload).headers(headers);
            let acked = match self.jetstream.send_publish(subject, publish).await {
                Ok(ack) => ack.await,
                Err(e) => Err(e),
            };
            match acked {
                Ok(ack) => match (ack.sequence + 1).checked_sub(n as u64) {
                    // The batch's messages are stored one after another, ending at the ack's.
                    Some(first) => {
                        for (k, (user, _)) in batch.iter().enumerate() {
                            last.insert(user.to_string(), first + k as u64);
                        }
                    }
                    // An answer that cannot be: its users' sequences are read back next time.
                    None => {
                        for (user, _) in batch {
                            last.remove(*user);
                        }
                        return Ok(false);
                    }
                },
                // Nothing of the batch was stored: a user's subject moved under us.
                Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => {
                    return Err(BilledError::SecondWriter(format!(
                        "a batch of {n} ending on {final_subject}: {e}"
                    )));
                }
                // The answer may be lost with the batch stored: the partition's next attempt
                // completes the checkpoint again, reading what is there.
                Err(e) => {
                    return Err(BilledError::Stream(format!(
                        "committing a batch of {n} to BILLED: {e}"
                    )));
                }
            }
        }
        Ok(true)
    }

    /// The messages of `user` on its subject after the checkpoint's floor that are this
    /// checkpoint's, and the subject's last sequence.
    async fn published_since_floor(
        &self,
        user: &UserBilled,
    ) -> Result<(Vec<bool>, u64), BilledError> {
        let subject = &subject(&user.user_token);
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
}

fn subject(user_token: &str) -> String {
    format!("{}.billed.{user_token}", subjects::ROOT)
}
