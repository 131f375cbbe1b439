//! The fold: one pinned partition of `USAGE` at a time, each batch folded exactly once.
//!
//! KV has no multi-key transaction, so a batch commits in an order that a crash anywhere can be
//! completed from:
//!
//! 0. the partition's last checkpoint is completed first (applied, published) if it is not;
//! 1. each event is checked, and the invalid are refused (to `USAGE_REJECTED`, by the worker);
//! 2. each valid event claims its dedupe entry (`claims`): first wins, whatever its time or
//!    `Nats-Msg-Id`;
//! 3. the checkpoint (`cp.<P>.<p>`) is written at the revision read: the accepted events, the
//!    aggregate deltas and every user's `BILLED` messages. A failed write means another holder
//!    (`Fenced`);
//! 4. it is applied (`aggregates`: each record skips a checkpoint it has applied), and its
//!    claims are confirmed;
//! 5. its `BILLED` messages are published (see `billed`);
//! 6. it is marked published, and the batch is acknowledged.

use std::collections::{BTreeMap, BTreeSet, HashSet};
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
use crate::claims::{Claim, dedupe_key};
use crate::decimal::Decimal;
use crate::metrics::BillingMetrics;
use crate::prices::{Prices, day, period};
use crate::validate::{self, Window};

/// Store operations in flight at once.
pub(crate) const AT_ONCE: usize = 256;

pub struct Folder {
    pub(crate) checkpoints: Records<FoldCheckpoint>,
    pub(crate) aggregates: Records<UsageAggregate>,
    pub(crate) dedupe: Records<DedupeClaim>,
    pub(crate) billed: BilledPublisher,
    pub(crate) prices: Prices,
    pub(crate) skew_ms: i64,
    pub(crate) lateness_ms: i64,
    /// Largest checkpoint record written; a batch that would make a larger one is cut.
    pub(crate) max_checkpoint_bytes: usize,
    pub(crate) metrics: BillingMetrics,
    /// Aggregate records as this replica last wrote them, with their revisions (`aggregates`).
    pub(crate) written: crate::aggregates::Written,
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

/// An accepted event on its way into a checkpoint.
struct Accepted {
    key: String,
    user_token: String,
    period: String,
    row: String,
    quantity: Decimal,
    amount: Option<Decimal>,
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
        let (last, revision) = self.complete(&key, &name).await?;

