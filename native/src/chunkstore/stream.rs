//! A byte stream (a container's tar stream) into the chunk store and back, with a dynamic
//! index (`.didx`, docs/chunk-store.md).
//!
//! **Backup.** The stream is read (from a pipe or a file, any `AsyncRead`) into a buffer of the
//! chunker's maximum size and cut by FastCDC v2020 (the `fastcdc` crate's `cut`, the function
//! its `StreamCDC` calls, with the same masks, normalization level 1 and seed 0: average 4 MiB,
//! minimum 1 MiB, maximum 16 MiB), so an unchanged stretch of the stream keeps its cut points
//! and chunks around an edit are the only new ones. Each chunk is hashed (keyed with the store's
//! key) and handed to the one upload path of chunks ([`ChunkUploader`]: known digests, `head`,
//! encode, put), at most `uploads` at once. Memory: the read buffer plus `uploads` chunks (each
//! at most 16 MiB, plus its encoded copy). When the stream ends, every upload has finished and
//! the `.didx` is written; on failure or cancellation no index is written (chunks already
//! uploaded stay, as garbage for the next collection).
//!
//! **Restore.** The index's chunks are fetched in parallel (at most `fetches` at once, through
//! [`get_chunk`], which also finds fossils), decoded and checked against their digests and
//! their lengths in the index, and written in stream order into an `AsyncWrite` (the tar
//! extractor's stdin, or a file). A damaged or missing chunk fails with `ERR_BACKUP_CORRUPT`
//! naming it and the index; nothing after it is written, so the reader sees the stream end
//! early. A reader that closes its end early (GNU tar stops at the end-of-archive blocks) ends
//! the restore without error but with `reader_closed`: whether that was complete is the
//! reader's to say (tar's exit status).

use std::collections::HashSet;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::format::DynamicIndex;
use super::key::{self, Digest, StoreKey};
use super::sink::{ChunkUploader, Stored, DEFAULT_UPLOADS};
use super::{fetch_chunk, fetch_pacing, Objects};
use crate::engine::Progress;
use crate::error::{Error, Result};
use crate::ratelimit::RateLimiter;

/// The chunker's average chunk size (4 MiB), as the index records it.
pub const AVERAGE_CHUNK: u32 = 4 << 20;
/// No chunk is shorter, except the stream's last.
pub const MINIMUM_CHUNK: u32 = 1 << 20;
/// No chunk is longer (the format's largest chunk).
pub const MAXIMUM_CHUNK: u32 = super::format::MAX_CHUNK_SIZE;
/// Chunks fetched at once by a restore when the caller does not say.
pub const DEFAULT_FETCHES: usize = 4;
/// How often progress is reported.
const PROGRESS_INTERVAL: Duration = Duration::from_millis(250);

/// The content-defined chunker: FastCDC v2020 with fixed parameters (a change of any of them
/// moves every cut point, so they are part of the format: docs/chunk-store.md).
#[derive(Debug, Clone, Copy)]
pub struct Chunker {
    min: usize,
    avg: usize,
    max: usize,
    mask_s: u64,
    mask_l: u64,
}

impl Chunker {
    /// The store's chunker (average 4 MiB, minimum 1 MiB, maximum 16 MiB).
    pub fn new() -> Chunker {
        Chunker::sized(MINIMUM_CHUNK, AVERAGE_CHUNK, MAXIMUM_CHUNK)
    }

    /// Other sizes (tests): within the crate's bounds (`fastcdc::v2020::MINIMUM_MIN` …), each
    /// even; the crate's mask table has no entry for others.
    #[cfg(test)]
    pub fn with_sizes(min: u32, avg: u32, max: u32) -> Chunker {
        Chunker::sized(min, avg, max)
    }

    fn sized(min: u32, avg: u32, max: u32) -> Chunker {
        use fastcdc::v2020::{select_masks, Normalization};
        let (min, avg, max) = (min as usize, avg as usize, max as usize);
        let (mask_s, mask_l) = select_masks(avg, Normalization::Level1);
        Chunker {
            min,
            avg,
            max,
            mask_s,
            mask_l,
        }
    }

    /// The length of the next chunk at the start of `data`: `data` holds at least `max` bytes,
    /// or all that is left of the stream.
    fn cut(&self, data: &[u8]) -> usize {
        let (_, end) = fastcdc::v2020::cut(
            data,
            self.min,
            self.avg,
            self.max,
            self.mask_s,
            self.mask_l,
            self.mask_s << 1,
            self.mask_l << 1,
        );
        end
    }
}

impl Default for Chunker {
    fn default() -> Self {
        Chunker::new()
    }
}

