//! Dedupe: first wins by (`source`, `id`), whatever the event's time or `Nats-Msg-Id`.
//!
//! Each end-user has an index in `slipway_billing_dedupe`, `u.<user_token>`: the keys (the first
//! 16 bytes of SHA-256 of the pair) of the user's events first seen in the last
//! `BILLING_DEDUPE_DAYS` of stream time, by the day first seen. It is written when a checkpoint is applied, one
//! revision-checked write per user per batch: the write decides which of the checkpoint's events
//! are first, and tags the keys it adds with the checkpoint (partition, number). Applying that
//! checkpoint again (a new holder completing it, or a stalled one resuming) finds its group and
//! gets the same answer; a checkpoint of another partition that added a key first (a `P` change
//! draining) makes the event a duplicate here. Nothing is written before the checkpoint, so an
//! attempt that dies early leaves nothing to take over.
//!
//! Past `SEAL_AT` settled keys, they are sealed into a chunk of their own (`u.<user_token>.<hex>`,
//! written once and listed in the index), so values stay far below the message limit.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use sha2::{Digest, Sha256};
use slipway_common::records::RecordError;
use slipway_common::topology::{BILLING_DEDUPE_DAYS, BILLING_DEDUPE_KEEP_DAYS};
use slipway_proto::v1::{DedupeChunk, DedupeGroup, DedupeIndex, DedupeKeys, FoldCheckpoint};

use crate::fold::{Folder, Stop, failed, fenced};
use crate::prices::day;

/// A dedupe key: the first 16 bytes of SHA-256 of (`source`, `id`).
pub type Key = [u8; 16];

/// Settled keys kept in the index itself (16 KiB); past it they are sealed into a chunk, so a
/// batch rewrites a small record however many events the user has.
pub const SEAL_AT: usize = 1024;

/// The dedupe key of an event.
pub fn dedupe_key(source: &str, id: &str) -> Key {
    let mut h = Sha256::new();
    h.update(source.as_bytes());
    h.update([0u8]);
    h.update(id.as_bytes());
    let mut key = [0u8; 16];
    key.copy_from_slice(&h.finalize()[..16]);
    key
}

pub fn index_key(user_token: &str) -> String {
    format!("u.{user_token}")
}

fn keys_of(bytes: &[u8]) -> impl Iterator<Item = Key> + '_ {
    bytes.chunks_exact(16).map(|c| {
        let mut k = [0u8; 16];
        k.copy_from_slice(c);
        k
    })
}

/// A user's index as read or written, with its revision and every key it holds (its chunks'
/// too), so the next batch of the user needs no read.
#[derive(Clone)]
struct Known {
    index: DedupeIndex,
    revision: u64,
    keys: HashSet<Key>,
}

/// User indexes this replica wrote last, bounded by the keys they hold (a miss only costs a
/// read).
pub struct Indexes {
    remembered: Mutex<(HashMap<String, Known>, usize)>,
    max_keys: usize,
}

const REMEMBERED_KEYS_MAX: usize = 4_000_000;

impl Default for Indexes {
    fn default() -> Self {
        Self::with_limit(REMEMBERED_KEYS_MAX)
    }
}

impl Indexes {
    fn with_limit(max_keys: usize) -> Self {
        Self {
            remembered: Mutex::new((HashMap::new(), 0)),
            max_keys,
        }
    }

    /// The remembered indexes and how many keys they hold.
    fn lock(&self) -> std::sync::MutexGuard<'_, (HashMap<String, Known>, usize)> {
        self.remembered.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn take(&self, user_token: &str) -> Option<Known> {
        let mut guard = self.lock();
        let (map, held) = &mut *guard;
        let known = map.remove(user_token)?;
        *held = held.saturating_sub(known.keys.len());
        Some(known)
    }

    fn keep(&self, user_token: &str, known: Known) {
        // A user this heavy is read each time rather than push everyone else out.
        if known.keys.len() > self.max_keys / 8 {
            return;
        }
        let mut guard = self.lock();
        let (map, held) = &mut *guard;
        if *held + known.keys.len() > self.max_keys {
            map.clear();
            *held = 0;
        }
        *held += known.keys.len();
        if let Some(old) = map.insert(user_token.to_string(), known) {
            *held = held.saturating_sub(old.keys.len());
        }
    }
}

