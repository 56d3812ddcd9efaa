//! Binding of a chunk backup (`chunkstore::backup`) and a chunk restore
//! (`chunkstore::restore`) as jobs, in the pattern of `copy.rs`: options in, progress out
//! through a weak threadsafe function, `cancel()` and `wait()` on the returned handle. Plus the
//! store's key files.
//!
//! The key file is loaded here and checked against the fingerprint the caller read from
//! `store.json` before anything is read or written (`ERR_KEY_REQUIRED`, `ERR_KEY_MISMATCH`).

use std::collections::HashSet;
use std::sync::Arc;

use napi::bindgen_prelude::Buffer;
use napi::threadsafe_function::{ThreadsafeFunction, ThreadsafeFunctionCallMode};
use napi::Status;
use napi_derive::napi;
use tokio::sync::{oneshot, Mutex};
use tokio_util::sync::CancellationToken;

use super::chunkstore::{objects, ChunkStoreOptions};
use super::copy::NativeProgress;
use super::error::{to_napi, IntoNapi};
use super::{to_js, to_u64};
use crate::chunkstore::backup::{self, BackupOptions, BackupSummary, DEFAULT_CHECKS};
use crate::chunkstore::format::{self, DynamicIndex, FixedIndex};
use crate::chunkstore::key::{self, StoreKey};
use crate::chunkstore::restore::{self, ChunkRestoreOptions};
use crate::chunkstore::stream::{
    self, Chunker, StreamBackupOptions, StreamBackupSummary, StreamRestoreOptions,
    StreamRestoreSummary,
};
use crate::chunkstore::{load_fixed_index, Objects};
use crate::engine::Progress;
use crate::error::{Error, Result};
use crate::restore::RestoreSummary;

type ProgressFn = ThreadsafeFunction<NativeProgress, (), NativeProgress, Status, false, true>;

#[napi(object)]
pub struct ChunkBackupOptions {
    pub store: ChunkStoreOptions,
    /// The key fingerprint `store.json` records, checked against the key file's before anything
    /// is read; absent: not checked here (the caller compared them).
    pub store_fingerprint: Option<String>,
    /// The NBD export to back up.
    pub uri: String,
    /// Where the index goes, relative to the store's prefix (`backups/…/<device>.fidx`).
    pub index_key: String,
    /// The previous backup's index of this disk (a key in the store): its chunks are reused as
    /// they are. The caller checked them (`chunkStoreMissingChunks`, after its writer record was
    /// written: docs/chunk-store.md, "The check of the previous index") before it asked QEMU for
    /// an incremental export, which can only be read where it is dirty.
    pub previous_index_key: Option<String>,
    /// With `previousIndexKey`: read only the areas dirty in this bitmap.
    pub bitmap: Option<String>,
    /// From `store.json` (default 4 MiB).
    pub chunk_size: Option<u32>,
    /// TRIM what the store holds, each range once its chunk is uploaded (a fleecing snapshot only).
    pub discard: Option<bool>,
    pub bandwidth_limit: Option<i64>,
    /// Ask the store for chunks not known to exist before uploading (dedup by hash).
    pub dedup_by_head: Option<bool>,
    /// Chunks hashed, encoded or uploaded at once.
    pub uploads: Option<u32>,
    /// Complete chunks dirty in part from the previous backup (restricted snapshot exports).
    pub fill_from_previous: Option<bool>,
    pub connections: Option<u32>,
    pub request_timeout_ms: Option<i64>,
}

#[napi(object)]
pub struct ChunkBackupSummary {
    pub bytes_total: i64,
    pub bytes_read: i64,
    pub seconds: f64,
    pub index_key: String,
    /// SHA-256 of the index object (for the manifest).
    pub index_sha256: String,
    pub index_size: i64,
    pub chunks: i64,
    pub uploaded: i64,
    pub reused: i64,
    pub zero: i64,
    pub unchanged: i64,
    pub completed: i64,
}

