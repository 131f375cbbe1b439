//! Dedupe claims: first wins by (`source`, `id`). An event claims its entry in
//! `slipway_billing_dedupe` (the hex of 128 bits of SHA-256 of the pair) for the attempt that
//! folds it; a claim is confirmed when its checkpoint is applied. An unconfirmed claim of this
//! partition is from an attempt that died before its checkpoint, and is taken over; one of
//! another partition waits until it settles.

use futures::{StreamExt, TryStreamExt};
use sha2::{Digest, Sha256};
use slipway_common::records::RecordError;
use slipway_proto::v1::{DedupeClaim, FoldCheckpoint};

use crate::fold::{AT_ONCE, Folder, Stop, failed};

/// The dedupe key of an event: 128 bits of SHA-256 of (`source`, `id`), in hex.
pub fn dedupe_key(source: &str, id: &str) -> String {
    let mut h = Sha256::new();
    h.update(source.as_bytes());
    h.update([0u8]);
    h.update(id.as_bytes());
    h.finalize()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// What a claim found.
pub(crate) enum Claim {
    /// The event is this attempt's to count.
    Ours,
    /// It was counted before (a confirmed claim).
    Duplicate,
    /// Another partition's unconfirmed claim: not decided yet.
    Busy,
}

impl Folder {
    /// Claims an event's dedupe entry for checkpoint `number`; `false` when it is a duplicate.
    pub(crate) async fn claim(
        &self,
        key: &str,
        name: &str,
        number: u64,
        nonce: &str,
        usage_sequence: u64,
    ) -> Result<Claim, Stop> {
        let claim = DedupeClaim {
            partition: name.to_string(),
            checkpoint: number,
            nonce: nonce.to_string(),
            committed: false,
            usage_sequence,
        };
        for _ in 0..8 {
            match self.dedupe.create(key, &claim).await {
                Ok(_) => return Ok(Claim::Ours),
                Err(RecordError::Exists { .. }) => {}
                Err(e) => return Err(failed(e)),
            }
            let Some((seen, revision)) = self.dedupe.get(key).await.map_err(failed)? else {
                continue;
            };
            if seen.committed {
                return Ok(Claim::Duplicate);
            }
            if seen.partition != name {
                return Ok(Claim::Busy);
            }
            // Claimed by an attempt of this partition that never wrote its checkpoint.
            match self.dedupe.update(key, &claim, revision).await {
                Ok(_) => return Ok(Claim::Ours),
                Err(RecordError::Conflict { .. }) => continue,
                Err(e) => return Err(failed(e)),
            }
        }
        Err(failed(format!("dedupe entry {key} kept changing")))
    }

    /// Confirms the claims of an applied checkpoint: a later event with the same pair is a
    /// duplicate. Written whatever the claim holds now (an attempt that lost the checkpoint
    /// race may have written over it).
    pub(crate) async fn confirm(&self, cp: &FoldCheckpoint) -> Result<(), Stop> {
        futures::stream::iter(cp.accepted.clone())
            .map(|key| async move {
                let claim = DedupeClaim {
                    partition: cp.partition.clone(),
                    checkpoint: cp.number,
                    nonce: cp.nonce.clone(),
                    committed: true,
                    usage_sequence: 0,
                };
                self.dedupe
                    .store()
                    .put(&key, slipway_common::records::encode(&claim))
                    .await
                    .map(|_| ())
                    .map_err(failed)
            })
            .buffer_unordered(AT_ONCE)
            .try_collect::<Vec<()>>()
            .await?;
        Ok(())
    }
}
