//! The chunk store (docs/chunk-store.md): content-addressed chunks on object storage.
//!
//! `format` encodes and checks chunk objects and indexes (pure); `key` holds a store key and
//! its derived keys; `objects` is the one storage trait the rest sees, with `s3` (object storage
//! through the `object_store` crate) and `memory` (unit tests) behind it; `sink` is the backup
//! sink (dirty extents in, chunks out); `restore` writes a disk back from its index.
//! Only `s3` knows about S3.

pub mod backup;
pub mod format;
pub mod key;
pub mod memory;
pub mod restore;
pub mod s3;
pub mod sink;

use async_trait::async_trait;
use bytes::Bytes;

use crate::error::Result;

/// One object of a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectMeta {
    /// Key relative to the store's prefix (`chunks/ab/cd/abcd…`).
    pub key: String,
    pub size: u64,
    /// Last modification, Unix seconds (what the server reports).
    pub modified: i64,
}

/// Object storage under one prefix: every key is relative to it.
///
/// Implementations retry what is worth retrying (connection errors, 5xx, throttling) with
/// backoff, then fail with a typed error: `ERR_STORE_UNAVAILABLE` (the endpoint does not answer
/// or keeps failing), `ERR_STORE_ACCESS` (credentials refused, 403), `ERR_STORE_NOT_FOUND`
/// (a missing bucket; a missing object is `Ok(None)` from `get`/`head`), `ERR_STORE_FULL`
/// (quota exceeded).
#[async_trait]
pub trait Objects: Send + Sync {
    /// Stores `data` under `key`, replacing what was there. Returns when the store acknowledged it.
    async fn put(&self, key: &str, data: Bytes) -> Result<()>;
    /// The object's bytes, or `None` when there is no such object.
    async fn get(&self, key: &str) -> Result<Option<Bytes>>;
    /// The object's metadata, or `None` when there is no such object.
    async fn head(&self, key: &str) -> Result<Option<ObjectMeta>>;
    /// Every object whose key starts with `prefix`, in any order (paginated internally).
    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>>;
    /// Removes the object; removing a missing object is not an error.
    async fn delete(&self, key: &str) -> Result<()>;
}