        // 1. Checked; the invalid refused.
        let mut outcomes: Vec<Result<(), HandlerError>> = vec![Ok(()); items.len()];
        let mut valid = Vec::new();
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
                Ok(v) => valid.push((i, v)),
                Err(r) => {
                    self.metrics.rejected(r.code);
                    outcomes[i] = Err(HandlerError::permanent(r.code, r.reason));
                }
            }
        }

        // 2. Claimed: first wins, within the batch too.
        let number = last + 1;
        let nonce = format!("{:016x}", rand::random::<u64>());
        let mut seen = HashSet::new();
        let unique: Vec<_> = valid
            .into_iter()
            .filter_map(|(i, v)| {
                let e = &items[i].message;
                let k = dedupe_key(&e.source, &e.id);
                seen.insert(k.clone()).then_some((i, v, k))
            })
            .collect();
        let wanted: Vec<(String, u64)> = unique
            .iter()
            .map(|(i, _, k)| (k.clone(), items[*i].delivery.stream_sequence))
            .collect();
        let (name_ref, nonce_ref) = (&name, &nonce);
        let claims: Vec<Claim> = futures::stream::iter(wanted)
            .map(|(k, seq)| async move { self.claim(&k, name_ref, number, nonce_ref, seq).await })
            .buffered(AT_ONCE)
            .try_collect()
            .await?;
        let mut ours = Vec::new();
        for (c, claim) in unique.into_iter().zip(claims) {
            match claim {
                Claim::Ours => ours.push(c),
                Claim::Duplicate => {}
                // Another partition's attempt holds it (a P change in progress, or the same
                // fact under another user): it comes back once that attempt is settled.
                Claim::Busy => {
                    outcomes[c.0] = Err(HandlerError::retry(
                        Duration::from_secs(1),
                        "claimed by another partition's unfinished batch",
                    ));
                }
            }
        }
        let refused = outcomes.iter().filter(|o| o.is_err()).count();
        self.metrics
            .duplicates((items.len() - refused - ours.len()) as u64);
        if ours.is_empty() {
            return Ok(outcomes);
        }
        // Which of the users' periods are closed (the rule of adjustments lives here).
        let pairs: BTreeSet<(String, String)> = ours
            .iter()
            .map(|(_, v, _)| (v.user_token.clone(), period(v.time_ms)))
            .collect();
        let closed: HashSet<(String, String)> = futures::stream::iter(pairs)
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
            .collect();
        let mut accepted: Vec<Accepted> = ours
            .into_iter()
            .map(|(i, v, k)| {
                let own = period(v.time_ms);
                let is_closed = closed.contains(&(v.user_token.clone(), own));
                // The open period: the one the stream stored it in.
                let open = period(items[i].delivery.published_ms);
                self.price(&items[i], v, k, is_closed.then_some(open.as_str()))
            })
            .collect();

        // Each user's BILLED floor, recorded in the checkpoint for recovery.
        let users: BTreeSet<String> = accepted.iter().map(|a| a.user_token.clone()).collect();
        let floors = self
            .billed
            .floors(&name, number, users.into_iter().collect())
            .await
            .map_err(failed)?;

        // 3. The checkpoint, written first.
        let first_sequence = items.first().map_or(0, |i| i.delivery.stream_sequence);
        let last_sequence = items.last().map_or(0, |i| i.delivery.stream_sequence);
        let build = |accepted: &[Accepted]| {
            checkpoint(
                &name,
                number,
                &nonce,
                first_sequence,
                last_sequence,
                accepted,
                &floors,
            )
        };
        let mut cp = build(&accepted)?;
        // A batch whose record would not fit in one KV value is cut: the rest comes back.
        while prost::Message::encoded_len(&cp) > self.max_checkpoint_bytes && accepted.len() > 1 {
            let keep = accepted.len() / 2;
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
            cp = build(&accepted)?;
        }
        let written = if revision == 0 {
            self.checkpoints.create(&key, &cp).await
        } else {
            self.checkpoints.update(&key, &cp, revision).await
        };
        let revision = match written {
            Ok(r) => r,
            Err(RecordError::Exists { .. } | RecordError::Conflict { .. }) => {
                self.metrics.fence_conflict();
                return Err(fenced(format!("{key} was written by another holder")));
            }
            Err(e) => return Err(failed(e)),
        };
        failpoint::hit("billing.after_checkpoint");

        // 4-6. Applied, published, marked.
        self.finish(&key, cp, revision, false).await?;
        self.metrics.folded(accepted.len() as u64);
        self.metrics
            .checkpoint_latency(started.elapsed().as_secs_f64());
        failpoint::hit("billing.after_published");
        Ok(outcomes)
    }

    /// Completes the partition's last checkpoint if an earlier holder left it unfinished;
    /// answers its number and the record's revision (0 and 0 when there is none).
    async fn complete(&self, key: &str, name: &str) -> Result<(u64, u64), Stop> {
        let Some((cp, revision)) = self.checkpoints.get(key).await.map_err(failed)? else {
            return Ok((0, 0));
        };
        if cp.partition != name {
            return Err(fenced(format!("{key} belongs to `{}`", cp.partition)));
        }
        if cp.state == CheckpointState::Published as i32 {
            return Ok((cp.number, revision));
        }
        let number = cp.number;
        let revision = self.finish(key, cp, revision, true).await?;
        Ok((number, revision))
    }

    /// Steps 4 to 6 for a written checkpoint; answers the record's final revision.
    async fn finish(
        &self,
        key: &str,
        mut cp: FoldCheckpoint,
        mut revision: u64,
        recovering: bool,
    ) -> Result<u64, Stop> {
        if cp.state == CheckpointState::Written as i32 {
            self.apply(&cp).await?;
            self.confirm(&cp).await?;
            cp.state = CheckpointState::Applied.into();
            revision = self.mark(key, &cp, revision).await?;
            failpoint::hit("billing.after_apply");
        }
        match self.billed.publish(&cp, recovering).await {
            Ok(()) => {}
            Err(BilledError::SecondWriter { subject, expected }) => {
                self.metrics.second_writer();
                tracing::error!(%subject, expected, partition = %cp.partition, "a second writer on BILLED: the partition stops here");
                return Err(fenced(format!("a second writer on {subject}")));
            }
            Err(e) => return Err(failed(e)),
        }
        cp.state = CheckpointState::Published.into();
        self.mark(key, &cp, revision).await
    }

    async fn mark(&self, key: &str, cp: &FoldCheckpoint, revision: u64) -> Result<u64, Stop> {
        match self.checkpoints.update(key, cp, revision).await {
            Ok(r) => Ok(r),
            Err(RecordError::Conflict { .. }) => {
                self.metrics.fence_conflict();
                Err(fenced(format!("{key} changed under this holder")))
            }
            Err(e) => Err(failed(e)),
        }
    }

    /// Prices an accepted event and places it in its period: its own, or `open` as an
    /// adjustment when its own is closed.
    fn price(
        &self,
        item: &Item<UsageEvent>,
        v: validate::Valid,
        key: String,
        open: Option<&str>,
    ) -> Accepted {
        let e = &item.message;
        let own = period(v.time_ms);
        let (billed_period, adjustment) = match open {
            Some(p) => (p.to_string(), true),
            None => (own.clone(), false),
        };
        let priced = self.prices.price(&e.meter, v.quantity);
        let billed = BilledUsage {
            event: Some(e.clone()),
            period: billed_period.clone(),
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
            key,
            user_token: v.user_token,
            period: billed_period,
            row: format!("{}|{}|{}", day(v.time_ms), e.meter, e.project_id),
            quantity: v.quantity,
            amount: priced.map(|(_, a)| a),
            billed,
        }
    }
}

