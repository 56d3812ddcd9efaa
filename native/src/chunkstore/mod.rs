//! The chunk store (docs/chunk-store.md): content-addressed chunks on object storage.
//!
//! `format` encodes and checks chunk objects and indexes (pure); `key` holds a store key and
//! its derived keys; `objects` is the one storage trait the rest sees, with `s3` (object storage
//! through the `object_store` crate) and `memory` (unit tests) behind it; `sink` is the backup
//! sink (dirty extents in, chunks out); `restore` writes a disk back from its index; `verify`
//! checks the chunks backups need; `disk` reads one from its chunks for the NBD server.
//! Only `s3` knows about S3.

pub mod backup;
pub mod disk;
pub mod format;
pub mod key;
pub mod memory;
pub mod pin;
pub mod restore;
pub mod s3;
pub mod sink;
pub mod stream;
pub mod verify;

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

use crate::error::{Error, Result};
use crate::ratelimit::RateLimiter;

/// One object of a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectMeta {
    /// Key relative to the store's prefix (`chunks/ab/cd/abcd…`).
    pub key: String,
    pub size: u64,
    /// Last modification, Unix seconds (what the server reports).
    pub modified: i64,
}

/// The most keys one listing page holds (S3 `ListObjectsV2` answers at most 1000 whatever is
/// asked): how [`Objects::list_limited`] pages, and how its callers count a listing's cost.
pub const LIST_PAGE: usize = 1000;

/// Object storage under one prefix: every key is relative to it.
///
/// Implementations retry what is worth retrying (connection errors, 5xx, throttling) with
/// backoff, then fail with a typed error: `ERR_STORE_UNAVAILABLE` (the endpoint does not answer
/// or keeps failing), `ERR_STORE_ACCESS` (credentials refused, 403), `ERR_STORE_NOT_FOUND`
/// (a missing bucket; a missing object is `Ok(None)` from `get`/`head`), `ERR_STORE_FULL`
/// (quota exceeded), `ERR_STORE_CERTIFICATE` (TLS refused the server's certificate: not the
/// pinned one, at once, or not trusted).
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
    /// At most `max_keys` objects whose key starts with `prefix` (S3: pages of at most 1000,
    /// stopping once `max_keys` are listed), and whether that was every one of them (`false`:
    /// the listing stopped at the bound). For a listing whose cost must stay bounded.
    async fn list_limited(&self, prefix: &str, max_keys: usize) -> Result<(Vec<ObjectMeta>, bool)>;
    /// Removes the object; removing a missing object is not an error.
    async fn delete(&self, key: &str) -> Result<()>;
    /// Copies `from` to `to` on the store's side (S3 `CopyObject`), replacing `to`. `false`
    /// when there is no object `from`.
    async fn copy(&self, from: &str, to: &str) -> Result<bool>;
}

/// The stored object of the chunk named `digest`: `chunks/…`, or, when that is missing, one of
/// its fossils (`fossils/…`: a garbage collection moved it there and has not yet decided;
/// docs/chunk-store.md, "Garbage collection"). `None` when neither exists. Every reader of
/// chunks (restore, verify, the NBD server) fetches through this.
pub async fn get_chunk(objects: &dyn Objects, digest: &key::Digest) -> Result<Option<Bytes>> {
    if let Some(object) = objects.get(&format::chunk_key(digest)).await? {
        return Ok(Some(object));
    }
    for fossil in objects.list(&format::fossil_prefix(digest)).await? {
        if let Some(object) = objects.get(&fossil.key).await? {
            return Ok(Some(object));
        }
    }
    Ok(None)
}

