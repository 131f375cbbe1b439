//! The fold: one pinned partition of `USAGE` at a time, each batch folded exactly once.
//!
//! KV has no multi-key transaction, so a batch commits in an order that a crash anywhere can be
//! completed from, each step idempotent:
//!
//! 0. the partition's last checkpoint is completed first, unless it is known complete (this
//!    replica completed it, or its `done.<P>.<p>` mark says so);
//! 1. each event is checked, and the invalid are refused (to `USAGE_REJECTED`, by the worker);
//! 2. the checkpoint (`cp.<P>.<p>`) is written at the revision read: every valid event once
//!    (first of its pair in the batch), priced, as each user's `BILLED` messages. A failed write
//!    means another holder (`Fenced`);
//! 3. it is applied: each user's dedupe index decides which events are first seen (`dedupe`),
//!    and theirs are added to the aggregates (`aggregates`: each record skips a checkpoint it
//!    has applied);
//! 4. the first seen are published to `BILLED` (see `billed`); the checkpoint is marked done, and
//!    the batch is acknowledged.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use slipway_common::failpoint;
use slipway_common::partition::{BatchOutcome, Fenced, PartitionId};
use slipway_common::records::{RecordError, Records};
use slipway_common::service::now;
use slipway_common::worker::{HandlerError, Item};
use slipway_proto::v1::*;

use crate::aggregates::agg_key;
use crate::billed::{BilledError, BilledPublisher};
use crate::decimal::Decimal;
use crate::dedupe::{Indexes, Key, days_of, dedupe_key};
use crate::metrics::BillingMetrics;
use crate::prices::{Prices, day, period};
use crate::validate::{self, Window};

/// Store operations in flight at once.
pub(crate) const AT_ONCE: usize = 256;

pub struct Folder {
    pub(crate) checkpoints: Records<FoldCheckpoint>,
    /// `done.<P>.<p>`: the partition's last checkpoint completed.
    pub(crate) completions: Records<FoldCompleted>,
    pub(crate) aggregates: Records<UsageAggregate>,
    pub(crate) dedupe: Records<DedupeIndex>,
    pub(crate) chunks: Records<DedupeKeys>,
    pub(crate) billed: BilledPublisher,
    pub(crate) prices: Prices,
    pub(crate) skew_ms: i64,
    pub(crate) lateness_ms: i64,
    /// Largest checkpoint record written; a batch that would make a larger one is cut.
    pub(crate) max_checkpoint_bytes: usize,
    pub(crate) metrics: BillingMetrics,
    /// Aggregate records as this replica last wrote them, with their revisions (`aggregates`).
    pub(crate) written: crate::aggregates::Written,
    /// User dedupe indexes as this replica last read or wrote them (`dedupe`).
    pub(crate) indexes: Indexes,
    /// Checkpoint key -> (revision, number) of the checkpoint this replica wrote and completed
    /// last. The partition's next batch then neither reads nor completes it: its own
    /// checkpoint is written at that revision, which fails if anyone else wrote since. Taken
    /// out while a batch runs, so a batch that fails reads the record again.
    pub(crate) completed: std::sync::Mutex<std::collections::HashMap<String, (u64, u64)>>,
}

/// Why a batch stopped.
pub(crate) enum Stop {
    /// Another holder wrote first: the batch is dropped unacknowledged and the partition
    /// released (the kit's `Fenced`).
    Fenced(String),
    /// A store or stream failed: the batch comes back after a pause, and the partition stays
    /// here. Everything done so far is completed or taken over by the next attempt.
    Failed(String),
}

pub(crate) fn fenced(what: impl std::fmt::Display) -> Stop {
    Stop::Fenced(what.to_string())
}

pub(crate) fn failed(what: impl std::fmt::Display) -> Stop {
    Stop::Failed(what.to_string())
}

/// A stored sum (empty is zero) plus `b`. A sum that cannot be read or grows past `i128`
/// stops the batch: it is never taken for zero.
pub(crate) fn add(a: &str, b: Decimal) -> Result<Decimal, Stop> {
    let a = if a.is_empty() {
        Decimal::ZERO
    } else {
        Decimal::parse_sum(a).map_err(|e| failed(format!("a stored sum: {e}")))?
    };
    a.checked_add(b)
        .ok_or_else(|| failed("a sum past the 128-bit bound"))
}