#[napi(object)]
pub struct ChunkRestoreOptionsJs {
    pub store: ChunkStoreOptions,
    /// As for a backup.
    pub store_fingerprint: Option<String>,
    /// The disk's index, relative to the store's prefix.
    pub index_key: String,
    /// A regular file (created 0600 if missing) or a block device.
    pub target: String,
    /// The target already reads as zeros (a fresh file): zero ranges stay holes.
    pub zeroed: Option<bool>,
    /// Chunks fetched at once (default 4).
    pub fetches: Option<u32>,
    pub bandwidth_limit: Option<i64>,
}

#[napi(object)]
pub struct ChunkRestoreSummary {
    pub bytes: i64,
    pub bytes_data: i64,
    pub bytes_zero: i64,
    pub bytes_read: i64,
    pub seconds: f64,
}

/// Where a job's result arrives, taken once by `wait()`.
pub(super) type Handle<T> = Mutex<Option<oneshot::Receiver<Result<T>>>>;

/// A running chunk backup: `wait()` resolves with its summary, `cancel()` stops it.
#[napi]
pub struct NativeChunkBackupJob {
    cancel: CancellationToken,
    handle: Handle<BackupSummary>,
}

/// A running chunk restore: `wait()` resolves once the target is synced, `cancel()` stops it.
#[napi]
pub struct NativeChunkRestoreJob {
    cancel: CancellationToken,
    handle: Handle<RestoreSummary>,
}

/// The key of `options.keyFile`, checked against the store's fingerprint when the caller gives
/// it (absent: the caller checked `store.json` itself).
pub(super) fn store_key(
    store: &ChunkStoreOptions,
    fingerprint: Option<&str>,
) -> Result<Option<Arc<StoreKey>>> {
    let key = match &store.key_file {
        Some(path) => Some(key::load_key_file(path.as_ref())?),
        None => None,
    };
    if let Some(fingerprint) = fingerprint {
        key::check_fingerprint(Some(fingerprint), key.as_ref())?;
    }
    Ok(key.map(Arc::new))
}

fn reporter(on_progress: Option<ProgressFn>) -> impl Fn(Progress) + Send + Sync + 'static {
    move |p: Progress| {
        if let Some(f) = &on_progress {
            let value = NativeProgress {
                done: to_js(p.done),
                total: to_js(p.total),
                bytes_per_second: p.bytes_per_second,
            };
            f.call(value, ThreadsafeFunctionCallMode::NonBlocking);
        }
    }
}

/// Runs `work` on napi's tokio runtime; the result arrives on the returned channel.
pub(super) fn spawn_work<T, F>(work: F) -> oneshot::Receiver<Result<T>>
where
    T: Send + 'static,
    F: std::future::Future<Output = Result<T>> + Send + 'static,
{
    let (done, result) = oneshot::channel();
    napi::bindgen_prelude::spawn(async move {
        // the receiver is gone only when the JS object was collected: nobody wants the result
        let _ = done.send(work.await);
    });
    result
}

/// The result of a job's channel, once.
pub(super) async fn take<T>(handle: &Handle<T>) -> napi::Result<T> {
    let Some(handle) = handle.lock().await.take() else {
        return Err(to_napi(Error::invalid_argument(
            "wait() was already called",
        )));
    };
    match handle.await {
        Ok(result) => result.napi(),
        Err(_) => Err(to_napi(Error::sink("chunk job ended without a result"))),
    }
}

