//! Leases, for the work that has no stream to pin: the executor's usage sampler and each of its
//! file-watch relays run on one replica at a time, but no consumer delivers them, so the server
//! cannot pin them to a client. (Work that arrives on a stream uses the server's pinned
//! consumers instead.) A lease is a `Lease` record in `slipway_leases`
//! ([`crate::topology::buckets::LEASES`]) under its encoded name; it is taken, renewed and
//! released only at the revision last read, so two holders never both believe they hold it, and
//! that revision is the fencing token a holder passes on to its effects.
//!
//! Expiry compares wall clocks across replicas: a lease's time to live must be well above the
//! clock skew between them.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::jetstream::kv;
use slipway_proto::v1::Lease;

use crate::keys::{self, KeyError};
use crate::records::{RecordError, Records};

#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error("lease `{name}` is lost: it changed since revision {revision} (taken over, or ended)")]
    Lost { name: String, revision: u64 },
    #[error("lease `{name}`: {source}")]
    Name {
        name: String,
        #[source]
        source: KeyError,
    },
    #[error("a lease holder must be named")]
    NoHolder,
    #[error("a lease must last longer than zero and end before the clock does ({0:?})")]
    Ttl(Duration),
    #[error(transparent)]
    Record(#[from] RecordError),
}

/// A lease this holder took, at the revision it was written.
#[derive(Debug, Clone, PartialEq)]
pub struct Held {
    name: String,
    key: String,
    revision: u64,
    lease: Lease,
}

impl Held {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The fencing token: it grows with every acquisition and renewal, so an effect written with
    /// it can be told apart from one of an earlier holder.
    pub fn revision(&self) -> u64 {
        self.revision
    }

    pub fn lease(&self) -> &Lease {
        &self.lease
    }
}

/// The leases of one holder.
#[derive(Clone)]
pub struct Leases {
    records: Records<Lease>,
    holder: String,
}

impl Leases {
    /// `holder` must be unique per process: a lease held under the same name by a process that
    /// died would otherwise look like one's own.
    pub fn new(store: kv::Store, holder: impl Into<String>) -> Result<Self, LeaseError> {
        let holder = holder.into();
        if holder.is_empty() {
            return Err(LeaseError::NoHolder);
        }
        Ok(Self {
            records: Records::new(store),
            holder,
        })
    }

    pub fn holder(&self) -> &str {
        &self.holder
    }

    /// The lease's key in the bucket.
    pub fn key(name: &str) -> Result<String, LeaseError> {
        keys::encode_key(name).map_err(|source| LeaseError::Name {
            name: name.to_string(),
            source,
        })
    }

    /// The lease as it stands, whoever holds it, with its revision; `None` when nobody does.
    pub async fn current(&self, name: &str) -> Result<Option<(Lease, u64)>, LeaseError> {
        Ok(self.records.get(&Self::key(name)?).await?)
    }

    /// Takes the lease when it is free or expired; `None` when a live lease is held, by another
    /// holder or by this one (a live lease is renewed with [`Leases::renew`], never taken twice).
    pub async fn try_acquire(&self, name: &str, ttl: Duration) -> Result<Option<Held>, LeaseError> {
        let (now, expires) = times(ttl)?;
        let key = Self::key(name)?;
        let lease = Lease {
            holder: self.holder.clone(),
            acquired_at: Some(now),
            renewed_at: Some(now),
            expires_at: Some(expires),
        };
        let written = match self.records.get(&key).await? {
            None => self.records.create(&key, &lease).await,
            Some((held, _)) if !expired(&held, &now) => return Ok(None),
            Some((_, revision)) => self.records.update(&key, &lease, revision).await,
        };
        match written {
            Ok(revision) => Ok(Some(Held {
                name: name.to_string(),
                key,
                revision,
                lease,
            })),
            // Another holder got there first.
            Err(RecordError::Exists { .. } | RecordError::Conflict { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Extends a held lease by `ttl` from now. `Lost` when it changed since `held` was written:
    /// its holder must stop the work, since another may be doing it.
    pub async fn renew(&self, held: &Held, ttl: Duration) -> Result<Held, LeaseError> {
        let (now, expires) = times(ttl)?;
        let lease = Lease {
            renewed_at: Some(now),
            expires_at: Some(expires),
            ..held.lease.clone()
        };
        match self.records.update(&held.key, &lease, held.revision).await {
            Ok(revision) => Ok(Held {
                revision,
                lease,
                ..held.clone()
            }),
            Err(RecordError::Conflict { .. }) => Err(lost(held)),
            Err(e) => Err(e.into()),
        }
    }

    /// Gives a held lease up, so another holder can take it at once. `Lost` when it had changed
    /// already (then there is nothing of this holder's to give up).
    pub async fn release(&self, held: Held) -> Result<(), LeaseError> {
        match self
            .records
            .store()
            .delete_expect_revision(&held.key, Some(held.revision))
            .await
        {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == kv::DeleteErrorKind::WrongLastRevision => Err(lost(&held)),
            Err(e) => Err(RecordError::Store {
                key: held.key.clone(),
                message: e.to_string(),
            }
            .into()),
        }
    }

    /// Ends the lease whoever holds it, for work that was stopped from elsewhere (`relay.stop`):
    /// its holder finds the lease lost at its next renewal.
    pub async fn revoke(&self, name: &str) -> Result<(), LeaseError> {
        let key = Self::key(name)?;
        self.records
            .store()
            .delete(&key)
            .await
            .map_err(|e| RecordError::Store {
                key,
                message: e.to_string(),
            })?;
        Ok(())
    }
}

fn lost(held: &Held) -> LeaseError {
    LeaseError::Lost {
        name: held.name.clone(),
        revision: held.revision,
    }
}

/// A lease without an expiry (written by something else) counts as expired: nobody can tell how
/// long it was meant to hold.
fn expired(lease: &Lease, now: &pbjson_types::Timestamp) -> bool {
    lease
        .expires_at
        .as_ref()
        .is_none_or(|t| (t.seconds, t.nanos) <= (now.seconds, now.nanos))
}

/// Now, and `ttl` from now.
fn times(ttl: Duration) -> Result<(pbjson_types::Timestamp, pbjson_types::Timestamp), LeaseError> {
    let now = SystemTime::now();
    let expires = now
        .checked_add(ttl)
        .filter(|_| !ttl.is_zero())
        .ok_or(LeaseError::Ttl(ttl))?;
    Ok((timestamp(now), timestamp(expires)))
}

fn timestamp(t: SystemTime) -> pbjson_types::Timestamp {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    pbjson_types::Timestamp {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}