pub(crate) fn stored(s: &str) -> Result<Decimal, Stop> {
    add(s, Decimal::ZERO)
}

/// A valid event on its way into a checkpoint.
struct Accepted {
    user_token: String,
    billed: BilledUsage,
}

impl Folder {
    /// Folds one batch of partition `part` (in stream order).
    pub async fn fold(&self, part: PartitionId, items: Vec<Item<UsageEvent>>) -> BatchOutcome {
        let n = items.len();
        match self.fold_batch(part, items).await {
            Ok(outcomes) => Ok(outcomes),
            Err(Stop::Fenced(why)) => Err(Fenced(why)),
            Err(Stop::Failed(why)) => {
                tracing::warn!(partition = %part, %why, "a batch failed; it comes back");
                Ok(vec![
                    Err(HandlerError::retry(Duration::from_secs(1), why));
                    n
                ])
            }
        }
    }

    async fn fold_batch(
        &self,
        part: PartitionId,
        items: Vec<Item<UsageEvent>>,
    ) -> Result<Vec<Result<(), HandlerError>>, Stop> {
        let started = Instant::now();
        let name = part.to_string();
        let key = format!("cp.{}.{}", part.count, part.index);
        let remembered = self.completed().remove(&key);
        let from_memory = remembered.is_some();
        let (last, revision) = match remembered {
            Some((revision, number)) => (number, revision),
            None => self.complete(&key, part).await?,
        };

        // 1. Checked; the invalid refused; each pair once in the batch.
        let mut outcomes: Vec<Result<(), HandlerError>> = vec![Ok(()); items.len()];
        let mut valid = Vec::new();
        let mut seen = HashSet::new();
        for (i, item) in items.iter().enumerate() {
            if item.delivery.delivered > 1 {
                self.metrics.redelivered();
            }
            // Judged against when the stream stored it, not the clock of this delivery: the
            // same event gets the same verdict however often, and however late, it comes.
            let window = Window {
                now_ms: item.delivery.published_ms,
                skew_ms: self.skew_ms,
                lateness_ms: self.lateness_ms,
            };
            match validate::check(&item.delivery.subject, &item.message, window) {
                Ok(v) => {
                    let e = &item.message;
                    // Per end-user, as the dedupe is: two users' events never hide each other.
                    if seen.insert((v.user_token.clone(), dedupe_key(&e.source, &e.id))) {
                        valid.push((i, v));
                    } else {
                        self.metrics.duplicates(1);
                    }
                }
                Err(r) => {
                    self.metrics.rejected(r.code);
                    outcomes[i] = Err(HandlerError::permanent(r.code, r.reason));
                }
            }
        }
        if valid.is_empty() {
            self.completed().insert(key, (revision, last));
            return Ok(outcomes);
        }
        let closed = self.closed_periods(&items, &valid).await?;
        let mut accepted: Vec<Accepted> = valid
            .into_iter()
            .map(|(i, v)| {
                let own = period(v.time_ms);
                // The open period: the one the stream stored it in.
                let open = period(items[i].delivery.published_ms);
                let is_closed = closed.contains(&(v.user_token.clone(), own));
                self.price(&items[i], v, is_closed.then_some(open.as_str()))
            })
            .collect();

        // Each user's BILLED floor, recorded in the checkpoint for recovery.
        let number = last + 1;
        let users: BTreeSet<String> = accepted.iter().map(|a| a.user_token.clone()).collect();
        let floors = self
            .billed
            .floors(&name, number, users.into_iter().collect())
            .await
            .map_err(failed)?;

        // 2. The checkpoint, written first.
        let first_sequence = items.first().map_or(0, |i| i.delivery.stream_sequence);
        let last_sequence = items.last().map_or(0, |i| i.delivery.stream_sequence);
        // A batch whose record would not fit in one KV value is cut: the rest comes back. Each
        // message is counted with room for its user's share of the record.
        let mut size = 128 + name.len();
        let keep = accepted
            .iter()
            .take_while(|a| {
                size += prost::Message::encoded_len(&a.billed) + a.user_token.len() + 24;
                size <= self.max_checkpoint_bytes
            })
            .count()
            .max(1);
        if keep < accepted.len() {
            let cut: HashSet<u64> = accepted[keep..]
                .iter()
                .map(|a| a.billed.usage_sequence)
                .collect();
            accepted.truncate(keep);
            for (i, item) in items.iter().enumerate() {
                if cut.contains(&item.delivery.stream_sequence) {
                    outcomes[i] = Err(HandlerError::retry(
                        Duration::from_millis(100),
                        "the batch was cut to fit its checkpoint",
                    ));
                }
            }
        }
        let candidates = accepted.len();
        let stored = items.iter().map(|i| i.delivery.published_ms);
        let (oldest_ms, newest_ms) = (stored.clone().min().unwrap_or(0), stored.max().unwrap_or(0));
        let timestamp = |ms: i64| pbjson_types::Timestamp {
            seconds: ms.div_euclid(1000),
            nanos: (ms.rem_euclid(1000) * 1_000_000) as i32,
        };
        let cp = FoldCheckpoint {
            number,
            partition: name.clone(),
            first_sequence,
            last_sequence,
            billed: by_user(accepted, &floors),
            written_at: Some(now()),
            stream_time: Some(timestamp(newest_ms)),
            oldest_stream_time: Some(timestamp(oldest_ms)),
        };
        let written = if revision == 0 {
            self.checkpoints.create(&key, &cp).await
        } else {
            self.checkpoints.update(&key, &cp, revision).await
        };
        let revision = match written {
            Ok(r) => r,
            // Written since this replica last completed it (the partition went elsewhere and
            // came back): read it again, without calling it a fence.
            Err(RecordError::Conflict { .. }) if from_memory => {
                return Err(failed(format!("{key} changed since this replica wrote it")));
            }
            Err(RecordError::Exists { .. } | RecordError::Conflict { .. }) => {
                self.metrics.fence_conflict();
                return Err(fenced(format!("{key} was written by another holder")));
            }
            Err(e) => return Err(failed(e)),
        };
        failpoint::hit("billing.after_checkpoint");

        // 3-4. Applied, published.
        let billed = self.finish(cp, false).await?;
        self.mark_done(part, number).await?;
        self.completed().insert(key, (revision, number));
        self.metrics.folded(billed as u64);
        self.metrics.duplicates((candidates - billed) as u64);
        self.metrics
            .checkpoint_latency(started.elapsed().as_secs_f64());
        failpoint::hit("billing.after_published");
        Ok(outcomes)
    }