/// Starts a chunk backup of an NBD export into the store.
#[napi]
pub fn start_chunk_backup(
    options: ChunkBackupOptions,
    on_progress: Option<ProgressFn>,
) -> napi::Result<NativeChunkBackupJob> {
    let objects: Arc<dyn Objects> = objects(&options.store)?;
    let bandwidth_limit = match options.bandwidth_limit {
        Some(v) => Some(to_u64(v, "bandwidthLimit")?).filter(|&b| b > 0),
        None => None,
    };
    let request_timeout = match options.request_timeout_ms {
        None => Some(crate::nbd::DEFAULT_REQUEST_TIMEOUT),
        Some(ms) => Some(std::time::Duration::from_millis(to_u64(
            ms,
            "requestTimeoutMs",
        )?))
        .filter(|t| !t.is_zero()),
    };
    let key = store_key(&options.store, options.store_fingerprint.as_deref()).napi()?;
    let cancel = CancellationToken::new();
    let token = cancel.clone();
    let report = reporter(on_progress);
    let work = async move {
        let previous = match &options.previous_index_key {
            Some(key) => Some(load_fixed_index(&*objects, key).await?),
            None => None,
        };
        let known: HashSet<_> = previous
            .as_ref()
            .map(|p: &FixedIndex| p.digests.iter().copied().collect())
            .unwrap_or_default();
        backup::backup(
            BackupOptions {
                uri: options.uri,
                bitmap: options.bitmap,
                dirty: None,
                previous,
                known,
                key,
                chunk_size: options.chunk_size.unwrap_or(0),
                discard: options.discard.unwrap_or(false),
                bandwidth_limit,
                dedup_by_head: options.dedup_by_head.unwrap_or(false),
                index_key: options.index_key,
                uploads: options.uploads.unwrap_or(0) as usize,
                fill_from_previous: options.fill_from_previous.unwrap_or(false),
                connections: options.connections.unwrap_or(0) as usize,
                request_timeout,
            },
            objects,
            &report,
            &token,
        )
        .await
    };
    Ok(NativeChunkBackupJob {
        cancel,
        handle: Mutex::new(Some(spawn_work(work))),
    })
}

/// Starts restoring one disk from its index into a raw target.
#[napi]
pub fn start_chunk_restore(
    options: ChunkRestoreOptionsJs,
    on_progress: Option<ProgressFn>,
) -> napi::Result<NativeChunkRestoreJob> {
    let objects: Arc<dyn Objects> = objects(&options.store)?;
    let bandwidth_limit = match options.bandwidth_limit {
        Some(v) => Some(to_u64(v, "bandwidthLimit")?).filter(|&b| b > 0),
        None => None,
    };
    let key = store_key(&options.store, options.store_fingerprint.as_deref()).napi()?;
    let cancel = CancellationToken::new();
    let token = cancel.clone();
    let work = async move {
        let index = tokio::select! {
            biased;
            _ = token.cancelled() => return Err(Error::cancelled()),
            index = load_fixed_index(&*objects, &options.index_key) => index?,
        };
        let summary = restore::restore(ChunkRestoreOptions {
            objects,
            index,
            index_name: options.index_key,
            key,
            target: options.target.into(),
            zeroed: options.zeroed.unwrap_or(false),
            fetches: options.fetches.unwrap_or(0) as usize,
            bandwidth_limit,
            cancel: token,
            progress: Some(Box::new(reporter(on_progress))),
        })
        .await?;
        Ok(summary)
    };
    Ok(NativeChunkRestoreJob {
        cancel,
        handle: Mutex::new(Some(spawn_work(work))),
    })
}

#[napi]
impl NativeChunkBackupJob {
    /// Stops the backup (no index is written); `wait()` then rejects with `ERR_CANCELLED`.
    #[napi]
    pub fn cancel(&self) {
        self.cancel.cancel();
    }

    /// The backup's summary once every chunk and the index are stored; rejects with its error.
    #[napi]
    pub async fn wait(&self) -> napi::Result<ChunkBackupSummary> {
        let s = take(&self.handle).await?;
        Ok(ChunkBackupSummary {
            bytes_total: to_js(s.copy.bytes_total),
            bytes_read: to_js(s.copy.bytes_read),
            seconds: s.copy.seconds,
            index_key: s.chunks.index_key,
            index_sha256: s.chunks.index_sha256,
            index_size: to_js(s.chunks.index_size),
            chunks: to_js(s.chunks.chunks),
            uploaded: to_js(s.chunks.uploaded),
            reused: to_js(s.chunks.reused),
            zero: to_js(s.chunks.zero),
            unchanged: to_js(s.chunks.unchanged),
            completed: to_js(s.chunks.completed),
        })
    }
}

#[napi]
impl NativeChunkRestoreJob {
    /// Stops the restore (the target holds a partial restore); `wait()` then rejects with
    /// `ERR_CANCELLED`.
    #[napi]
    pub fn cancel(&self) {
        self.cancel.cancel();
    }

