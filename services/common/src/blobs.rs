//! Values past the KV limit (plans, model outputs) live in the `slipway_blobs` Object Store
//! bucket; a record holds a `BlobRef` to one (bucket, name, size, SHA-256). A read checks the blob
//! against its reference, so a blob replaced or corrupted since the reference was written is
//! refused rather than taken for the value the record meant.
//!
//! The bucket's `max_age` is its retention: a blob past it reads as missing, so a record must not
//! need its blob for longer than that. Names are the writer's (any text); name a blob after the
//! fact it holds (`<run>:<step>:plan`) so that a repeated write replaces it with the same bytes.

use async_nats::jetstream::object_store::{self, ObjectStore};
use bytes::Bytes;
use sha2::{Digest, Sha256};
use slipway_proto::v1::BlobRef;
use tokio::io::AsyncReadExt;

#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    #[error("a blob must be named")]
    NoName,
    #[error(
        "blob `{name}` is not in bucket `{bucket}` (past the bucket's retention, deleted, or never written)"
    )]
    Missing { bucket: String, name: String },
    #[error("blob `{name}` is referenced in bucket `{expected}`, but this store is `{found}`")]
    WrongBucket {
        name: String,
        expected: String,
        found: String,
    },
    #[error("blob `{name}` holds {found} bytes; its reference says {expected}")]
    Size {
        name: String,
        expected: u64,
        found: u64,
    },
    #[error(
        "blob `{name}` does not match its reference's SHA-256 (changed or corrupted since it was written)"
    )]
    Digest { name: String },
    #[error("object store, blob `{name}`: {message}")]
    Store { name: String, message: String },
}

/// The blobs of one Object Store bucket.
#[derive(Clone)]
pub struct Blobs {
    store: ObjectStore,
}

impl Blobs {
    pub fn new(store: ObjectStore) -> Self {
        Self { store }
    }

    /// Stores `value` under `name` (replacing what the name held) and returns its reference.
    pub async fn put(&self, name: &str, value: &[u8]) -> Result<BlobRef, BlobError> {
        if name.is_empty() {
            return Err(BlobError::NoName);
        }
        let mut reader = value;
        let info = self
            .store
            .put(name, &mut reader)
            .await
            .map_err(|e| store_err(name, e))?;
        Ok(BlobRef {
            bucket: info.bucket,
            name: name.to_string(),
            size: value.len() as u64,
            sha256: sha256_hex(value),
        })
    }

    /// Reads the blob a reference names, refusing one whose bucket, size or digest differ.
    pub async fn get(&self, blob: &BlobRef) -> Result<Bytes, BlobError> {
        if blob.name.is_empty() {
            return Err(BlobError::NoName);
        }
        let name = &blob.name;
        let missing = || BlobError::Missing {
            bucket: blob.bucket.clone(),
            name: name.clone(),
        };
        let mut object = self.store.get(name).await.map_err(|e| match e.kind() {
            object_store::GetErrorKind::NotFound => missing(),
            _ => store_err(name, e),
        })?;
        if object.info.bucket != blob.bucket {
            return Err(BlobError::WrongBucket {
                name: name.clone(),
                expected: blob.bucket.clone(),
                found: object.info.bucket.clone(),
            });
        }
        // Checked before reading, so a replaced blob of another size is not read at all.
        let size_err = |found: u64| BlobError::Size {
            name: name.clone(),
            expected: blob.size,
            found,
        };
        if object.info.size as u64 != blob.size {
            return Err(size_err(object.info.size as u64));
        }
        let capacity = usize::try_from(blob.size).map_err(|_| size_err(blob.size))?;
        let mut value = Vec::with_capacity(capacity);
        (&mut object)
            .take(blob.size.saturating_add(1))
            .read_to_end(&mut value)
            .await
            .map_err(|e| store_err(name, e))?;
        if value.len() as u64 != blob.size {
            return Err(size_err(value.len() as u64));
        }
        if !sha256_hex(&value).eq_ignore_ascii_case(&blob.sha256) {
            return Err(BlobError::Digest { name: name.clone() });
        }
        Ok(value.into())
    }
}

fn sha256_hex(value: &[u8]) -> String {
    Sha256::digest(value)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn store_err(name: &str, e: impl std::fmt::Display) -> BlobError {
    BlobError::Store {
        name: name.to_string(),
        message: e.to_string(),
    }
}