/// Whether the bucket may have removed `chunk` by now (a day's margin for clocks).
fn expired(chunk: &DedupeChunk) -> bool {
    let keep = i64::from(BILLING_DEDUPE_KEEP_DAYS.saturating_sub(1)) * 86_400;
    let now = slipway_common::service::now().seconds;
    chunk
        .sealed_at
        .as_ref()
        .is_some_and(|t| t.seconds.saturating_add(keep) < now)
}

/// The day a checkpoint whose newest event was stored at `ms` files its keys under, and the
/// first day it keeps.
pub fn days_of(ms: i64) -> (String, String) {
    let window = i64::from(BILLING_DEDUPE_DAYS) * 86_400_000;
    (day(ms), day(ms.saturating_sub(window)))
}

impl Folder {
    /// Which of `keys` (a user's events in checkpoint `cp`, distinct) are first seen: decided by
    /// the first write of the user's index for this checkpoint, and read back from it after.
    pub(crate) async fn first_seen(
        &self,
        cp: &FoldCheckpoint,
        (day, cut): (&str, &str),
        user_token: &str,
        keys: &[Key],
    ) -> Result<Vec<bool>, Stop> {
        let key = index_key(user_token);
        for attempt in 0..16 {
            let remembered = if attempt == 0 {
                self.indexes.take(user_token)
            } else {
                None
            };
            let mut known = match remembered {
                Some(k) => k,
                None => self.read_index(&key, cut).await?,
            };
            if let Some(g) = known
                .index
                .groups
                .iter()
                .find(|g| g.partition == cp.partition)
            {
                if g.checkpoint == cp.number {
                    let ours: HashSet<Key> = keys_of(&g.keys).collect();
                    let first = keys.iter().map(|k| ours.contains(k)).collect();
                    self.indexes.keep(user_token, known);
                    return Ok(first);
                }
                if g.checkpoint > cp.number {
                    return Err(fenced(format!(
                        "{key} holds checkpoint {} of {}: past {}",
                        g.checkpoint, cp.partition, cp.number
                    )));
                }
            }
            let first: Vec<bool> = keys.iter().map(|k| !known.keys.contains(k)).collect();
            if !first.iter().any(|f| *f) {
                // Nothing to add: every one is a duplicate, and stays one.
                self.indexes.keep(user_token, known);
                return Ok(first);
            }
            let added: Vec<Key> = keys
                .iter()
                .zip(&first)
                .filter(|(_, f)| **f)
                .map(|(k, _)| *k)
                .collect();
            let chunk_dropped = add_group(&mut known, cp, (day, cut), &added);
            self.seal(&key, &mut known, day).await?;
            let written = if known.revision == 0 {
                self.dedupe.create(&key, &known.index).await
            } else {
                self.dedupe.update(&key, &known.index, known.revision).await
            };
            match written {
                Ok(revision) => {
                    known.revision = revision;
                    known.keys.extend(added);
                    // A dropped chunk's keys are only gone from a fresh read.
                    if !chunk_dropped {
                        self.indexes.keep(user_token, known);
                    }
                    return Ok(first);
                }
                Err(RecordError::Exists { .. } | RecordError::Conflict { .. }) => continue,
                Err(e) => return Err(failed(e)),
            }
        }
        Err(failed(format!("{key} kept changing")))
    }

    /// The index and every key it holds, its chunks' too (empty, revision 0, when there is none).
    async fn read_index(&self, key: &str, cut: &str) -> Result<Known, Stop> {
        let Some((index, revision)) = self.dedupe.get(key).await.map_err(failed)? else {
            return Ok(Known {
                index: DedupeIndex::default(),
                revision: 0,
                keys: HashSet::new(),
            });
        };
        let mut keys: HashSet<Key> = index
            .settled
            .values()
            .flat_map(|b| keys_of(b))
            .chain(index.groups.iter().flat_map(|g| keys_of(&g.keys)))
            .collect();
        for chunk in &index.chunks {
            match self.chunks.get(&chunk.key).await.map_err(failed)? {
                Some((sealed, _)) => keys.extend(keys_of(&sealed.keys)),
                // Past the window it has aged out. Within it, a chunk is written before the index
                // that lists it, so a miss is a stale read (a lagging replica): never taken for
                // "no keys", which would count its duplicates again.
                None if chunk.last_day.as_str() < cut => {}
                // Written long enough ago for the bucket to have removed it: a fold that far
                // behind the stream loses those keys (logged) rather than stop the partition.
                None if expired(chunk) => {
                    tracing::warn!(%key, chunk = %chunk.key, last_day = %chunk.last_day, "a sealed chunk aged out of the bucket while still in the window: its keys are lost");
                }
                None => return Err(failed(format!("{key}: chunk {} not found", chunk.key))),
            }
        }
        Ok(Known {
            index,
            revision,
            keys,
        })
    }
}