fn checkpoint(
    name: &str,
    number: u64,
    nonce: &str,
    first_sequence: u64,
    last_sequence: u64,
    accepted: &[Accepted],
    floors: &std::collections::HashMap<String, u64>,
) -> Result<FoldCheckpoint, Stop> {
    let mut deltas: BTreeMap<(String, String, String), AggregateDelta> = BTreeMap::new();
    let mut billed: BTreeMap<String, Vec<BilledUsage>> = BTreeMap::new();
    for a in accepted {
        let d = deltas
            .entry((a.user_token.clone(), a.period.clone(), a.row.clone()))
            .or_insert_with(|| AggregateDelta {
                user_token: a.user_token.clone(),
                user_id: a
                    .billed
                    .event
                    .as_ref()
                    .map(|e| e.subject.clone())
                    .unwrap_or_default(),
                period: a.period.clone(),
                row: a.row.clone(),
                quantity: "0".into(),
                amount: String::new(),
                events: 0,
            });
        d.quantity = add(&d.quantity, a.quantity)?.to_string();
        if let Some(amount) = a.amount {
            d.amount = add(&d.amount, amount)?.to_string();
        }
        d.events += 1;
        billed
            .entry(a.user_token.clone())
            .or_default()
            .push(a.billed.clone());
    }
    Ok(FoldCheckpoint {
        number,
        partition: name.to_string(),
        state: CheckpointState::Written.into(),
        first_sequence,
        last_sequence,
        accepted: accepted.iter().map(|a| a.key.clone()).collect(),
        deltas: deltas.into_values().collect(),
        billed: billed
            .into_iter()
            .map(|(user_token, messages)| UserBilled {
                floor: floors.get(&user_token).copied().unwrap_or(0),
                user_token,
                messages,
            })
            .collect(),
        nonce: nonce.to_string(),
        written_at: Some(now()),
    })
}