    /// The restore's summary once the target is synced; rejects with its error.
    #[napi]
    pub async fn wait(&self) -> napi::Result<ChunkRestoreSummary> {
        let s = take(&self.handle).await?;
        Ok(ChunkRestoreSummary {
            bytes: to_js(s.bytes),
            bytes_data: to_js(s.bytes_data),
            bytes_zero: to_js(s.bytes_zero),
            bytes_read: to_js(s.bytes_read),
            seconds: s.seconds,
        })
    }
}

/// Creates a key file (mode 0600, never overwriting) with a fresh key; returns its fingerprint.
#[napi]
pub fn create_key_file(path: String) -> napi::Result<String> {
    let key = key::create_key_file(path.as_ref()).napi()?;
    Ok(key.fingerprint().to_string())
}

/// The fingerprint of a key file's key (what `store.json` and manifests record).
#[napi]
pub fn key_fingerprint(path: String) -> napi::Result<String> {
    let key = key::load_key_file(path.as_ref()).napi()?;
    Ok(key.fingerprint().to_string())
}

/// HMAC-SHA256 of `data` under the key file's id key, lower-case hex (a manifest's signature).
#[napi]
pub fn key_sign(path: String, data: Buffer) -> napi::Result<String> {
    let key = key::load_key_file(path.as_ref()).napi()?;
    Ok(key::hex(&key.sign(&data)))
}

/// A small file of a backup (a configuration, the task log) as a chunk object: compressed when
/// that saves space, encrypted with the key file's key when one is given.
#[napi]
pub fn encode_blob(data: Buffer, key_file: Option<String>) -> napi::Result<Buffer> {
    let key = load_optional_key(key_file)?;
    Ok(format::encode_blob(&data, key.as_ref()).napi()?.into())
}

/// Decodes and checks a blob written by [`encode_blob`]; `name` (its object key) names it in errors.
#[napi]
pub fn decode_blob(object: Buffer, key_file: Option<String>, name: String) -> napi::Result<Buffer> {
    let key = load_optional_key(key_file)?;
    Ok(format::decode_blob(&name, &object, key.as_ref())
        .napi()?
        .into())
}

/// The chunks an index object (`.fidx` or `.didx`) names: its non-zero digests, 32 bytes each,
/// concatenated. `ERR_BACKUP_CORRUPT` / `ERR_BACKUP_VERSION` for an object that is not a sound index.
#[napi]
pub fn chunk_index_digests(object: Buffer, name: String) -> napi::Result<Buffer> {
    let digests = format::index_digests(&name, &object).napi()?;
    Ok(digests.concat().into())
}

fn load_optional_key(key_file: Option<String>) -> napi::Result<Option<StoreKey>> {
    key_file
        .map(|p| key::load_key_file(p.as_ref()))
        .transpose()
        .napi()
}

// ----- streams (container tar streams, `.didx`) -------------------------------------------------

#[napi(object)]
pub struct ChunkStreamBackupOptions {
    pub store: ChunkStoreOptions,
    /// As for a disk backup.
    pub store_fingerprint: Option<String>,
    /// The stream to read until its end: a pipe's read end (or a file). Owned by the job from
    /// this call on (closed when it ends, also on an error here): the caller must not close it.
    pub fd: i32,
    /// Where the `.didx` goes, relative to the store's prefix.
    pub index_key: String,
    /// The previous backup's index of this stream: its chunks that the store still holds are
    /// not uploaded again (checked with `head` first).
    pub previous_index_key: Option<String>,
    /// Ask the store for the other chunks before uploading them (default true).
    pub dedup_by_head: Option<bool>,
    /// Chunks hashed, encoded or uploaded at once.
    pub uploads: Option<u32>,
    /// Bytes per second read from the stream.
    pub bandwidth_limit: Option<i64>,
}

#[napi(object)]
pub struct ChunkStreamBackupSummary {
    /// The stream's length.
    pub length: i64,
    pub seconds: f64,
    pub index_key: String,
    pub index_sha256: String,
    pub index_size: i64,
    pub chunks: i64,
    pub uploaded: i64,
    pub reused: i64,
    pub bytes_uploaded: i64,
    /// Chunks of the previous index that are fossils (not taken as known; uploaded again if needed).
    pub previous_missing: i64,
}