/// A chunk a reader needs, whole and checked: fetched through [`get_chunk`] (a fossil too), the
/// bytes fetched paid to `limiter`, then decoded off the runtime (header, tag, digest) and its
/// plain length checked against `len`. `what` names it in errors (`chunk 3 of <index>`); a
/// missing or damaged chunk is `ERR_BACKUP_CORRUPT` naming its object, a wrong key the key's
/// code. Returns the plain content and the bytes fetched. Restore, the stream restore and the
/// NBD server's disk read chunks through this; verify, which reports instead of failing, uses
/// [`get_chunk`] and `decode_chunk` itself.
pub async fn fetch_chunk(
    objects: &dyn Objects,
    digest: key::Digest,
    len: u64,
    key: Option<Arc<key::StoreKey>>,
    limiter: Option<&RateLimiter>,
    what: String,
) -> Result<(Vec<u8>, u64)> {
    let name = format::chunk_key(&digest);
    let Some(object) = get_chunk(objects, &digest).await? else {
        return Err(Error::corrupt(format!("{name} is missing ({what})")));
    };
    let read = object.len() as u64;
    if let Some(l) = limiter {
        l.acquire(read).await;
    }
    let failed = format!("decoding {name}");
    tokio::task::spawn_blocking(move || {
        // the error names the chunk object; its code says what is wrong (corrupt, key)
        let plain = format::decode_chunk(&object, &digest, key.as_deref())?;
        if plain.len() as u64 != len {
            return Err(Error::corrupt(format!(
                "{name} holds {} bytes, {what} is {len}",
                plain.len()
            )));
        }
        Ok((plain, read))
    })
    .await
    .map_err(|e| Error::sink(format!("{failed}: {e}")))?
}

/// Most chunks a reader (restore, stream restore, verify) fetches at once, whatever it is asked.
pub const MAX_FETCHES: usize = 64;

/// How a reader of chunks paces its fetches: `fetches` at once (0: the reader's `default`; at
/// most [`MAX_FETCHES`]), and a limiter of `bandwidth_limit` bytes per second of stored size
/// (`None` or 0: none), shared by its fetches.
pub fn fetch_pacing(
    fetches: usize,
    default: usize,
    bandwidth_limit: Option<u64>,
) -> (usize, Option<Arc<RateLimiter>>) {
    let fetches = match fetches {
        0 => default,
        n => n.min(MAX_FETCHES),
    };
    let limiter = bandwidth_limit
        .filter(|&b| b > 0)
        .map(|b| Arc::new(RateLimiter::new(b)));
    (fetches, limiter)
}

/// The fixed index stored at `key`, decoded (and so checked); a missing one is corrupt (a
/// manifest or the caller named it).
pub async fn load_fixed_index(objects: &dyn Objects, key: &str) -> Result<format::FixedIndex> {
    let data = objects.get(key).await?.ok_or_else(|| {
        crate::error::Error::corrupt(format!("index {key} is missing from the store"))
    })?;
    format::FixedIndex::decode(key, &data)
}

#[cfg(test)]
mod tests {
    use super::format::{chunk_key, fossil_prefix};
    use super::memory::MemoryObjects;
    use super::*;

    #[tokio::test]
    async fn a_chunk_is_read_from_its_fossil_when_it_was_moved() -> Result<()> {
        let objects = MemoryObjects::new();
        let (here, moved, gone) = ([1u8; 32], [2u8; 32], [3u8; 32]);
        objects
            .put(&chunk_key(&here), Bytes::from_static(b"here"))
            .await?;
        let fossil = format!("{}c1", fossil_prefix(&moved));
        objects.put(&fossil, Bytes::from_static(b"moved")).await?;
        assert_eq!(
            get_chunk(&objects, &here).await?.as_deref(),
            Some(&b"here"[..])
        );
        assert_eq!(
            get_chunk(&objects, &moved).await?.as_deref(),
            Some(&b"moved"[..])
        );
        assert_eq!(get_chunk(&objects, &gone).await?, None);
        assert!(fossil.starts_with("fossils/02/02/0202"));
        assert!(objects.copy(&fossil, &chunk_key(&moved)).await?);
        assert!(!objects.copy(&chunk_key(&gone), "x").await?);
        Ok(())
    }
}