/// Replaces this partition's previous group (settled under its day) with the checkpoint's, and
/// drops what is older than `cut`; `true` when a chunk was dropped (its keys are still in
/// `known.keys`).
fn add_group(
    known: &mut Known,
    cp: &FoldCheckpoint,
    (day, cut): (&str, &str),
    added: &[Key],
) -> bool {
    let index = &mut known.index;
    if let Some(at) = index
        .groups
        .iter()
        .position(|g| g.partition == cp.partition)
    {
        let old = index.groups.remove(at);
        index
            .settled
            .entry(old.day)
            .or_default()
            .extend_from_slice(&old.keys);
    }
    index.groups.push(DedupeGroup {
        partition: cp.partition.clone(),
        checkpoint: cp.number,
        day: day.to_string(),
        keys: added.iter().flatten().copied().collect(),
    });
    let mut dropped = Vec::new();
    index.settled.retain(|d, keys| {
        let keep = d.as_str() >= cut;
        if !keep {
            dropped.extend(keys_of(keys));
        }
        keep
    });
    // Other partitions' groups too (a count of `P` no longer in use leaves its groups).
    index.groups.retain(|g| {
        let keep = g.day.as_str() >= cut;
        if !keep {
            dropped.extend(keys_of(&g.keys));
        }
        keep
    });
    let chunks = index.chunks.len();
    index.chunks.retain(|c| c.last_day.as_str() >= cut);
    for k in dropped {
        known.keys.remove(&k);
    }
    chunks != index.chunks.len()
}

