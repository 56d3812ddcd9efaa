//! Restore of one disk from its fixed index into a raw target, straight from the chunks.
//!
//! Follows `crate::restore`'s conventions for targets: a regular file (created 0600 if missing,
//! sized to the disk; the caller names it `.partial` and renames it on success) or a block
//! device of at least the disk's size. Chunks are fetched in parallel (at most `fetches` at
//! once, each holding one chunk), every one decoded and checked against its digest
//! (`ERR_BACKUP_CORRUPT` naming the chunk and the index; a missing chunk is corrupt too),
//! written with `pwrite`; zero chunks (and all-zero 64 KiB blocks of a chunk) stay holes on a
//! target that reads as zeros (`zeroed`), and are zeroed otherwise. The target is
//! fdatasync-ed at the end. On error or cancellation the target holds a partial restore, which
//! the caller removes.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use super::format::{FixedIndex, ZERO_DIGEST};
use super::key::StoreKey;
use super::{fetch_chunk, fetch_pacing, Objects};
use crate::engine::Progress;
use crate::error::{Error, Result};
use crate::ratelimit::RateLimiter;
use crate::restore::{open_target, write_sparse, zero_range, RestoreSummary, Target};

/// Chunks fetched at once when the caller does not say.
pub const DEFAULT_FETCHES: usize = 4;
/// How often progress is reported.
const PROGRESS_INTERVAL: Duration = Duration::from_millis(250);
/// Granularity of the holes left inside a chunk on a zeroed target.
const HOLE_BLOCK: usize = 64 << 10;

/// What to restore where.
pub struct ChunkRestoreOptions {
    pub objects: Arc<dyn Objects>,
    /// The disk's index, decoded (and so checked).
    pub index: FixedIndex,
    /// The index's name, for messages (its key in the store).
    pub index_name: String,
    /// The store's key, when it has one (the caller checked its fingerprint).
    pub key: Option<Arc<StoreKey>>,
    /// A regular file (created 0600 if missing) or a block device.
    pub target: PathBuf,
    /// The target already reads as zeros (a fresh file): zero ranges are left alone.
    pub zeroed: bool,
    /// Chunks fetched at once (0: [`DEFAULT_FETCHES`]).
    pub fetches: usize,
    /// Bytes per second fetched from the store (stored size); `None` or 0: no limit.
    pub bandwidth_limit: Option<u64>,
    pub cancel: CancellationToken,
    /// Called about every 250 ms, and once at the end.
    pub progress: Option<Box<dyn Fn(Progress) + Send + Sync>>,
}

/// What one chunk did.
#[derive(Default)]
struct Done {
    plain: u64,
    data: u64,
    zero: u64,
    read: u64,
}

/// Restores the disk; returns when the target is synced.
pub async fn restore(options: ChunkRestoreOptions) -> Result<RestoreSummary> {
    let started = Instant::now();
    let index = Arc::new(options.index);
    if index.chunk_size == 0 {
        return Err(Error::corrupt(format!(
            "{}: chunk size 0",
            options.index_name
        )));
    }
    let target = {
        let path = options.target.clone();
        let size = index.size;
        tokio::task::spawn_blocking(move || open_target(&path, size))
            .await
            .map_err(|e| Error::sink(format!("opening the target: {e}")))??
    };
    let target = Arc::new(target);
    let (fetches, limiter) =
        fetch_pacing(options.fetches, DEFAULT_FETCHES, options.bandwidth_limit);
    let index_name: Arc<str> = options.index_name.into();
    let n = index.digests.len() as u64;
    let mut work = futures::stream::iter(0..n)
        .map(|i| {
            restore_chunk(
                options.objects.clone(),
                index.clone(),
                index_name.clone(),
                options.key.clone(),
                target.clone(),
                options.zeroed,
                limiter.clone(),
                i,
            )
        })
        .buffer_unordered(fetches);
    let mut total = Done::default();
    let mut last = Instant::now();
    let report = |done: u64| {
        if let Some(p) = &options.progress {
            let secs = started.elapsed().as_secs_f64();
            p(Progress {
                done,
                total: index.size,
                bytes_per_second: if secs > 0.0 { done as f64 / secs } else { 0.0 },
            });
        }
    };
    loop {
        let next = tokio::select! {
            biased;
            _ = options.cancel.cancelled() => return Err(Error::cancelled()),
            next = work.next() => next,
        };
        let Some(done) = next else { break };
        let done = done?;
        total.plain += done.plain;
        total.data += done.data;
        total.zero += done.zero;
        total.read += done.read;
        if last.elapsed() >= PROGRESS_INTERVAL {
            last = Instant::now();
            report(total.plain);
        }
    }
    drop(work);
    let t = target.clone();
    tokio::task::spawn_blocking(move || {
        t.file
            .sync_data()
            .map_err(|e| Error::sink_io(format!("syncing {}", t.path.display()), e))
    })
    .await
    .map_err(|e| Error::sink(format!("syncing the target: {e}")))??;
    report(total.plain);
    Ok(RestoreSummary {
        bytes: index.size,
        bytes_data: total.data,
        bytes_zero: total.zero,
        bytes_read: total.read,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Fetches, checks and writes chunk `i`.
#[allow(clippy::too_many_arguments)]
async fn restore_chunk(
    objects: Arc<dyn Objects>,
    index: Arc<FixedIndex>,
    index_name: Arc<str>,
    key: Option<Arc<StoreKey>>,
    target: Arc<Target>,
    zeroed: bool,
    limiter: Option<Arc<RateLimiter>>,
    i: u64,
) -> Result<Done> {
    let (start, end) = index.chunk_range(i);
    let len = end - start;
    let digest = index.digests[i as usize];
    if digest == ZERO_DIGEST {
        if !zeroed {
            blocking(move || zero_range(&target, start, len)).await?;
        }
        return Ok(Done {
            plain: len,
            zero: len,
            ..Default::default()
        });
    }
    let (plain, read) = fetch_chunk(
        objects.as_ref(),
        digest,
        len,
        key,
        limiter.as_deref(),
        format!("chunk {i} of {index_name}"),
    )
    .await?;
    blocking(move || {
        let (data, zero) = write_sparse(&target, start, &plain, HOLE_BLOCK, zeroed)?;
        Ok(Done {
            plain: len,
            data,
            zero,
            read,
        })
    })
    .await
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::sink(format!("a restore task failed: {e}")))?
}

#[cfg(test)]
mod tests;
