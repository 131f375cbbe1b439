//! Records in JetStream KV buckets: each wrapped in `StoredRecord` with its type and schema
//! version, and updated only against the revision it was read at, so two writers never
//! overwrite each other silently.

use async_nats::jetstream::kv;
use bytes::Bytes;
use prost::Message;
pub use slipway_proto::records::Record;
use slipway_proto::v1::StoredRecord;

#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("record `{key}` holds a `{found}`, expected `{expected}`")]
    WrongType {
        key: String,
        found: String,
        expected: String,
    },
    #[error(
        "record `{key}` was written with schema {found}; this version reads up to {supported} (upgrade this service)"
    )]
    NewerSchema {
        key: String,
        found: u32,
        supported: u32,
    },
    #[error("record `{key}` cannot be decoded: {source}")]
    Decode {
        key: String,
        #[source]
        source: prost::DecodeError,
    },
    #[error("record `{key}` changed since it was read (revision {revision})")]
    Conflict { key: String, revision: u64 },
    #[error("record `{key}` already exists")]
    Exists { key: String },
    #[error("bucket operation on `{key}`: {message}")]
    Store { key: String, message: String },
}

/// Encodes a record in its envelope.
pub fn encode<R: Record>(record: &R) -> Bytes {
    StoredRecord {
        r#type: R::full_name(),
        schema_version: R::SCHEMA_VERSION,
        payload: record.encode_to_vec(),
    }
    .encode_to_vec()
    .into()
}

/// Decodes a record from its envelope, refusing other types and newer schemas.
pub fn decode<R: Record>(key: &str, bytes: &[u8]) -> Result<R, RecordError> {
    let envelope = StoredRecord::decode(bytes).map_err(|source| RecordError::Decode {
        key: key.to_string(),
        source,
    })?;
    if envelope.r#type != R::full_name() {
        return Err(RecordError::WrongType {
            key: key.to_string(),
            found: envelope.r#type,
            expected: R::full_name(),
        });
    }
    if envelope.schema_version > R::SCHEMA_VERSION {
        return Err(RecordError::NewerSchema {
            key: key.to_string(),
            found: envelope.schema_version,
            supported: R::SCHEMA_VERSION,
        });
    }
    R::decode(envelope.payload.as_slice()).map_err(|source| RecordError::Decode {
        key: key.to_string(),
        source,
    })
}

/// A typed view of a bucket.
#[derive(Clone)]
pub struct Records<R> {
    store: kv::Store,
    _type: std::marker::PhantomData<fn() -> R>,
}

impl<R: Record> Records<R> {
    pub fn new(store: kv::Store) -> Self {
        Self {
            store,
            _type: std::marker::PhantomData,
        }
    }

    /// The bucket, for listing keys.
    pub fn store(&self) -> &kv::Store {
        &self.store
    }

    /// The record and the revision it was read at.
    pub async fn get(&self, key: &str) -> Result<Option<(R, u64)>, RecordError> {
        let entry = self.store.entry(key).await.map_err(|e| store_err(key, e))?;
        match entry {
            Some(e) if e.operation == kv::Operation::Put => {
                Ok(Some((decode(key, &e.value)?, e.revision)))
            }
            _ => Ok(None),
        }
    }

    /// Writes a new record; fails with `Exists` if the key holds one.
    pub async fn create(&self, key: &str, record: &R) -> Result<u64, RecordError> {
        self.store
            .create(key, encode(record))
            .await
            .map_err(|e| match e.kind() {
                kv::CreateErrorKind::AlreadyExists => RecordError::Exists {
                    key: key.to_string(),
                },
                _ => store_err(key, e),
            })
    }

    /// Reads the record, lets `change` edit it (answering whether there is anything to write),
    /// and writes it at the revision read; when another writer got there first, reads again and
    /// repeats. Answers the record as it stands after (`None` when there is none). The fence of
    /// every racing effect: what `change` decides, it decides on the current record.
    pub async fn modify(
        &self,
        key: &str,
        mut change: impl FnMut(&mut R) -> bool,
    ) -> Result<Option<R>, RecordError> {
        let mut revision = 0;
        for _ in 0..16 {
            let Some((mut record, read)) = self.get(key).await? else {
                return Ok(None);
            };
            revision = read;
            if !change(&mut record) {
                return Ok(Some(record));
            }
            match self.update(key, &record, read).await {
                Ok(_) => return Ok(Some(record)),
                Err(RecordError::Conflict { .. }) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(RecordError::Conflict {
            key: key.to_string(),
            revision,
        })
    }

    /// Replaces the record read at `revision`; fails with `Conflict` if it changed since.
    pub async fn update(&self, key: &str, record: &R, revision: u64) -> Result<u64, RecordError> {
        self.store
            .update(key, encode(record), revision)
            .await
            .map_err(|e| match e.kind() {
                kv::UpdateErrorKind::WrongLastRevision => RecordError::Conflict {
                    key: key.to_string(),
                    revision,
                },
                _ => store_err(key, e),
            })
    }
}

fn store_err(key: &str, e: impl std::fmt::Display) -> RecordError {
    RecordError::Store {
        key: key.to_string(),
        message: e.to_string(),
    }
}
