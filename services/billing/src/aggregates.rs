//! Aggregates: one record per user and day of the period (`agg.<user>.<YYYY-MM>.<DD>`), and a
//! period record per user and month (`agg.<user>.<YYYY-MM>`) that says whether it is closed.
//! Each record remembers, per partition, the last checkpoint applied to it, so applying one
//! again is a no-op.

use std::collections::BTreeMap;

use futures::{StreamExt, TryStreamExt};
use slipway_common::records::RecordError;
use slipway_proto::v1::{AggregateDelta, UsageAggregate};

use crate::fold::{AT_ONCE, Folder, Stop, add, failed, stored};

impl Folder {
    /// Checkpoint `number` of `partition`'s deltas into the aggregates (each record skips a
    /// checkpoint it applied).
    pub(crate) async fn apply(
        &self,
        partition: &str,
        number: u64,
        deltas: &[AggregateDelta],
    ) -> Result<(), Stop> {
        let mut by_record: BTreeMap<String, Vec<AggregateDelta>> = BTreeMap::new();
        for d in deltas {
            by_record
                .entry(day_key(&d.user_token, &d.period, &d.row))
                .or_default()
                .push(d.clone());
        }
        futures::stream::iter(by_record)
            .map(|(key, deltas)| self.apply_one(key, deltas, partition, number))
            .buffer_unordered(AT_ONCE)
            .try_collect::<Vec<()>>()
            .await?;
        Ok(())
    }

    async fn apply_one(
        &self,
        key: String,
        deltas: Vec<AggregateDelta>,
        partition: &str,
        number: u64,
    ) -> Result<(), Stop> {
        for attempt in 0..16 {
            // What this replica wrote last is the record as long as its revision holds: the
            // revision-checked write below says when it does not, and the record is read then.
            let remembered = if attempt == 0 {
                self.written.take(&key)
            } else {
                None
            };
            let found = match remembered {
                Some(x) => Some(x),
                None => self.aggregates.get(&key).await.map_err(failed)?,
            };
            let (mut agg, revision) = match found {
                Some(x) => x,
                None => (
                    UsageAggregate {
                        user_id: deltas
                            .first()
                            .map(|d| d.user_id.clone())
                            .unwrap_or_default(),
                        period: deltas.first().map(|d| d.period.clone()).unwrap_or_default(),
                        currency: self.prices.currency.clone(),
                        ..Default::default()
                    },
                    0,
                ),
            };
            if agg.applied.get(partition).is_some_and(|n| *n >= number) {
                return Ok(());
            }
            for d in &deltas {
                let row = agg.rows.entry(d.row.clone()).or_default();
                row.quantity = add(&row.quantity, stored(&d.quantity)?)?.to_string();
                if !d.amount.is_empty() {
                    row.amount = add(&row.amount, stored(&d.amount)?)?.to_string();
                }
                row.events += d.events;
            }
            agg.applied.insert(partition.to_string(), number);
            let written = if revision == 0 {
                self.aggregates.create(&key, &agg).await
            } else {
                self.aggregates.update(&key, &agg, revision).await
            };
            match written {
                Ok(revision) => {
                    self.written.keep(key, agg, revision);
                    return Ok(());
                }
                Err(RecordError::Exists { .. } | RecordError::Conflict { .. }) => continue,
                Err(e) => return Err(failed(e)),
            }
        }
        Err(failed(format!("{key} kept changing")))
    }
}

/// The aggregate records this replica wrote last, by key, with their revisions: a batch's
/// update of a user's day then needs no read first. Bounded: past `WRITTEN_MAX` records it
/// starts again empty (a miss only costs the read).
#[derive(Default)]
pub struct Written(std::sync::Mutex<std::collections::HashMap<String, (UsageAggregate, u64)>>);

const WRITTEN_MAX: usize = 20_000;

impl Written {
    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, (UsageAggregate, u64)>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn take(&self, key: &str) -> Option<(UsageAggregate, u64)> {
        self.lock().remove(key)
    }

    fn keep(&self, key: String, agg: UsageAggregate, revision: u64) {
        let mut map = self.lock();
        if map.len() >= WRITTEN_MAX {
            map.clear();
        }
        map.insert(key, (agg, revision));
    }
}

/// A user's period record, `agg.<user>.<YYYY-MM>`: whether the period is closed (Billing 2/2
/// writes it when it closes the period).
pub fn agg_key(user_token: &str, period: &str) -> String {
    format!("agg.{user_token}.{period}")
}

/// Where a row's usage is kept: one record per user and day of the period,
/// `agg.<user>.<YYYY-MM>.<DD>`, so a batch rewrites a day's rows, not a month's; adjustments
/// (rows of another month billed in this one) in `agg.<user>.<YYYY-MM>.adj`.
pub fn day_key(user_token: &str, period: &str, row: &str) -> String {
    let day = row.split('|').next().unwrap_or_default();
    match day.strip_prefix(period).and_then(|d| d.strip_prefix('-')) {
        Some(dd) => format!("agg.{user_token}.{period}.{dd}"),
        None => format!("agg.{user_token}.{period}.adj"),
    }
}
