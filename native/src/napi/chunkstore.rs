//! Binding of the chunk store's object storage (`chunkstore::s3`): the object operations the
//! TypeScript side needs for manifests, `store.json`, list, prune and delete.
//!
//! One S3 client per distinct options, kept in a small cache (a client holds a connection pool:
//! building one per call would open a connection per call).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use napi::bindgen_prelude::Buffer;
use napi_derive::napi;

use super::error::IntoNapi;
use super::{to_js, to_u64};
use crate::chunkstore::s3::{RetryOptions, S3Objects, S3Options};
use crate::chunkstore::{ObjectMeta, Objects};

/// Where a chunk store is and how to reach it.
#[napi(object)]
#[derive(Clone)]
pub struct ChunkStoreOptions {
    /// `https://host[:port]`, or `http://…` with `allowHttp`; absent: AWS S3 of `region`.
    pub endpoint: Option<String>,
    /// Default `us-east-1`.
    pub region: Option<String>,
    pub bucket: String,
    /// The store's keys live under `prefix/`; default none.
    pub prefix: Option<String>,
    /// `bucket.host` addressing instead of path style (the default).
    pub virtual_hosted: Option<bool>,
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: Option<String>,
    /// PEM file of certificate authorities to trust besides the system's.
    pub ca_file: Option<String>,
    /// Trust exactly the server certificate with this SHA-256 fingerprint (`AB:CD:…`, 32 bytes),
    /// nothing else; excludes `caFile`.
    pub fingerprint: Option<String>,
    /// Required for an `http://` endpoint.
    pub allow_http: Option<bool>,
    /// No retry starts after this long since a request's first attempt (default 60 000).
    pub retry_timeout_ms: Option<i64>,
    /// Retries of one request at most (default 100; the retry timeout is the bound that matters).
    pub max_retries: Option<u32>,
    /// First backoff between retries (default 100), doubling up to `maxBackoffMs` (default 5000).
    pub init_backoff_ms: Option<i64>,
    pub max_backoff_ms: Option<i64>,
    /// Longest one request may take (default 120 000).
    pub request_timeout_ms: Option<i64>,
    /// Longest wait for a connection (default 5000).
    pub connect_timeout_ms: Option<i64>,
    /// The store's key file, for backup and restore (the object operations do not use it).
    pub key_file: Option<String>,
}

/// One object of a listing.
#[napi(object)]
pub struct ChunkStoreObject {
    /// Relative to the store's prefix.
    pub key: String,
    pub size: i64,
    /// Unix seconds.
    pub modified: i64,
}

fn millis(v: Option<i64>, default: Duration, what: &str) -> napi::Result<Duration> {
    match v {
        None => Ok(default),
        Some(ms) => Ok(Duration::from_millis(to_u64(ms, what)?)),
    }
}

fn s3_options(o: &ChunkStoreOptions) -> napi::Result<S3Options> {
    let d = S3Options::default();
    let r = RetryOptions::default();
    Ok(S3Options {
        endpoint: o.endpoint.clone(),
        region: o.region.clone().unwrap_or(d.region),
        bucket: o.bucket.clone(),
        prefix: o.prefix.clone().unwrap_or_default(),
        virtual_hosted: o.virtual_hosted.unwrap_or(false),
        access_key_id: o.access_key_id.clone(),
        secret_access_key: o.secret_access_key.clone(),
        session_token: o.session_token.clone(),
        ca_file: o.ca_file.clone().map(Into::into),
        fingerprint: o.fingerprint.clone(),
        allow_http: o.allow_http.unwrap_or(false),
        retry: RetryOptions {
            timeout: millis(o.retry_timeout_ms, r.timeout, "retryTimeoutMs")?,
            max_retries: o.max_retries.map_or(r.max_retries, |n| n as usize),
            init_backoff: millis(o.init_backoff_ms, r.init_backoff, "initBackoffMs")?,
            max_backoff: millis(o.max_backoff_ms, r.max_backoff, "maxBackoffMs")?,
        },
        request_timeout: millis(o.request_timeout_ms, d.request_timeout, "requestTimeoutMs")?,
        connect_timeout: millis(o.connect_timeout_ms, d.connect_timeout, "connectTimeoutMs")?,
    })
}