#[napi(object)]
pub struct ChunkStreamRestoreOptions {
    pub store: ChunkStoreOptions,
    pub store_fingerprint: Option<String>,
    /// The stream's `.didx`, relative to the store's prefix.
    pub index_key: String,
    /// Where the stream goes: a pipe's write end (the tar extractor's stdin) or a file. Owned by
    /// the job from this call on (closed when it ends): the caller must not close it.
    pub fd: i32,
    /// Chunks fetched at once (default 4).
    pub fetches: Option<u32>,
    pub bandwidth_limit: Option<i64>,
}

#[napi(object)]
pub struct ChunkStreamRestoreSummary {
    pub length: i64,
    pub written: i64,
    pub bytes_read: i64,
    /// The reader closed its end before the stream's end (tar stops at the end-of-archive
    /// blocks): whether that was complete is the reader's exit status to say.
    pub reader_closed: bool,
    pub seconds: f64,
}

/// A running stream backup: `wait()` resolves with its summary, `cancel()` stops it.
#[napi]
pub struct NativeChunkStreamBackupJob {
    cancel: CancellationToken,
    handle: Handle<(StreamBackupSummary, u64)>,
}

/// A running stream restore: `wait()` resolves once the stream is written, `cancel()` stops it.
#[napi]
pub struct NativeChunkStreamRestoreJob {
    cancel: CancellationToken,
    handle: Handle<StreamRestoreSummary>,
}

/// Takes ownership of a file descriptor handed over by JavaScript.
fn owned_fd(fd: i32) -> napi::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: F_GETFD only asks whether `fd` is open
    if fd < 0 || unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(to_napi(Error::invalid_argument(format!(
            "fd {fd} is not an open file descriptor"
        ))));
    }
    // SAFETY: the caller hands the descriptor over (documented on the options): nothing else
    // closes it from now on
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
}

/// The `.didx` at `key`; a missing one is corrupt (a manifest or the caller named it).
async fn load_dynamic_index(objects: &dyn Objects, key: &str) -> Result<DynamicIndex> {
    let data = objects
        .get(key)
        .await?
        .ok_or_else(|| Error::corrupt(format!("index {key} is missing from the store")))?;
    DynamicIndex::decode(key, &data)
}

fn bandwidth(v: Option<i64>) -> napi::Result<Option<u64>> {
    match v {
        Some(v) => Ok(Some(to_u64(v, "bandwidthLimit")?).filter(|&b| b > 0)),
        None => Ok(None),
    }
}

/// Starts backing up a stream (read from `options.fd` until its end) into a `.didx`.
#[napi]
pub fn start_chunk_stream_backup(
    options: ChunkStreamBackupOptions,
    on_progress: Option<ProgressFn>,
) -> napi::Result<NativeChunkStreamBackupJob> {
    let fd = owned_fd(options.fd)?;
    let objects: Arc<dyn Objects> = objects(&options.store)?;
    let bandwidth_limit = bandwidth(options.bandwidth_limit)?;
    let key = store_key(&options.store, options.store_fingerprint.as_deref()).napi()?;
    let cancel = CancellationToken::new();
    let token = cancel.clone();
    let report = reporter(on_progress);
    let work = async move {
        let reader = stream::fd_reader(fd)?;
        let mut known = HashSet::new();
        let mut previous_missing = 0;
        if let Some(previous_key) = &options.previous_index_key {
            let index = load_dynamic_index(&*objects, previous_key).await?;
            let missing: HashSet<_> = backup::missing_chunks(
                &*objects,
                index.entries.iter().map(|e| e.1),
                DEFAULT_CHECKS,
                &token,
            )
            .await?
            .into_iter()
            .collect();
            previous_missing = missing.len() as u64;
            known = index
                .entries
                .iter()
                .map(|e| e.1)
                .filter(|d| !missing.contains(d))
                .collect();
        }
        let summary = stream::backup_stream(
            reader,
            StreamBackupOptions {
                objects,
                key,
                index_key: options.index_key,
                known,
                dedup_by_head: options.dedup_by_head.unwrap_or(true),
                uploads: options.uploads.unwrap_or(0) as usize,
                bandwidth_limit,
                chunker: Chunker::new(),
                cancel: token,
                progress: Some(Box::new(report)),
            },
        )
        .await?;
        Ok((summary, previous_missing))
    };
    Ok(NativeChunkStreamBackupJob {
        cancel,
        handle: Mutex::new(Some(spawn_work(work))),
    })
}