impl Folder {
    /// Seals the settled keys into a chunk of their own when there are more than `SEAL_AT`.
    async fn seal(&self, key: &str, known: &mut Known, day: &str) -> Result<(), Stop> {
        let settled: usize = known.index.settled.values().map(|b| b.len() / 16).sum();
        if settled <= SEAL_AT {
            return Ok(());
        }
        let last_day = known
            .index
            .settled
            .keys()
            .max()
            .cloned()
            .unwrap_or_else(|| day.to_string());
        let chunk_key = format!("{key}.{:016x}", rand::random::<u64>());
        let sealed = DedupeKeys {
            keys: known.index.settled.values().flatten().copied().collect(),
        };
        self.chunks
            .create(&chunk_key, &sealed)
            .await
            .map_err(failed)?;
        known.index.settled.clear();
        known.index.chunks.push(DedupeChunk {
            key: chunk_key,
            last_day,
            count: settled as u32,
            sealed_at: Some(slipway_common::service::now()),
        });
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use slipway_common::records::Records;
    use slipway_test_support::NatsServer;

    /// A folder on the real buckets of a fresh server (no partitions folded: only its dedupe).
    async fn folder(nats: &NatsServer) -> Folder {
        let env = vec![("SLIPWAY__NATS__URL".to_string(), nats.url())];
        let (_, client) = slipway_test_support::set_up_topology(&nats.url(), &env)
            .await
            .unwrap();
        let js = async_nats::jetstream::new(client);
        let store = js.get_key_value("slipway_billing").await.unwrap();
        let dedupe = js.get_key_value("slipway_billing_dedupe").await.unwrap();
        Folder {
            checkpoints: Records::new(store.clone()),
            completions: Records::new(store.clone()),
            aggregates: Records::new(store),
            dedupe: Records::new(dedupe.clone()),
            chunks: Records::new(dedupe),
            billed: crate::billed::BilledPublisher::new(js).await.unwrap(),
            prices: crate::prices::Prices::new("USD", &Default::default()).unwrap(),
            skew_ms: 0,
            lateness_ms: 0,
            max_checkpoint_bytes: 1 << 20,
            metrics: crate::metrics::BillingMetrics::register(
                &slipway_common::metrics::Metrics::new(),
            ),
            written: Default::default(),
            indexes: Default::default(),
            completed: Default::default(),
        }
    }

    fn cp(partition: &str, number: u64) -> FoldCheckpoint {
        FoldCheckpoint {
            partition: partition.into(),
            number,
            ..Default::default()
        }
    }

    fn key(n: u32) -> Key {
        dedupe_key("slipway/executor", &format!("sbx{n}:sandbox_seconds"))
    }

    const DAYS: (&str, &str) = ("2026-11-28", "2026-10-23");

    #[tokio::test]
    async fn the_first_checkpoint_to_write_a_key_wins_and_keeps_its_answer() {
        let nats = NatsServer::start().unwrap();
        let f = folder(&nats).await;
        let a = cp("0-of-8", 1);
        assert_eq!(
            f.first_seen(&a, DAYS, "u1", &[key(1), key(2)]).await.ok(),
            Some(vec![true, true])
        );
        // Another partition (a change of P draining) with one key in common: a duplicate there.
        let b = cp("3-of-16", 7);
        assert_eq!(
            f.first_seen(&b, DAYS, "u1", &[key(2), key(3)]).await.ok(),
            Some(vec![false, true])
        );
        // The first checkpoint applied again (a new holder completing it, with nothing
        // remembered): the same answer, read back from its group.
        let fresh = folder(&nats).await;
        assert_eq!(
            fresh
                .first_seen(&a, DAYS, "u1", &[key(1), key(2)])
                .await
                .ok(),
            Some(vec![true, true])
        );
        // The partition's next checkpoint: what it counted is a duplicate now.
        let next = cp("0-of-8", 2);
        assert_eq!(
            fresh
                .first_seen(&next, DAYS, "u1", &[key(1), key(4)])
                .await
                .ok(),
            Some(vec![false, true])
        );
        // A stalled holder coming back with checkpoint 1 after 2 was applied, reading the
        // index: stopped, not answered from keys that have since moved on. (One that still
        // remembers its own write gets the answer checkpoint 1 had; its publish is then refused
        // by the subjects' expected sequences.)
        match folder(&nats)
            .await
            .first_seen(&a, DAYS, "u1", &[key(1)])
            .await
        {
            Err(Stop::Fenced(why)) => assert!(why.contains("past 1"), "{why}"),
            _ => panic!("a stale checkpoint must be fenced"),
        }
        // Another user's index is its own.
        assert_eq!(
            f.first_seen(&next, DAYS, "u2", &[key(1)]).await.ok(),
            Some(vec![true])
        );
    }

    #[tokio::test]
    async fn keys_past_the_seal_go_to_chunks_and_still_count_as_seen() {
        let nats = NatsServer::start().unwrap();
        let f = folder(&nats).await;
        let per_batch = 400u32;
        let batches = (SEAL_AT as u32 * 3) / per_batch + 1;
        for b in 0..batches {
            let keys: Vec<Key> = (b * per_batch..(b + 1) * per_batch).map(key).collect();
            let first = f
                .first_seen(&cp("0-of-8", u64::from(b) + 1), DAYS, "heavy", &keys)
                .await
                .ok()
                .unwrap();
            assert!(first.iter().all(|f| *f), "batch {b} is all new");
            // Sealed exactly when the settled keys (earlier batches') pass SEAL_AT.
            let (index, _) = f.dedupe.get(&index_key("heavy")).await.unwrap().unwrap();
            let settled: usize = index.settled.values().map(|b| b.len() / 16).sum();
            let before = b as usize * per_batch as usize;
            let sealed_at = SEAL_AT - SEAL_AT % per_batch as usize + per_batch as usize;
            if before < sealed_at {
                assert!(index.chunks.is_empty(), "batch {b}: not sealed yet");
                assert_eq!(settled, before, "batch {b}");
            } else if before == sealed_at {
                assert_eq!(index.chunks.len(), 1, "batch {b}: sealed once");
                assert_eq!(index.chunks[0].count as usize, sealed_at);
                assert_eq!(settled, 0, "batch {b}");
            }
        }
        let (index, _) = f.dedupe.get(&index_key("heavy")).await.unwrap().unwrap();
        assert!(index.chunks.len() >= 2, "sealed: {:?}", index.chunks.len());
        let settled: usize = index.settled.values().map(|b| b.len() / 16).sum();
        assert!(settled <= SEAL_AT, "the index stays small: {settled}");
        // Read from nothing remembered: every old key, sealed or not, is a duplicate.
        let fresh = folder(&nats).await;
        let old: Vec<Key> = [0, 1, per_batch, SEAL_AT as u32 + 5, batches * per_batch - 1]
            .into_iter()
            .map(key)
            .collect();
        let mut probe = old.clone();
        probe.push(key(batches * per_batch + 10));
        let first = fresh
            .first_seen(&cp("0-of-8", u64::from(batches) + 1), DAYS, "heavy", &probe)
            .await
            .ok()
            .unwrap();
        assert_eq!(first, [vec![false; old.len()], vec![true]].concat());
    }

    #[tokio::test]
    async fn keys_older_than_the_window_are_dropped_from_the_index() {
        let nats = NatsServer::start().unwrap();
        let f = folder(&nats).await;
        let old_days = ("2026-09-01", "2026-07-27");
        f.first_seen(&cp("0-of-8", 1), old_days, "u", &[key(1)])
            .await
            .ok()
            .unwrap();
        f.first_seen(&cp("0-of-8", 2), old_days, "u", &[key(2)])
            .await
            .ok()
            .unwrap();
        // Checkpoint 3 is written 88 days later: 1 and 2 settled under 2026-09-01, now gone.
        let fresh = folder(&nats).await;
        fresh
            .first_seen(&cp("0-of-8", 3), DAYS, "u", &[key(3)])
            .await
            .ok()
            .unwrap();
        let (index, _) = fresh.dedupe.get(&index_key("u")).await.unwrap().unwrap();
        assert!(
            index.settled.keys().all(|d| d.as_str() >= DAYS.1),
            "{:?}",
            index.settled.keys().collect::<Vec<_>>()
        );
        // Forgotten past the window (the lateness refuses such events before they get here);
        // what is within it is still a duplicate.
        let again = folder(&nats).await;
        assert_eq!(
            again
                .first_seen(&cp("0-of-8", 4), DAYS, "u", &[key(1), key(3)])
                .await
                .ok(),
            Some(vec![true, false])
        );
    }

    #[tokio::test]
    async fn what_the_window_drops_is_dropped_from_what_a_replica_remembers_too() {
        let nats = NatsServer::start().unwrap();
        let f = folder(&nats).await;
        let old_days = ("2026-09-01", "2026-07-27");
        // Settled keys of an old day, and an old group of a count of P no longer in use.
        for (c, k) in [(cp("0-of-8", 1), 1), (cp("0-of-8", 2), 2)] {
            f.first_seen(&c, old_days, "u", &[key(k)])
                .await
                .ok()
                .unwrap();
        }
        f.first_seen(&cp("1-of-4", 9), old_days, "u", &[key(5)])
            .await
            .ok()
            .unwrap();
        // A checkpoint of today, by the same replica: the old keys go from its memory as well.
        f.first_seen(&cp("0-of-8", 3), DAYS, "u", &[key(3)])
            .await
            .ok()
            .unwrap();
        assert_eq!(
            f.first_seen(
                &cp("0-of-8", 4),
                DAYS,
                "u",
                &[key(1), key(2), key(5), key(3)]
            )
            .await
            .ok(),
            Some(vec![true, true, true, false])
        );
        let (index, _) = f.dedupe.get(&index_key("u")).await.unwrap().unwrap();
        assert!(
            index.groups.iter().all(|g| g.partition != "1-of-4"),
            "the old count's group is gone"
        );
    }

    #[tokio::test]
    async fn a_listed_chunk_missing_within_the_window_is_not_taken_for_no_keys() {
        let nats = NatsServer::start().unwrap();
        let f = folder(&nats).await;
        let keys: Vec<Key> = (0..SEAL_AT as u32 + 1).map(key).collect();
        for (n, batch) in [&keys[..], &[key(90_000)], &[key(90_001)]]
            .iter()
            .enumerate()
        {
            f.first_seen(&cp("0-of-8", n as u64 + 1), DAYS, "u", batch)
                .await
                .ok()
                .unwrap();
        }
        let (index, _) = f.dedupe.get(&index_key("u")).await.unwrap().unwrap();
        assert_eq!(index.chunks.len(), 1);
        f.chunks.store().purge(&index.chunks[0].key).await.unwrap();
        // A replica reading the index now: a stale read, not "no keys" (which would count
        // the sealed keys' duplicates again).
        match folder(&nats)
            .await
            .first_seen(&cp("0-of-8", 4), DAYS, "u", &[key(0)])
            .await
        {
            Err(Stop::Failed(why)) => assert!(why.contains("not found"), "{why}"),
            _ => panic!("a missing chunk within the window must fail the batch"),
        }
        // Its last day is the window's first: still within it.
        let edge = ("2027-01-03", DAYS.0);
        assert!(matches!(
            folder(&nats)
                .await
                .first_seen(&cp("0-of-8", 4), edge, "u", &[key(0)])
                .await,
            Err(Stop::Failed(_))
        ));
        // Written longer ago than the bucket keeps values: gone for good, and the partition
        // goes on (the keys are lost, which is logged).
        let mut aged = index.clone();
        aged.chunks[0].sealed_at = Some(pbjson_types::Timestamp {
            seconds: slipway_common::service::now().seconds - 61 * 86_400,
            nanos: 0,
        });
        let (_, revision) = f.dedupe.get(&index_key("u")).await.unwrap().unwrap();
        f.dedupe
            .update(&index_key("u"), &aged, revision)
            .await
            .unwrap();
        assert_eq!(
            folder(&nats)
                .await
                .first_seen(&cp("0-of-8", 4), DAYS, "u", &[key(0)])
                .await
                .ok(),
            Some(vec![true])
        );
        // Past the window, the same chunk has simply aged out.
        let later = ("2027-02-01", "2026-12-27");
        assert_eq!(
            folder(&nats)
                .await
                .first_seen(&cp("0-of-8", 4), later, "u", &[key(0)])
                .await
                .ok(),
            Some(vec![true])
        );
    }

    fn known(n: u32) -> Known {
        Known {
            index: DedupeIndex::default(),
            revision: u64::from(n),
            keys: (0..n).map(key).collect(),
        }
    }

    #[test]
    fn remembered_indexes_are_bounded_by_the_keys_they_hold() {
        let r = Indexes::with_limit(80);
        r.keep("a", known(10));
        assert_eq!(r.take("a").map(|k| k.revision), Some(10));
        assert!(r.take("a").is_none(), "taken once");
        // One user past an eighth of the limit is not remembered at all.
        r.keep("heavy", known(11));
        assert!(r.take("heavy").is_none());
        // Eight users of 10 fit; a ninth starts again empty, holding only itself.
        for u in 0..8 {
            r.keep(&format!("u{u}"), known(10));
        }
        assert_eq!(r.lock().1, 80);
        r.keep("u8", known(10));
        assert_eq!(r.lock().1, 10);
        assert!(r.take("u0").is_none());
        assert!(r.take("u8").is_some());
        // Keeping a user again replaces it, counted once.
        r.keep("v", known(10));
        r.keep("v", known(5));
        assert_eq!(r.lock().1, 5);
    }

    #[test]
    fn keys_differ_by_source_and_by_id_and_do_not_run_together() {
        let a = dedupe_key("slipway/executor", "run1:step:0");
        assert_eq!(a, dedupe_key("slipway/executor", "run1:step:0"));
        assert_ne!(a, dedupe_key("slipway/planner", "run1:step:0"));
        assert_ne!(a, dedupe_key("slipway/executor", "run1:step:1"));
        // The separator keeps ("ab", "c") apart from ("a", "bc").
        assert_ne!(dedupe_key("ab", "c"), dedupe_key("a", "bc"));
    }

    #[test]
    fn the_window_is_counted_back_in_days() {
        // 2026-03-05T12:00:00Z
        let (day, cut) = days_of(1_772_712_000_000);
        assert_eq!((day.as_str(), cut.as_str()), ("2026-03-05", "2026-01-28"));
    }
}