/// How a stream backup writes.
pub struct StreamBackupOptions {
    pub objects: Arc<dyn Objects>,
    /// The store's key, when it has one (checked against `store.json` by the caller).
    pub key: Option<Arc<StoreKey>>,
    /// Key of the `.didx` object, relative to the store's prefix.
    pub index_key: String,
    /// Digests known to exist in the store (the previous backup's index, checked): not uploaded.
    pub known: HashSet<Digest>,
    /// Ask the store (`head`) for the other chunks before uploading them.
    pub dedup_by_head: bool,
    /// Chunks hashed, encoded or uploaded at once (0: the sink's default).
    pub uploads: usize,
    /// Bytes per second read from the stream; `None` or 0: no limit.
    pub bandwidth_limit: Option<u64>,
    /// The chunker (tests use small chunks; backups [`Chunker::new`]).
    pub chunker: Chunker,
    pub cancel: CancellationToken,
    /// Called about every 250 ms and once at the end; `total` is the bytes read so far.
    pub progress: Option<Box<dyn Fn(Progress) + Send + Sync>>,
}

/// What a stream backup did.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct StreamBackupSummary {
    pub index_key: String,
    /// SHA-256 of the index object, lower-case hex (for the manifest).
    pub index_sha256: String,
    pub index_size: u64,
    /// The stream's length.
    pub length: u64,
    pub chunks: u64,
    pub uploaded: u64,
    /// Chunks the store had already (known, sent earlier in this run, or found by `head`).
    pub reused: u64,
    /// Bytes of the chunk objects uploaded, and their plain bytes.
    pub bytes_uploaded: u64,
    pub bytes_plain_uploaded: u64,
    pub seconds: f64,
}

fn report(progress: &Option<Box<dyn Fn(Progress) + Send + Sync>>, done: u64, started: Instant) {
    if let Some(p) = progress {
        let secs = started.elapsed().as_secs_f64();
        p(Progress {
            done,
            total: done,
            bytes_per_second: if secs > 0.0 { done as f64 / secs } else { 0.0 },
        });
    }
}

type Upload = (usize, Digest, Stored);

/// Backs up the stream `reader` (until its end) into `options.objects`: chunks, then the index.
pub async fn backup_stream<R: AsyncRead + Unpin>(
    mut reader: R,
    options: StreamBackupOptions,
) -> Result<StreamBackupSummary> {
    let started = Instant::now();
    let uploader = Arc::new(ChunkUploader::new(
        options.objects.clone(),
        options.key.clone(),
        options.known,
        options.dedup_by_head,
    ));
    let uploads = match options.uploads {
        0 => DEFAULT_UPLOADS,
        n => n,
    };
    let limiter = options
        .bandwidth_limit
        .filter(|&b| b > 0)
        .map(RateLimiter::new);
    let chunker = options.chunker;
    let cancel = &options.cancel;
    let mut summary = StreamBackupSummary::default();
    let mut ends: Vec<u64> = Vec::new();
    let mut digests: Vec<Option<Digest>> = Vec::new();
    let mut tasks: JoinSet<Result<Upload>> = JoinSet::new();
    let mut buf: Vec<u8> = Vec::with_capacity(chunker.max);
    let mut eof = false;
    let mut last_report = Instant::now();
    loop {
        // fill to the chunker's maximum (or the stream's end) before cutting, as StreamCDC does
        while !eof && buf.len() < chunker.max {
            buf.reserve(chunker.max - buf.len());
            let n = tokio::select! {
                biased;
                _ = cancel.cancelled() => return Err(abort(&mut tasks, Error::cancelled()).await),
                n = reader.read_buf(&mut buf) => match n {
                    Ok(n) => n,
                    Err(e) => {
                        let e = Error::io("reading the stream", e);
                        return Err(abort(&mut tasks, e).await);
                    }
                },
            };
            if n == 0 {
                eof = true;
                break;
            }
            summary.length += n as u64;
            if let Some(l) = &limiter {
                tokio::select! {
                    biased;
                    _ = cancel.cancelled() => return Err(abort(&mut tasks, Error::cancelled()).await),
                    _ = l.acquire(n as u64) => {}
                }
            }
            if last_report.elapsed() >= PROGRESS_INTERVAL {
                last_report = Instant::now();
                report(&options.progress, summary.length, started);
            }
        }
        if buf.is_empty() {
            break;
        }
        let count = chunker.cut(&buf).clamp(1, buf.len());
        let data = buf[..count].to_vec();
        buf.drain(..count);
        let end = ends.last().copied().unwrap_or(0) + count as u64;
        ends.push(end);
        digests.push(None);
        while tasks.len() >= uploads {
            if let Some(joined) = tasks.join_next().await {
                if let Err(e) = settle(joined, &mut digests, &mut summary) {
                    return Err(abort(&mut tasks, e).await);
                }
            }
        }
        tasks.spawn(upload_chunk(uploader.clone(), ends.len() - 1, data));
        while let Some(joined) = tasks.try_join_next() {
            if let Err(e) = settle(joined, &mut digests, &mut summary) {
                return Err(abort(&mut tasks, e).await);
            }
        }
    }
    while let Some(joined) = tokio::select! {
        biased;
        _ = cancel.cancelled() => return Err(abort(&mut tasks, Error::cancelled()).await),
        j = tasks.join_next() => j,
    } {
        if let Err(e) = settle(joined, &mut digests, &mut summary) {
            return Err(abort(&mut tasks, e).await);
        }
    }
    let mut entries = Vec::with_capacity(ends.len());
    for (i, (end, d)) in ends.iter().zip(&digests).enumerate() {
        let d = d.ok_or_else(|| Error::sink(format!("chunk {i} of the stream has no digest")))?;
        entries.push((*end, d));
    }
    let index = DynamicIndex {
        length: summary.length,
        average_chunk_size: chunker.avg as u32,
        entries,
    };
    let encoded = index.encode();
    summary.chunks = ends.len() as u64;
    summary.index_sha256 = key::hex(&Sha256::digest(&encoded));
    summary.index_size = encoded.len() as u64;
    summary.index_key = options.index_key.clone();
    if cancel.is_cancelled() {
        return Err(Error::cancelled());
    }
    options
        .objects
        .put(&options.index_key, Bytes::from(encoded))
        .await?;
    summary.seconds = started.elapsed().as_secs_f64();
    report(&options.progress, summary.length, started);
    Ok(summary)
}