/// Starts writing the stream of a `.didx` into `options.fd`, chunks checked as they come.
#[napi]
pub fn start_chunk_stream_restore(
    options: ChunkStreamRestoreOptions,
    on_progress: Option<ProgressFn>,
) -> napi::Result<NativeChunkStreamRestoreJob> {
    let fd = owned_fd(options.fd)?;
    let objects: Arc<dyn Objects> = objects(&options.store)?;
    let bandwidth_limit = bandwidth(options.bandwidth_limit)?;
    let key = store_key(&options.store, options.store_fingerprint.as_deref()).napi()?;
    let cancel = CancellationToken::new();
    let token = cancel.clone();
    let work = async move {
        let writer = stream::fd_writer(fd)?;
        let index = tokio::select! {
            biased;
            _ = token.cancelled() => return Err(Error::cancelled()),
            index = load_dynamic_index(&*objects, &options.index_key) => index?,
        };
        stream::restore_stream(
            writer,
            StreamRestoreOptions {
                objects,
                index,
                index_name: options.index_key,
                key,
                fetches: options.fetches.unwrap_or(0) as usize,
                bandwidth_limit,
                cancel: token,
                progress: Some(Box::new(reporter(on_progress))),
            },
        )
        .await
    };
    Ok(NativeChunkStreamRestoreJob {
        cancel,
        handle: Mutex::new(Some(spawn_work(work))),
    })
}

#[napi]
impl NativeChunkStreamBackupJob {
    /// Stops the backup (no index is written); `wait()` then rejects with `ERR_CANCELLED`.
    #[napi]
    pub fn cancel(&self) {
        self.cancel.cancel();
    }

    /// The summary once every chunk and the index are stored; rejects with the error.
    #[napi]
    pub async fn wait(&self) -> napi::Result<ChunkStreamBackupSummary> {
        let (s, previous_missing) = take(&self.handle).await?;
        Ok(ChunkStreamBackupSummary {
            length: to_js(s.length),
            seconds: s.seconds,
            index_key: s.index_key,
            index_sha256: s.index_sha256,
            index_size: to_js(s.index_size),
            chunks: to_js(s.chunks),
            uploaded: to_js(s.uploaded),
            reused: to_js(s.reused),
            bytes_uploaded: to_js(s.bytes_uploaded),
            previous_missing: to_js(previous_missing),
        })
    }
}

#[napi]
impl NativeChunkStreamRestoreJob {
    /// Stops the restore (the writer's end is closed: the reader sees the stream end early);
    /// `wait()` then rejects with `ERR_CANCELLED`.
    #[napi]
    pub fn cancel(&self) {
        self.cancel.cancel();
    }

    /// The summary once the stream is written and its fd closed; rejects with the error.
    #[napi]
    pub async fn wait(&self) -> napi::Result<ChunkStreamRestoreSummary> {
        let s = take(&self.handle).await?;
        Ok(ChunkStreamRestoreSummary {
            length: to_js(s.length),
            written: to_js(s.written),
            bytes_read: to_js(s.bytes_read),
            reader_closed: s.reader_closed,
            seconds: s.seconds,
        })
    }
}

/// A pipe `[readEnd, writeEnd]`, both close-on-exec (a child gets an end only as its stdin or
/// stdout, where it is duplicated). Hand one end to a stream job and the other to tar.
#[napi]
pub fn create_pipe() -> napi::Result<Vec<i32>> {
    let mut fds = [0i32; 2];
    // SAFETY: pipe2 writes two descriptors into `fds` on success
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(to_napi(Error::io(
            "creating a pipe",
            std::io::Error::last_os_error(),
        )));
    }
    Ok(fds.to_vec())
}