    fn completed(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, (u64, u64)>> {
        self.completed.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Which of the batch's users' own periods are closed, for the events stored after their
    /// period ended (the rule of adjustments lives here). An event stored within its own period
    /// needs no look: a period is closed only once it has ended and every event stored in it
    /// has been folded (Billing 2/2).
    async fn closed_periods(
        &self,
        items: &[Item<UsageEvent>],
        valid: &[(usize, validate::Valid)],
    ) -> Result<HashSet<(String, String)>, Stop> {
        let pairs: BTreeSet<(String, String)> = valid
            .iter()
            .filter(|(i, v)| period(v.time_ms) < period(items[*i].delivery.published_ms))
            .map(|(_, v)| (v.user_token.clone(), period(v.time_ms)))
            .collect();
        Ok(futures::stream::iter(pairs)
            .map(|(user, p)| async move {
                let agg = self
                    .aggregates
                    .get(&agg_key(&user, &p))
                    .await
                    .map_err(failed)?;
                Ok::<_, Stop>(agg.is_some_and(|(a, _)| a.closed).then_some((user, p)))
            })
            .buffer_unordered(AT_ONCE)
            .try_collect::<Vec<_>>()
            .await?
            .into_iter()
            .flatten()
            .collect())
    }

    /// Completes the partition's last checkpoint unless its `done` mark says it is complete.
    /// Answers its number and the record's revision (0 and 0 when there is none).
    async fn complete(&self, key: &str, part: PartitionId) -> Result<(u64, u64), Stop> {
        let name = part.to_string();
        let Some((cp, revision)) = self.checkpoints.get(key).await.map_err(failed)? else {
            return Ok((0, 0));
        };
        if cp.partition != name {
            return Err(fenced(format!("{key} belongs to `{}`", cp.partition)));
        }
        let number = cp.number;
        // Completing it again long after would be wrong, not only slow: its duplicates' keys
        // may have aged out of the dedupe window by then.
        let marked = self
            .completions
            .get(&done_key(part))
            .await
            .map_err(failed)?
            .is_some_and(|(d, _)| d.partition == name && d.number >= number);
        if !marked {
            self.finish(cp, true).await?;
            self.mark_done(part, number).await?;
        }
        Ok((number, revision))
    }

    /// Marks checkpoint `number` of `part` complete. The mark only moves forward: a stalled
    /// holder finishing an older checkpoint late must not make the next holder complete the
    /// last one again.
    async fn mark_done(&self, part: PartitionId, number: u64) -> Result<(), Stop> {
        let key = done_key(part);
        let done = FoldCompleted {
            partition: part.to_string(),
            number,
            completed_at: Some(now()),
        };
        for _ in 0..16 {
            let written = match self.completions.get(&key).await.map_err(failed)? {
                Some((d, _)) if d.partition == done.partition && d.number >= number => {
                    return Ok(());
                }
                Some((_, revision)) => self.completions.update(&key, &done, revision).await,
                None => self.completions.create(&key, &done).await,
            };
            match written {
                Ok(_) => return Ok(()),
                Err(RecordError::Exists { .. } | RecordError::Conflict { .. }) => continue,
                Err(e) => return Err(failed(e)),
            }
        }
        Err(failed(format!("{key} kept changing")))
    }

    /// Steps 3 and 4 for a written checkpoint (again, when `recovering`): answers how many of
    /// its events were first seen and billed.
    async fn finish(&self, cp: FoldCheckpoint, recovering: bool) -> Result<usize, Stop> {
        let Some(stream_time) = cp.stream_time.as_ref().or(cp.written_at.as_ref()) else {
            return Err(failed(format!("checkpoint {} has no time", cp.number)));
        };
        let oldest = cp.oldest_stream_time.as_ref().unwrap_or(stream_time);
        let (day, _) = days_of(validate::ms(stream_time));
        let (_, cut) = days_of(validate::ms(oldest));
        let (day, cut, cp_ref) = (day.as_str(), cut.as_str(), &cp);
        let mut firsts: Vec<(usize, Vec<bool>)> = futures::stream::iter(0..cp.billed.len())
            .map(|i| async move {
                let user = &cp_ref.billed[i];
                let keys: Vec<Key> = user
                    .messages
                    .iter()
                    .map(|m| {
                        let e = m.event.as_ref();
                        dedupe_key(
                            e.map_or("", |e| e.source.as_str()),
                            e.map_or("", |e| e.id.as_str()),
                        )
                    })
                    .collect();
                let first = self
                    .first_seen(cp_ref, (day, cut), &user.user_token, &keys)
                    .await?;
                Ok::<_, Stop>((i, first))
            })
            .buffer_unordered(AT_ONCE)
            .try_collect()
            .await?;
        firsts.sort_unstable_by_key(|(i, _)| *i);
        let FoldCheckpoint {
            partition,
            number,
            billed: all,
            ..
        } = cp;
        let users: Vec<UserBilled> = all
            .into_iter()
            .zip(firsts)
            .map(|(user, (_, first))| UserBilled {
                messages: user
                    .messages
                    .into_iter()
                    .zip(first)
                    .filter(|(_, f)| *f)
                    .map(|(m, _)| m)
                    .collect(),
                ..user
            })
            .collect();
        let billed: usize = users.iter().map(|u| u.messages.len()).sum();
        self.apply(&partition, number, &deltas(&users)?).await?;
        failpoint::hit("billing.after_apply");
        let mut result = self
            .billed
            .publish(&partition, number, &users, recovering)
            .await;
        if let Err(BilledError::SecondWriter(what)) = &result {
            // Another writer on one of the users' subjects (a `P` change draining): nothing of
            // the batch was stored, so it is published again as a recovery would, after what
            // is there now, before the partition is given up.
            self.metrics.second_writer();
            tracing::warn!(%what, %partition, "a second writer on BILLED: publishing after it");
            result = self.billed.publish(&partition, number, &users, true).await;
        }
        match result {
            Ok(()) => Ok(billed),
            Err(BilledError::SecondWriter(what)) => {
                tracing::error!(%what, %partition, "a second writer on BILLED: the partition stops here");
                Err(fenced(what))
            }
            Err(e) => Err(failed(e)),
        }
    }

    /// Prices a valid event and places it in its period: its own, or `open` as an adjustment
    /// when its own is closed.
    fn price(&self, item: &Item<UsageEvent>, v: validate::Valid, open: Option<&str>) -> Accepted {
        let e = &item.message;
        let own = period(v.time_ms);
        let (billed_period, adjustment) = match open {
            Some(p) => (p.to_string(), true),
            None => (own.clone(), false),
        };
        let priced = self.prices.price(&e.meter, v.quantity);
        let billed = BilledUsage {
            event: Some(e.clone()),
            period: billed_period,
            unit_price: priced.map(|(u, _)| u.to_string()).unwrap_or_default(),
            amount: priced.map(|(_, a)| a.to_string()).unwrap_or_default(),
            currency: if priced.is_some() {
                self.prices.currency.clone()
            } else {
                String::new()
            },
            adjustment,
            original_period: if adjustment { own } else { String::new() },
            usage_sequence: item.delivery.stream_sequence,
            period_closed: None,
        };
        Accepted {
            user_token: v.user_token,
            billed,
        }
    }
}

/// The key of a partition's completion mark.
fn done_key(part: PartitionId) -> String {
    format!("done.{}.{}", part.count, part.index)
}

/// Each user's messages in stream order, with the user's floor.
fn by_user(accepted: Vec<Accepted>, floors: &HashMap<String, u64>) -> Vec<UserBilled> {
    let mut billed: BTreeMap<String, Vec<BilledUsage>> = BTreeMap::new();
    for a in accepted {
        billed.entry(a.user_token).or_default().push(a.billed);
    }
    billed
        .into_iter()
        .map(|(user_token, messages)| UserBilled {
            floor: floors.get(&user_token).copied().unwrap_or(0),
            user_token,
            messages,
        })
        .collect()
}

/// What the billed messages add to the aggregate rows: one delta per user, period and row
/// (`<YYYY-MM-DD>|<meter>|<project>`, the day of the event's own time).
fn deltas(users: &[UserBilled]) -> Result<Vec<AggregateDelta>, Stop> {
    let mut deltas: BTreeMap<(&str, &str, String), AggregateDelta> = BTreeMap::new();
    for user in users {
        for m in &user.messages {
            let e = m
                .event
                .as_ref()
                .ok_or_else(|| failed("a checkpoint message without its event"))?;
            let time_ms = e.time.as_ref().map_or(0, validate::ms);
            let row = format!("{}|{}|{}", day(time_ms), e.meter, e.project_id);
            let quantity = Decimal::parse(&e.quantity)
                .map_err(|err| failed(format!("a checkpoint quantity: {err}")))?;
            let d = deltas
                .entry((user.user_token.as_str(), m.period.as_str(), row.clone()))
                .or_insert_with(|| AggregateDelta {
                    user_token: user.user_token.clone(),
                    user_id: e.subject.clone(),
                    period: m.period.clone(),
                    row,
                    quantity: "0".into(),
                    amount: String::new(),
                    events: 0,
                });
            d.quantity = add(&d.quantity, quantity)?.to_string();
            if !m.amount.is_empty() {
                d.amount = add(&d.amount, stored(&m.amount)?)?.to_string();
            }
            d.events += 1;
        }
    }
    Ok(deltas.into_values().collect())
}