/// Hashes chunk `i` (off the runtime's threads) and stores it.
async fn upload_chunk(uploader: Arc<ChunkUploader>, i: usize, data: Vec<u8>) -> Result<Upload> {
    let key = uploader.key().cloned();
    let (digest, data) =
        tokio::task::spawn_blocking(move || (key::digest(key.as_deref(), &data), data))
            .await
            .map_err(|e| Error::sink(format!("hashing chunk {i} of the stream: {e}")))?;
    let stored = uploader.store(digest, data).await?;
    Ok((i, digest, stored))
}

fn settle(
    joined: std::result::Result<Result<Upload>, tokio::task::JoinError>,
    digests: &mut [Option<Digest>],
    summary: &mut StreamBackupSummary,
) -> Result<()> {
    let (i, digest, stored) =
        joined.map_err(|e| Error::sink(format!("a chunk upload task failed: {e}")))??;
    digests[i] = Some(digest);
    match stored {
        Stored::Uploaded { stored, plain } => {
            summary.uploaded += 1;
            summary.bytes_uploaded += stored;
            summary.bytes_plain_uploaded += plain;
        }
        Stored::Reused => summary.reused += 1,
    }
    Ok(())
}

/// Stops the uploads in flight (their chunks, if stored, stay as garbage) and returns `err`.
async fn abort(tasks: &mut JoinSet<Result<Upload>>, err: Error) -> Error {
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
    err
}

/// How a stream restore reads and writes.
pub struct StreamRestoreOptions {
    pub objects: Arc<dyn Objects>,
    /// The stream's index, decoded (and so checked).
    pub index: DynamicIndex,
    /// The index's name, for messages (its key in the store).
    pub index_name: String,
    /// The store's key, when it has one (the caller checked its fingerprint).
    pub key: Option<Arc<StoreKey>>,
    /// Chunks fetched at once (0: [`DEFAULT_FETCHES`]).
    pub fetches: usize,
    /// Bytes per second fetched from the store (stored size); `None` or 0: no limit.
    pub bandwidth_limit: Option<u64>,
    pub cancel: CancellationToken,
    /// Called about every 250 ms, and once at the end.
    pub progress: Option<Box<dyn Fn(Progress) + Send + Sync>>,
}

/// What a stream restore did.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct StreamRestoreSummary {
    /// The stream's length (from the index).
    pub length: u64,
    /// Bytes written (the length, unless the reader closed its end first).
    pub written: u64,
    /// Bytes of chunk objects fetched.
    pub bytes_read: u64,
    /// The reader closed its end before the stream's end (a broken pipe).
    pub reader_closed: bool,
    pub seconds: f64,
}