/// Clients by their options; cleared when it grows past a few entries.
static CLIENTS: Mutex<Option<HashMap<S3Options, Arc<S3Objects>>>> = Mutex::new(None);
const MAX_CLIENTS: usize = 16;

/// The client for `options`, from the cache or new.
pub(crate) fn objects(options: &ChunkStoreOptions) -> napi::Result<Arc<S3Objects>> {
    let s3 = s3_options(options)?;
    // a poisoned lock only means another call panicked while holding it: the map is intact
    let mut guard = CLIENTS.lock().unwrap_or_else(|p| p.into_inner());
    let map = guard.get_or_insert_with(HashMap::new);
    if let Some(client) = map.get(&s3) {
        return Ok(client.clone());
    }
    let client = Arc::new(S3Objects::new(&s3).napi()?);
    if map.len() >= MAX_CLIENTS {
        map.clear();
    }
    map.insert(s3, client.clone());
    Ok(client)
}

fn object_to_js(m: ObjectMeta) -> ChunkStoreObject {
    ChunkStoreObject {
        key: m.key,
        size: to_js(m.size),
        modified: m.modified,
    }
}

/// Stores `data` under `key` (relative to the store's prefix), replacing what was there.
#[napi]
pub async fn chunk_store_put(
    options: ChunkStoreOptions,
    key: String,
    data: Buffer,
) -> napi::Result<()> {
    let store = objects(&options)?;
    let data = Bytes::from(Vec::from(data));
    store.put(&key, data).await.napi()
}

/// The object's bytes, or null when there is no such object.
#[napi]
pub async fn chunk_store_get(
    options: ChunkStoreOptions,
    key: String,
) -> napi::Result<Option<Buffer>> {
    let store = objects(&options)?;
    let data = store.get(&key).await.napi()?;
    Ok(data.map(|d| Buffer::from(Vec::from(d))))
}

/// The object's size and time, or null when there is no such object.
#[napi]
pub async fn chunk_store_head(
    options: ChunkStoreOptions,
    key: String,
) -> napi::Result<Option<ChunkStoreObject>> {
    let store = objects(&options)?;
    Ok(store.head(&key).await.napi()?.map(object_to_js))
}

/// Every object whose key starts with `prefix` (a plain string prefix), in any order.
#[napi]
pub async fn chunk_store_list(
    options: ChunkStoreOptions,
    prefix: String,
) -> napi::Result<Vec<ChunkStoreObject>> {
    let store = objects(&options)?;
    let list = store.list(&prefix).await.napi()?;
    Ok(list.into_iter().map(object_to_js).collect())
}

/// Of the chunks a previous backup's index names (`digests`: 32 bytes each, concatenated), those
/// an incremental backup must not take as stored, concatenated the same way: the fossils among
/// them, found by one listing of `fossils/` (a `head` per chunk when there are too many
/// fossils). Call it after the backup's writer record is written (docs/chunk-store.md, "The
/// check of the previous index").
#[napi]
pub async fn chunk_store_missing_chunks(
    options: ChunkStoreOptions,
    digests: Buffer,
) -> napi::Result<Buffer> {
    if !digests.len().is_multiple_of(32) {
        return Err(crate::error::Error::invalid_argument(format!(
            "digests: {} bytes is not a whole number of 32-byte digests",
            digests.len()
        )))
        .napi();
    }
    let store = objects(&options)?;
    let all = digests.chunks_exact(32).filter_map(|d| d.try_into().ok());
    let missing = crate::chunkstore::backup::missing_chunks(
        &*store,
        all,
        0,
        &tokio_util::sync::CancellationToken::new(),
    )
    .await
    .napi()?;
    Ok(Buffer::from(missing.concat()))
}

/// Removes the object; a missing object is not an error.
#[napi]
pub async fn chunk_store_delete(options: ChunkStoreOptions, key: String) -> napi::Result<()> {
    let store = objects(&options)?;
    store.delete(&key).await.napi()
}

/// Copies `from` to `to` on the store's side, replacing `to`; false when `from` does not exist.
#[napi]
pub async fn chunk_store_copy(
    options: ChunkStoreOptions,
    from: String,
    to: String,
) -> napi::Result<bool> {
    let store = objects(&options)?;
    store.copy(&from, &to).await.napi()
}