/// Writes the stream of `options.index` into `writer`, checked chunk by chunk; shuts the writer
/// down at the end (closing a pipe: the reader sees the end of the stream).
pub async fn restore_stream<W: AsyncWrite + Unpin>(
    mut writer: W,
    options: StreamRestoreOptions,
) -> Result<StreamRestoreSummary> {
    let started = Instant::now();
    let index = Arc::new(options.index);
    let (fetches, limiter) =
        fetch_pacing(options.fetches, DEFAULT_FETCHES, options.bandwidth_limit);
    let name: Arc<str> = options.index_name.into();
    let mut summary = StreamRestoreSummary {
        length: index.length,
        ..Default::default()
    };
    let mut work = futures::stream::iter(0..index.entries.len())
        .map(|i| {
            fetch_entry(
                options.objects.clone(),
                index.clone(),
                name.clone(),
                options.key.clone(),
                limiter.clone(),
                i,
            )
        })
        .buffered(fetches);
    let mut last = Instant::now();
    loop {
        let next = tokio::select! {
            biased;
            _ = options.cancel.cancelled() => return Err(Error::cancelled()),
            next = work.next() => next,
        };
        let Some(chunk) = next else { break };
        let (plain, read) = chunk?;
        summary.bytes_read += read;
        let written = tokio::select! {
            biased;
            _ = options.cancel.cancelled() => return Err(Error::cancelled()),
            w = writer.write_all(&plain) => w,
        };
        match written {
            Ok(()) => summary.written += plain.len() as u64,
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {
                summary.reader_closed = true;
                break;
            }
            Err(e) => return Err(Error::sink_io("writing the stream", e)),
        }
        if last.elapsed() >= PROGRESS_INTERVAL {
            last = Instant::now();
            report_restore(&options.progress, &summary, started);
        }
    }
    drop(work);
    if !summary.reader_closed {
        match writer.shutdown().await {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => summary.reader_closed = true,
            Err(e) => return Err(Error::sink_io("closing the stream", e)),
        }
    }
    summary.seconds = started.elapsed().as_secs_f64();
    report_restore(&options.progress, &summary, started);
    Ok(summary)
}

fn report_restore(
    progress: &Option<Box<dyn Fn(Progress) + Send + Sync>>,
    s: &StreamRestoreSummary,
    started: Instant,
) {
    if let Some(p) = progress {
        let secs = started.elapsed().as_secs_f64();
        p(Progress {
            done: s.written,
            total: s.length,
            bytes_per_second: if secs > 0.0 {
                s.written as f64 / secs
            } else {
                0.0
            },
        });
    }
}

/// Fetches chunk `i` of the index and checks it: its plain content and the bytes fetched.
async fn fetch_entry(
    objects: Arc<dyn Objects>,
    index: Arc<DynamicIndex>,
    index_name: Arc<str>,
    key: Option<Arc<StoreKey>>,
    limiter: Option<Arc<RateLimiter>>,
    i: usize,
) -> Result<(Vec<u8>, u64)> {
    let (end, digest) = index.entries[i];
    let start = if i == 0 { 0 } else { index.entries[i - 1].0 };
    fetch_chunk(
        objects.as_ref(),
        digest,
        end - start,
        key,
        limiter.as_deref(),
        format!("chunk {i} of {index_name} [{start}, {end})"),
    )
    .await
}

/// A readable stream over a file descriptor this process owns: a pipe's read end (read
/// without blocking a thread) or a regular file. Must be called inside the runtime.
pub fn fd_reader(fd: OwnedFd) -> Result<Box<dyn AsyncRead + Unpin + Send>> {
    let file = std::fs::File::from(fd);
    if is_fifo(&file)? {
        let pipe = tokio::net::unix::pipe::Receiver::from_file(file)
            .map_err(|e| Error::io("opening the stream's pipe", e))?;
        return Ok(Box::new(pipe));
    }
    Ok(Box::new(tokio::fs::File::from_std(file)))
}

/// A writable stream over a file descriptor this process owns: a pipe's write end or a
/// regular file. Must be called inside the runtime.
pub fn fd_writer(fd: OwnedFd) -> Result<Box<dyn AsyncWrite + Unpin + Send>> {
    let file = std::fs::File::from(fd);
    if is_fifo(&file)? {
        let pipe = tokio::net::unix::pipe::Sender::from_file(file)
            .map_err(|e| Error::sink_io("opening the stream's pipe", e))?;
        return Ok(Box::new(pipe));
    }
    Ok(Box::new(tokio::fs::File::from_std(file)))
}

fn is_fifo(file: &std::fs::File) -> Result<bool> {
    use std::os::unix::fs::FileTypeExt;
    let meta = file
        .metadata()
        .map_err(|e| Error::io("inspecting the stream's file descriptor", e))?;
    Ok(meta.file_type().is_fifo())
}

#[cfg(test)]
mod tests;
